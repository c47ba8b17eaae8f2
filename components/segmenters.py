"""Segmenters: cut every completion into contiguous token spans ("steps") that tile its valid tokens.

Every segmenter returns, for each row ``i``, half-open spans ``[(s_0, e_0), (s_1, e_1), ...]`` with
``s_0 = 0``, ``s_{j+1} = e_j`` and ``e_last = L_i`` (``L_i`` = number of valid completion tokens). A row with
``L_i = 0`` gets ``[]``. The module checks this contract once per batch
(:func:`prpo_lightning.batch.check_segment_spans`); :func:`cuts_to_spans` always satisfies it.

Selectable from YAML, e.g.::

    segmenter:
      class_path: components.segmenters.EntropySpikeSegmenter
      init_args: {k: 5, min_gap: 10, mode: paper}
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from torch import Tensor

from prpo_lightning.batch import RolloutBatch, Span
from prpo_lightning.scoring.segmenter import Segmenter
from prpo_lightning.scoring.needs import ComponentNeeds

__all__ = [
    "DelimiterSegmenter",
    "EntropySpikeSegmenter",
    "FixedLengthSegmenter",
    "cuts_to_spans",
    "spike_cuts_paper",
    "spike_cuts_reference",
]


def cuts_to_spans(cuts: list[int], length: int) -> list[Span]:
    """Turn cut positions into spans tiling ``[0, length)``.

    A cut ``c`` means "token ``c`` starts a new segment". Cuts outside ``(0, length)`` and duplicates are
    ignored, so the result always tiles exactly.

    Args:
        cuts: candidate cut positions, any order.
        length: the number of valid tokens ``L``.

    Returns:
        ``[(0, c_1), (c_1, c_2), ..., (c_n, L)]``, or ``[]`` when ``L = 0``.
    """
    if length <= 0:
        return []
    bounds = [0, *sorted({int(c) for c in cuts if 0 < int(c) < length}), length]
    return [(bounds[j], bounds[j + 1]) for j in range(len(bounds) - 1)]


def spike_cuts_paper(positions: list[int], min_gap: int) -> list[int]:
    """Paper reading ("variant B", prpo_spec.md §2.2) of "top-k spikes at least m tokens apart".

    Visit the candidates in the given order (descending entropy) and keep one if it is ``>= min_gap`` from
    every kept one. Cuts are the kept positions ``> 0``.

    Args:
        positions: top-k positions, sorted by descending entropy.
        min_gap: the minimum distance ``m`` between kept spikes.
    """
    kept: list[int] = []
    for p in positions:
        if all(abs(p - q) >= min_gap for q in kept):
            kept.append(p)
    return sorted(p for p in kept if p > 0)


def spike_cuts_reference(positions: list[int], min_gap: int) -> list[int]:
    """The authors' exact rules (``entropy_segmentation`` in srpocode, prpo_spec.md §2.2 steps 3–4).

    Args:
        positions: top-k positions (any order; they are sorted ascending here).
        min_gap: the gap ``m``.

    Returns:
        Accepted cut positions, ascending. Every cut is ``>= m`` and consecutive cuts are ``>= m`` apart.
    """
    p = sorted(positions)
    emitted: list[int] = []
    for i in range(len(p) - 1):  # pair pass; the last position is never a left element
        if p[i + 1] - p[i] > min_gap:
            emitted.append(p[i])
        else:
            nxt = next((p[j] for j in range(i + 1, len(p)) if p[j] - p[i] > min_gap), None)
            if nxt is not None:
                emitted.append(nxt)
    cuts: list[int] = []
    last = 0
    for a in emitted:  # cut pass over the (possibly unsorted, duplicated) emitted list
        if a - last >= min_gap:
            cuts.append(a)
            last = a
    return cuts


class EntropySpikeSegmenter(Segmenter):
    """Cut each completion at its top-k token-entropy spikes that are at least ``m`` tokens apart.

    Candidates are the ``min(k, L_i)`` positions of row i with the largest entropy ``H_{i,t}``
    (``batch.entropies``, ``(B, T)``, nats), ties broken by lower position. The spike token **starts** the
    next segment. Two rules:

    * ``mode="paper"`` (default): visit candidates in descending entropy and keep one if it is ``>= m`` from
      every kept cut; cut at kept positions ``> 0`` (at most ``k + 1`` segments).
    * ``mode="reference"``: the authors' code exactly (prpo_spec.md §2.2): ``L < k + 1`` gives one segment;
      otherwise a pair pass over the ascending positions then a cut pass with ``last = 0``, so every cut is
      ``>= m``, there are at most ``k - 1`` cuts, and a spike can be replaced by its neighbour
      (reproduces cases S1–S6 of §9).

    Args:
        k: number of spike candidates (top-k), default 5.
        min_gap: minimum distance ``m`` between cuts, default 10.
        mode: ``"paper"`` or ``"reference"``.
    """

    needs = ComponentNeeds(entropies=True)

    def __init__(self, k: int = 5, min_gap: int = 10, mode: Literal["paper", "reference"] = "paper") -> None:
        if k < 1 or min_gap < 1:
            raise ValueError(f"k and min_gap must be >= 1, got k={k}, min_gap={min_gap}")
        if mode not in ("paper", "reference"):
            raise ValueError(f"mode must be 'paper' or 'reference', got {mode!r}")
        self.k = k
        self.min_gap = min_gap
        self.mode = mode

    def segment(self, batch: RolloutBatch, tokenizer: Any = None) -> list[list[Span]]:
        """Return spans per row from ``batch.entropies`` ``(B, T)`` and ``batch.completion_mask`` ``(B, T)``."""
        if batch.entropies is None:
            raise ValueError("EntropySpikeSegmenter needs batch.entropies (token entropies of the old policy)")
        return self.segment_entropies(batch.entropies, batch.completion_mask)

    def segment_entropies(self, entropies: Tensor, mask: Tensor) -> list[list[Span]]:
        """Segment from raw tensors.

        Args:
            entropies: ``(B, T)`` float token entropies.
            mask: ``(B, T)`` bool completion mask.
        """
        mask = mask.bool()
        lengths = mask.sum(dim=1).tolist()  # (B,)
        ent = entropies.detach().double().masked_fill(~mask, float("-inf"))  # (B, T)
        # Descending entropy, ties by lower position (stable sort).
        order = torch.sort(ent, dim=1, descending=True, stable=True).indices[:, : self.k].cpu()  # (B, min(k, T))
        out: list[list[Span]] = []
        for i, length in enumerate(lengths):
            length = int(length)
            if length == 0:
                out.append([])
                continue
            if self.mode == "reference" and length < self.k + 1:
                out.append([(0, length)])
                continue
            top = [int(p) for p in order[i, : min(self.k, length)].tolist()]
            if self.mode == "paper":
                cuts = spike_cuts_paper(top, self.min_gap)
            else:
                cuts = spike_cuts_reference(top, self.min_gap)
            out.append(cuts_to_spans(cuts, length))
        return out


class DelimiterSegmenter(Segmenter):
    """Split completions on text delimiters and step markers, mapped to token offsets.

    Each token is decoded on its own; the texts are concatenated with a char → token map. The text of a token id
    is decoded once per tokenizer and cached (:meth:`setup_tokenizer` binds the tokenizer and empties the cache;
    a different tokenizer passed to :meth:`segment` is bound the same way). Then:

    * a ``delimiters`` match (literal text, default ``"\\n\\n"``) **ends** a step: the next step starts at the
      token after the one holding the match's last character;
    * a ``markers`` match (regular expression, e.g. ``r"Step \\d+:"``) **starts** a step at the token holding
      the match's first character.

    Cuts at 0 or ``L`` and duplicates are dropped, so no span is empty and spans tile ``[0, L)``. A completion
    without any delimiter is one step; trailing special tokens (EOS) stay in the last step.

    Args:
        delimiters: literal strings that end a step.
        markers: regular expressions whose matches start a step (``[]`` = none). ``["Step \\\\d+:"]`` gives
            the "Step k:" convention.
    """

    def __init__(
        self,
        delimiters: list[str] | None = None,
        markers: list[str] | None = None,
    ) -> None:
        self.delimiters = ["\n\n"] if delimiters is None else list(delimiters)
        self.markers = [] if markers is None else list(markers)
        if any(not d for d in self.delimiters):
            raise ValueError("delimiters must be non-empty strings")
        self._marker_res = [re.compile(m) for m in self.markers]
        self._tokenizer: Any = None
        self._pieces: dict[int, str] = {}  # token id -> its text decoded on its own (special tokens kept)

    def setup_tokenizer(self, tokenizer: Any) -> None:
        """Bind the policy's tokenizer and empty the per-token text cache."""
        self._tokenizer = tokenizer
        self._pieces = {}

    def token_pieces(self, tokenizer: Any, ids: list[int]) -> list[str]:
        """The text of each token of ``ids`` decoded on its own; only ids not seen before are decoded."""
        if tokenizer is not self._tokenizer:
            self.setup_tokenizer(tokenizer)
        new = sorted(set(ids).difference(self._pieces))
        if new:
            texts = tokenizer.batch_decode([[t] for t in new], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
            self._pieces.update(zip(new, texts))
        return [self._pieces[t] for t in ids]

    def cuts_for_text(self, pieces: list[str]) -> list[int]:
        """Cut positions (token indices starting a new step) for one row's per-token texts."""
        text = "".join(pieces)
        owner: list[int] = []  # char index -> token index
        for j, p in enumerate(pieces):
            owner.extend([j] * len(p))
        cuts: list[int] = []
        for d in self.delimiters:
            start = text.find(d)
            while start != -1:
                cuts.append(owner[start + len(d) - 1] + 1)
                start = text.find(d, start + len(d))
        for rx in self._marker_res:
            for m in rx.finditer(text):
                if m.end() > m.start():
                    cuts.append(owner[m.start()])
        return cuts

    def segment(self, batch: RolloutBatch, tokenizer: Any) -> list[list[Span]]:
        """Return spans per row from ``batch.completion_ids`` ``(B, T)`` decoded with ``tokenizer``."""
        if tokenizer is None:
            raise ValueError("DelimiterSegmenter needs the policy tokenizer")
        lengths = batch.lengths.tolist()
        ids = batch.completion_ids.cpu()
        out: list[list[Span]] = []
        for i, length in enumerate(lengths):
            length = int(length)
            row = [int(t) for t in ids[i, :length].tolist()]
            out.append(cuts_to_spans(self.cuts_for_text(self.token_pieces(tokenizer, row)), length) if row else [])
        return out


class FixedLengthSegmenter(Segmenter):
    """Cut every completion into fixed-size chunks: ``[0, n), [n, 2n), ..., [j·n, L)``.

    With ``num_segments`` set instead, row i is cut into ``min(num_segments, L_i)`` nearly equal chunks
    (boundaries ``floor(j·L_i/N)``).

    Args:
        segment_length: chunk size ``n`` in tokens (used when ``num_segments`` is None).
        num_segments: if set, the number of chunks ``N`` per completion.
    """

    def __init__(self, segment_length: int = 32, num_segments: int | None = None) -> None:
        if segment_length < 1:
            raise ValueError(f"segment_length must be >= 1, got {segment_length}")
        if num_segments is not None and num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        self.segment_length = segment_length
        self.num_segments = num_segments

    def spans_for_length(self, length: int) -> list[Span]:
        """Spans tiling ``[0, length)``."""
        if length <= 0:
            return []
        if self.num_segments is not None:
            n = min(self.num_segments, length)
            cuts = [(j * length) // n for j in range(1, n)]
        else:
            cuts = list(range(self.segment_length, length, self.segment_length))
        return cuts_to_spans(cuts, length)

    def segment(self, batch: RolloutBatch, tokenizer: Any = None) -> list[list[Span]]:
        """Return spans per row from ``batch.completion_mask`` ``(B, T)``."""
        return [self.spans_for_length(int(n)) for n in batch.lengths.tolist()]
