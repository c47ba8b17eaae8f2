"""Rollout: from a prompt batch to sampled completions (engines, samplers, dynamic sampling, off-policy checks).

Modules, in the order data flows: :mod:`~prpo_lightning.rollout.engine` (the engine interface),
:mod:`~prpo_lightning.rollout.engines` (the framework's engines on the live policy), :mod:`~prpo_lightning.rollout.sampling`
and :mod:`~prpo_lightning.rollout.decoding` (Hugging Face ``generate`` and the static-cache decoder),
:mod:`~prpo_lightning.rollout.offpolicy` (sampler-vs-trainer checks and importance weights),
:mod:`~prpo_lightning.rollout.dynamic_sampling` and :mod:`~prpo_lightning.rollout.collector` (one step's rounds).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

#: Names that ``prpo_lightning.rollout`` held when it was one module, and where they live now.
_MOVED = {name: "prpo_lightning.rollout.sampling" for name in (
    "Completions", "EntropyRecorder", "generate_completions", "generate_groups", "left_pad", "pad_token_id",
    "tokenize_prompts")}
_MOVED["SamplingConfig"] = "prpo_lightning.config"


def __getattr__(name: str) -> Any:
    """Names of the earlier ``prpo_lightning.rollout`` module keep working, with a deprecation warning."""
    if name not in _MOVED:
        raise AttributeError(f"module 'prpo_lightning.rollout' has no attribute {name!r}")
    warnings.warn(f"prpo_lightning.rollout.{name} moved to {_MOVED[name]}.{name}; import it from there",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
