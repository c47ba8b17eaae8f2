"""Abstract advantage aligner: turns outcome rewards and process scores into token advantages."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from prpo_lightning.batch import RolloutBatch


class AdvantageAligner(ABC):
    """Computes ``(B, T)`` token advantages from a scored rollout batch.

    Implementations must compute group statistics by ``batch.group_ids`` (never by row position), be
    vectorised over ``(B, T)`` and return exact zeros on padding. The module calls :meth:`align` under
    ``torch.no_grad()`` with a view of the batch in which inputs the aligner did not declare (``old_logprobs``,
    ``ref_logprobs``, ``entropies``) raise :class:`~prpo_lightning.batch.ComponentContractError`.
    """

    #: Whether the aligner needs ``batch.ref_logprobs`` (the module then creates a reference model).
    requires_reference: bool = False
    #: Whether the aligner reads ``batch.old_logprobs``/``batch.entropies`` (the module then computes them in a
    #: separate no-grad pass even for on-policy updates).
    requires_rollout_logprobs: bool = False
    #: Whether the aligner reads PRM step scores (if False the module skips segmentation and PRM scoring).
    uses_process_scores: bool = False
    #: Whether every advantage is relative to the prompt's group, so that a group of one completion gets zero
    #: advantages everywhere (GRPO, RLOO, ...): the module then refuses ``sampling.num_generations: 1``.
    group_relative: bool = False

    @abstractmethod
    def align(self, batch: RolloutBatch) -> Tensor:
        """Return ``(B, T)`` float token advantages, zero where ``batch.completion_mask`` is False."""


def token_step_scores(batch: RolloutBatch) -> Tensor:
    """Broadcast each segment's score to its tokens: ``(B, T)`` float, 0 on padding.

    Raises:
        ValueError: if the batch has no step scores or a segment has no score.
    """
    if batch.step_scores is None or batch.step_mask is None:
        raise ValueError("this aligner needs step scores: configure a ProcessRewardModel")
    seg = batch.segment_ids()  # (B, T), -1 on padding
    if seg.numel() and int(seg.max()) >= batch.step_scores.shape[1]:
        raise ValueError("a segment has no PRM score (more segments than step scores)")
    idx = seg.clamp(min=0)  # (B, T)
    scored = torch.gather(batch.step_mask, 1, idx) | (seg < 0)  # (B, T)
    if not bool(scored.all()):
        raise ValueError("a segment has no PRM score (step_mask is False for a used segment)")
    scores = torch.gather(batch.step_scores.to(torch.float32), 1, idx)  # (B, T)
    return torch.where(seg >= 0, scores, torch.zeros_like(scores))
