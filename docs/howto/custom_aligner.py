"""How-to: write your own AdvantageAligner (included in the docs, executed by tests/test_docs_howto.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from prpo_lightning import AdvantageAligner, ComponentNeeds, RolloutBatch
from prpo_lightning.scoring.aligner import token_step_scores
from prpo_lightning.scoring.grouping import group_mean, group_std


# [aligner-class]
class StepBonusAligner(AdvantageAligner):
    """GRPO's outcome advantage plus a bonus for steps the PRM scores above their group's mean.

    ``A_{i,t} = (r_i − mean_g r)/(std_g r + ε) + λ · (s_{i,seg(t)} − mean_g s̄)`` on valid tokens, 0 on padding,
    where ``s`` is the PRM step score broadcast to tokens and ``s̄_j`` completion j's mean token score.
    Shapes: ``outcome_rewards (B,)``, ``step_scores (B, S)`` → advantages ``(B, T)``.

    Args:
        bonus: λ, the weight of the process bonus (0 gives plain GRPO).
        epsilon: ε added to the group std.
    """

    # the module segments and PRM-scores each batch only for an aligner that needs process scores; a typo in a
    # need's name fails when the class is defined
    needs = ComponentNeeds(process_scores=True, group_relative=True)

    def __init__(self, bonus: float = 0.5, epsilon: float = 1e-6) -> None:
        self.bonus = bonus
        self.epsilon = epsilon

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        mask = batch.completion_mask  # (B, T) bool
        gid = batch.group_ids  # (B,): group statistics by prompt id, never by row position
        r = batch.outcome_rewards.double()  # (B,)
        outcome = (r - group_mean(r, gid)) / (group_std(r, gid) + self.epsilon)  # (B,)
        s = token_step_scores(batch).double()  # (B, T), 0 on padding
        n = mask.sum(dim=1).clamp(min=1)  # (B,)
        s_bar = s.sum(dim=1) / n  # (B,) mean token score of each completion
        process = s - group_mean(s_bar, gid)[:, None]  # (B, T)
        zero = torch.zeros_like(process)
        # the parts are logged (train/advantage/{outcome,process}_abs_mean); align() is their sum, 0 on padding
        return {"outcome": torch.where(mask, outcome[:, None].expand_as(process), zero),
                "process": torch.where(mask, self.bonus * process, zero)}
# [aligner-class-end]


# [aligner-usage]
def demo() -> Tensor:
    """One group of two completions with hand-made segments and step scores."""
    batch = RolloutBatch(
        prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
        completion_ids=torch.zeros(2, 4, dtype=torch.long),
        completion_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool),
        group_ids=torch.tensor([3, 3]), problems=["p", "p"], answers=["1", "1"],
        outcome_rewards=torch.tensor([1.0, 0.0]),
        segment_spans=[[(0, 2), (2, 4)], [(0, 3)]],
        step_scores=torch.tensor([[0.9, 0.5], [0.2, 0.0]]),
        step_mask=torch.tensor([[True, True], [True, False]]),
    )
    return StepBonusAligner(bonus=0.5).align(batch)


if __name__ == "__main__":
    print(demo())
# [aligner-usage-end]
