"""Abstract process reward model: scores each segment of each completion."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.needs import ComponentNeeds, declare_needs


@dataclass
class ProcessScores:
    """PRM output for one batch.

    Attributes:
        step_scores: ``(B, S)`` float, the score of segment j of row i, conventionally P(step correct) in
            ``[0, 1]``; 0 where ``step_mask`` is False.
        step_mask: ``(B, S)`` bool, True where row i has a scored segment j.
        token_scores: ``(B, T)`` float or None, optional dense per-token process rewards.
    """

    step_scores: Tensor
    step_mask: Tensor
    token_scores: Tensor | None = None


class ProcessRewardModel(ABC):
    """Scores the segments (``batch.segment_spans``) of every completion.

    The module calls :meth:`score` under ``torch.no_grad()`` (PRMs run without gradient, in eval mode, in
    micro-batches, on the policy's device) with a view of the batch in which inputs the PRM did not declare
    (``old_logprobs``, ``ref_logprobs``, ``entropies``) raise :class:`~prpo_lightning.batch.ComponentContractError`.
    :meth:`score` must return a :class:`ProcessScores`. A PRM that cannot score an input (e.g. it is too long)
    must follow a documented rule and never silently return 0.
    """

    #: What the PRM reads: ``reference_logprobs`` (the module keeps a reference model and fills ``ref_logprobs``
    #: and ``old_logprobs``) and ``rollout_logprobs`` (``old_logprobs``/``entropies`` from a no-grad pass).
    needs: ComponentNeeds = ComponentNeeds()
    #: The range every step score lies in (default: probabilities). Scores outside it are a contract error naming
    #: the PRM, so a PRM on another scale (logits, say) declares it instead of silently dominating the advantages.
    score_range: tuple[float, float] = (0.0, 1.0)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declare_needs(cls, "prm")

    def setup(self, device: torch.device) -> None:  # noqa: B027 - optional hook
        """Load weights / move to ``device``. Called by the module at the start of fit, validate and test."""

    def setup_tokenizer(self, tokenizer: Any) -> None:  # noqa: B027 - optional hook
        """Prepare state that depends on the policy's tokenizer once (e.g. per-token texts).

        Called once by the module after the policy's tokenizer is loaded, before training or evaluation (and
        before :meth:`setup`), so this work is not redone at every step. The default does nothing.

        Args:
            tokenizer: the policy's tokenizer, the one later passed to :meth:`score`.
        """

    def batch_metrics(self) -> dict[str, float]:
        """Statistics of the last :meth:`score` call, logged as ``train/prm/<key>`` (e.g. truncated rows).

        Called once after every successful :meth:`score`; the default has none.
        """
        return {}

    @abstractmethod
    def score(self, batch: RolloutBatch, tokenizer: Any) -> ProcessScores:
        """Score every segment of every row.

        Args:
            batch: rollout batch with ``problems``, ``completion_ids``, ``completions`` and ``segment_spans``.
            tokenizer: the policy's tokenizer, to decode segment texts.
        """


def pad_step_scores(scores: list[list[float]], device: torch.device | None = None) -> ProcessScores:
    """Pack ragged per-row step scores into ``(B, S)`` tensors with a mask."""
    b = len(scores)
    s = max((len(r) for r in scores), default=0)
    step_scores = torch.zeros(b, max(s, 1), dtype=torch.float32, device=device)
    step_mask = torch.zeros(b, max(s, 1), dtype=torch.bool, device=device)
    for i, row in enumerate(scores):
        if row:
            step_scores[i, : len(row)] = torch.tensor(row, dtype=torch.float32, device=device)
            step_mask[i, : len(row)] = True
    return ProcessScores(step_scores=step_scores, step_mask=step_mask)
