"""Implicit PRM (SPRO/PRIME): per-token rewards β·(log π_old − log π_ref), no extra model."""

from __future__ import annotations

from typing import Any, Literal

import torch

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.prm import ProcessRewardModel, ProcessScores
from prpo_lightning.scoring.needs import ComponentNeeds

__all__ = ["ImplicitPRM"]


class ImplicitPRM(ProcessRewardModel):
    """The policy's own log-ratio against the reference as a dense process reward.

    Token scores: ``ρ_{i,t} = β (log π_old(o_t) − log π_ref(o_t))`` on valid tokens, 0 on padding
    (``token_scores (B, T)``; PRIME reads these with ``PRIMEAligner(reward_source="token_scores")``).

    Step scores, so that PRM-score aligners (PRPO, PRM-Avg, PURE) can consume it, map the step's implicit
    reward into [0, 1] with a sigmoid (0.5 when policy = reference, i.e. exactly the PRPO prior mean):

    * ``step_reduction="sum"`` (default): ``s_{i,j} = σ(Σ_{t∈seg j} ρ_{i,t})``, the implicit reward of step j
      (the difference of implicit Q-values at its boundaries);
    * ``"cumulative"``: ``s_{i,j} = σ(Σ_{t<e_j} ρ_{i,t})``, the implicit Q-value at the step's end
      (the implicit-PRM reading of "Free process rewards").

    Output: ``step_scores (B, S)``, ``step_mask (B, S)``, ``token_scores (B, T)``. Needs the reference model
    (``needs = ComponentNeeds(reference_logprobs=True)``). Runs without grad; tensors stay on the batch's device.

    Args:
        beta: β (PRIME uses 0.05).
        step_reduction: ``"sum"`` or ``"cumulative"``.
    """

    needs = ComponentNeeds(reference_logprobs=True)

    def __init__(self, beta: float = 0.05, step_reduction: Literal["sum", "cumulative"] = "sum") -> None:
        if step_reduction not in ("sum", "cumulative"):
            raise ValueError(f"step_reduction must be 'sum' or 'cumulative', got {step_reduction!r}")
        self.beta = beta
        self.step_reduction = step_reduction

    @torch.no_grad()
    def score(self, batch: RolloutBatch, tokenizer: Any = None) -> ProcessScores:
        """Score every segment of every row from ``old_logprobs``/``ref_logprobs`` ``(B, T)``."""
        if batch.old_logprobs is None or batch.ref_logprobs is None:
            raise ValueError("ImplicitPRM needs batch.old_logprobs and batch.ref_logprobs (a reference model)")
        if len(batch.segment_spans) != batch.size:
            raise ValueError(f"batch.segment_spans has {len(batch.segment_spans)} rows, expected {batch.size}")
        mask = batch.completion_mask  # (B, T)
        dev = mask.device
        rho = self.beta * (batch.old_logprobs.to(dev, torch.float64) - batch.ref_logprobs.to(dev, torch.float64))
        rho = torch.where(mask, rho, torch.zeros_like(rho))  # (B, T)
        seg = batch.segment_ids().to(dev)  # (B, T), -1 on padding
        counts = torch.tensor([len(r) for r in batch.segment_spans], dtype=torch.long, device=dev)  # (B,)
        s = max(int(counts.max()) if counts.numel() else 0, 1)
        step_mask = torch.arange(s, device=dev)[None, :] < counts[:, None]  # (B, S)
        sums = torch.zeros(batch.size, s, dtype=torch.float64, device=dev)  # (B, S)
        sums.scatter_add_(1, seg.clamp(min=0), rho)  # padding adds 0 to step 0
        if self.step_reduction == "cumulative":
            sums = torch.cumsum(sums, dim=1)  # (B, S)
        step_scores = torch.where(step_mask, torch.sigmoid(sums), torch.zeros_like(sums))  # (B, S)
        return ProcessScores(step_scores=step_scores.float(), step_mask=step_mask, token_scores=rho.float())
