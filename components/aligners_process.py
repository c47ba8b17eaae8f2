"""PRM-score aligners: PRPO, the process-only (Hypothesis 1) baseline and PRM-Avg (prpo_spec.md §2.4–§3).

All read per-segment PRM scores ``batch.step_scores`` ``(B, S)`` (P(step correct) in [0, 1]) and broadcast
them to tokens through ``batch.segment_spans``: ``r_{i,t} = step_scores[i, seg(i, t)]`` ``(B, T)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from components.aligners_base import (
    CALC,
    broadcast,
    finish,
    normalized_outcome,
    outcome_rewards,
    register_aligner,
    resolve_scale_rewards,
)
from prpo_lightning.scoring.aligner import AdvantageAligner, token_step_scores
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.grouping import group_mean, group_moments, masked_row_mean
from prpo_lightning.scoring.needs import ComponentNeeds

__all__ = ["SIGMA0_CODE", "SIGMA0_UNIFORM", "PRMAvgAligner", "PRPOAligner", "ProcessOnlyAligner"]

#: σ0 of a uniform(0, 1) prior, √(1/12): the paper's "fixed uniform prior" reading (default).
SIGMA0_UNIFORM = math.sqrt(1.0 / 12.0)
#: σ0 in the authors' code, √(1/24) (variance of the triangular distribution on [0, 1]).
SIGMA0_CODE = math.sqrt(1.0 / 24.0)

Prior = Literal["uniform", "triangular", "empirical"]


def mean_token_prm(r_tok: Tensor, mask: Tensor, over: Literal["valid", "padded"], pad_length: int | None) -> Tensor:
    """``(B,)`` mean PRM score per completion: over its ``L_i`` valid tokens (0 if ``L_i = 0``), or over the padded
    length (``pad_length`` or T), as in the authors' code (which rewards length)."""
    if over == "valid":
        return masked_row_mean(r_tok, mask)  # (B,), exact for a row of equal scores
    if over == "padded":
        return (r_tok * mask.to(r_tok.dtype)).sum(dim=1) / float(pad_length or mask.shape[1])  # (B,)
    raise ValueError(f"mean_over must be 'valid' or 'padded', got {over!r}")


def last_token_mask(mask: Tensor) -> Tensor:
    """``(B, T)`` bool, True at each row's last valid token ``t = L_i − 1`` (none when ``L_i = 0``)."""
    lengths = mask.sum(dim=1)  # (B,)
    pos = torch.arange(mask.shape[1], device=mask.device)[None, :]  # (1, T)
    return (pos == (lengths - 1)[:, None]) & mask  # (B, T)


class _FixedPriorZ:
    """Process z-score ``Z_{i,t} = (r_{i,t} − μ0)/σ0`` with a fixed or empirical prior.

    Shared by PRPO and ProcessOnly.
    """

    def _init_prior(self, prior: Prior, sigma0: float | None, prior_mean: float, last_token_quirk: bool) -> None:
        if prior not in ("uniform", "triangular", "empirical"):
            raise ValueError(f"prior must be 'uniform', 'triangular' or 'empirical', got {prior!r}")
        if sigma0 is not None and sigma0 <= 0:
            raise ValueError(f"sigma0 must be > 0, got {sigma0}")
        self.prior = prior
        self.sigma0 = sigma0 if sigma0 is not None else (SIGMA0_CODE if prior == "triangular" else SIGMA0_UNIFORM)
        self.prior_mean = prior_mean
        self.last_token_quirk = last_token_quirk

    def process_z(self, batch: RolloutBatch, r_tok: Tensor) -> Tensor:
        """``(B, T)`` Z-scores on valid tokens (last token: raw ``r`` when ``last_token_quirk``), 0 on padding."""
        mask = batch.completion_mask
        last = last_token_mask(mask)  # (B, T)
        if self.prior == "empirical":
            z = self._empirical_z(batch, r_tok, mask & ~last if self.last_token_quirk else mask)
        else:
            z = (r_tok - self.prior_mean) / self.sigma0  # (B, T)
        if self.last_token_quirk:
            z = torch.where(last, r_tok, z)
        return torch.where(mask, z, torch.zeros_like(z))

    @staticmethod
    def _empirical_z(batch: RolloutBatch, r_tok: Tensor, pool: Tensor) -> Tensor:
        """srpo4: pooled group token mean m̂ and unbiased std ŝ over ``pool`` ``(B, T)``.

        Z is exactly 0 for every token of a group whose pooled scores are all equal (ŝ = 0) or that pools at
        most one token.
        """
        moments = group_moments(r_tok, batch.group_ids, pool)  # (B,) count, mean, std, constant
        ok = (moments.count > 1) & ~moments.constant & (moments.std > 0)  # (B,)
        safe = torch.where(ok, moments.std, torch.ones_like(moments.std))  # (B,)
        z = (r_tok - moments.mean[:, None]) / safe[:, None]  # (B, T)
        return torch.where(ok[:, None], z, torch.zeros_like(r_tok))


@register_aligner("prpo")
class PRPOAligner(_FixedPriorZ, AdvantageAligner):
    """PRPO: process z-scores under a fixed prior, shifted by the outcome advantage (location shift).

    ``Z_{i,t} = (r_{i,t} − μ0)/σ0``, ``β_i = R_i − mean_g R`` (``outcome_norm="center"``, default) or
    ``β_i = (R_i − mean_g R)/(std_g R + ε)`` (``"zscore"``), and ``A_{i,t} = Z_{i,t} + β_i`` for every valid
    token (paper reading, default). With ``last_token_quirk=True`` the last valid token gets ``r + β`` (the
    authors' code). Padding gets 0. If every step score equals μ0, ``A = β`` (the outcome advantage).
    Exact degenerate values: β = 0 for a group whose (augmented) rewards are all equal, in every outcome scaling
    and for every ``outcome_epsilon`` (0 included), and for a singleton; an empty completion's row is 0.

    Shapes: ``step_scores (B, S)``, ``segment_spans`` tiling ``[0, L_i)``, ``outcome_rewards (B,)`` →
    advantages ``(B, T)``.

    Args:
        prior: ``"uniform"`` (σ0 = √(1/12), default), ``"triangular"`` (σ0 = √(1/24), the code) or
            ``"empirical"`` (srpo4 ablation: pooled group token mean/unbiased std; a group whose pooled step
            scores are all equal gives Z = 0 exactly).
        sigma0: explicit σ0, overriding ``prior``'s.
        prior_mean: μ0 (0.5).
        outcome_norm: ``"center"`` (default, code) or ``"zscore"`` (GRPO form).
        outcome_epsilon: ε of the ``"zscore"`` form.
        last_token_quirk: the code's raw-score last token.
        prm_avg_in_outcome: srpo3 ("PRPO + PRM-Avg"): ``R'_i = R_i + mean PRM score`` before centring.
        prm_avg_over: ``"valid"`` tokens (default) or ``"padded"`` length (the code).
        pad_length: padded length for ``"padded"`` (default: the batch's T; the code used 2048).
        scale_rewards: when set, replaces ``outcome_norm`` with TRL's names: ``"none"`` = ``"center"``,
            ``"group"`` = ``"zscore"``, ``"batch"`` = centred by the group mean and divided by the std of the
            whole batch (+ ``outcome_epsilon``). None (default): ``outcome_norm`` decides.

    Raises:
        ValueError: for an unknown ``outcome_norm``/``scale_rewards``, or ``outcome_norm="zscore"`` with a
            ``scale_rewards`` other than ``"group"``.
    """

    needs = ComponentNeeds(process_scores=True)

    def __init__(
        self,
        prior: Prior = "uniform",
        sigma0: float | None = None,
        prior_mean: float = 0.5,
        outcome_norm: Literal["center", "zscore"] = "center",
        outcome_epsilon: float = 1e-6,
        last_token_quirk: bool = False,
        prm_avg_in_outcome: bool = False,
        prm_avg_over: Literal["valid", "padded"] = "valid",
        pad_length: int | None = None,
        scale_rewards: str | None = None,
    ) -> None:
        self._init_prior(prior, sigma0, prior_mean, last_token_quirk)
        if outcome_norm not in ("center", "zscore"):
            raise ValueError(f"outcome_norm must be 'center' or 'zscore', got {outcome_norm!r}")
        if scale_rewards is None:
            scale_rewards = "group" if outcome_norm == "zscore" else "none"
        elif outcome_norm == "zscore" and scale_rewards != "group":
            raise ValueError(f"PRPOAligner: outcome_norm='zscore' contradicts scale_rewards={scale_rewards!r}; "
                             "set only scale_rewards ('group' is the same as outcome_norm='zscore')")
        self.scale_rewards = resolve_scale_rewards("PRPOAligner", scale_rewards)
        self.outcome_norm = outcome_norm
        self.outcome_epsilon = outcome_epsilon
        self.prm_avg_in_outcome = prm_avg_in_outcome
        self.prm_avg_over = prm_avg_over
        self.pad_length = pad_length

    def outcome_advantage(self, batch: RolloutBatch, r_tok: Tensor) -> Tensor:
        """``(B,)`` β_i."""
        r = outcome_rewards(batch)  # (B,)
        if self.prm_avg_in_outcome:
            r = r + mean_token_prm(r_tok, batch.completion_mask, self.prm_avg_over, self.pad_length)
        if self.scale_rewards == "none":
            return r - group_mean(r, batch.group_ids.to(r.device))
        return normalized_outcome(r, batch.group_ids, True, self.outcome_epsilon, scale_rewards=self.scale_rewards)

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """``{"outcome": β_i broadcast (the location shift), "process": Z}``, both ``(B, T)`` float64, 0 on padding."""
        mask = batch.completion_mask  # (B, T)
        r_tok = token_step_scores(batch, CALC)  # (B, T)
        z = self.process_z(batch, r_tok)  # (B, T)
        beta = self.outcome_advantage(batch, r_tok)  # (B,)
        return {"outcome": broadcast(beta, mask), "process": z}


@register_aligner("process_only")
class ProcessOnlyAligner(_FixedPriorZ, AdvantageAligner):
    """Process-only baseline (the Hypothesis-1 setting, prpo_spec.md §8): PRPO without the outcome anchor.

    ``A_{i,t} = Z_{i,t} = (r_{i,t} − μ0)/σ0`` on valid tokens (last token raw ``r`` with
    ``last_token_quirk``), 0 on padding. The outcome reward is ignored.

    Shapes: ``step_scores (B, S)`` → ``(B, T)``.

    Args:
        prior: ``"uniform"`` (σ0 = √(1/12)), ``"triangular"`` (√(1/24)) or ``"empirical"`` (a group whose
            pooled step scores are all equal gives exactly 0).
        sigma0: explicit σ0 override.
        prior_mean: μ0.
        last_token_quirk: the code's raw-score last token.
    """

    needs = ComponentNeeds(process_scores=True)

    def __init__(
        self,
        prior: Prior = "uniform",
        sigma0: float | None = None,
        prior_mean: float = 0.5,
        last_token_quirk: bool = False,
    ) -> None:
        self._init_prior(prior, sigma0, prior_mean, last_token_quirk)

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """``{"process": Z}``: ``(B, T)`` float64, 0 on padding (there is no outcome term)."""
        return {"process": self.process_z(batch, token_step_scores(batch, CALC))}


@register_aligner("prm_avg")
class PRMAvgAligner(AdvantageAligner):
    """PRM-Avg baseline (the authors' ``rflux``): outcome plus the mean PRM score, GRPO-normalised.

    ``R'_i = R_i + (1/L_i) Σ_{t<L_i} r_{i,t}`` (mean over **valid** tokens, default; ``mean_over="padded"``
    divides by the padded length like the code), then ``A_{i,t} = (R'_i − mean_g R')/(std_g R' + ε)`` on every
    valid token, 0 on padding. No token-level process term. A group whose ``R'`` are all equal (e.g.
    identical completions) gives exactly 0 for every ``epsilon`` (0 included); a singleton gives 0.

    Shapes: ``step_scores (B, S)``, ``outcome_rewards (B,)`` → ``(B, T)``.

    Args:
        mean_over: ``"valid"`` or ``"padded"``.
        pad_length: padded length for ``"padded"`` (default: the batch's T).
        std_normalize: divide by the group std (False: ``scale_rewards="none"``).
        epsilon: ε added to the (unbiased) std.
        scale_rewards: ``"group"`` (default), ``"batch"`` (std of the whole batch's ``R'``) or ``"none"``.

    Raises:
        ValueError: for an unknown ``mean_over``/``scale_rewards``, or ``std_normalize=False`` with
            ``scale_rewards="batch"``.
    """

    needs = ComponentNeeds(process_scores=True, group_relative=True)

    def __init__(
        self,
        mean_over: Literal["valid", "padded"] = "valid",
        pad_length: int | None = None,
        std_normalize: bool = True,
        epsilon: float = 1e-6,
        scale_rewards: str = "group",
    ) -> None:
        if mean_over not in ("valid", "padded"):
            raise ValueError(f"mean_over must be 'valid' or 'padded', got {mean_over!r}")
        self.scale_rewards = resolve_scale_rewards("PRMAvgAligner", scale_rewards, std_normalize)
        self.mean_over = mean_over
        self.pad_length = pad_length
        self.std_normalize = std_normalize
        self.epsilon = epsilon

    def augmented_rewards(self, batch: RolloutBatch) -> Tensor:
        """``(B,)`` float64 ``R'``."""
        r_tok = token_step_scores(batch, CALC)  # (B, T)
        return outcome_rewards(batch) + mean_token_prm(r_tok, batch.completion_mask, self.mean_over, self.pad_length)

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """``{"outcome": (B, T)}`` float32 advantages (one value per completion)."""
        mask = batch.completion_mask
        r_aug = self.augmented_rewards(batch)  # (B,)
        a = normalized_outcome(r_aug, batch.group_ids, True, self.epsilon, scale_rewards=self.scale_rewards)  # (B,)
        return {"outcome": finish(broadcast(a, mask), mask)}
