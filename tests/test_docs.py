"""The Sphinx documentation builds with warnings as errors and documents every public class.

CI runs the same build as ``python -m sphinx -W --keep-going -b html docs docs/_build/html``; here it goes to a
temporary directory with a fresh environment (``-E``) so that stale pickles cannot hide a warning.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

pytest.importorskip("sphinx")
pytest.importorskip("furo")
pytest.importorskip("myst_parser")

import prpo_docs  # noqa: E402  (docs/_ext/prpo_docs.py)


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs_html")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"sphinx build failed (warnings are errors):\n{proc.stderr[-6000:]}"
    return out


def _inventory(html_dir: Path) -> dict[str, dict]:
    from sphinx.util.inventory import InventoryFile

    inv = InventoryFile.loads((html_dir / "objects.inv").read_bytes(), uri="")
    data = inv.data if hasattr(inv, "data") else inv
    return {kind: dict(entries) for kind, entries in data.items()}


def test_docs_build_without_warnings(built_docs: Path) -> None:
    for page in ("index", "quickstart", "concepts", "metrics", "benchmarks", "reference/config", "reference/api"):
        assert (built_docs / f"{page}.html").exists(), page


def test_every_public_class_is_documented(built_docs: Path) -> None:
    inv = _inventory(built_docs)
    documented = set(inv.get("py:class", {})) | set(inv.get("py:exception", {}))
    missing = [
        f"{cls.__module__}.{cls.__qualname__}"
        for package in ("prpo_lightning", "components")
        for module in prpo_docs.iter_modules(package)
        for cls in prpo_docs.public_classes(module)
        if f"{cls.__module__}.{cls.__qualname__}" not in documented
    ]
    assert not missing, f"public classes missing from the API reference: {missing}"


def test_one_page_per_bundled_aligner(built_docs: Path) -> None:
    from prpo_lightning.scoring.aligner import AdvantageAligner

    pages = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "aligners").glob("*.rst"))
    missing = [
        cls.__qualname__
        for cls in prpo_docs.component_classes(AdvantageAligner)
        if f"{cls.__module__}.{cls.__qualname__}" not in pages and f".{cls.__qualname__}" not in pages
    ]
    assert not missing, f"aligners without a page in docs/aligners/: {missing}"


def test_config_reference_lists_every_config_field(built_docs: Path) -> None:
    html = (built_docs / "reference" / "config.html").read_text(encoding="utf-8")
    for path in ("prpo_lightning.config.SamplingConfig", "prpo_lightning.config.LossConfig", "prpo_lightning.config.OptimConfig"):
        obj = prpo_docs.import_object(path)
        prefix = {"SamplingConfig": "model.sampling", "LossConfig": "model.loss", "OptimConfig": "model.optim"}[obj.__name__]
        for name, *_ in prpo_docs.config_rows(obj):
            assert f"{prefix}.{name}" in html, f"{prefix}.{name} missing from the configuration reference"


def test_parse_google_args() -> None:
    doc = """Summary.

    Args:
        alpha: first line
            continued here.
        beta (int): second.
        problem_key / answer_key: field names.

    Raises:
        ValueError: never documented as an argument.
    """
    args = prpo_docs.parse_google_args(doc)
    assert args == {
        "alpha": "first line continued here.",
        "beta": "second.",
        "problem_key": "field names.",
        "answer_key": "field names.",
    }


def test_config_rows_read_signature_and_docstring() -> None:
    rows = {name: (ann, default, desc) for name, ann, default, desc in prpo_docs.config_rows(importlib.import_module("prpo_lightning.config").LossConfig)}
    assert rows["eps_high"][1] == "``0.2``"
    assert "clip" in rows["eps_high"][2]


REMOTE_SCRIPT = re.compile(r"<script[^>]+src=\"(?:https?:)?//", re.IGNORECASE)
REMOTE_LINK = re.compile(r"<link[^>]+href=\"(?:https?:)?//[^\"]*\"", re.IGNORECASE)
REMOTE_CSS_URL = re.compile(r"(?:url\(\s*['\"]?|@import\s+['\"])(?:https?:)?//", re.IGNORECASE)


def test_built_html_references_no_remote_script_or_font(built_docs: Path) -> None:
    """Offline docs: every script, stylesheet and font comes from the build itself (MathJax from _static/mathjax)."""
    pages = sorted(built_docs.rglob("*.html"))
    assert pages
    remote = [(p.name, m.group(0)) for p in pages for rx in (REMOTE_SCRIPT, REMOTE_LINK)
              for m in rx.finditer(p.read_text(encoding="utf-8"))]
    assert remote == [], remote[:5]
    css = [p for p in (built_docs / "_static").rglob("*.css")]
    remote_css = [p.name for p in css if REMOTE_CSS_URL.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert remote_css == []
    math_page = (built_docs / "aligners" / "prpo.html").read_text(encoding="utf-8")
    assert 'class="math' in math_page
    assert re.search(r"<script[^>]+src=\"(\.\./)?_static/mathjax/tex-chtml\.js", math_page)
    assert (built_docs / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert list((built_docs / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
