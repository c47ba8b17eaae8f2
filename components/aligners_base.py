"""Shared pieces of the concrete aligners: a small name registry and vectorised (B, T) helpers.

Shape legend: ``B`` completions, ``T`` padded completion length, ``S`` max segments per completion,
``n`` number of prompt groups. Everything is computed in float64 and returned as float32. Group statistics
come from :mod:`prpo_lightning.scoring.grouping`, which is exact for groups whose values are all equal; step scores
are read with :func:`prpo_lightning.scoring.aligner.checked_step_scores`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from prpo_lightning.scoring.aligner import AdvantageAligner
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.grouping import (
    batch_scaled_centred,
    group_count,
    group_loo_mean,
    group_mean,
    group_moments,
    group_zscore,
)

_ALIGNERS: dict[str, type[AdvantageAligner]] = {}
A = TypeVar("A", bound=type[AdvantageAligner])

#: dtype used for every advantage computation (results are cast to float32).
CALC = torch.float64

#: accepted values of the aligners' ``scale_rewards`` (TRL's names): the std that divides the centred reward.
SCALE_REWARDS = ("group", "batch", "none")


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


def resolve_scale_rewards(owner: str, scale_rewards: str, std_normalize: bool = True) -> str:
    """Check an aligner's ``scale_rewards`` against :data:`SCALE_REWARDS` and fold ``std_normalize=False`` into it.

    Args:
        owner: the aligner's class name, for the error message.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.
        std_normalize: the older switch; False means ``"none"``.

    Returns:
        The effective scaling.

    Raises:
        ValueError: for an unknown value, or ``std_normalize=False`` together with ``scale_rewards="batch"``.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"{owner}: scale_rewards must be one of {', '.join(map(repr, SCALE_REWARDS))}, "
                         f"got {scale_rewards!r}")
    if not std_normalize:
        if scale_rewards == "batch":
            raise ValueError(f"{owner}: std_normalize=False (no std division) contradicts scale_rewards='batch'; "
                             "set only scale_rewards ('none' is the same as std_normalize=False)")
        return "none"
    return scale_rewards


def normalized_outcome(
    r: Tensor,
    group_ids: Tensor,
    std_normalize: bool = True,
    epsilon: float = 1e-6,
    unbiased: bool = True,
    min_std: float = 0.0,
    scale_rewards: str = "group",
) -> Tensor:
    """GRPO normalisation ``(r_i − mean_g r)/(max(std r, min_std) + ε)`` (or only the centring).

    ``std`` is the group's (``scale_rewards="group"``, default) or the whole batch's (``"batch"``); ``"none"``
    (or ``std_normalize=False``) returns ``r_i − mean_g r`` (Dr. GRPO). A group whose rewards are all equal gives
    exactly 0 for every setting, ``ε`` and ``min_std``, and so does a singleton (see
    :func:`prpo_lightning.scoring.grouping.group_zscore` and :func:`~prpo_lightning.scoring.grouping.batch_scaled_centred`).

    Args:
        r: ``(B,)`` rewards.
        group_ids: ``(B,)`` prompt ids.
        std_normalize: divide by the std (False: ``"none"``).
        epsilon: ε added to the std.
        unbiased: Bessel-corrected std.
        min_std: floor on the std before adding ε.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"`` (TRL's ``scale_rewards``).
    """
    gid = group_ids.to(r.device)
    scale = resolve_scale_rewards("normalized_outcome", scale_rewards, std_normalize)
    if scale == "none":
        return r - group_mean(r, gid)  # (B,), exactly 0 in an equal-valued group
    if scale == "batch":
        return batch_scaled_centred(r, gid, epsilon, unbiased, min_std)  # (B,)
    return group_zscore(r, gid, epsilon, unbiased, min_std)  # (B,)


def loo_advantage(values: Tensor, group_ids: Tensor) -> Tensor:
    """``(B,)`` ``v_i − mean_{j≠i} v_j`` (RLOO); exactly 0 in an equal-valued group and for singletons."""
    gid = group_ids.to(values.device)
    multi = group_count(gid).to(values.device) > 1  # (B,)
    return torch.where(multi, values - group_loo_mean(values, gid), torch.zeros_like(values))


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """verl ``masked_whiten``: ``(x − mean)/sqrt(var_unbiased + eps)`` over all valid tokens of the batch.

    Statistics are token-weighted. With ≤ 1 valid token the values are only centred. Valid tokens that all
    hold the same value give exactly 0. Padding → 0.

    Args:
        values: ``(B, T)``.
        mask: ``(B, T)`` bool.
    """
    whole_batch = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)  # (B,) one group
    moments = group_moments(values, whole_batch, mask)  # (B,) each, equal across rows
    centred = values - moments.mean[:, None]  # (B, T)
    scaled = centred * torch.rsqrt(moments.std[:, None] ** 2 + eps) if int(mask.sum()) > 1 else centred
    return torch.where(mask, scaled, torch.zeros_like(scaled))
