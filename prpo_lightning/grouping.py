"""Group statistics keyed by prompt id (never by batch position).

All functions take ``group_ids`` of shape ``(B,)`` and per-row values of shape ``(B,)`` and return per-row
statistics of shape ``(B,)``, so results are invariant to any permutation of the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary prompt ids to dense indices.

    Args:
        group_ids: ``(B,)`` integer prompt ids.

    Returns:
        ``(inverse, num_groups)`` where ``inverse`` is ``(B,)`` long in ``[0, num_groups)``.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def group_sum(values: Tensor, group_ids: Tensor) -> Tensor:
    """``(B,)`` sum of ``values`` over each row's group."""
    inverse, n = group_index(group_ids)
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)  # (n,)
    return sums[inverse]  # (B,)


def group_count(group_ids: Tensor) -> Tensor:
    """``(B,)`` float size of each row's group."""
    return group_sum(torch.ones_like(group_ids, dtype=torch.float64), group_ids)


def group_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """``(B,)`` mean of ``values`` over each row's group."""
    return group_sum(values, group_ids) / group_count(group_ids).to(values.dtype)


def group_std(values: Tensor, group_ids: Tensor, unbiased: bool = True) -> Tensor:
    """``(B,)`` standard deviation of ``values`` within each row's group.

    With ``unbiased=True`` (Bessel, as verl and TRL do) a singleton group has std 0 by definition here
    (the unbiased estimate is undefined); callers decide what a singleton's advantage is.
    """
    mean = group_mean(values, group_ids)  # (B,)
    sq = group_sum((values - mean) ** 2, group_ids)  # (B,)
    n = group_count(group_ids).to(values.dtype)  # (B,)
    denom = (n - 1).clamp(min=1) if unbiased else n
    return torch.sqrt(sq / denom)


def group_loo_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """``(B,)`` leave-one-out mean ``(Σ_g v − v_i)/(n − 1)``; 0 for singleton groups."""
    n = group_count(group_ids).to(values.dtype)
    total = group_sum(values, group_ids)
    return torch.where(n > 1, (total - values) / (n - 1).clamp(min=1), torch.zeros_like(values))


def zero_variance_fraction(values: Tensor, group_ids: Tensor) -> float:
    """Fraction of groups whose values are all equal (they carry no outcome signal)."""
    inverse, n = group_index(group_ids)
    if n == 0:
        return 0.0
    mins = torch.full((n,), float("inf"), dtype=torch.float64).scatter_reduce(
        0, inverse, values.double(), reduce="amin"
    )
    maxs = torch.full((n,), float("-inf"), dtype=torch.float64).scatter_reduce(
        0, inverse, values.double(), reduce="amax"
    )
    return float((maxs - mins <= 1e-12).double().mean().item())
