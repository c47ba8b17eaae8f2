"""prpo-lightning: critic-free RL post-training of LLMs for math reasoning, built on PyTorch Lightning.

The package is laid out in the order data flows: :mod:`prpo_lightning.data` → :mod:`prpo_lightning.rollout` →
:mod:`prpo_lightning.scoring` → :mod:`prpo_lightning.training` → :mod:`prpo_lightning.evaluation`, with
:mod:`prpo_lightning.module` (the ``LightningModule``), :mod:`prpo_lightning.config` (every run argument),
:mod:`prpo_lightning.callbacks`, :mod:`prpo_lightning.cli` and :mod:`prpo_lightning.runtime` beside them. The
component contracts are exported here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.rollout.engine import EngineCapabilities, RolloutEngine, RolloutResult, SampleRequest
from prpo_lightning.scoring.aligner import AdvantageAligner
from prpo_lightning.scoring.needs import ComponentNeeds
from prpo_lightning.scoring.prm import ProcessRewardModel, ProcessScores
from prpo_lightning.scoring.segmenter import Segmenter
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus

__all__ = [
    "AdvantageAligner",
    "ComponentNeeds",
    "EngineCapabilities",
    "OutcomeVerifier",
    "ProcessRewardModel",
    "ProcessScores",
    "RolloutBatch",
    "RolloutEngine",
    "RolloutResult",
    "SampleRequest",
    "Segmenter",
    "Verdict",
    "VerdictStatus",
]
__version__ = "0.1.0"

#: Modules of the flat layout before issue 21 and the module that holds their contents now.
MOVED_MODULES: dict[str, str] = {
    **{f"prpo_lightning.{m}": f"prpo_lightning.rollout.{m}" for m in ("engine", "decoding", "dynamic_sampling",
                                                                      "offpolicy")},
    **{f"prpo_lightning.{m}": f"prpo_lightning.scoring.{m}" for m in ("aligner", "prm", "segmenter", "verifier",
                                                                      "grouping", "shaping", "faults")},
    **{f"prpo_lightning.{m}": f"prpo_lightning.training.{m}" for m in ("losses", "logprobs", "lora",
                                                                       "refsync")},
    **{f"prpo_lightning.{m}": f"prpo_lightning.runtime.{m}" for m in ("checkpoint", "distributed", "compat",
                                                                      "models", "zero3")},
    "prpo_lightning.optim": "prpo_lightning.training.updater",
}


def _importer_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the code that ran the import (past importlib's frames)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen") or frame.f_code.co_filename == __file__):
        frame, level = frame.f_back, level + 1
    return level


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of a moved module's old path get the new module, with a deprecation warning naming it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import from there (or from prpo_lightning)", DeprecationWarning,
                      stacklevel=_importer_stacklevel())
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:
        """The module was executed under its new name."""


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
