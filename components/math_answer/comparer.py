"""Element-by-element comparison of two answer shapes (see :mod:`.structure`), exact where possible.

:class:`Comparer` compares numbers exactly (or within a tolerance, or by rounding when the problem asks for a
rounded value), sequences in order, sets as perfect matchings, intervals, matrices, equations, named values and
answer letters, and hands anything else to :mod:`.symbolic` when allowed (inside worker processes) or raises
:class:`NeedsSympy`.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import TYPE_CHECKING

from .brackets import enclosed, split_top_level
from .forms import parse_e_notation
from .named import FUNCTION_NAME
from .numeric import ParsedNumber, numbers_equal, parse_number
from .structure import Shape

if TYPE_CHECKING:
    from .compare import CompareConfig

__all__ = ["Comparer", "GoldError", "Unreadable", "NeedsSympy", "uses_imaginary_unit"]

_LETTER = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z](?![a-zA-Z])")
_ASSIGNMENT_LHS = re.compile(r"[a-zA-Z](?:_\{?\w{1,3}\}?)?(?:\([a-z]\))?|[a-zA-Z]\^\{-1\}\([a-z]\)")


class GoldError(ValueError):
    """The gold element could not be read (a data problem, reported as ``GOLD_ERROR``)."""


class Unreadable(ValueError):
    """The candidate element could not be read (``UNPARSABLE``)."""


class NeedsSympy(Exception):
    """The in-process fast path cannot decide: the pair goes to a sympy worker."""


def uses_imaginary_unit(gold_norm: str) -> bool:
    letters = {m.group() for m in _LETTER.finditer(gold_norm)}
    return letters == {"i"}


class Comparer:
    """Compares a candidate shape with a gold shape under one :class:`~.compare.CompareConfig`.

    Args:
        config: the comparison settings (tolerance, rounding place, list order...).
        symbolic: allow sympy (only inside worker processes); otherwise raise :class:`NeedsSympy`.
        imaginary_i: read ``i`` as the imaginary unit (the gold uses it so).
    """

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
        if g_num is not None and c_num is None:
            e_value = parse_e_notation(candidate)
            c_num = None if e_value is None else ParsedNumber(e_value, "." in candidate)
        if g_num is not None and c_num is not None:
            if numbers_equal(g_num, c_num, self.config.float_rel_tol):
                return True
            places = self.config.round_places
            return places is not None and _rounded(g_num.value, places) == _rounded(c_num.value, places)
        if gold.replace("{", "").replace("}", "") == candidate.replace("{", "").replace("}", ""):
            return True
        if "\\infty" in gold or "\\infty" in candidate:
            return gold.lstrip("+") == candidate.lstrip("+")
        g_items, c_items = _tuple_items(gold), _tuple_items(candidate)
        if g_items is not None and c_items is not None:  # tuples inside a list or set: entry by entry
            return gold[0] + gold[-1] == candidate[0] + candidate[-1] and self.sequence(g_items, c_items)
        if not self.symbolic:
            raise NeedsSympy
        from .symbolic import ElementUnreadable, GoldUnreadable, expressions_equal

        try:
            return expressions_equal(gold, candidate, self.config.float_rel_tol, self.imaginary_i)
        except GoldUnreadable as exc:
            raise GoldError(str(exc)) from exc
        except ElementUnreadable as exc:
            raise Unreadable(str(exc)) from exc

    def sequence(self, golds, candidates) -> bool:
        if len(golds) != len(candidates):
            return False
        pending = None
        for g, c in zip(golds, candidates):
            try:
                if not self.element(g, c):
                    return False
            except (NeedsSympy, Unreadable) as exc:
                pending = pending or exc
        if pending is not None:
            raise pending
        return True

    def unordered(self, golds, candidates, match) -> bool:
        """Order-free comparison: a perfect matching of equal pairs; above 64 items, equal sorted exact keys."""
        if len(golds) != len(candidates):
            return False
        n = len(golds)
        if n > _MAX_MATCHING:
            return sorted(map(_exact_key, golds)) == sorted(map(_exact_key, candidates))
        equal = [[False] * n for _ in range(n)]
        pending = None
        for i, g in enumerate(golds):
            for j, c in enumerate(candidates):
                try:
                    equal[i][j] = match(g, c)
                except (NeedsSympy, Unreadable) as exc:
                    pending = pending or exc
        if _perfect_matching(equal):
            return True
        if pending is not None:
            raise pending
        return False

    def intervals(self, golds, candidates) -> bool:
        if candidates and candidates[0] == "excluded":
            points = _excluded_from_intervals(golds)
            return points is not None and self.unordered(points, list(candidates[1:]), self.element)

        def one(g, c) -> bool:
            return g[0] == c[0] and g[3] == c[3] and self.sequence(g[1:3], c[1:3])

        return self.unordered(golds, candidates, one)

    def equation(self, gold: Shape, cand: Shape) -> bool:
        g_lhs, g_rhs = gold.items
        assignment = _ASSIGNMENT_LHS.fullmatch(g_lhs) is not None
        if cand.kind == "scalar":
            return assignment and self.element(g_rhs, cand.items[0])
        c_lhs, c_rhs = cand.items
        g_function, c_function = FUNCTION_NAME.fullmatch(g_lhs), FUNCTION_NAME.fullmatch(c_lhs)
        if g_function and c_function and (g_function.group(1) or "x") == (c_function.group(1) or "x"):
            return self.element(g_rhs, c_rhs)  # ``y = 2x+1`` and ``f(x) = 2x+1`` give the same function
        if c_lhs == g_lhs and assignment:
            try:
                if self.element(g_rhs, c_rhs):
                    return True
            except NeedsSympy:
                pass
        if not self.symbolic:
            raise NeedsSympy
        from .symbolic import ElementUnreadable, GoldUnreadable, equations_equal

        try:
            return equations_equal((g_lhs, g_rhs), (c_lhs, c_rhs), self.imaginary_i)
        except GoldUnreadable as exc:
            raise GoldError(str(exc)) from exc
        except ElementUnreadable as exc:
            raise Unreadable(str(exc)) from exc

    def shapes(self, gold: Shape, cand: Shape) -> bool:
        kind = gold.kind
        if kind == "choice":
            if not cand.text:  # the option's value without its letter
                return bool(gold.items) and self.element(gold.items[0], cand.items[0])
            if gold.text != cand.text:
                return False
            return not (gold.items and cand.items) or self.element(gold.items[0], cand.items[0])
        if kind in ("text", "relation"):
            return gold.text == cand.text
        if kind == "base":
            return gold.text == cand.text and (cand.base is None or cand.base == gold.base)
        if kind == "scalar":
            return self.element(gold.items[0], cand.items[0])
        if kind == "seq":
            return gold.brackets == cand.brackets and self.sequence(gold.items, cand.items)
        if kind == "set":
            if self.config.ordered_lists and gold.brackets == "" and len(gold.items) > 1:
                return cand.brackets == "" and self.sequence(gold.items, cand.items)  # the problem asks for an order
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
        if kind == "named":
            if cand.brackets == "values":
                return self.sequence([value for _, value in gold.items], cand.items)
            names = dict(cand.items)
            if set(names) != {name for name, _ in gold.items}:
                return False
            return self.sequence([value for _, value in gold.items], [names[name] for name, _ in gold.items])
        return False


_MAX_MATCHING = 64


def _tuple_items(s: str) -> list[str] | None:
    """The entries of ``(a, b, ...)``/``[a, b]`` (at least two), else ``None``."""
    if len(s) < 5 or s[0] not in "([" or s[-1] not in ")]" or not enclosed(s, s[0], s[-1]):
        return None
    items = split_top_level(s[1:-1], ",")
    return items if len(items) >= 2 and all(items) else None


def _rounded(value: Fraction, places: int) -> Fraction:
    """``value`` rounded half away from zero to ``places`` decimal places (negative: tens, hundreds...)."""
    scale = Fraction(10) ** places
    magnitude = math.floor(abs(value) * scale + Fraction(1, 2))
    return (magnitude if value >= 0 else -magnitude) / scale


def _exact_key(item: str) -> str:
    number = parse_number(item)
    return str(number.value) if number is not None and not number.inexact else item


def _excluded_from_intervals(intervals) -> list[str] | None:
    """``(-inf,a)\\cup(a,b)\\cup(b,inf)`` -> ``[a, b]`` (the real line minus points); ``None`` otherwise."""
    if not intervals or intervals[0][1] != "-\\infty" or intervals[-1][2] != "\\infty":
        return None
    points = []
    for left, right in zip(intervals, intervals[1:]):
        if left[3] != ")" or right[0] != "(" or left[2] != right[1]:
            return None
        points.append(left[2])
    return points or None


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
