"""Scoring: from sampled completions to token advantages.

The four component contracts (:mod:`~prpo_lightning.scoring.verifier`, :mod:`~prpo_lightning.scoring.segmenter`,
:mod:`~prpo_lightning.scoring.prm`, :mod:`~prpo_lightning.scoring.aligner`) and their declared
:mod:`~prpo_lightning.scoring.needs`; the pipeline that runs them (:mod:`~prpo_lightning.scoring.pipeline`) under the
fault policy (:mod:`~prpo_lightning.scoring.faults`); exact group statistics (:mod:`~prpo_lightning.scoring.grouping`),
reward shaping and combined verifiers.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

#: Names that ``prpo_lightning.scoring`` held when it was one module (now :mod:`prpo_lightning.scoring.pipeline`).
_MOVED = ("advantage_term_metrics", "check_process_scores", "checked_terms", "compute_advantages", "grade",
          "rollout_metrics", "segment_and_score")


def __getattr__(name: str) -> Any:
    """Names of the earlier ``prpo_lightning.scoring`` module keep working, with a deprecation warning."""
    if name not in _MOVED:
        raise AttributeError(f"module 'prpo_lightning.scoring' has no attribute {name!r}")
    warnings.warn(f"prpo_lightning.scoring.{name} moved to prpo_lightning.scoring.pipeline.{name}; import it from "
                  "there", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("prpo_lightning.scoring.pipeline"), name)
