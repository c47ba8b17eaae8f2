"""Gold-guided comparison of a candidate answer with a gold answer.

:func:`compare_answers` runs in two modes. With ``symbolic=False`` (the in-process fast path) it uses only string
normalisation, exact rationals and structure, and answers :attr:`Outcome.UNKNOWN` when sympy is needed. With
``symbolic=True`` (inside a worker process) it also uses :mod:`.symbolic`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


from .forms import (
    UnreadableCharacters,
    check_control_characters,
    fraction_latex,
    rewrite_notations,
    split_percent,
)
from .comparer import Comparer, GoldError, NeedsSympy, Unreadable, uses_imaginary_unit
from .interval_sets import real_set
from .normalize import MAX_ANSWER_CHARS, AnswerTooLong, normalize
from .numeric import parse_number
from .words import lone_number, time_of_day
from .structure import Shape, StructureError, candidate_shape, gold_shape

__all__ = ["Outcome", "CompareConfig", "PERCENT_POLICIES", "compare_answers", "symbolic_task", "WARMUP_PAYLOAD"]

PERCENT_POLICIES = ("problem", "divide", "divide_or_bare", "ignore")
"""How ``N\\%`` is read. ``problem`` (default): ``N\\%`` is ``N/100``, and it matches the bare number ``N`` only when
the problem text asks for a percent ("what percent", "as a percentage"); without a problem text this is ``divide``.
``divide``: only ``N/100`` (a bare ``20`` never equals ``20\\%``). ``divide_or_bare``: also the bare number, always
(a bare gold ``20`` accepts ``20\\%``; a gold ``20\\%`` accepts ``20``). ``ignore``: the sign is dropped on both sides
(``0.5`` then wrongly matches ``0.5\\%``)."""

MAX_LONG_ANSWER_CHARS = 50_000
"""Answers longer than :data:`~.normalize.MAX_ANSWER_CHARS` (and up to this) are graded without sympy: equal when
their normalised strings or their structures (element by element, exact numbers only) agree, different otherwise."""

_COMPLEX_GOLD = re.compile(r"[0-9.+\-\\{}a-z]*i[0-9.+\-\\{}a-z]*")


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LIST_COMMA = re.compile(r"\d\s*,\s+[+-]?\d")


def _explicit_thousands(raw: str) -> str:
    """``11,\\! 111`` and ``11{,}111`` mark thousands explicitly: drop the space that follows them."""
    return re.sub(r",\\!\s*", ",", raw.replace("{,}", ","))


class Outcome(str, enum.Enum):
    """Result of comparing a candidate with a gold answer."""

    EQUAL = "equal"
    DIFFERENT = "different"
    UNKNOWN = "unknown"  # the fast path cannot decide: sympy is needed
    UNPARSABLE = "unparsable"  # the candidate could not be read
    GOLD_ERROR = "gold_error"  # the gold could not be read


@dataclass(frozen=True)
class CompareConfig:
    """Comparison settings (picklable, sent to workers).

    Attributes:
        float_rel_tol: relative tolerance for answers written as decimals. ``0`` (default): decimals are exact, so a
            terminating decimal equals its fraction and a rounded one (``0.333333`` for ``1/3``) does not.
        percent: one of :data:`PERCENT_POLICIES`.
        equation_as_value: ``x=3`` (a name given with its value) equals ``3`` and vice versa.
        ignore_units: unit words after a number are removed before comparing.
        round_places: the problem asks for an answer rounded to this many decimal places (``0`` = whole number):
            numbers are equal when both round to the same value there. ``None``: no rounding asked.
        ordered_lists: the problem asks for a list in a stated order: a bare list is compared in order.
    """

    float_rel_tol: float = 0.0
    percent: str = "problem"
    equation_as_value: bool = True
    ignore_units: bool = True
    round_places: int | None = None
    ordered_lists: bool = False


_HAS_WORD = re.compile(r"[A-Za-z]{2}")
_EQUATION_SIGN = re.compile(r"(?<![<>!\\])=")


def _percent_variants(gold: str, candidate: str, policy: str) -> list[tuple[str, str]]:
    """The (gold, candidate) readings to try under a percent policy; equal when any reading is equal."""
    g_body, g_pct = split_percent(gold)
    c_body, c_pct = split_percent(candidate)
    if not (g_pct or c_pct) or policy == "ignore" or (g_pct and c_pct):
        return [(g_body, c_body)] if (g_pct or c_pct) else [(gold, candidate)]
    body = c_body if c_pct else g_body
    number = parse_number(normalize(body)) if len(body) <= MAX_ANSWER_CHARS else None
    hundredth = fraction_latex(number.value / 100) if number is not None else f"\\frac{{{body}}}{{100}}"
    variants = [(gold, hundredth)] if c_pct else [(hundredth, candidate)]
    if policy == "divide_or_bare":  # ``problem`` arrives here resolved by the verifier (or as plain ``divide``)
        variants.append((g_body, c_body))
    return variants


def compare_answers(gold: str, candidate: str, config: CompareConfig, symbolic: bool) -> tuple[Outcome, str | None]:
    """Compares a candidate with a gold answer under the config's policies (control characters, long answers,
    percent readings, ``x=3`` against ``3``), then structurally via :func:`compare_forms`.

    Args:
        gold: the gold answer as written in the dataset.
        candidate: the answer extracted from the completion.
        config: comparison settings.
        symbolic: allow sympy (only inside worker processes).

    Returns:
        The outcome and, for ``UNPARSABLE``/``GOLD_ERROR``, a short reason.
    """
    try:
        check_control_characters(gold)
    except UnreadableCharacters as exc:
        return Outcome.GOLD_ERROR, str(exc)
    try:
        check_control_characters(candidate)
    except UnreadableCharacters as exc:
        return Outcome.UNPARSABLE, str(exc)
    max_chars = MAX_ANSWER_CHARS
    if len(gold) > MAX_ANSWER_CHARS:
        max_chars = min(MAX_LONG_ANSWER_CHARS, 2 * len(gold))
        symbolic = False
    if len(gold) > MAX_LONG_ANSWER_CHARS:
        return Outcome.GOLD_ERROR, f"gold answer has {len(gold)} characters (limit {MAX_LONG_ANSWER_CHARS})"
    if len(candidate) > max_chars:
        return Outcome.UNPARSABLE, f"answer has {len(candidate)} characters (limit {max_chars})"
    if not config.equation_as_value and bool(_EQUATION_SIGN.search(gold)) != bool(_EQUATION_SIGN.search(candidate)):
        return Outcome.DIFFERENT, None
    gold, candidate = rewrite_notations(gold), rewrite_notations(candidate)
    worded = _worded_verdict(gold, candidate)
    if isinstance(worded, Outcome):
        return worded, None
    candidate = worded
    outcomes = [
        compare_forms(g, c, config, symbolic, max_chars) for g, c in _percent_variants(gold, candidate, config.percent)
    ]
    for wanted in (Outcome.EQUAL, Outcome.UNKNOWN):
        if any(outcome is wanted for outcome, _ in outcomes):
            return wanted, None
    outcome, detail = outcomes[0]
    if max_chars > MAX_ANSWER_CHARS and outcome is Outcome.GOLD_ERROR:
        return Outcome.DIFFERENT, None  # long answers: what the fast path cannot confirm is not equal
    return outcome, detail


def _worded_verdict(gold: str, candidate: str) -> Outcome | str:
    """Times of day are compared as minutes after midnight; against a plain-number gold, a number with words
    around it (``12 \\text{ red marbles}``) is read as the number (:mod:`.words`). Returns the outcome, or the
    candidate to compare further."""
    if ":" in gold or ":" in candidate:
        gold_time = time_of_day(gold)
        cand_time = time_of_day(candidate) if gold_time is not None else None
        if gold_time is not None and cand_time is not None:
            return Outcome.EQUAL if gold_time[0] == cand_time[0] else Outcome.DIFFERENT
    if _HAS_WORD.search(candidate) and len(gold) <= MAX_ANSWER_CHARS and not split_percent(gold)[1]:
        if parse_number(normalize(gold)) is not None:
            lone = lone_number(candidate)
            if lone is not None:
                return lone
    return candidate


def compare_forms(
    gold: str, candidate: str, config: CompareConfig, symbolic: bool, max_chars: int = MAX_ANSWER_CHARS
) -> tuple[Outcome, str | None]:
    """Compares an extracted candidate answer with a gold answer, reading the candidate in the gold's shape.

    Args:
        gold: the gold answer as written in the dataset.
        candidate: the answer extracted from the completion.
        config: comparison settings.
        symbolic: allow sympy (only inside worker processes).
        max_chars: length limit passed to :func:`~.normalize.normalize`.

    Returns:
        The outcome and, for ``UNPARSABLE``/``GOLD_ERROR``, a short reason.
    """
    try:
        gold_norm = normalize(gold, config.ignore_units, max_chars)
    except AnswerTooLong as exc:
        return Outcome.GOLD_ERROR, str(exc)
    try:
        cand_norm = normalize(candidate, config.ignore_units, max_chars)
    except AnswerTooLong as exc:
        return Outcome.UNPARSABLE, str(exc)
    if not cand_norm:
        return Outcome.UNPARSABLE, "empty answer"
    if _THOUSANDS.fullmatch(gold_norm) and _LIST_COMMA.search(_explicit_thousands(candidate)):
        if not _LIST_COMMA.search(_explicit_thousands(gold)):
            return Outcome.DIFFERENT, None  # ``58, 500`` is a list of two numbers, not 58500
    if gold_norm == cand_norm:
        return Outcome.EQUAL, None
    try:
        g_shape = gold_shape(gold_norm, gold)
    except StructureError as exc:
        return Outcome.GOLD_ERROR, f"gold structure: {exc}"
    reals = _real_set_verdict(g_shape, gold_norm, cand_norm)
    if reals is not None:
        return reals, None
    try:
        c_shape = candidate_shape(cand_norm, g_shape)
    except StructureError as exc:
        return Outcome.UNPARSABLE, f"structure: {exc}"
    if c_shape is None:
        return Outcome.DIFFERENT, None
    comparer = Comparer(config, symbolic, uses_imaginary_unit(gold_norm))
    try:
        return (Outcome.EQUAL if comparer.shapes(g_shape, c_shape) else Outcome.DIFFERENT), None
    except NeedsSympy:
        if max_chars > MAX_ANSWER_CHARS:
            return Outcome.DIFFERENT, None  # long answers never go to sympy
        return Outcome.UNKNOWN, None
    except Unreadable as exc:
        return Outcome.UNPARSABLE, str(exc)
    except GoldError as exc:
        return Outcome.GOLD_ERROR, str(exc)
    except StructureError as exc:
        return Outcome.UNPARSABLE, f"structure: {exc}"


_SET_OF_REALS = re.compile(r"<|>|\\[lgn]e(?![a-zA-Z])|\\setminus|\\backslash|\\mathbb\{R\}|\\\{[a-zA-Z](?:\\in[^|:]{0,20})?[|:]")


def _real_set_verdict(gold: Shape, gold_norm: str, cand_norm: str) -> Outcome | None:
    """Equal or different when both answers are sets of reals with rational endpoints (see :mod:`.interval_sets`);
    ``None`` (undecided here) otherwise. A gold pair ``(a, b)`` is read as an interval only against a relation."""
    if gold.kind == "seq":
        if len(gold.items) != 2 or gold.brackets != "()" or not _SET_OF_REALS.search(cand_norm):
            return None
    elif gold.kind != "intervals" and not _SET_OF_REALS.search(gold_norm):
        return None
    gold_set = real_set(gold_norm)
    if gold_set is None or all(low == high and low is not None for low, _, high, _ in gold_set):
        return None  # not a set of reals, or a finite set of points (compared as a set of elements)
    cand_set = real_set(cand_norm)
    if cand_set is None:
        return None
    return Outcome.EQUAL if cand_set == gold_set else Outcome.DIFFERENT


def symbolic_task(payload: tuple[str, str, CompareConfig]) -> tuple[str, str | None]:
    """Worker entry point: the full (sympy-backed) comparison of one ``(gold, candidate, config)`` payload.

    Args:
        payload: the gold answer, the extracted candidate answer and the comparison settings.

    Returns:
        ``(outcome value, reason)`` as plain picklable values.
    """
    gold, candidate, config = payload
    outcome, detail = compare_answers(gold, candidate, config, symbolic=True)
    return outcome.value, detail


WARMUP_PAYLOAD = ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2+x-x", CompareConfig())
"""Run once in each new worker so imports and the parser's first-use costs are paid before any deadline."""
