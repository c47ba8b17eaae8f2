"""How-to: write your own ProcessRewardModel (included in the docs, executed by tests/test_docs_howto.py)."""

from __future__ import annotations

from typing import Any

import torch

from prpo_lightning import ProcessRewardModel, ProcessScores, RolloutBatch
from prpo_lightning.prm import pad_step_scores


# [prm-class]
class ConfidencePRM(ProcessRewardModel):
    """Scores a step by the policy's own confidence in it: ``exp(mean log π_old)`` over the step's tokens.

    A model-free PRM (no weights, nothing to load) that only reads ``batch.old_logprobs`` ``(B, T)`` and
    ``batch.segment_spans``. The score is in ``(0, 1]`` like P(step correct). An empty step cannot occur
    (segmenters must produce non-empty spans), so no score is ever a silent default.

    Args:
        temperature: scores are ``exp(mean log-prob / temperature)``; > 1 flattens them towards 1.
    """

    requires_reference = False  # set True to receive batch.ref_logprobs (the module then keeps a reference model)

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def setup(self, device: torch.device) -> None:
        """Called once before the first rollout: load weights and move them to ``device`` here."""
        self.device = device

    @torch.no_grad()
    def score(self, batch: RolloutBatch, tokenizer: Any) -> ProcessScores:
        if batch.old_logprobs is None:
            raise ValueError("ConfidencePRM needs batch.old_logprobs")
        logp = batch.old_logprobs.float()  # (B, T)
        scores: list[list[float]] = []
        for i, spans in enumerate(batch.segment_spans):
            scores.append([float(torch.exp(logp[i, s:e].mean() / self.temperature)) for s, e in spans])
        return pad_step_scores(scores)  # step_scores (B, S), step_mask (B, S)
# [prm-class-end]


# [prm-usage]
def demo() -> ProcessScores:
    """Score a two-row batch whose segments are given by hand."""
    batch = RolloutBatch(
        prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
        completion_ids=torch.zeros(2, 4, dtype=torch.long),
        completion_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool),
        group_ids=torch.tensor([7, 7]), problems=["p", "p"], answers=["1", "1"],
        old_logprobs=torch.tensor([[-0.1, -0.3, -2.0, -2.0], [-0.5, -0.5, 0.0, 0.0]]),
    )
    batch.segment_spans = [[(0, 2), (2, 4)], [(0, 2)]]
    out = ConfidencePRM().score(batch, tokenizer=None)
    assert out.step_mask.tolist() == [[True, True], [True, False]]
    return out


if __name__ == "__main__":
    print(demo().step_scores)  # tensor([[0.8187, 0.1353], [0.6065, 0.0000]])
# [prm-usage-end]
