"""Abstract advantage aligner: turns outcome rewards and process scores into token advantages."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.needs import ComponentNeeds, declare_needs


class AdvantageAligner(ABC):
    """Computes ``(B, T)`` token advantages from a scored rollout batch.

    Implementations must compute group statistics by ``batch.group_ids`` (never by row position), be
    vectorised over ``(B, T)`` and return exact zeros on padding. They implement :meth:`advantage_terms`; the
    advantages are their sum (:meth:`align`, derived). The framework calls it under ``torch.no_grad()`` with a view
    of the batch in which inputs the aligner did not declare in :attr:`needs` (``old_logprobs``,
    ``ref_logprobs``, ``entropies``) raise :class:`~prpo_lightning.batch.ComponentContractError`.
    """

    #: What the aligner reads (``reference_logprobs``, ``rollout_logprobs``, ``process_scores``) and whether its
    #: advantages are ``group_relative`` (a lone completion gets 0: the module refuses ``num_generations: 1``).
    needs: ComponentNeeds = ComponentNeeds()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declare_needs(cls, "aligner")
        if "align" in vars(cls):
            raise TypeError(f"aligner {cls.__name__} overrides align(batch): implement advantage_terms(batch) instead, "
                            "returning {'outcome': adv} or {'process': adv} (or both parts) as (B, T) tensors; "
                            "align is their sum, derived by AdvantageAligner")

    @abstractmethod
    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """Named ``(B, T)`` parts whose sum is the advantages (:meth:`align`).

        The bundled aligners name them ``"outcome"`` (the part every token of a completion shares) and
        ``"process"`` (the per-token part): PRPO and SPRO return both, process-only, PURE and PRIME ``"process"``,
        the GRPO family, RLOO, REINFORCE++ and PRM-Avg ``"outcome"``. The module logs the mean absolute value of
        each part over valid tokens as ``train/advantage/<name>_abs_mean``, and ``train/advantage/process_to_outcome``
        (their ratio) when both are there, so a run shows when the process term outweighs the outcome signal.

        Returns:
            ``{name: (B, T) tensor}`` (at least one part).
        """

    def align(self, batch: RolloutBatch) -> Tensor:
        """``(B, T)`` float32 token advantages: the sum of :meth:`advantage_terms`, exactly 0 on padding."""
        return sum_of_terms(self.advantage_terms(batch), batch.completion_mask)

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """Method-specific diagnostics of one scored batch, logged as ``train/aligner/<key>`` (optional).

        SPRO, for example, logs its implicit process reward. Called under ``torch.no_grad()`` after
        :meth:`align`, with the same batch view. Default: no metrics.
        """
        return {}


def sum_of_terms(terms: dict[str, Tensor], mask: Tensor) -> Tensor:
    """``(B, T)`` float32 sum of :meth:`AdvantageAligner.advantage_terms`' parts, exactly 0 where ``mask`` is False."""
    total = sum(terms.values())  # (B, T)
    return torch.where(mask, total, torch.zeros_like(total)).to(torch.float32)  # (B, T)


def checked_step_scores(batch: RolloutBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Validated step tensors of a scored batch.

    Args:
        batch: a batch whose ``segment_spans``, ``step_scores`` and ``step_mask`` are filled.

    Returns:
        ``(step_scores, has_step, segment_ids)``: ``(B, S)`` float64 scores, 0 beyond each row's segments;
        ``(B, S)`` bool, True exactly for the segments each row has; ``(B, T)`` long segment index of every
        token, -1 on padding.

    Raises:
        ValueError: if step scores are missing, a segment has no score, or a score is NaN/inf.
    """
    if batch.step_scores is None or batch.step_mask is None:
        raise ValueError(
            "AdvantageAligner: this aligner needs step scores (batch.step_scores/step_mask are None); "
            "configure a segmenter and a ProcessRewardModel, and declare needs = ComponentNeeds(process_scores=True) "
            "on the aligner"
        )
    if len(batch.segment_spans) != batch.size:
        raise ValueError(
            f"AdvantageAligner: batch.segment_spans has {len(batch.segment_spans)} rows, expected one per "
            f"completion ({batch.size}); the segmenter must return spans for every completion"
        )
    device = batch.completion_mask.device
    segment_ids = batch.segment_ids().to(device)  # (B, T)
    scores = batch.step_scores.to(device=device, dtype=torch.float64)  # (B, S)
    step_mask = batch.step_mask.to(device).bool()  # (B, S)
    counts = torch.tensor([len(row) for row in batch.segment_spans], dtype=torch.long, device=device)  # (B,)
    if (int(counts.max()) if counts.numel() else 0) > scores.shape[1]:
        raise ValueError(
            "AdvantageAligner: a segment has no PRM score (more segments than step scores); the PRM must "
            "return one score per segment"
        )
    has_step = torch.arange(scores.shape[1], device=device)[None, :] < counts[:, None]  # (B, S)
    if bool((has_step & ~step_mask).any()):
        raise ValueError(
            "AdvantageAligner: a segment has no PRM score (step_mask is False for a used segment); the PRM "
            "must score every segment"
        )
    if not bool(torch.isfinite(scores[has_step]).all()):
        raise ValueError("AdvantageAligner: PRM step scores contain NaN/inf; the PRM must return finite scores")
    return torch.where(has_step, scores, torch.zeros_like(scores)), has_step, segment_ids


def step_values_to_tokens(step_values: Tensor, segment_ids: Tensor) -> Tensor:
    """Broadcast ``(B, S)`` per-step values to ``(B, T)`` tokens through ``segment_ids`` (-1 = padding → 0)."""
    segment_ids = segment_ids.to(step_values.device)  # (B, T)
    values = torch.gather(step_values, 1, segment_ids.clamp(min=0))  # (B, T)
    return torch.where(segment_ids >= 0, values, torch.zeros_like(values))


def token_step_scores(batch: RolloutBatch, dtype: torch.dtype = torch.float32) -> Tensor:
    """Each token's PRM step score: ``(B, T)`` in ``dtype``, 0 on padding (validated by ``checked_step_scores``).

    Args:
        batch: a scored batch.
        dtype: result dtype (the bundled aligners use float64).

    Raises:
        ValueError: as :func:`checked_step_scores`.
    """
    scores, _, segment_ids = checked_step_scores(batch)  # (B, S), (B, S), (B, T)
    return step_values_to_tokens(scores, segment_ids).to(dtype)  # (B, T)
