"""Sphinx configuration of the prpo-lightning documentation.

Build (warnings are errors, as in CI)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

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

# -- HTML
html_theme = "furo"
html_title = f"prpo-lightning {release}"
html_static_path = ["_static"]
html_show_sourcelink = False

# Cross-references to external projects are not resolved (no network in CI); keep unresolved references quiet.
nitpicky = False
