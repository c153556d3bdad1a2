"""The README is a front page and the docs hold the rest: the README stays short, carries the commands that CI runs
(parsed by .ci/run exactly as these tests parse them), its links resolve, its tour runs, and no prose line of the
README or the docs is wider than 120 characters.
"""
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_README_LINES = 300
MAX_WIDTH = 120

# The commands the README must carry, each the first line of the fenced block after its marker (None: any text).
COMMANDS = {
    "test-command": 'pip install -e ".[test]" && python -m pytest',
    "docs-command": 'pip install -e ".[docs]" && mkdocs build --strict',
}
MAIN_COMMAND = ("pip install -e . && lcnn-jax compare --config experiments/configs/compare_mnist5k.py "
                "--workdir runs/compare")


def _read(*parts: str) -> str:
    return open(os.path.join(ROOT, *parts), encoding="utf-8").read()


def _fenced_after(text: str, marker: str) -> str:
    """The body of the fenced block right after the line ``marker`` (blank lines between are allowed)."""
    match = re.search(r"^" + re.escape(marker) + r"[^\n]*\n\s*```\w*\n(.*?)^```", text, flags=re.S | re.M)
    assert match, f"no fenced block after {marker!r}"
    return match.group(1)


def _docs_pages() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def test_readme_is_a_front_page():
    lines = _read("README.md").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): " \
                                           "move the detail to docs/"


@pytest.mark.parametrize("marker", sorted(COMMANDS))
def test_readme_carries_the_commands_ci_runs(marker):
    text = _read("README.md")
    assert text.count(f"<!-- {marker} -->\n") == 1, f"README.md needs exactly one '<!-- {marker} -->' line"
    assert _fenced_after(text, f"<!-- {marker} -->") == COMMANDS[marker] + "\n"


def test_readme_carries_the_main_command():
    blocks = re.findall(r"^```bash\n(.*?)^```", _read("README.md"), flags=re.S | re.M)
    assert MAIN_COMMAND + "\n" in blocks, "README.md lost its install-and-compare command block"


@pytest.mark.parametrize("marker", sorted(COMMANDS))
def test_ci_parses_the_same_commands(marker):
    """.ci/run extracts each command with its own awk function; it must find what the README says."""
    script = _read(".ci", "run")
    function = re.search(r"^readme_command\(\) \{\n.*?^\}\n", script, flags=re.S | re.M)
    assert function, ".ci/run has no readme_command function"
    assert f"readme_command {marker}" in script, f".ci/run does not read the {marker}"
    out = subprocess.run(["bash", "-c", function.group(0) + f"readme_command {marker}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out == COMMANDS[marker] + "\n"
    docs = re.search(r'^bash -c "\$docs_cmd"$', script, flags=re.M)
    tests = re.search(r'^bash -c "\$cmd"$', script, flags=re.M)
    assert docs and tests and docs.start() > tests.start(), ".ci/run must run the docs command after the tests"


def test_readme_and_docs_links_resolve():
    """Relative links of the README (into docs/) and of the docs pages point to files that exist (mkdocs --strict
    checks the docs' own links too, and their anchors; this catches the README's and runs without mkdocs)."""
    missing = []
    for path in [os.path.join(ROOT, "README.md"), *_docs_pages()]:
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = target.split("#")[0]
            if os.path.relpath(path, ROOT).startswith("docs") and file.startswith("files/"):
                # the results pages link experiments/results/ files, published under results/files/ (docs/hooks.py)
                resolved = os.path.join(ROOT, "experiments", "results", file[len("files/"):])
            else:
                resolved = os.path.normpath(os.path.join(os.path.dirname(path), file))
            if not os.path.exists(resolved):
                missing.append(f"{os.path.relpath(path, ROOT)}: {target}")
    assert not missing, "links to missing files:\n" + "\n".join(missing)


def test_prose_lines_are_at_most_120_characters():
    """Every line of the README and the docs except table rows (a table of numbers may be wider)."""
    wide = []
    for path in [os.path.join(ROOT, "README.md"), *_docs_pages()]:
        for i, line in enumerate(open(path, encoding="utf-8"), 1):
            line = line.rstrip("\n")
            if len(line) > MAX_WIDTH and not line.lstrip().startswith("|"):
                wide.append(f"{os.path.relpath(path, ROOT)}:{i}: {len(line)} characters")
    assert not wide, f"lines over {MAX_WIDTH} characters:\n" + "\n".join(wide)


def _python_block(text: str, marker: str) -> str:
    return _fenced_after(text, marker)


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
def test_readme_tour_runs_and_matches_the_guide(capsys):
    tour = _python_block(_read("README.md"), "<!-- tour:")
    assert tour == _python_block(_read("docs", "guide", "measuring.md"), "<!-- tour:"), (
        "the README's tour and the copy in docs/guide/measuring.md differ")
    exec(compile(tour, "<README tour>", "exec"), {"__name__": "readme_tour"})  # noqa: S102
    printed = capsys.readouterr().out.split("\n")
    assert len([line for line in printed if line.strip()]) >= 3


def test_readme_regularizer_call_works():
    from lcnn_jax.regularizers import make_regularizer

    assert make_regularizer("spectreg", coeff=1e-3).name == "spectreg"


def test_certifying_example_runs():
    ns: dict = {"__name__": "certify_example"}
    code = _python_block(_read("docs", "guide", "certifying.md"), "<!-- certify example")
    exec(compile(code, "<docs certify example>", "exec"), ns)  # noqa: S102
    cert = ns["cert"]
    assert cert.radius.shape == (8,) and (cert.radius >= 0).all()
    assert 0.0 <= cert.accuracy(0.01) <= 1.0
