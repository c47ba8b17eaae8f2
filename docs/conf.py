"""Sphinx configuration of the prpo-lightning documentation.

Build (warnings are errors, as in CI)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # prpo_lightning and components, importable without installing
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # autodoc imports transformers; never touch the hub

import prpo_lightning  # noqa: E402

project = "prpo-lightning"
author = "prpo-lightning contributors"
copyright = "2026, prpo-lightning contributors"  # noqa: A001
release = prpo_lightning.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "myst_parser",
    "prpo_docs",  # docs/_ext/prpo_docs.py: configuration tables and per-package API pages from the code
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "howto/*.py", "README.md"]
templates_path: list[str] = []

# -- autodoc / napoleon (Google-style docstrings, Args in the class docstring, Lightning convention)
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # Lightning hooks without our own docstring would inherit Lightning's (testcode, paramref)
autodoc_class_signature = "mixed"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# -- MyST (Markdown pages: benchmarks, evaluation, scaling)
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# -- Math: MathJax 3 served from the build itself (_static/mathjax), never from a CDN, so formulas render offline.
# The files come from the pip package sphinx-mathjax-offline (a dev dependency, pinned in constraints.txt); its own
# Sphinx extension is not used, only its files.
_mathjax_spec = importlib.util.find_spec("sphinx-mathjax-offline")
if _mathjax_spec is None or not _mathjax_spec.submodule_search_locations:
    raise RuntimeError(
        "the docs need the package sphinx-mathjax-offline (MathJax files for offline math). "
        'Fix: pip install -c constraints.txt -e ".[dev]"'
    )
MATHJAX_STATIC = Path(next(iter(_mathjax_spec.submodule_search_locations))) / "static"  # holds mathjax/
mathjax_path = "mathjax/tex-chtml.js"  # relative: Sphinx serves it from _static/

# -- HTML
html_theme = "furo"
html_title = f"prpo-lightning {release}"
html_static_path = ["_static", str(MATHJAX_STATIC)]
html_show_sourcelink = False

# Cross-references to external projects are not resolved (no network in CI); keep unresolved references quiet.
nitpicky = False
