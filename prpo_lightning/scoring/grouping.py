"""Group statistics keyed by prompt id (never by batch position).

Functions take ``group_ids`` of shape ``(B,)`` and per-row values of shape ``(B,)`` (or per-token values
``(B, T)`` pooled over a mask) and return per-row statistics of shape ``(B,)``, so results are invariant to any
permutation of the batch.

**Exact zero-variance groups.** A group whose values are all equal is detected exactly (``max == min``), never
by testing a float std against 0: ``Σv/n`` rounds (``(0.1 + 0.1 + 0.1)/3 ≠ 0.1`` in float64), which leaves a
std of ~1e-17 and a z-score of ±0.8 where 0 is meant. For such a group the mean (and leave-one-out mean) is
the common value itself, so centred values are exactly 0 and the std is exactly 0, in every dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class GroupMoments(NamedTuple):
    """Per-row statistics of the row's group from :func:`group_moments`, each ``(B,)`` (floats in the values'
    dtype)."""

    #: number of (pooled) values in the group.
    count: Tensor
    #: their mean: exactly the common value when all are equal; 0 for a group with no values.
    mean: Tensor
    #: their standard deviation: exactly 0 when all are equal (singletons included).
    std: Tensor
    #: bool, True where all the group's values are exactly equal (or it has none).
    constant: Tensor


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
    """``(B,)`` sum of ``values`` over each row's group (``values`` ``(B,)``, or ``(B, T)`` summed per position)."""
    inverse, n = group_index(group_ids.to(values.device))
    sums = torch.zeros(n, *values.shape[1:], dtype=values.dtype, device=values.device)  # (n, ...)
    return sums.index_add_(0, inverse, values)[inverse]  # (B, ...)


def group_count(group_ids: Tensor) -> Tensor:
    """``(B,)`` float size of each row's group."""
    return group_sum(torch.ones_like(group_ids, dtype=torch.float64), group_ids)


def _per_group_extreme(values: Tensor, inverse: Tensor, n: int, reduce: str) -> Tensor:
    """``(n, ...)`` ``amin``/``amax`` of ``(B, ...)`` values over each dense group index (±inf for none)."""
    fill = float("inf") if reduce == "amin" else float("-inf")
    out = torch.full((n, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)  # (n, ...)
    index = inverse.view(-1, *([1] * (values.dim() - 1))).expand_as(values)  # (B, ...)
    return out.scatter_reduce(0, index, values, reduce=reduce)  # (n, ...)


def _scatter_extreme(values: Tensor, group_ids: Tensor, reduce: str) -> Tensor:
    """``(B, ...)``: for each row, the ``amin``/``amax`` of ``(B, ...)`` values over its group."""
    inverse, n = group_index(group_ids.to(values.device))
    return _per_group_extreme(values, inverse, n, reduce)[inverse]  # (B, ...)


def _row_total(values: Tensor) -> Tensor:
    """``(B,)`` → itself; ``(B, T)`` → its row sums ``(B,)``."""
    return values.sum(dim=1) if values.dim() == 2 else values


def group_extrema(values: Tensor, group_ids: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(B,)`` min and max over each row's group of the ``mask``-selected values.

    Args:
        values: ``(B,)`` or ``(B, T)`` (pooled over the tokens of every row of the group).
        group_ids: ``(B,)`` prompt ids.
        mask: bool, the shape of ``values``; None selects every value.

    Returns:
        ``(mins, maxs)``, each ``(B,)`` in ``values``' dtype; ``(+inf, -inf)`` for a group with no value.
    """
    if mask is not None:
        values_lo = torch.where(mask.bool(), values, float("inf"))
        values_hi = torch.where(mask.bool(), values, float("-inf"))
    else:
        values_lo = values_hi = values
    if values.dim() == 2:
        values_lo, values_hi = values_lo.amin(dim=1), values_hi.amax(dim=1)  # (B,)
    return _scatter_extreme(values_lo, group_ids, "amin"), _scatter_extreme(values_hi, group_ids, "amax")


def group_constant(values: Tensor, group_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """``(B,)`` bool: True where all selected values of the row's group are exactly equal (or there are none).

    Args:
        values: ``(B,)`` or ``(B, T)``.
        group_ids: ``(B,)`` prompt ids.
        mask: bool, the shape of ``values``; None selects every value.
    """
    mins, maxs = group_extrema(values, group_ids, mask)  # (B,), (B,)
    return (mins == maxs) | (mins > maxs)  # (B,); mins > maxs only for an empty group (+inf, -inf)


def group_moments(
    values: Tensor, group_ids: Tensor, mask: Tensor | None = None, unbiased: bool = True
) -> GroupMoments:
    """Count, mean and std of each row's group, exact for groups whose values are all equal.

    ``(B, T)`` values are pooled over the ``mask``-selected tokens of all the group's rows (token-weighted).
    With ``unbiased=True`` (Bessel, as verl and TRL) a group of one value has std 0 here (the unbiased estimate
    is undefined); callers decide what a singleton's advantage is.

    Args:
        values: ``(B,)`` or ``(B, T)`` float.
        group_ids: ``(B,)`` prompt ids.
        mask: bool, the shape of ``values``; None selects every value.
        unbiased: divide the squared deviations by ``n − 1`` (else ``n``).

    Returns:
        :class:`GroupMoments` of ``(B,)`` tensors.
    """
    calc = torch.promote_types(values.dtype, torch.float32)  # sums of bf16/fp16 values in float32
    x = values.to(calc)  # (B,) or (B, T)
    selected = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()  # like x
    weight = selected.to(calc)
    count = group_sum(_row_total(weight), group_ids)  # (B,)
    mins, maxs = group_extrema(x, group_ids, selected)  # (B,), (B,)
    constant = (mins == maxs) | (mins > maxs)  # (B,)
    raw_mean = group_sum(_row_total(torch.where(selected, x, 0.0)), group_ids) / count.clamp(min=1)  # (B,)
    mean = torch.where(count > 0, torch.where(constant, mins, raw_mean), torch.zeros_like(raw_mean))  # (B,)
    centred = torch.where(selected, x - (mean[:, None] if x.dim() == 2 else mean), 0.0)  # like x
    sq = group_sum(_row_total(centred**2), group_ids)  # (B,)
    denom = (count - 1).clamp(min=1) if unbiased else count.clamp(min=1)  # (B,)
    std = torch.where(constant, torch.zeros_like(sq), torch.sqrt(sq / denom))  # (B,)
    count, mean, std = (t.to(values.dtype) for t in (count, mean, std))
    return GroupMoments(count, mean, std, constant)


def masked_row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``(B,)`` mean of each row's ``mask``-selected values ``(B, T)``; exactly the value when they are all equal,
    0 for a row with none selected (e.g. an empty completion).

    Args:
        values: ``(B, T)`` float.
        mask: ``(B, T)`` bool.
    """
    each_row_alone = torch.arange(values.shape[0], device=values.device)  # (B,)
    return group_moments(values, each_row_alone, mask).mean  # (B,)


def group_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """``(B,)`` mean of ``values`` ``(B,)`` over each row's group (exactly the value when all are equal)."""
    return group_moments(values, group_ids).mean


def group_std(values: Tensor, group_ids: Tensor, unbiased: bool = True) -> Tensor:
    """``(B,)`` standard deviation of ``values`` ``(B,)`` within each row's group (exactly 0 when all are equal).

    With ``unbiased=True`` a singleton group has std 0 by definition here; see :func:`group_moments`.
    """
    return group_moments(values, group_ids, unbiased=unbiased).std


def group_zscore(
    values: Tensor, group_ids: Tensor, epsilon: float = 1e-6, unbiased: bool = True, min_std: float = 0.0
) -> Tensor:
    """GRPO normalisation ``(v_i − mean_g v)/(max(std_g v, min_std) + ε)``, ``(B,)``.

    A group whose values are all equal gives exactly 0 for every ``ε`` and ``min_std`` (its centred values are
    exactly 0, and a zero denominator counts as 0/0 = 0); a singleton gives 0.

    Args:
        values: ``(B,)`` float.
        group_ids: ``(B,)`` prompt ids.
        epsilon: ε added to the std (≥ 0).
        unbiased: Bessel-corrected std.
        min_std: floor on the std before adding ε (≥ 0).
    """
    moments = group_moments(values, group_ids, unbiased=unbiased)
    centred = values - moments.mean  # (B,), exactly 0 in a constant group
    denom = moments.std.clamp(min=min_std) + epsilon  # (B,)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))  # (B,)
    return torch.where(moments.constant | (denom <= 0), torch.zeros_like(values), centred / safe)


def batch_scaled_centred(
    values: Tensor, group_ids: Tensor, epsilon: float = 1e-6, unbiased: bool = True, min_std: float = 0.0
) -> Tensor:
    """``(v_i − mean_g v)/(max(std_batch v, min_std) + ε)``, ``(B,)``: centred by the group mean, scaled by the std
    of the **whole batch** (TRL's ``scale_rewards="batch"``).

    A group whose values are all equal gives exactly 0 (its centred values are exactly 0); a batch whose values
    are all equal has std exactly 0, and a zero denominator counts as 0/0 = 0.

    Args:
        values: ``(B,)`` float.
        group_ids: ``(B,)`` prompt ids.
        epsilon: ε added to the std (≥ 0).
        unbiased: Bessel-corrected batch std.
        min_std: floor on the std before adding ε (≥ 0).
    """
    centred = values - group_mean(values, group_ids)  # (B,), exactly 0 in a constant group
    whole_batch = torch.zeros_like(group_ids)  # (B,) one group
    batch_std = group_moments(values, whole_batch, unbiased=unbiased).std  # (B,), equal across rows
    denom = batch_std.clamp(min=min_std) + epsilon  # (B,)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))  # (B,)
    return torch.where((centred == 0) | (denom <= 0), torch.zeros_like(values), centred / safe)


def group_loo_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """``(B,)`` leave-one-out mean ``(Σ_g v − v_i)/(n − 1)``; 0 for singleton groups.

    In a group whose values are all equal it is exactly that value, so ``v_i − loo_i`` is exactly 0.
    """
    x = values.to(torch.promote_types(values.dtype, torch.float32))  # (B,)
    n = group_count(group_ids).to(device=x.device, dtype=x.dtype)  # (B,)
    loo = (group_sum(x, group_ids) - x) / (n - 1).clamp(min=1)  # (B,)
    loo = torch.where(group_constant(x, group_ids), x, loo)  # (B,)
    return torch.where(n > 1, loo, torch.zeros_like(x)).to(values.dtype)


def group_position_mean(values: Tensor, mask: Tensor, group_ids: Tensor) -> Tensor:
    """``(B, T)`` mean, at each position t, over the rows of the row's group whose ``mask`` is True at t.

    Exactly the common value where those rows all hold the same value; 0 where none is masked in.

    Args:
        values: ``(B, T)`` float.
        mask: ``(B, T)`` bool.
        group_ids: ``(B,)`` prompt ids.
    """
    x = values.to(torch.promote_types(values.dtype, torch.float32))  # (B, T)
    mask = mask.bool()
    alive = group_sum(mask.to(x.dtype), group_ids)  # (B, T)
    raw = group_sum(torch.where(mask, x, 0.0), group_ids) / alive.clamp(min=1)  # (B, T)
    lo = _scatter_extreme(torch.where(mask, x, float("inf")), group_ids, "amin")  # (B, T)
    hi = _scatter_extreme(torch.where(mask, x, float("-inf")), group_ids, "amax")  # (B, T)
    exact = torch.where(lo == hi, lo, raw)  # (B, T)
    return torch.where(alive > 0, exact, torch.zeros_like(raw)).to(values.dtype)


def zero_variance_fraction(values: Tensor, group_ids: Tensor) -> float:
    """Fraction of groups whose values ``(B,)`` are all exactly equal (they carry no outcome signal)."""
    inverse, n = group_index(group_ids.to(values.device))
    if n == 0:
        return 0.0
    mins = _per_group_extreme(values, inverse, n, "amin")  # (n,)
    maxs = _per_group_extreme(values, inverse, n, "amax")  # (n,)
    return float((mins == maxs).double().mean().item())
