"""Shared machinery of the model-based PRMs: segment texts, step-tagged inputs, truncation, micro-batching.

Shape legend: ``B`` completions, ``S`` max segments, ``N`` padded PRM input length of a micro-batch.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.prm import ProcessRewardModel, ProcessScores, pad_step_scores

log = logging.getLogger(__name__)

Truncation = Literal["carry_forward", "error"]
#: One encoded PRM input: ``(row index, token ids, separator positions read)``.
PRMInput = tuple[int, list[int], list[int]]


def segment_texts(batch: RolloutBatch, tokenizer: Any, skip_special_tokens: bool = True) -> list[list[str]]:
    """Decode every segment of every row with the policy tokenizer.

    Each span ``(s, e)`` of ``batch.segment_spans[i]`` is decoded on its own from ``completion_ids[i, s:e]``,
    so the concatenation of a row's texts is (up to byte-level merges) its completion text.

    Returns:
        ``B`` lists with one string per segment (``[]`` for an empty completion).
    """
    if len(batch.segment_spans) != batch.size:
        raise ValueError(f"batch.segment_spans has {len(batch.segment_spans)} rows, expected {batch.size}")
    ids = batch.completion_ids.cpu()
    out: list[list[str]] = []
    for i, spans in enumerate(batch.segment_spans):
        seqs = [ids[i, s:e].tolist() for s, e in spans]
        out.append(tokenizer.batch_decode(seqs, skip_special_tokens=skip_special_tokens) if seqs else [])
    return out


def truncate_keep_first_tag(
    ids: list[int], positions: list[int], max_length: int, tag_id: int
) -> tuple[list[int], list[int]]:
    """The documented truncation rule of the model PRMs.

    If ``len(ids) <= max_length`` nothing changes. Otherwise the input is cut to its first ``max_length``
    tokens (right truncation, as the PRPO authors' 4096-token tokenisation does) and only the separators that
    survive are read. If none survives, the input is cut to ``max_length − 1`` tokens and one separator is
    appended, so the first step is always scored (on its truncated text).

    Returns:
        ``(ids, positions)`` after truncation; ``positions`` are the separator indices read, in step order.
    """
    if len(ids) <= max_length:
        return ids, positions
    kept = [p for p in positions if p < max_length]
    if kept:
        return ids[:max_length], kept
    return ids[: max_length - 1] + [tag_id], [max_length - 1]


class TaggedStepPRM(ProcessRewardModel):
    """Base of PRMs that read a probability at a step-separator token after every step.

    Subclasses build the text (:meth:`build_text`), name the separator token (``tag_id``), load the model
    (:meth:`load_model`) and map logits to P(step correct) (:meth:`positive_probs`).

    **Truncation rule** (``truncation="carry_forward"``, default): inputs longer than ``max_length`` tokens
    are right-truncated (:func:`truncate_keep_first_tag`). A step whose separator fell beyond the limit gets
    the score of the last step the PRM could read (carried forward), never 0; the first step is always read.
    The counts of the last call are its :meth:`batch_metrics` (logged as ``train/prm/truncated_rows`` and
    ``train/prm/carried_steps``).
    ``truncation="error"`` raises ``ValueError`` instead.

    All scoring runs under ``torch.no_grad()`` in eval mode, in micro-batches of ``micro_batch_size``
    inputs (sorted by length, right-padded, with an attention mask) on the device given to :meth:`setup`.
    """

    add_special_tokens: bool = False

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer_name_or_path: str | None = None,
        max_length: int = 4096,
        micro_batch_size: int = 4,
        dtype: str = "bfloat16",
        truncation: Truncation = "carry_forward",
        skip_special_tokens: bool = True,
    ) -> None:
        if max_length < 2 or micro_batch_size < 1:
            raise ValueError("max_length must be >= 2 and micro_batch_size >= 1")
        if truncation not in ("carry_forward", "error"):
            raise ValueError(f"truncation must be 'carry_forward' or 'error', got {truncation!r}")
        self.model_name_or_path = model_name_or_path
        self.tokenizer_name_or_path = tokenizer_name_or_path or model_name_or_path
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size
        self.dtype = dtype
        self.truncation = truncation
        self.skip_special_tokens = skip_special_tokens
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        self.last_stats: dict[str, float] = {}

    def batch_metrics(self) -> dict[str, float]:
        """``truncated_rows`` and ``carried_steps`` of the last :meth:`score` call."""
        return dict(self.last_stats)

    # ----------------------------------------------------------------- hooks
    @property
    @abstractmethod
    def tag_id(self) -> int:
        """Token id of the step separator whose logits are read."""

    @abstractmethod
    def build_text(self, problem: str, steps: list[str]) -> str:
        """The full PRM input text for one completion."""

    @abstractmethod
    def load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        """Load the scoring model from a resolved path."""

    @abstractmethod
    def positive_probs(self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(b, N)`` P(step correct) at every position of ``input_ids`` ``(b, N)``."""

    def load_tokenizer(self, path: str) -> Any:
        """Load the PRM tokenizer (``AutoTokenizer``)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    # ----------------------------------------------------------------- lifecycle
    def setup(self, device: torch.device | str = "cpu") -> None:
        """Load tokenizer and model once (a tokenizer already set is kept), eval mode, no grad, move to ``device``."""
        from prpo_lightning.runtime.models import resolve_model_path, torch_dtype

        self.device = torch.device(device)
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer(resolve_model_path(self.tokenizer_name_or_path))
        if self.model is None:
            model = self.load_model(resolve_model_path(self.model_name_or_path), torch_dtype(self.dtype))
            model.eval()
            model.requires_grad_(False)
            self.model = model
        self.model.to(self.device)

    # ----------------------------------------------------------------- scoring
    def encode(self, problem: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of one PRM input and the separator positions (one per step, in order).

        Raises:
            ValueError: if the number of separators found differs from the number of steps.
        """
        ids = self.tokenizer(self.build_text(problem, steps), add_special_tokens=self.add_special_tokens)["input_ids"]
        positions = [j for j, t in enumerate(ids) if t == self.tag_id]
        if len(positions) != len(steps):
            raise ValueError(f"{type(self).__name__}: found {len(positions)} step separators for {len(steps)} steps")
        return ids, positions

    def encode_inputs(self, problems: list[str], steps: list[list[str]]) -> tuple[list[PRMInput], int, int]:
        """Encode every non-empty row and apply the truncation rule.

        Returns:
            ``(inputs, truncated_rows, carried_steps)``; ``inputs`` holds ``(row, ids, positions)`` for every row
            with at least one step, ``positions`` being the separators read (all separators left in ``ids``).

        Raises:
            ValueError: a row is longer than ``max_length`` under ``truncation="error"``.
        """
        inputs: list[PRMInput] = []
        carried = truncated = 0
        for i, (problem, row) in enumerate(zip(problems, steps)):
            if not row:
                continue
            ids, pos = self.encode(problem, row)
            if len(ids) > self.max_length:
                if self.truncation == "error":
                    raise ValueError(f"{type(self).__name__}: row {i} has {len(ids)} > max_length={self.max_length} tokens")
                ids, pos = truncate_keep_first_tag(ids, pos, self.max_length, self.tag_id)
                truncated += 1
                carried += len(row) - len(pos)
            inputs.append((i, ids, pos))
        return inputs, truncated, carried

    @torch.no_grad()
    def read_step_probs(self, inputs: list[PRMInput]) -> dict[int, list[float]]:
        """P(step correct) at the separator positions of every input: ``{row: [p per position]}``.

        Runs the model in micro-batches of ``micro_batch_size`` inputs, sorted by length, right-padded with an
        attention mask. Subclasses that score elsewhere (e.g. on a server) override this method only, so the
        inputs (:meth:`encode_inputs`) stay identical.
        """
        if self.model is None:
            self.setup(self.device)
        assert self.model is not None
        self.model.eval()
        read: dict[int, list[float]] = {}
        order = sorted(inputs, key=lambda x: len(x[1]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for k in range(0, len(order), self.micro_batch_size):
            chunk = order[k : k + self.micro_batch_size]
            n = max(len(ids) for _, ids, _ in chunk)
            input_ids = torch.full((len(chunk), n), pad, dtype=torch.long)  # (b, N)
            attn = torch.zeros(len(chunk), n, dtype=torch.long)  # (b, N)
            for r, (_, ids, _) in enumerate(chunk):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attn[r, : len(ids)] = 1
            probs = self.positive_probs(self.model, input_ids.to(self.device), attn.to(self.device))  # (b, N)
            probs = probs.float().cpu()
            for r, (i, _, pos) in enumerate(chunk):
                read[i] = probs[r, pos].tolist()
        return read

    def score_texts(self, problems: list[str], steps: list[list[str]]) -> list[list[float]]:
        """Score step texts directly: ``problems[i]`` with its ``steps[i]`` → one P(correct) per step."""
        if self.tokenizer is None:
            self.setup(self.device)
        inputs, truncated, carried = self.encode_inputs(problems, steps)
        read = self.read_step_probs(inputs)
        out: list[list[float]] = []
        for i, row in enumerate(steps):
            vals = read.get(i, [])
            out.append(vals + [vals[-1]] * (len(row) - len(vals)) if row else [])  # carry forward
        self.last_stats = {"truncated_rows": float(truncated), "carried_steps": float(carried)}
        if truncated:
            log.warning("%s: %d inputs exceeded max_length=%d; %d steps carry the last read score",
                        type(self).__name__, truncated, self.max_length, carried)
        return out

    def score(self, batch: RolloutBatch, tokenizer: Any) -> ProcessScores:
        """Score every segment of every row.

        Returns:
            ``ProcessScores`` with ``step_scores`` ``(B, S)`` in [0, 1] and ``step_mask`` ``(B, S)``.
        """
        texts = segment_texts(batch, tokenizer, self.skip_special_tokens)
        scores = self.score_texts(list(batch.problems), texts)
        return pad_step_scores(scores, device=batch.completion_ids.device)
