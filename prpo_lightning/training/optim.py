"""Learning-rate schedule and gradient-norm helpers of the manual optimisation loop."""

from __future__ import annotations

import math

from typing import Any

import torch


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (linear warm-up, then constant/linear/cosine)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR schedule {schedule!r}; use constant, linear or cosine")


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the gradients of ``model`` (before clipping)."""
    norms = [p.grad.detach().norm(2) for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def deepspeed_engine(trainer: Any) -> Any | None:
    """The ``DeepSpeedEngine`` that wraps the module under Lightning's ``DeepSpeedStrategy``, else None."""
    strategy = getattr(trainer, "strategy", None)
    if type(strategy).__name__ != "DeepSpeedStrategy":
        return None
    return getattr(strategy, "model", None)


def engine_grad_norm(engine: Any) -> float:
    """The global gradient norm (before clipping) that a ``DeepSpeedEngine`` computed in its last ``step()``.

    Under ZeRO the gradients are partitioned and ``p.grad`` is None, so :func:`grad_norm` would read 0; DeepSpeed
    clips (its ``gradient_clipping`` setting) and records the norm itself.
    """
    value = engine.get_global_grad_norm()
    return float(value) if value is not None else float("nan")
