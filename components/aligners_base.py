"""Shared pieces of the concrete aligners: a small name registry and vectorised (B, T) helpers.

Shape legend: ``B`` completions, ``T`` padded completion length, ``S`` max segments per completion,
``n`` number of prompt groups. Everything is computed in float64 and returned as float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from prpo_lightning.aligner import AdvantageAligner
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.grouping import group_count, group_index, group_mean, group_std, group_sum

_ALIGNERS: dict[str, type[AdvantageAligner]] = {}
A = TypeVar("A", bound=type[AdvantageAligner])

#: dtype used for every advantage computation (results are cast to float32).
CALC = torch.float64


def register_aligner(name: str) -> Callable[[A], A]:
    """Class decorator: register an aligner under a short name (verl-style), e.g. ``"grpo"``.

    ``class_path`` in YAML stays the primary way to select a component; the registry lets code and tests
    build one by name with :func:`build_aligner`.

    Raises:
        ValueError: if the name is taken by another class.
    """

    def wrap(cls: A) -> A:
        if name in _ALIGNERS and _ALIGNERS[name] is not cls:
            raise ValueError(f"aligner name {name!r} is already registered to {_ALIGNERS[name].__name__}")
        _ALIGNERS[name] = cls
        return cls

    return wrap


def build_aligner(name: str, **kwargs: Any) -> AdvantageAligner:
    """Instantiate the aligner registered as ``name`` with ``kwargs``.

    Raises:
        KeyError: for an unknown name (the message lists the known ones).
    """
    if name not in _ALIGNERS:
        raise KeyError(f"unknown aligner {name!r}; known: {sorted(_ALIGNERS)}")
    return _ALIGNERS[name](**kwargs)


def aligner_names() -> list[str]:
    """Names of all registered aligners."""
    return sorted(_ALIGNERS)


def outcome_rewards(batch: RolloutBatch) -> Tensor:
    """``(B,)`` float64 outcome rewards on the mask's device.

    Raises:
        ValueError: if the batch has not been graded.
    """
    if batch.outcome_rewards is None:
        raise ValueError("the batch has no outcome_rewards: grade it with a verifier first")
    return batch.outcome_rewards.to(device=batch.completion_mask.device, dtype=CALC)


def broadcast(per_row: Tensor, mask: Tensor) -> Tensor:
    """``(B,)`` → ``(B, T)``: every valid token of row i gets ``per_row[i]``, padding 0."""
    return per_row[:, None] * mask.to(per_row.dtype)  # (B, T)


def finish(adv: Tensor, mask: Tensor) -> Tensor:
    """Zero the padding and cast to float32. ``adv``/``mask``: ``(B, T)``."""
    return torch.where(mask, adv, torch.zeros_like(adv)).to(torch.float32)  # (B, T)


def normalized_outcome(
    r: Tensor,
    group_ids: Tensor,
    std_normalize: bool = True,
    epsilon: float = 1e-6,
    unbiased: bool = True,
    min_std: float = 0.0,
) -> Tensor:
    """GRPO group normalisation ``(r_i − mean_g r)/(max(std_g r, min_std) + ε)`` (or no division).

    A zero denominator (zero-variance group with ``ε = 0`` and ``min_std = 0``) gives 0; a singleton's
    numerator is ``r_i − r_i = 0``, so singletons always get 0.

    Args:
        r: ``(B,)`` rewards.
        group_ids: ``(B,)`` prompt ids.
    """
    gid = group_ids.to(r.device)
    centred = r - group_mean(r, gid)  # (B,)
    if not std_normalize:
        return centred
    std = group_std(r, gid, unbiased=unbiased).clamp(min=min_std) + epsilon  # (B,)
    return torch.where(std > 0, centred / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(r))


def loo_baseline(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Leave-one-out mean ``(Σ_g v − v_i)/(n − 1)`` and a ``(B,)`` bool "group has ≥ 2 members" flag."""
    gid = group_ids.to(values.device)
    n = group_count(gid).to(values.dtype)  # (B,)
    loo = (group_sum(values, gid) - values) / (n - 1).clamp(min=1)  # (B,)
    return torch.where(n > 1, loo, torch.zeros_like(values)), n > 1


def group_token_sum(values: Tensor, group_ids: Tensor) -> Tensor:
    """``(B, T)`` → ``(B, T)``: for each row, the sum over the rows of its group at the same position."""
    inverse, n = group_index(group_ids.to(values.device))
    sums = torch.zeros(n, values.shape[1], dtype=values.dtype, device=values.device)  # (n, T)
    sums.index_add_(0, inverse, values)
    return sums[inverse]  # (B, T)


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """verl ``masked_whiten``: ``(x − mean)/sqrt(var_unbiased + eps)`` over all valid tokens of the batch.

    Statistics are token-weighted. With ≤ 1 valid token the values are only centred. Padding → 0.

    Args:
        values: ``(B, T)``.
        mask: ``(B, T)`` bool.
    """
    m = mask.to(values.dtype)  # (B, T)
    count = m.sum()
    if float(count) == 0:
        return torch.zeros_like(values)
    mean = (values * m).sum() / count
    var = (((values - mean) ** 2) * m).sum() / (count - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + eps) if float(count) > 1 else values - mean
    return out * m


def token_step_values(step_values: Tensor, segment_ids: Tensor) -> Tensor:
    """Broadcast ``(B, S)`` per-step values to ``(B, T)`` tokens through ``segment_ids`` (``-1`` = padding → 0)."""
    idx = segment_ids.clamp(min=0).to(step_values.device)  # (B, T)
    vals = torch.gather(step_values, 1, idx)  # (B, T)
    return torch.where(segment_ids.to(step_values.device) >= 0, vals, torch.zeros_like(vals))


def checked_steps(batch: RolloutBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Validated step tensors: ``(step_scores (B, S) float64, step_mask (B, S) bool, segment_ids (B, T))``.

    The step mask is reduced to exactly the segments each row has, and every segment must be scored.

    Raises:
        ValueError: if step scores are missing or a segment has no score.
    """
    if batch.step_scores is None or batch.step_mask is None:
        raise ValueError("this aligner needs step scores: configure a segmenter and a ProcessRewardModel")
    if len(batch.segment_spans) != batch.size:
        raise ValueError(f"batch.segment_spans has {len(batch.segment_spans)} rows, expected {batch.size}")
    dev = batch.completion_mask.device
    seg = batch.segment_ids().to(dev)  # (B, T)
    scores = batch.step_scores.to(device=dev, dtype=CALC)  # (B, S)
    smask = batch.step_mask.to(dev).bool()  # (B, S)
    counts = torch.tensor([len(r) for r in batch.segment_spans], dtype=torch.long, device=dev)  # (B,)
    if (int(counts.max()) if counts.numel() else 0) > scores.shape[1]:
        raise ValueError("a segment has no PRM score (more segments than step scores)")
    has_seg = torch.arange(scores.shape[1], device=dev)[None, :] < counts[:, None]  # (B, S)
    if bool((has_seg & ~smask).any()):
        raise ValueError("a segment has no PRM score (step_mask is False for a used segment)")
    if not bool(torch.isfinite(scores[has_seg]).all()):
        raise ValueError("PRM step scores contain NaN/inf")
    return torch.where(has_seg, scores, torch.zeros_like(scores)), has_seg, seg
