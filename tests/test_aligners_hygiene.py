"""One implementation per helper (issue 12 item 13): one ``token_step_scores``, no unused public function."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import components.aligners_dense as aligners_dense
import components.aligners_process as aligners_process
import prpo_lightning.scoring.aligner as framework_aligner

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("prpo_lightning", "components")
#: where a public name may be used: code, tests, configs and docs of the repository
USAGE_DIRS = ("prpo_lightning", "components", "docs", "benchmarks", "scripts", "configs")
USAGE_SUFFIXES = {".py", ".yaml", ".yml", ".rst", ".md", ".toml"}
STEP_SCORE_HELPERS = {"token_step_scores", "checked_step_scores", "step_values_to_tokens"}
#: names the step-score helpers had in components before they were merged into the framework's
OLD_COPIES = {"token_prm_scores", "checked_steps", "token_step_values"}


def _top_level_functions(path: Path) -> list[str]:
    return [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)]


def _package_files() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_step_scores_are_broadcast_to_tokens_by_the_framework_only():
    """The framework's ``token_step_scores`` family is the only one; the bundled aligners import it."""
    defined = {
        (str(p.relative_to(ROOT)), name)
        for p in _package_files()
        for name in _top_level_functions(p)
        if name in STEP_SCORE_HELPERS | OLD_COPIES
    }
    assert defined == {("prpo_lightning/scoring/aligner.py", name) for name in STEP_SCORE_HELPERS}
    assert aligners_process.token_step_scores is framework_aligner.token_step_scores
    assert aligners_dense.checked_step_scores is framework_aligner.checked_step_scores


def test_every_public_function_of_the_framework_and_components_is_used():
    """A public top-level function or class that nothing references (code, tests, configs, docs) is dead code."""
    texts = {
        p: p.read_text()
        for folder in USAGE_DIRS
        if (ROOT / folder).is_dir()
        for p in (ROOT / folder).rglob("*")
        if p.suffix in USAGE_SUFFIXES and p.is_file()
    }
    unused = []
    for path in _package_files():
        for node in ast.parse(texts[path]).body:
            if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
                continue
            word = re.compile(rf"\b{re.escape(node.name)}\b")
            used_in_module = len(word.findall(texts[path])) > 1
            used_elsewhere = any(word.search(text) for other, text in texts.items() if other != path)
            if not (used_in_module or used_elsewhere):
                unused.append(f"{path.relative_to(ROOT)}::{node.name}")
    assert unused == [], f"unused public definitions (remove them or use them): {unused}"
