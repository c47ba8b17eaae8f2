"""From sampled completions to token advantages: verify → segment → PRM → align, with per-stage metrics.

Every completion is graded against ``batch.answers[i]``, its own sample's answer, and every group statistic
is taken by ``batch.group_ids`` (prompt id), so the result does not depend on row order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from prpo_lightning.batch import (
    ComponentContractError,
    RolloutBatch,
    StepContext,
    check_segment_spans,
    component_name,
    declared_inputs_view,
    rollout_rows,
)
from prpo_lightning.config import RewardShapingConfig
from prpo_lightning.scoring.aligner import AdvantageAligner, sum_of_terms
from prpo_lightning.scoring.deadline import RewardClock, StepAbandoned, call_with_deadline
from prpo_lightning.scoring.faults import (PROGRAMMING_ERRORS, ComponentError, ComponentTimeoutError, PRMError,
                                           VerifierError)
from prpo_lightning.scoring.grouping import group_index, zero_variance_fraction
from prpo_lightning.scoring.prm import ProcessRewardModel, ProcessScores
from prpo_lightning.scoring.segmenter import Segmenter
from prpo_lightning.scoring.shaping import apply_reward_shaping
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus


T = TypeVar("T")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _programming_error(kind: str, component: Any, method: str, err: BaseException) -> ComponentError:
    name = type(component).__name__
    return ComponentError(
        f"{kind} {name}.{method} raised {type(err).__name__}: {err}. This is a programming error in the {kind} "
        f"({', '.join(e.__name__ for e in PROGRAMMING_ERRORS)} are never skipped, whatever model.on_prm_error "
        f"says); fix {name}.{method} (the traceback above points to the line)."
    )


def guarded_call(kind: str, component: Any, method: str, call: Callable[[], T], size: int,
                 timeout_s: float | None = None) -> T:
    """Run one component call under the fault policy: a programming error becomes a :class:`ComponentError`, any
    other exception a :class:`PRMError` (``kind`` ``"PRM"``: skippable under ``on_prm_error: skip``) or a
    :class:`VerifierError` (any other kind: a bug, never skipped); each names the component and the method.

    Args:
        kind: ``"PRM"``, ``"verifier"``, ``"segmenter"`` or ``"aligner"`` (for the message and the error type).
        component: the component (its class name is reported).
        method: the method being called (for the message).
        call: the call itself.
        size: completions in the call (for the message).
        timeout_s: ``model.component_timeout_s``: the call runs in a daemon thread and a call still running after
            that many seconds raises :class:`~prpo_lightning.scoring.faults.ComponentTimeoutError` here, which
            follows the policy above (:mod:`prpo_lightning.scoring.deadline`); None: no limit, in this thread.
    """
    name = type(component).__name__
    try:
        if timeout_s is not None:
            return call_with_deadline(call, timeout_s, f"{kind} {name}.{method} on {size} completions",
                                      "model.component_timeout_s")
        return call()
    except StepAbandoned:  # a stop signal ended the wait: preemption, not a component error
        raise
    except SystemExit as err:  # sys.exit() in a component must not end the run without a word
        raise ComponentError(f"{kind} {name}.{method} called sys.exit({err.code!r}): a component must return its "
                             f"result or raise an exception, never exit the process. Fix {name}.{method}.") from err
    except PROGRAMMING_ERRORS as err:
        raise _programming_error(kind, component, method, err) from err
    except ComponentContractError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the component's name
        error = PRMError if kind == "PRM" else VerifierError
        message = (str(err) if isinstance(err, ComponentTimeoutError)
                   else f"{kind} {name} failed on {size} completions: {type(err).__name__}: {err}")
        raise error(message) from err


def grade(batch: RolloutBatch, verifier: OutcomeVerifier, timeout_s: float | None = None,
          reward_clock: RewardClock | None = None) -> dict[str, float]:
    """Fill ``batch.verdicts`` and ``batch.outcome_rewards`` ``(B,)``; return verifier metrics.

    The verifier's own :meth:`~prpo_lightning.scoring.verifier.OutcomeVerifier.batch_metrics` (e.g. the math verifier's
    ``completion/no_boxed_frac``) are added to the generic counts.

    Raises:
        ComponentContractError: if ``verify_batch`` does not return one ``Verdict`` per completion.
    """
    name = component_name(verifier)
    with reward_clock.timing(name) if reward_clock is not None else contextlib.nullcontext():
        verdicts = guarded_call("verifier", verifier, "verify_batch",
                                lambda: verifier.verify_batch(batch.completions, batch.answers, rollout_rows(batch)),
                                batch.size, timeout_s)
    if not isinstance(verdicts, list) or len(verdicts) != batch.size:
        got = f"{len(verdicts)} items" if isinstance(verdicts, list) else f"a {type(verdicts).__name__}"
        raise ComponentContractError(f"verifier {name}.verify_batch returned {got} for {batch.size} completions: "
                                     "it must return a list with one prpo_lightning.scoring.verifier.Verdict per completion")
    wrong = next((v for v in verdicts if not isinstance(v, Verdict)), None)
    if wrong is not None:
        raise ComponentContractError(f"verifier {name}.verify_batch returned a {type(wrong).__name__} where a "
                                     "prpo_lightning.scoring.verifier.Verdict is expected: build one Verdict(status, reward) "
                                     "per completion")
    bad = next(((i, v.reward) for i, v in enumerate(verdicts)
                if not isinstance(v.reward, (int, float)) or not math.isfinite(v.reward) or abs(v.reward) > FLOAT32_MAX),
               None)
    if bad is not None:
        raise ComponentContractError(f"verifier {name} gave row {bad[0]} the reward {bad[1]!r}: rewards must be finite "
                                     f"numbers within float32's range (|r| <= {FLOAT32_MAX:.3g}); fix the verifier or "
                                     "reward function")
    batch.verdicts = verdicts
    batch.outcome_rewards = torch.tensor([v.reward for v in verdicts], dtype=torch.float32)
    metrics = {
        "verifier/unparsable": float(sum(v.status is VerdictStatus.UNPARSABLE for v in verdicts)),
        "verifier/timeouts": float(sum(v.timed_out for v in verdicts)),
        "verifier/errors": float(sum(v.error is not None for v in verdicts)),
    }
    metrics.update(verifier.batch_metrics(batch.completions, verdicts))
    return metrics


def check_process_scores(scores: Any, batch: RolloutBatch, prm: ProcessRewardModel) -> ProcessScores:
    """Check a PRM's output against its contract: a :class:`ProcessScores` with ``(B, S)`` tensors.

    Raises:
        ComponentContractError: naming the PRM, what it returned, the rule and the fix.
    """
    name = component_name(prm)
    fix = ("return prpo_lightning.ProcessScores(step_scores (B, S) float, step_mask (B, S) bool); "
           "prpo_lightning.scoring.prm.pad_step_scores(per_row_scores) builds it from one list of step scores per row")
    if not isinstance(scores, ProcessScores):
        raise ComponentContractError(f"PRM {name}.score returned a {type(scores).__name__}: {fix}")
    b = batch.size
    for attr in ("step_scores", "step_mask"):
        value = getattr(scores, attr)
        if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[0] != b:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ComponentContractError(f"PRM {name}.score returned {attr} of shape {shape}, "
                                         f"expected (B={b}, S): {fix}")
    if scores.step_scores.shape != scores.step_mask.shape:
        raise ComponentContractError(f"PRM {name}.score returned step_scores {tuple(scores.step_scores.shape)} and "
                                     f"step_mask {tuple(scores.step_mask.shape)}: the two must have the same shape")
    expected = tuple(batch.completion_mask.shape)
    if scores.token_scores is not None and tuple(scores.token_scores.shape) != expected:
        raise ComponentContractError(f"PRM {name}.score returned token_scores of shape "
                                     f"{tuple(scores.token_scores.shape)}, expected (B, T) = {expected}")
    marked = scores.step_mask.bool().sum(dim=1).tolist()  # (B,) scores per row
    for row, (n_scores, spans) in enumerate(zip(marked, batch.segment_spans)):
        if n_scores != len(spans):
            raise ComponentContractError(f"PRM {name}.score marked {n_scores} step scores on row {row}, which has "
                                         f"{len(spans)} segments: return exactly one score per segment (step_mask "
                                         "True on the first len(spans) columns of the row)")
    valid = scores.step_scores[scores.step_mask.bool()].double()
    finite = valid[torch.isfinite(valid)]
    low, high = prm.score_range
    if finite.numel() and (float(finite.min()) < low or float(finite.max()) > high):
        raise ComponentContractError(f"PRM {name}.score returned step scores in [{float(finite.min()):.4g}, "
                                     f"{float(finite.max()):.4g}], outside its score_range [{low}, {high}]: return "
                                     "P(step correct), or declare score_range = (low, high) on the PRM if its scores "
                                     "live on another scale (the aligners z-score them)")
    return scores


def segment_and_score(
    batch: RolloutBatch, segmenter: Segmenter, prm: ProcessRewardModel, tokenizer: Any, timeout_s: float | None = None
) -> dict[str, float]:
    """Fill ``segment_spans``, ``step_scores`` ``(B, S)``, ``step_mask`` ``(B, S)`` and ``token_scores``.

    The segmenter and the PRM see the batch through :func:`~prpo_lightning.batch.declared_inputs_view`.

    Raises:
        SpanContractError: if the segmenter's spans do not tile a completion.
        ComponentContractError: if the PRM does not return a well-formed ``ProcessScores`` or a component reads
            an input it did not declare.
    """
    spans = segmenter.segment(declared_inputs_view(batch, segmenter, "segmenter"), tokenizer)
    if not isinstance(spans, list):
        raise ComponentContractError(f"segmenter {component_name(segmenter)}.segment returned a "
                                     f"{type(spans).__name__}: it must return one list of (start, end) spans per row")
    check_segment_spans(spans, batch.lengths.tolist(), source=f"segmenter {component_name(segmenter)}.segment")
    batch.segment_spans = spans
    view = declared_inputs_view(batch, prm, "prm")
    t0 = time.perf_counter()
    raw = guarded_call("PRM", prm, "score", lambda: prm.score(view, tokenizer), batch.size, timeout_s)
    prm_s = time.perf_counter() - t0  # the PRM alone: train/time/prm_s
    scores = check_process_scores(raw, batch, prm)
    counts = torch.tensor([len(r) for r in spans], dtype=torch.float32)  # (B,)
    batch.step_scores = scores.step_scores.float().cpu()
    batch.step_mask = scores.step_mask.bool().cpu()
    batch.token_scores = None if scores.token_scores is None else scores.token_scores.float().cpu()
    valid = batch.step_scores[batch.step_mask]
    metrics = {
        "time/prm_s": prm_s,
        "segments/per_completion": float(counts.mean()) if counts.numel() else 0.0,
        "segments/max": float(counts.max()) if counts.numel() else 0.0,
    }
    if valid.numel():
        metrics.update(
            {
                "prm/score_mean": float(valid.mean()),
                "prm/score_std": float(valid.std()) if valid.numel() > 1 else 0.0,
                "prm/score_min": float(valid.min()),
                "prm/score_max": float(valid.max()),
            }
        )
    metrics.update({f"prm/{k}": float(v) for k, v in prm.batch_metrics().items()})
    metrics.update({f"segments/{k}": float(v) for k, v in segmenter.batch_metrics(spans).items()})
    return metrics


def compute_advantages(
    batch: RolloutBatch,
    verifier: OutcomeVerifier,
    aligner: AdvantageAligner,
    segmenter: Segmenter | None,
    prm: ProcessRewardModel | None,
    tokenizer: Any,
    reward_shaping: RewardShapingConfig | None = None,
    max_new_tokens: int | None = None,
    timeout_s: float | None = None,
    reward_clock: RewardClock | None = None,
) -> dict[str, float]:
    """Run the whole scoring pipeline on ``batch`` (in place) and return its metrics.

    ``reward_shaping`` (e.g. the overlong penalty, which needs ``max_new_tokens``) is added to
    ``batch.outcome_rewards`` right after grading, so the aligner and the reward metrics see the shaped rewards.

    Every component runs under ``torch.no_grad()``: scoring never builds an autograd graph, so a model PRM keeps
    no activations. Each component sees the batch through :func:`~prpo_lightning.batch.declared_inputs_view`.
    ``timeout_s`` (``model.component_timeout_s``) bounds the verifier and PRM calls (:func:`guarded_call`);
    ``reward_clock`` times the verifier (:class:`~prpo_lightning.scoring.deadline.RewardClock`).

    Raises:
        ValueError: if the aligner needs process scores but no segmenter/PRM is configured, or it returns
            advantages of the wrong shape or with NaN/inf.
        ComponentContractError: if a component breaks its contract (see :func:`grade`, :func:`segment_and_score`).
    """
    with torch.no_grad():
        t0 = time.perf_counter()
        metrics = grade(batch, verifier, timeout_s, reward_clock)
        metrics["time/verify_s"] = time.perf_counter() - t0  # the verifier and its checks: train/time/verify_s
        if reward_shaping is not None and reward_shaping.overlong is not None:
            if max_new_tokens is None:
                raise ValueError("compute_advantages: reward_shaping.overlong needs max_new_tokens")
            batch.outcome_rewards, shaping_metrics = apply_reward_shaping(
                batch.outcome_rewards, batch.lengths, max_new_tokens, reward_shaping)  # (B,)
            metrics.update(shaping_metrics)
        if aligner.needs.process_scores:
            if segmenter is None or prm is None:
                raise ValueError(
                    f"{component_name(aligner)} uses process scores: configure model.segmenter and model.prm"
                )
            metrics.update(segment_and_score(batch, segmenter, prm, tokenizer, timeout_s))
        view = declared_inputs_view(batch, aligner, "aligner")
        name = component_name(aligner)
        terms = checked_terms(aligner.advantage_terms(view), batch.completion_mask, name)
        adv = sum_of_terms(terms, batch.completion_mask)  # (B, T): the aligner's align, computed once
    if not torch.isfinite(adv).all():
        raise ValueError(f"{name} produced NaN/inf advantages")
    batch.advantages = adv.float().detach() * batch.completion_mask  # (B, T)
    metrics.update(rollout_metrics(batch))
    metrics.update(advantage_term_metrics(terms, batch.completion_mask))
    with torch.no_grad():
        metrics.update({f"aligner/{k}": float(v) for k, v in aligner.batch_metrics(view).items()})
    return metrics


def checked_terms(terms: Any, mask: Tensor, aligner_name: str) -> dict[str, Tensor]:
    """``advantage_terms``' result, checked: a non-empty dict of ``(B, T)`` tensors.

    Raises:
        ComponentContractError: naming the aligner and the part that is not a ``(B, T)`` tensor.
    """
    if not isinstance(terms, dict) or not terms:
        got = "an empty dict" if isinstance(terms, dict) else f"a {type(terms).__name__}"
        raise ComponentContractError(f"aligner {aligner_name}.advantage_terms returned {got}: it must return a dict "
                                     "of (B, T) tensors, e.g. {'outcome': adv}")
    for key, term in terms.items():
        if not isinstance(term, Tensor) or term.shape != mask.shape:
            shape = tuple(term.shape) if isinstance(term, Tensor) else type(term).__name__
            raise ComponentContractError(f"aligner {aligner_name}.advantage_terms returned {key!r} of shape {shape}, "
                                         f"expected (B, T) = {tuple(mask.shape)}")
    return terms


def advantage_term_metrics(terms: dict[str, Tensor], mask: Tensor) -> dict[str, float]:
    """Mean ``|part|`` over valid tokens for each part of an aligner's advantages, and the process/outcome ratio.

    Args:
        terms: :meth:`~prpo_lightning.scoring.aligner.AdvantageAligner.advantage_terms`' ``{name: (B, T)}``.
        mask: ``(B, T)`` bool valid tokens.

    Returns:
        ``{"advantage/<name>_abs_mean": ...}``, plus ``"advantage/process_to_outcome"`` when both parts exist and
        the outcome part is not zero everywhere.
    """
    n_tok = mask.sum().clamp(min=1)
    out = {f"advantage/{key}_abs_mean": float((term.abs() * mask.to(term.device)).sum() / n_tok)
           for key, term in terms.items()}
    if out.get("advantage/outcome_abs_mean", 0.0) > 0 and "advantage/process_abs_mean" in out:
        out["advantage/process_to_outcome"] = out["advantage/process_abs_mean"] / out["advantage/outcome_abs_mean"]
    return out


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """TRL-style rollout statistics: reward, accuracy, zero-variance groups, lengths, entropy, advantages."""
    r = batch.outcome_rewards if batch.outcome_rewards is not None else torch.zeros(batch.size)
    mask = batch.completion_mask
    lengths = mask.sum(dim=1).float()  # (B,)
    n_tok = mask.sum().clamp(min=1)
    _, n_groups = group_index(batch.group_ids)
    out = {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
        "accuracy": float(sum(v.is_correct for v in batch.verdicts)) / max(batch.size, 1),
        "frac_zero_std_groups": zero_variance_fraction(r, batch.group_ids.cpu()),
        "num_groups": float(n_groups),
        "completion/length_mean": float(lengths.mean()),
        "completion/length_max": float(lengths.max()),
        "completion/length_min": float(lengths.min()),
        "completion/truncated_frac": float(batch.truncated.float().mean()) if batch.truncated is not None else 0.0,
    }
    if batch.entropies is not None:
        out["entropy"] = float((batch.entropies * mask).sum() / n_tok)
    if batch.advantages is not None:
        adv: Tensor = batch.advantages[mask]
        out["advantage/mean"] = float(adv.mean()) if adv.numel() else 0.0
        out["advantage/std"] = float(adv.std()) if adv.numel() > 1 else 0.0
    return out


@dataclass
class Scorer:
    """The scoring stage of a step: the four scoring components, the reward shaping and the PRM fault policy.

    Attributes:
        verifier: grades each completion against its own gold answer.
        aligner: turns rewards (and step scores) into token advantages.
        segmenter: cuts completions into steps (when the aligner reads process scores).
        prm: scores the steps (likewise).
        tokenizer: the policy's tokenizer (segment texts).
        reward_shaping: shaping added to the outcome rewards before the aligner.
        max_new_tokens: the completion budget (the overlong penalty's reference).
        on_prm_error: ``raise`` or ``skip`` (a PRM failure skips this rank's update, counted and warned).
        component_timeout_s: the limit of one verifier or PRM call (None: none), see :func:`guarded_call`.
        reward_clock: times the verifier against the rest of the step (warns once when rewards dominate).
    """

    verifier: OutcomeVerifier
    aligner: AdvantageAligner
    segmenter: Segmenter | None
    prm: ProcessRewardModel | None
    tokenizer: Any
    reward_shaping: RewardShapingConfig
    max_new_tokens: int
    on_prm_error: Literal["raise", "skip"] = "raise"
    component_timeout_s: float | None = None
    reward_clock: RewardClock = field(default_factory=RewardClock)

    def score(self, rollout: RolloutBatch, ctx: StepContext) -> tuple[RolloutBatch | None, str | None, dict[str, float]]:
        """Grade, segment, score and align ``rollout`` in place (:func:`compute_advantages`).

        Returns:
            ``(rollout, None, metrics)``, or ``(None, error, {})`` for a PRM failure under ``on_prm_error: skip``.

        Raises:
            PRMError: the PRM failed and ``on_prm_error`` is ``raise``.
        """
        try:
            metrics = compute_advantages(rollout, self.verifier, self.aligner, self.segmenter, self.prm,
                                         self.tokenizer, self.reward_shaping, self.max_new_tokens,
                                         self.component_timeout_s, self.reward_clock)
        except PRMError as err:
            if self.on_prm_error == "raise":
                raise
            logging.getLogger(__name__).warning("rank %d, step %d: skipping the batch's update: %s",
                                                ctx.rank, ctx.step, err)
            return None, str(err), {}
        return rollout, None, metrics
