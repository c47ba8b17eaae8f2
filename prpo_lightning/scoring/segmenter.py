"""Abstract segmenter: cuts every completion into steps (segments) of tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from prpo_lightning.batch import RolloutBatch, Span
from prpo_lightning.scoring.needs import ComponentNeeds, declare_needs


class Segmenter(ABC):
    """Cuts completions into contiguous token spans that tile their valid tokens.

    Implementations read whatever they need from the batch (entropies for entropy-spike segmentation,
    ``completion_ids`` plus the tokenizer for delimiter-based segmentation). The module calls :meth:`segment` under
    ``torch.no_grad()`` with a view of the batch in which ``entropies`` raises
    :class:`~prpo_lightning.batch.ComponentContractError` unless :attr:`needs` declares ``entropies``; the spans it
    returns are checked once (:func:`~prpo_lightning.batch.check_segment_spans`).
    """

    #: ``entropies``: :meth:`segment` reads ``batch.entropies`` (the module then provides them before scoring).
    needs: ComponentNeeds = ComponentNeeds()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declare_needs(cls, "segmenter")

    def batch_metrics(self, spans: list[list[Span]]) -> dict[str, float]:
        """Statistics of one segmented batch, logged as ``train/segments/<key>`` (default: none beyond the
        framework's counts)."""
        return {}

    def setup_tokenizer(self, tokenizer: Any) -> None:  # noqa: B027 - optional hook
        """Prepare tokenizer-dependent state once (e.g. a table of per-token texts).

        Called once by the module after the policy's tokenizer is loaded, before training or evaluation, so work
        that depends only on the tokenizer is not redone at every step. The default does nothing.

        Args:
            tokenizer: the policy's tokenizer, the one later passed to :meth:`segment`.
        """

    @abstractmethod
    def segment(self, batch: RolloutBatch, tokenizer: Any) -> list[list[Span]]:
        """Return, for each row i, half-open spans ``(start, end)`` tiling ``[0, L_i)``.

        Args:
            batch: the rollout batch; ``completion_ids``/``completion_mask`` ``(B, T)`` and, when
                available, ``entropies`` ``(B, T)``.
            tokenizer: the policy's tokenizer (Hugging Face ``PreTrainedTokenizerBase``).

        Returns:
            ``B`` lists of spans. A row with ``L_i = 0`` gets ``[]``.
        """
