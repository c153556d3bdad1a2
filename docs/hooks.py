"""MkDocs hook: publish the studies' figures and tables from ``experiments/results/`` without copying them.

Every ``*.png`` and ``*.md`` file under ``experiments/results/`` becomes part of the site under
``results/files/<same path>``: the results pages show the figures and link the tables where the studies wrote them,
and ``mkdocs build --strict`` checks those links like any other. The Markdown tables are rendered as pages outside
the navigation (``not_in_nav`` in ``mkdocs.yml``).

It also reads the Sphinx cross-reference roles of the library's docstrings (``:func:`name```, ``:class:`~a.B```)
as plain code spans, so the API pages show ``name`` instead of the role's markup.
"""
from __future__ import annotations

import os
import re

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "results")
PUBLISHED = (".png", ".md")
PREFIX = "results/files"
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|const):`~?([^`]+)`")


class _SphinxRoles(Preprocessor):
    def run(self, lines):
        return [ROLE.sub(r"`\1`", line) for line in lines]


class SphinxRolesAsCode(Extension):
    def extendMarkdown(self, md):
        md.preprocessors.register(_SphinxRoles(md), "sphinx_roles_as_code", 40)


@event_priority(100)  # before mkdocstrings reads the Markdown extensions
def on_config(config):
    config.markdown_extensions.append(SphinxRolesAsCode())
    return config


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
