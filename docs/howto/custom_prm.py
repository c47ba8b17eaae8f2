"""How-to: write your own ProcessRewardModel (included in the docs, executed by tests/test_docs_howto.py)."""

from __future__ import annotations

from typing import Any

import torch

from prpo_lightning import ProcessRewardModel, ProcessScores, RolloutBatch
from prpo_lightning.scoring.prm import pad_step_scores


# [prm-class]
class DistinctTokenPRM(ProcessRewardModel):
    """Scores a step by how little it repeats itself: the fraction of distinct tokens among its tokens.

    A model-free PRM (no weights, nothing to load) that reads only ``batch.completion_ids`` ``(B, T)`` and
    ``batch.segment_spans``: a step that loops on the same few tokens (a common degenerate output under RL)
    scores near 0, varied text near 1, like P(step correct) in [0, 1]. Segmenters never produce empty spans, so
    every step gets a real score (no silent default).

    Args:
        min_tokens: steps shorter than this score 1.0 (too short to judge repetition).
    """

    # needs = ComponentNeeds(reference_logprobs=True) would make the module keep a reference model and fill
    # batch.ref_logprobs; this PRM reads only the completion tokens, so it declares no needs (the default)

    def __init__(self, min_tokens: int = 4) -> None:
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        self.min_tokens = min_tokens

    def setup(self, device: torch.device) -> None:
        """Called once before the first rollout: load weights and move them to ``device`` here."""
        self.device = device

    @torch.no_grad()
    def score(self, batch: RolloutBatch, tokenizer: Any) -> ProcessScores:
        ids = batch.completion_ids  # (B, T)
        scores: list[list[float]] = []
        for i, spans in enumerate(batch.segment_spans):
            row = []
            for s, e in spans:
                step = ids[i, s:e]
                n = e - s
                row.append(1.0 if n < self.min_tokens else float(torch.unique(step).numel()) / n)
            scores.append(row)
        return pad_step_scores(scores)  # step_scores (B, S), step_mask (B, S)
# [prm-class-end]


# [prm-usage]
def demo() -> ProcessScores:
    """Score a two-row batch whose segments are given by hand."""
    batch = RolloutBatch(
        prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
        completion_ids=torch.tensor([[5, 6, 7, 8, 9, 9, 9, 9], [3, 4, 5, 6, 0, 0, 0, 0]]),
        completion_mask=torch.tensor([[1] * 8, [1] * 4 + [0] * 4], dtype=torch.bool),
        group_ids=torch.tensor([7, 7]), problems=["p", "p"], answers=["1", "1"],
    )
    batch.segment_spans = [[(0, 4), (4, 8)], [(0, 4)]]
    out = DistinctTokenPRM().score(batch, tokenizer=None)
    assert out.step_mask.tolist() == [[True, True], [True, False]]
    return out


if __name__ == "__main__":
    print(demo().step_scores)  # tensor([[1.0000, 0.2500], [1.0000, 0.0000]])
# [prm-usage-end]
