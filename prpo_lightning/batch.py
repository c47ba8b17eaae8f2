"""Typed containers for one rollout batch.

Shape legend used throughout the project:

- ``B``: number of completions in the batch (prompts × G rollouts);
- ``P``: padded prompt length (prompts are **left**-padded);
- ``T``: padded completion length (completions are **right**-padded);
- ``S``: maximum number of segments (steps) of any completion in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.scoring.verifier import Verdict

Span = tuple[int, int]


@dataclass
class RolloutBatch:
    """Everything known about B sampled completions, filled in stage by stage.

    Every per-sample field is indexed by the same row ``i``; rows may be in any order. Group statistics
    must use ``group_ids``, never row positions.

    Attributes:
        prompt_ids: ``(B, P)`` long, left-padded prompt token ids.
        prompt_mask: ``(B, P)`` long/bool, 1 on real prompt tokens.
        completion_ids: ``(B, T)`` long, right-padded completion token ids (EOS included when generated).
        completion_mask: ``(B, T)`` bool, True on valid completion tokens (EOS counts as valid).
        group_ids: ``(B,)`` long, the prompt id of each row; rows with equal ids form a group.
        problems: ``B`` problem texts (the question, without chat formatting), used by PRMs.
        answers: ``B`` gold answers; ``answers[i]`` is row i's **own** answer.
        completions: ``B`` decoded completion texts (special tokens removed).
        truncated: ``(B,)`` bool, True when generation hit ``max_new_tokens`` without EOS.
        old_logprobs: ``(B, T)`` float, log π_old of each sampled token (0 on padding).
        entropies: ``(B, T)`` float, full-vocabulary entropy (nats) of the distribution that produced
            each token (0 on padding).
        ref_logprobs: ``(B, T)`` float or None, log π_ref of each sampled token.
        is_weights: ``(B, T)`` float or None, off-policy correction weight of each token's policy-gradient term
            (:func:`~prpo_lightning.rollout.offpolicy.correction_weights`; None: weights ≡ 1).
        verdicts: ``B`` verifier verdicts.
        outcome_rewards: ``(B,)`` float, the verifier reward of each row.
        segment_spans: ``B`` lists of half-open token spans ``(start, end)`` that tile ``[0, L_i)``.
        step_scores: ``(B, S)`` float, PRM score of each segment (0 where ``step_mask`` is False).
        step_mask: ``(B, S)`` bool, True where row i has a segment j.
        token_scores: ``(B, T)`` float or None, dense per-token process rewards (e.g. implicit PRM).
        advantages: ``(B, T)`` float, token advantages (0 on padding).
        policy_versions: ``(B,)`` long or None, the weight version (optimizer steps and checkpoint loads) of the
            engine that sampled each row; the update's version minus it is the row's staleness.
        extras: free-form per-batch data for user components.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    group_ids: Tensor
    problems: list[str]
    answers: list[str]
    completions: list[str] = field(default_factory=list)
    truncated: Tensor | None = None
    old_logprobs: Tensor | None = None
    entropies: Tensor | None = None
    ref_logprobs: Tensor | None = None
    is_weights: Tensor | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    outcome_rewards: Tensor | None = None
    segment_spans: list[list[Span]] = field(default_factory=list)
    step_scores: Tensor | None = None
    step_mask: Tensor | None = None
    token_scores: Tensor | None = None
    advantages: Tensor | None = None
    policy_versions: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b = self.completion_ids.shape[0]
        for name in ("prompt_ids", "prompt_mask", "completion_mask", "group_ids"):
            if getattr(self, name).shape[0] != b:
                raise ValueError(f"RolloutBatch.{name} has {getattr(self, name).shape[0]} rows, expected {b}")
        if len(self.problems) != b or len(self.answers) != b:
            raise ValueError(f"RolloutBatch needs one problem and one answer per row ({b} rows)")
        self.completion_mask = self.completion_mask.bool()

    @property
    def size(self) -> int:
        """Number of completions B."""
        return int(self.completion_ids.shape[0])

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` long, the number of valid completion tokens ``L_i``."""
        return self.completion_mask.sum(dim=1)

    def segment_ids(self) -> Tensor:
        """``(B, T)`` long: the segment index of every token, -1 on padding."""
        return spans_to_segment_ids(self.segment_spans, self.completion_mask)

    def select(self, index: Tensor) -> RolloutBatch:
        """Return the rows ``index`` (a ``(b,)`` long tensor) as a new batch; tensors are indexed, lists gathered."""
        rows = index.tolist()
        updates: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                updates[f.name] = value[index]
            elif isinstance(value, list) and len(value) == self.size:
                updates[f.name] = [value[r] for r in rows]
        return replace(self, **updates)


#: the per-row fields :func:`rollout_rows` gives :meth:`~prpo_lightning.scoring.verifier.OutcomeVerifier.verify_batch`
#: besides completion and answer.
ROW_FIELDS = ("problem", "id", "truncated", "num_tokens")


def rollout_rows(batch: RolloutBatch) -> list[dict[str, Any]]:
    """The per-row fields of a rollout batch a verifier may read besides the completion and the answer.

    Returns:
        One dict per row with ``problem`` (the question text), ``id`` (the prompt id, shared by the row's group),
        ``truncated`` (generation hit ``max_new_tokens`` without EOS) and ``num_tokens`` (valid completion tokens).
    """
    ids = batch.group_ids.tolist()
    truncated = batch.truncated.tolist() if batch.truncated is not None else [False] * len(ids)
    lengths = batch.completion_mask.sum(dim=1).tolist()
    return [
        {"problem": problem, "id": int(pid), "truncated": bool(cut), "num_tokens": int(n)}
        for problem, pid, cut, n in zip(batch.problems, ids, truncated, lengths)
    ]


def spans_to_segment_ids(spans: list[list[Span]], mask: Tensor) -> Tensor:
    """Turn per-row segment spans into a ``(B, T)`` segment-index tensor (-1 on padding).

    Args:
        spans: ``B`` lists of half-open ``(start, end)`` spans.
        mask: ``(B, T)`` bool completion mask.

    The spans must tile each row's valid tokens ``[0, L_i)``: the framework checks them once, when the segmenter
    returns them (:func:`check_segment_spans`, whose error names the segmenter); code that builds spans by hand
    calls that check itself.
    """
    b, t = mask.shape
    out = torch.full((b, t), -1, dtype=torch.long, device=mask.device)
    for i, row in enumerate(spans):
        for j, (s, e) in enumerate(row):
            out[i, s:e] = j
    return out


class ComponentContractError(TypeError):
    """A user component broke its contract with the framework (wrong return type, bad spans, an input it did not
    declare). The message names the component, the rule and the fix. Always raised, whatever the fault policy."""


class SpanContractError(ComponentContractError, ValueError):
    """Segment spans that do not tile a completion (also a ``ValueError``, as the check always raised)."""


TILING_RULE = (
    "spans must be half-open (start, end) pairs that are non-empty, contiguous, start at 0 and end at the "
    "completion length L (a completion of length 0 has no spans); build them from cut positions with "
    "components.segmenters.cuts_to_spans(cuts, L)"
)


def check_segment_spans(spans: list[list[Span]], lengths: list[int], source: str = "segment_spans") -> None:
    """The one tiling check: every row's spans tile its valid tokens ``[0, L_i)``.

    Args:
        spans: ``B`` lists of spans.
        lengths: ``B`` valid-token counts ``L_i``.
        source: who produced the spans, for the message (e.g. ``"segmenter DelimiterSegmenter"``).

    Raises:
        SpanContractError: naming ``source``, the row, the spans, the rule and the fix.
    """
    if len(spans) != len(lengths):
        raise SpanContractError(f"{source} returned spans for {len(spans)} rows, expected one list per completion "
                                f"({len(lengths)} rows)")
    for i, (row, length) in enumerate(zip(spans, lengths)):
        check_spans_tile(row, int(length), row_index=i, source=source)


def check_spans_tile(spans: list[Span], length: int, row_index: int = 0, source: str = "segment_spans") -> None:
    """Raise :class:`SpanContractError` unless ``spans`` are contiguous, non-empty and cover exactly ``[0, length)``.

    A completion of length 0 must have no spans.
    """
    pos = 0
    for s, e in spans:
        if s != pos or e <= s:
            break
        pos = e
    else:
        if pos == length:
            return
    raise SpanContractError(f"{source}: row {row_index}: spans {list(spans)} do not tile [0, {length}): {TILING_RULE}")


# Inputs a component must declare before reading them: field -> role -> the needs that grant it.
# ``reference_logprobs`` grants ``old_logprobs`` too (a log-ratio against the reference needs both).
_DECLARED_INPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "old_logprobs": {"prm": ("rollout_logprobs", "reference_logprobs"),
                     "aligner": ("rollout_logprobs", "reference_logprobs")},
    "ref_logprobs": {"prm": ("reference_logprobs",), "aligner": ("reference_logprobs",)},
    "entropies": {"segmenter": ("entropies",), "prm": ("rollout_logprobs",), "aligner": ("rollout_logprobs",)},
}


def component_name(component: Any) -> str:
    """The class name of a component."""
    return type(component).__name__


class _DeclaredInputsView(RolloutBatch):
    """A :class:`RolloutBatch` whose undeclared inputs raise :class:`ComponentContractError` when read."""

    def __getattribute__(self, name: str) -> Any:
        hidden = object.__getattribute__(self, "__dict__").get("_undeclared")
        if hidden and name in hidden:
            raise ComponentContractError(hidden[name])
        return object.__getattribute__(self, name)

    def __repr__(self) -> str:
        return f"<RolloutBatch view of {self.size} rows for {object.__getattribute__(self, '_role')}>"

    def select(self, index: Tensor) -> RolloutBatch:
        source = object.__getattribute__(self, "_source")
        return declared_inputs_view(source.select(index), object.__getattribute__(self, "_component"),
                                    object.__getattribute__(self, "_role"))


def declared_inputs_view(batch: RolloutBatch, component: Any, role: str) -> RolloutBatch:
    """The batch as ``component`` may see it: inputs it did not declare raise a clear error instead of being None.

    Reading ``old_logprobs``, ``ref_logprobs`` or ``entropies`` without declaring the need that makes the module
    compute them would work only by accident (e.g. off-policy, or because another component asked for them); the
    view makes it fail on every configuration, naming the component, the field and the need to declare.

    Args:
        batch: the rollout batch.
        component: the segmenter, PRM or aligner (its ``needs``, a
            :class:`~prpo_lightning.scoring.needs.ComponentNeeds`).
        role: ``"segmenter"``, ``"prm"`` or ``"aligner"``.

    Returns:
        ``batch`` itself when the component declared every input, else a view sharing its tensors and lists.
    """
    needs = component.needs
    undeclared: dict[str, str] = {}
    for name, by_role in _DECLARED_INPUTS.items():
        granted_by = by_role.get(role, ())
        if any(getattr(needs, need) for need in granted_by):
            continue
        if granted_by:
            alt = f" (or {granted_by[1]}=True)" if len(granted_by) > 1 else ""
            fix = f"declare needs = ComponentNeeds({granted_by[0]}=True){alt} so that the module computes it"
        else:
            fix = f"a {role} cannot read it; read it in a PRM or an aligner instead"
        undeclared[name] = (f"{role} {type(component).__name__} read batch.{name}, an input it did not declare: "
                            f"{fix} (see ComponentNeeds in docs/howto)")
    if not undeclared:
        return batch
    view = _DeclaredInputsView(**{f.name: getattr(batch, f.name) for f in fields(batch)})
    view.__dict__.update(_undeclared=undeclared, _source=batch, _component=component, _role=role)
    return view


@dataclass(frozen=True)
class StepContext:
    """Where one training (or evaluation) step runs; passed explicitly to the collector and the updater.

    Attributes:
        step: ``global_step`` at the start of the step (it seeds sampling and shuffling).
        rank: this process's global rank.
        world_size: number of ranks.
        device: the policy's device.
        datamodule: the trainer's datamodule (dynamic sampling draws extra prompts from it), or None.
    """

    step: int
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    datamodule: Any = None


@dataclass
class Round:
    """One generate → score round of a step.

    Attributes:
        rollout: the scored rollout of this rank (None: no prompt fitted ``max_prompt_length``, or a skipped PRM
            failure).
        prm_error: the PRM failure that made this rank skip the round (``on_prm_error: skip``), or None.
        metrics: the round's metrics (``data/*``, ``rollout/*``, the scoring metrics, ``time/*``).
        fitted: some prompt fitted ``max_prompt_length`` (so the round was generated and scored).
    """

    rollout: RolloutBatch | None
    prm_error: str | None
    metrics: dict[str, float]
    fitted: bool
