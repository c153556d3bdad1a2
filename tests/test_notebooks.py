"""Execute the tour notebooks (notebooks/*.ipynb) top to bottom in their reduced mode.

Each notebook reads ``LCNN_NOTEBOOK_FAST`` in its first code cell ("1" shrinks steps, examples and iterations)
and ends with a cell of assertions on its key numeric claim, checked against an independent oracle where there
is one: the dense-Jacobian SVD and norm (01), ``|s''| <= beta/4``, the dense-matrix SVD of a spectral convolution
(= 1 to 1e-3) and bound >= measured logit-Hessian norm (02), lambda = 10 gives a smaller Lipschitz estimate than
lambda = 0, bracketed by the grid maximum of ``|f'|`` (03), exact layer traces = dense ``jax.hessian`` diagonal and
minimum / normalized sharpness invariant to 1e-5 under rescalings that move the trace by > 100x (04). Any error in
any cell, those assertions included, fails the test; the test also checks that the checks cell ran to its end and
that the fast mode was on.

The kernel is this interpreter: a ``python3`` kernel spec pointing at ``sys.executable`` is written to a temporary
``JUPYTER_PATH`` entry (which jupyter_client searches before user and system kernel directories), so a
``python3`` spec installed elsewhere for another Python cannot be picked up by mistake.
"""
import json
import os
import sys

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = ("01_measuring_smoothness", "02_lcnn_curvature_bound", "03_clip_regression_toy",
             "04_minimum_sharpness")


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernel spec for ``sys.executable``, first on the Jupyter search path."""
    spec_dir = write_kernel_spec(path=str(tmp_path / "kernels" / "python3"))
    with open(os.path.join(spec_dir, "kernel.json")) as fh:
        assert json.load(fh)["argv"][0] == sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("LCNN_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return "python3"


def test_every_notebook_is_tested():
    found = sorted(f[:-len(".ipynb")] for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
    assert found == sorted(NOTEBOOKS)


@pytest.mark.notebooks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_fast_mode_and_its_checks_pass(name, this_python_kernel):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name + ".ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:  # start from a clean slate: the stored outputs come from the full run
        cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, kernel_name=this_python_kernel, timeout=300, allow_errors=False,
                            resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    assert "FAST=True" in _stream_text(code[0]), _stream_text(code[0])
    assert "assert" in code[-1].source
    assert "all checks passed" in _stream_text(code[-1]), _stream_text(code[-1])
