"""Outcome verifiers: grade a completion's final answer against its gold answer.

:class:`SympyMathVerifier` is the default math verifier. A pair is graded in three steps:

1. **Extraction** -- the last complete ``\\boxed{...}``/``\\fbox{...}`` (any nesting depth); optionally an explicit
   "the answer is ..." sentence. Never the last number in the text.
2. **Fast path (in-process, microseconds)** -- normalised strings, exact rationals (``fractions.Fraction``),
   exact decimals (or within a relative tolerance, when configured), and answer structure (tuples, intervals,
   sets, matrices, equations, multiple-choice letters, text), all read through the *gold* answer's shape.
3. **Symbolic path (worker processes)** -- pairs the fast path cannot decide go to a pool of worker processes that
   parse LaTeX with a grammar parser behind size guards and compare with sympy. Each check has a hard wall-clock
   timeout; a worker that overruns is killed and replaced and its verdict is ``UNPARSABLE`` with ``timed_out=True``.

Model output never reaches ``eval``, ``exec``, ``sympify`` or ``parse_expr``.

Policy choices are constructor arguments (see ``docs/howto/verifier.rst``): ``percent`` (how ``N\\%`` is read),
``float_rel_tol`` (``0`` = decimals are exact: ``0.125`` equals ``1/8`` but ``0.333333`` does not equal ``1/3``),
``equation_as_value`` (whether ``x=3`` equals ``3``), ``ignore_units``, ``multiple_boxes`` (several boxes in the
final answer), ``rounding`` and ``list_order``. The ``"problem"`` policies read the question text, which the
framework passes with each row to :meth:`SympyMathVerifier.verify_batch` (``verify``/``verify_batch`` also take it
as an optional ``problem``/``problems`` argument); without it they behave as when the problem asks for nothing.

Example::

    verifier = SympyMathVerifier()
    verdict = verifier.verify("... so the answer is $\\boxed{\\dfrac{1}{2}}$.", "0.5")
    assert verdict.is_correct and verdict.reward == 1.0
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from components.math_answer.compare import (
    PERCENT_POLICIES,
    WARMUP_PAYLOAD,
    CompareConfig,
    Outcome,
    compare_answers,
)
from components.math_answer.context import resolve_policies
from components.math_answer.extract import extract_answer, extract_last_boxed
from components.math_answer.pool import TaskResult, TimeoutPool
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus

__all__ = ["SympyMathVerifier"]

log = logging.getLogger(__name__)

_MAX_STORED_EXTRACT = 1000
_WORKER_HANDLER = "components.math_answer.compare:symbolic_task"
MULTIPLE_BOXES_POLICIES = ("final", "last")
ROUNDING_POLICIES = ("problem", "exact")
LIST_ORDER_POLICIES = ("problem", "any", "always")


class SympyMathVerifier(OutcomeVerifier):
    """Rule-based math answer verifier with a sympy fallback running under a hard timeout.

    Args:
        correct_reward: reward for a correct answer (the paper uses +1).
        incorrect_reward: reward for a wrong answer (the paper uses -1).
        unparsable_reward: reward when no answer could be extracted or read, or the check timed out or failed.
        timeout_seconds: hard wall-clock limit for the symbolic check of one answer.
        num_workers: number of worker processes for symbolic checks (started lazily on first need).
        float_rel_tol: relative tolerance when a decimal is involved. ``0`` (default): decimals are exact values,
            so ``0.125`` equals ``1/8`` and ``0.333333`` does not equal ``1/3`` nor ``1.414214`` equal
            ``\\sqrt{2}``. A positive value accepts a decimal within it that is also a correct rounding (at most
            half a unit in its last written place away).
        answer_is_fallback: when there is no ``\\boxed{}``, also accept "the answer is ..." (off for rewards).
        worker_memory_mb: address-space limit of each worker process in MiB (0 disables it).
        percent: how ``N\\%`` is read, one of ``"problem"`` (default: ``N/100``; it also matches the bare number
            ``N`` only when the problem asks for a percent, e.g. "What percent of ..."), ``"divide"`` (only
            ``N/100``: a bare ``20`` never equals ``20\\%``), ``"divide_or_bare"`` (also the bare number, always)
            or ``"ignore"`` (the sign is dropped on both sides).
        equation_as_value: ``x=3`` (a name with its value, ``a+b=12``, ``x=1 or x=2``, ``a=1, b=2`` against a
            tuple) equals the value(s); ``False`` makes an equation and a bare value always different.
        ignore_units: remove unit words (``\\text{ cm}``, ``km/h``, ``square units``) before comparing; with
            ``False`` units are compared as text. Degree and currency signs are notation and always removed.
        multiple_boxes: ``"final"`` (default): several boxes that end the completion on one line, each within a
            few characters of the next (``$x=\\boxed{2}$ or $x=\\boxed{5}$``), are read together as the list
            ``2, 5`` (so hedging ``\\boxed{5} or \\boxed{-5}`` is not the answer ``5``); an earlier box in another
            sentence is an intermediate result and ignored. ``"last"``: only the last box counts.
        rounding: ``"problem"`` (default): when the problem asks for a rounded value ("to the nearest tenth",
            "to 3 decimal places", "to the nearest cent"), two numbers are equal when both round to the same
            value at that place (``3.16`` for a gold ``3.2``; ``3.33`` for a gold ``\\frac{10}{3}``, hundredths).
            ``"exact"``: the problem text is not read for rounding.
        list_order: ``"problem"`` (default): a bare list (``-2, 1, 3``) is compared in order when the problem asks
            for an order ("in increasing order", "from least to greatest") and as a multiset otherwise. ``"any"``:
            never in order. ``"always"``: bare lists are always compared in order. Tuples ``(a, b)`` are always
            ordered and sets ``\\{a, b\\}`` never.

    Raises:
        ValueError: for a non-positive timeout or worker count, a negative tolerance or an unknown ``percent``,
            ``multiple_boxes``, ``rounding`` or ``list_order``.
        TypeError: when ``equation_as_value`` or ``ignore_units`` is not a bool.
    """

    def __init__(
        self,
        correct_reward: float = 1.0,
        incorrect_reward: float = -1.0,
        unparsable_reward: float = -1.0,
        timeout_seconds: float = 5.0,
        num_workers: int = 2,
        float_rel_tol: float = 0.0,
        answer_is_fallback: bool = False,
        worker_memory_mb: int = 2048,
        percent: str = "problem",
        equation_as_value: bool = True,
        ignore_units: bool = True,
        multiple_boxes: str = "final",
        rounding: str = "problem",
        list_order: str = "problem",
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if float_rel_tol < 0:
            raise ValueError(f"float_rel_tol must be >= 0 (0 = exact decimals), got {float_rel_tol}")
        if percent not in PERCENT_POLICIES:
            raise ValueError(
                f"SympyMathVerifier: percent must be one of {', '.join(map(repr, PERCENT_POLICIES))}, got {percent!r}"
            )
        for name, value, allowed in (
            ("multiple_boxes", multiple_boxes, MULTIPLE_BOXES_POLICIES),
            ("rounding", rounding, ROUNDING_POLICIES),
            ("list_order", list_order, LIST_ORDER_POLICIES),
        ):
            if value not in allowed:
                raise ValueError(
                    f"SympyMathVerifier: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
                )
        for name, value in (("equation_as_value", equation_as_value), ("ignore_units", ignore_units)):
            if not isinstance(value, bool):
                raise TypeError(f"SympyMathVerifier: {name} must be True or False, got {value!r}")
        self.correct_reward = float(correct_reward)
        self.incorrect_reward = float(incorrect_reward)
        self.unparsable_reward = float(unparsable_reward)
        self.timeout_seconds = float(timeout_seconds)
        self.num_workers = int(num_workers)
        self.float_rel_tol = float(float_rel_tol)
        self.answer_is_fallback = bool(answer_is_fallback)
        self.worker_memory_mb = int(worker_memory_mb)
        self.percent = percent
        self.equation_as_value = equation_as_value
        self.ignore_units = ignore_units
        self.multiple_boxes = multiple_boxes
        self.rounding = rounding
        self.list_order = list_order
        self._config = CompareConfig(
            float_rel_tol=self.float_rel_tol,
            percent="divide" if percent == "problem" else percent,
            equation_as_value=equation_as_value,
            ignore_units=ignore_units,
            ordered_lists=list_order == "always",
        )
        self._pool: TimeoutPool | None = None
        self._lock = threading.Lock()
        self._stats: Counter[str] = Counter()

    # ------------------------------------------------------------------ public API

    def verify(self, completion: str, gold: str, problem: str | None = None) -> Verdict:
        """Grades one completion against its gold answer.

        Args:
            completion: the model's full response text (untrusted).
            gold: the reference answer.
            problem: the question text, read by the ``"problem"`` policies (optional).

        Returns:
            The verdict, carrying the configured reward.
        """
        return self.verify_batch([completion], [gold], problems=None if problem is None else [problem])[0]

    def verify_batch(
        self, completions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]] | None = None,
        problems: Sequence[str | None] | None = None,
    ) -> list[Verdict]:
        """Grades ``completions[i]`` against ``golds[i]``; symbolic checks run in parallel in the workers.

        The one batch method the training and evaluation loops call, with each row's fields: a row's ``"problem"``
        feeds the ``"problem"`` policies (percent, rounding, list order).

        Args:
            completions: model responses (untrusted).
            golds: reference answers, one per completion.
            rows: the rows' other fields (the framework's call); their ``"problem"`` is read when ``problems`` is None.
            problems: question texts, one per completion, for direct calls (``None`` entries: no problem text).

        Returns:
            One verdict per completion, in order.

        Raises:
            ValueError: if the sequences differ in length.
        """
        if len(completions) != len(golds):
            raise ValueError(f"verify_batch got {len(completions)} completions but {len(golds)} gold answers")
        if rows is not None and len(rows) != len(completions):
            raise ValueError(f"verify_batch got {len(completions)} completions but {len(rows)} rows")
        if problems is None and rows is not None and any(row.get("problem") for row in rows):
            problems = [row.get("problem") for row in rows]
        if problems is not None and len(problems) != len(completions):
            raise ValueError(f"verify_batch got {len(completions)} completions but {len(problems)} problems")
        configs = [self._config_for(None if problems is None else problems[i]) for i in range(len(completions))]
        verdicts: list[Verdict | None] = [None] * len(completions)
        pending: list[tuple[int, str, str]] = []
        for i, (completion, gold) in enumerate(zip(completions, golds)):
            try:
                verdict, extracted = self._fast(completion, gold, configs[i])
            except Exception as exc:  # noqa: BLE001 - counted and logged, never silently scored
                log.exception("verifier fast path failed")
                verdicts[i] = self._verdict(VerdictStatus.UNPARSABLE, None, error=f"{type(exc).__name__}: {exc}")
                continue
            if verdict is None:
                pending.append((i, str(gold), extracted))
            else:
                verdicts[i] = verdict
        if pending:
            results = self._get_pool().run(
                [(gold, extracted, configs[i]) for i, gold, extracted in pending], self.timeout_seconds
            )
            for (i, _gold, extracted), result in zip(pending, results):
                verdicts[i] = self._from_worker(result, extracted)
        out = [v for v in verdicts if v is not None]
        self._record(out, symbolic=len(pending))
        return out

    def batch_metrics(self, completions: Sequence[str], verdicts: Sequence[Verdict]) -> dict[str, float]:
        """``completion/no_boxed_frac``: the fraction of completions without a complete ``\\boxed{}``/``\\fbox{}``."""
        missing = sum(extract_last_boxed(c) is None for c in completions)
        return {"completion/no_boxed_frac": missing / max(len(completions), 1)}

    def stats(self) -> dict[str, int]:
        """Running counts since construction or :meth:`reset_stats`.

        Returns:
            Counts of ``total``, ``correct``, ``incorrect``, ``unparsable``, ``timeouts``, ``errors`` and
            ``symbolic`` (pairs that needed a worker).
        """
        with self._lock:
            keys = ("total", "correct", "incorrect", "unparsable", "timeouts", "errors", "symbolic")
            return {key: int(self._stats[key]) for key in keys}

    def reset_stats(self) -> None:
        """Zeroes the running counts."""
        with self._lock:
            self._stats.clear()

    def close(self) -> None:
        """Stops the worker processes (they are restarted lazily if the verifier is used again)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> SympyMathVerifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pool"] = None
        state["_lock"] = None
        state["_stats"] = Counter()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(correct_reward={self.correct_reward}, incorrect_reward={self.incorrect_reward}, "
            f"unparsable_reward={self.unparsable_reward}, timeout_seconds={self.timeout_seconds}, "
            f"num_workers={self.num_workers}, float_rel_tol={self.float_rel_tol}, "
            f"answer_is_fallback={self.answer_is_fallback}, percent={self.percent!r}, "
            f"equation_as_value={self.equation_as_value}, ignore_units={self.ignore_units}, "
            f"multiple_boxes={self.multiple_boxes!r}, rounding={self.rounding!r}, list_order={self.list_order!r})"
        )

    # ------------------------------------------------------------------ internals

    def _get_pool(self) -> TimeoutPool:
        with self._lock:
            if self._pool is None:
                self._pool = TimeoutPool(
                    _WORKER_HANDLER,
                    num_workers=self.num_workers,
                    memory_limit_mb=self.worker_memory_mb,
                    warmup=WARMUP_PAYLOAD,
                )
            return self._pool

    def _verdict(
        self, status: VerdictStatus, extracted: str | None, timed_out: bool = False, error: str | None = None
    ) -> Verdict:
        reward = {
            VerdictStatus.CORRECT: self.correct_reward,
            VerdictStatus.INCORRECT: self.incorrect_reward,
            VerdictStatus.UNPARSABLE: self.unparsable_reward,
        }[status]
        if extracted is not None and len(extracted) > _MAX_STORED_EXTRACT:
            extracted = extracted[:_MAX_STORED_EXTRACT] + "..."
        return Verdict(status=status, reward=reward, extracted=extracted, timed_out=timed_out, error=error)

    def _from_outcome(self, outcome: Outcome, detail: str | None, extracted: str) -> Verdict:
        if outcome is Outcome.EQUAL:
            return self._verdict(VerdictStatus.CORRECT, extracted)
        if outcome is Outcome.DIFFERENT:
            return self._verdict(VerdictStatus.INCORRECT, extracted)
        if outcome is Outcome.GOLD_ERROR:
            return self._verdict(VerdictStatus.UNPARSABLE, extracted, error=f"gold answer unreadable: {detail}")
        return self._verdict(VerdictStatus.UNPARSABLE, extracted)

    def _config_for(self, problem: str | None) -> CompareConfig:
        """The comparison settings for one pair: the ``"problem"`` policies resolved against its question text."""
        return resolve_policies(self._config, problem, self.percent, self.rounding, self.list_order)

    def _fast(self, completion: str, gold: str, config: CompareConfig) -> tuple[Verdict | None, str]:
        """In-process grading; returns ``(None, extracted)`` when the pair needs the symbolic path."""
        extracted = extract_answer(
            str(completion), answer_is_fallback=self.answer_is_fallback, final_boxes=self.multiple_boxes == "final"
        )
        if extracted is None:
            return self._verdict(VerdictStatus.UNPARSABLE, None), ""
        outcome, detail = compare_answers(str(gold), extracted, config, symbolic=False)
        if outcome is Outcome.UNKNOWN:
            return None, extracted
        return self._from_outcome(outcome, detail, extracted), extracted

    def _from_worker(self, result: TaskResult, extracted: str) -> Verdict:
        if result.timed_out:
            return self._verdict(VerdictStatus.UNPARSABLE, extracted, timed_out=True)
        if result.error is not None:
            log.warning("verifier worker error: %s", result.error)
            return self._verdict(VerdictStatus.UNPARSABLE, extracted, error=result.error)
        outcome_value, detail = result.value
        return self._from_outcome(Outcome(outcome_value), detail, extracted)

    def _record(self, verdicts: list[Verdict], symbolic: int) -> None:
        with self._lock:
            self._stats["total"] += len(verdicts)
            self._stats["symbolic"] += symbolic
            for verdict in verdicts:
                self._stats[verdict.status.value] += 1
                self._stats["timeouts"] += int(verdict.timed_out)
                self._stats["errors"] += int(verdict.error is not None)
        timeouts = sum(v.timed_out for v in verdicts)
        errors = sum(v.error is not None for v in verdicts)
        if timeouts or errors:
            log.warning("verifier batch of %d: %d timed out, %d errors", len(verdicts), timeouts, errors)


# Reward composition (components/rewards.py), importable from here as components.verifiers.<Name> in YAML.
from components.rewards import BoxedFormatReward, CallableReward, WeightedVerifiers  # noqa: E402

__all__ += ["BoxedFormatReward", "CallableReward"]  # WeightedVerifiers: prpo_lightning.scoring.combined
