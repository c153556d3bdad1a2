"""MkDocs hook: publish the studies' figures and tables from ``experiments/results/`` without copying them.

Every ``*.png`` and ``*.md`` file under ``experiments/results/`` becomes part of the site under
``results/files/<same path>``: the results pages show the figures and link the tables where the studies wrote them,
and ``mkdocs build --strict`` checks those links like any other. The Markdown tables are rendered as pages outside
the navigation (``not_in_nav`` in ``mkdocs.yml``).
"""
from __future__ import annotations

import os

from mkdocs.structure.files import File, Files

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "results")
PUBLISHED = (".png", ".md")
PREFIX = "results/files"


def on_files(files: Files, config) -> Files:
    for dirpath, dirnames, filenames in os.walk(RESULTS):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(PUBLISHED):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, RESULTS).replace(os.sep, "/")
            files.append(File.generated(config, f"{PREFIX}/{rel}", abs_src_path=path))
    return files
