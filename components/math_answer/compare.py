"""Gold-guided comparison of a candidate answer with a gold answer.

:func:`compare_answers` runs in two modes. With ``symbolic=False`` (the in-process fast path) it uses only string
normalisation, exact rationals and structure, and answers :attr:`Outcome.UNKNOWN` when sympy is needed. With
``symbolic=True`` (inside a worker process) it also uses :mod:`.symbolic`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .normalize import AnswerTooLong, normalize
from .numeric import numbers_equal, parse_number
from .structure import Shape, StructureError, candidate_shape, gold_shape

__all__ = ["Outcome", "CompareConfig", "compare_answers", "symbolic_task", "WARMUP_PAYLOAD"]

_COMPLEX_GOLD = re.compile(r"[0-9.+\-\\{}a-z]*i[0-9.+\-\\{}a-z]*")
_LETTER = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z](?![a-zA-Z])")


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
        float_rel_tol: relative tolerance for answers written as decimals.
    """

    float_rel_tol: float = 1e-6


class _GoldError(ValueError):
    pass


class _Unreadable(ValueError):
    pass


class _NeedsSympy(Exception):
    pass


def _uses_imaginary_unit(gold_norm: str) -> bool:
    letters = {m.group() for m in _LETTER.finditer(gold_norm)}
    return letters == {"i"}


class _Comparer:
    def __init__(self, config: CompareConfig, symbolic: bool, imaginary_i: bool) -> None:
        self.config = config
        self.symbolic = symbolic
        self.imaginary_i = imaginary_i

    def element(self, gold: str, candidate: str) -> bool:
        if gold == candidate:
            return True
        if not candidate:
            return False
        g_num = parse_number(gold)
        c_num = parse_number(candidate)
        if g_num is not None and c_num is not None:
            return numbers_equal(g_num, c_num, self.config.float_rel_tol)
        if gold.replace("{", "").replace("}", "") == candidate.replace("{", "").replace("}", ""):
            return True
        if "\\infty" in gold or "\\infty" in candidate:
            return gold.lstrip("+") == candidate.lstrip("+")
        if not self.symbolic:
            raise _NeedsSympy
        from .symbolic import ElementUnreadable, GoldUnreadable, expressions_equal

        try:
            return expressions_equal(gold, candidate, self.config.float_rel_tol, self.imaginary_i)
        except GoldUnreadable as exc:
            raise _GoldError(str(exc)) from exc
        except ElementUnreadable as exc:
            raise _Unreadable(str(exc)) from exc

    def sequence(self, golds, candidates) -> bool:
        if len(golds) != len(candidates):
            return False
        pending = None
        for g, c in zip(golds, candidates):
            try:
                if not self.element(g, c):
                    return False
            except (_NeedsSympy, _Unreadable) as exc:
                pending = pending or exc
        if pending is not None:
            raise pending
        return True

    def unordered(self, golds, candidates, match) -> bool:
        """Order-free comparison: a perfect matching of equal pairs (sizes are small and bounded)."""
        if len(golds) != len(candidates):
            return False
        n = len(golds)
        equal = [[False] * n for _ in range(n)]
        pending = None
        for i, g in enumerate(golds):
            for j, c in enumerate(candidates):
                try:
                    equal[i][j] = match(g, c)
                except (_NeedsSympy, _Unreadable) as exc:
                    pending = pending or exc
        if _perfect_matching(equal):
            return True
        if pending is not None:
            raise pending
        return False

    def intervals(self, golds, candidates) -> bool:
        def one(g, c) -> bool:
            return g[0] == c[0] and g[3] == c[3] and self.sequence(g[1:3], c[1:3])

        return self.unordered(golds, candidates, one)

    def equation(self, gold: Shape, cand: Shape) -> bool:
        g_lhs, g_rhs = gold.items
        assignment = re.fullmatch(r"[a-zA-Z](?:_\{?\w{1,3}\}?)?(?:\([a-z]\))?", g_lhs) is not None
        if cand.kind == "scalar":
            return assignment and self.element(g_rhs, cand.items[0])
        c_lhs, c_rhs = cand.items
        if c_lhs == g_lhs and assignment:
            try:
                if self.element(g_rhs, c_rhs):
                    return True
            except _NeedsSympy:
                pass
        if not self.symbolic:
            raise _NeedsSympy
        from .symbolic import ElementUnreadable, GoldUnreadable, equations_equal

        try:
            return equations_equal((g_lhs, g_rhs), (c_lhs, c_rhs), self.imaginary_i)
        except GoldUnreadable as exc:
            raise _GoldError(str(exc)) from exc
        except ElementUnreadable as exc:
            raise _Unreadable(str(exc)) from exc

    def shapes(self, gold: Shape, cand: Shape) -> bool:
        kind = gold.kind
        if kind in ("choice", "text", "relation"):
            return gold.text == cand.text
        if kind == "base":
            return gold.text == cand.text and (cand.base is None or cand.base == gold.base)
        if kind == "scalar":
            return self.element(gold.items[0], cand.items[0])
        if kind == "seq":
            return gold.brackets == cand.brackets and self.sequence(gold.items, cand.items)
        if kind == "set":
            return self.unordered(gold.items, cand.items, self.element)
        if kind == "intervals":
            return self.intervals(gold.items, cand.items)
        if kind == "matrix":
            if len(gold.items) != len(cand.items) or cand.brackets in ("vmatrix", "Vmatrix"):
                return False
            if any(len(g) != len(c) for g, c in zip(gold.items, cand.items)):
                return False
            flat_g = [x for row in gold.items for x in row]
            flat_c = [x for row in cand.items for x in row]
            return self.sequence(flat_g, flat_c)
        if kind == "equation":
            return self.equation(gold, cand)
        return False


def _perfect_matching(equal: list[list[bool]]) -> bool:
    n = len(equal)
    match_of: list[int] = [-1] * n

    def augment(i: int, seen: list[bool]) -> bool:
        for j in range(n):
            if equal[i][j] and not seen[j]:
                seen[j] = True
                if match_of[j] < 0 or augment(match_of[j], seen):
                    match_of[j] = i
                    return True
        return False

    return all(augment(i, [False] * n) for i in range(n))


def compare_answers(gold: str, candidate: str, config: CompareConfig, symbolic: bool) -> tuple[Outcome, str | None]:
    """Compares an extracted candidate answer with a gold answer, reading the candidate in the gold's shape.

    Args:
        gold: the gold answer as written in the dataset.
        candidate: the answer extracted from the completion.
        config: comparison settings.
        symbolic: allow sympy (only inside worker processes).

    Returns:
        The outcome and, for ``UNPARSABLE``/``GOLD_ERROR``, a short reason.
    """
    try:
        gold_norm = normalize(gold)
    except AnswerTooLong as exc:
        return Outcome.GOLD_ERROR, str(exc)
    try:
        cand_norm = normalize(candidate)
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
    try:
        c_shape = candidate_shape(cand_norm, g_shape)
    except StructureError as exc:
        return Outcome.UNPARSABLE, f"structure: {exc}"
    if c_shape is None:
        return Outcome.DIFFERENT, None
    comparer = _Comparer(config, symbolic, _uses_imaginary_unit(gold_norm))
    try:
        return (Outcome.EQUAL if comparer.shapes(g_shape, c_shape) else Outcome.DIFFERENT), None
    except _NeedsSympy:
        return Outcome.UNKNOWN, None
    except _Unreadable as exc:
        return Outcome.UNPARSABLE, str(exc)
    except _GoldError as exc:
        return Outcome.GOLD_ERROR, str(exc)
    except StructureError as exc:
        return Outcome.UNPARSABLE, f"structure: {exc}"


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
