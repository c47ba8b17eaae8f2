"""Outcome-only aligners: GRPO, Dr.GRPO, RLOO and REINFORCE++-baseline (process_methods_spec.md §2).

Each computes one scalar per completion from ``batch.outcome_rewards`` ``(B,)`` and broadcasts it to the
completion's valid tokens; padding gets 0. Groups are ``batch.group_ids``. **Degenerate cases**, exact
(``== 0``, not merely close): a completion alone in its group has no baseline, so its advantage is 0 (as in
TRL); a group whose rewards are all equal gives 0 for every setting; an empty completion has no tokens, so its
row is all 0.
"""

from __future__ import annotations

from torch import Tensor

from components.aligners_base import (
    broadcast,
    finish,
    loo_advantage,
    masked_whiten,
    normalized_outcome,
    outcome_rewards,
    register_aligner,
    resolve_scale_rewards,
)
from prpo_lightning.scoring.aligner import AdvantageAligner
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.grouping import group_mean
from prpo_lightning.scoring.needs import ComponentNeeds

__all__ = ["DrGRPOAligner", "GRPOAligner", "RLOOAligner", "ReinforcePPBaselineAligner"]


@register_aligner("grpo")
class GRPOAligner(AdvantageAligner):
    """GRPO outcome advantage, broadcast to tokens.

    ``A_{i,t} = (r_i − mean_g r) / (max(std r, min_std) + ε)`` for valid t, else 0, where ``g`` is row i's
    group and std is unbiased by default (verl/TRL). ``std`` is the group's (``scale_rewards="group"``, default)
    or the whole batch's (``"batch"``; the rank's batch under DDP); with ``"none"`` (Dr. GRPO) or
    ``std_normalize=False``, ``A_{i,t} = r_i − mean_g r``.
    A group whose rewards are all equal gives exactly 0 for every ``epsilon`` and ``min_std`` (equality is
    tested exactly, not through a rounded float std; a 0/0 is defined as 0). A singleton gives 0.

    Shapes: ``outcome_rewards (B,)`` → advantages ``(B, T)``.

    Args:
        std_normalize: divide by the group std (False = Dr.GRPO's centring only).
        epsilon: ε added to the std (verl 1e-6, TRL 1e-4).
        unbiased: Bessel-corrected std (True in verl and TRL; False = population std).
        min_std: floor on the std before adding ε (the PRPO authors' ``grpo`` manager uses 0.1 for G ≤ 8).
        scale_rewards: ``"group"`` (default), ``"batch"`` or ``"none"`` (TRL's ``scale_rewards``).

    Raises:
        ValueError: for a negative ``epsilon``/``min_std``, an unknown ``scale_rewards``, or
            ``std_normalize=False`` with ``scale_rewards="batch"``.
    """

    needs = ComponentNeeds(group_relative=True)

    def __init__(
        self,
        std_normalize: bool = True,
        epsilon: float = 1e-6,
        unbiased: bool = True,
        min_std: float = 0.0,
        scale_rewards: str = "group",
    ) -> None:
        if epsilon < 0 or min_std < 0:
            raise ValueError("epsilon and min_std must be >= 0")
        self.scale_rewards = resolve_scale_rewards(type(self).__name__, scale_rewards, std_normalize)
        self.std_normalize = std_normalize
        self.epsilon = epsilon
        self.unbiased = unbiased
        self.min_std = min_std

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        """``(B,)`` float64 per-completion advantages."""
        r = outcome_rewards(batch)  # (B,)
        return normalized_outcome(
            r, batch.group_ids, True, self.epsilon, self.unbiased, self.min_std, self.scale_rewards
        )  # (B,)

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """``{"outcome": the sequence advantage broadcast}``: ``(B, T)`` float64, 0 on padding."""
        return {"outcome": broadcast(self.sequence_advantages(batch), batch.completion_mask)}  # (B, T)


@register_aligner("dr_grpo")
class DrGRPOAligner(GRPOAligner):
    """Dr.GRPO (arXiv 2503.20783): GRPO without the std division.

    ``A_{i,t} = r_i − mean_g r`` for valid t, else 0 (exactly 0 for equal rewards and for singletons).
    Shapes: ``(B,)`` → ``(B, T)``. Pair it with the
    ``seq-mean-token-sum-norm`` loss aggregation (a module setting) to drop the 1/|o_i| term as well.
    """

    def __init__(self) -> None:
        super().__init__(std_normalize=False, epsilon=0.0)


@register_aligner("rloo")
class RLOOAligner(AdvantageAligner):
    """RLOO: ``A_{i,t} = r_i − (1/(G−1)) Σ_{j≠i} r_j = G/(G−1)·(r_i − mean_g r)`` on valid tokens.

    Singletons (no other sample) and groups whose rewards are all equal get exactly 0.
    Shapes: ``outcome_rewards (B,)`` → ``(B, T)``.
    """

    needs = ComponentNeeds(group_relative=True)

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        """``(B,)`` float64 per-completion advantages."""
        r = outcome_rewards(batch)  # (B,)
        return loo_advantage(r, batch.group_ids)  # (B,)

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """``{"outcome": (B, T)}`` float32 advantages."""
        mask = batch.completion_mask
        return {"outcome": finish(broadcast(self.sequence_advantages(batch), mask), mask)}


@register_aligner("reinforce_pp_baseline")
class ReinforcePPBaselineAligner(AdvantageAligner):
    """REINFORCE++-baseline (arXiv 2501.03262, verl ``reinforce_plus_plus_baseline``).

    ``a_i = r_i − mean_g r`` (singletons: 0), broadcast to valid tokens, then whitened over **all valid
    tokens of the batch**: ``A = (a − μ_tok) / sqrt(var_tok,unbiased + 1e-8)`` (token-weighted statistics).
    Groups whose rewards are all equal have ``a = 0`` exactly; a batch where every valid token holds the same
    ``a`` (e.g. every group equal-valued) gives exactly 0.

    Shapes: ``outcome_rewards (B,)`` → ``(B, T)``.

    Args:
        whiten: apply the batch whitening (True in the method).
    """

    needs = ComponentNeeds(group_relative=True)

    def __init__(self, whiten: bool = True) -> None:
        self.whiten = whiten

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """``{"outcome": (B, T)}`` float32 advantages (whitened over the batch's tokens)."""
        mask = batch.completion_mask  # (B, T)
        r = outcome_rewards(batch)  # (B,)
        a = r - group_mean(r, batch.group_ids.to(r.device))  # (B,)
        tok = broadcast(a, mask)  # (B, T)
        if self.whiten:
            tok = masked_whiten(tok, mask)  # (B, T)
        return {"outcome": finish(tok, mask)}
