"""Exact algebra of subsets of the real line with rational endpoints (no sympy, linear scans only).

An answer that denotes a set of reals -- intervals and their unions (``[1,3]\\cup[3,7]`` merges into ``[1,7]``),
differences and complements (``[0,2]\\setminus\\{1\\}``, ``\\mathbb{R}\\setminus[0,4]``), relations in one variable
of any letter (``3<x``, ``-x>-2``, ``t\\le5``, chains ``1<x\\le4``), absolute values (``|x-2|\\le4``, ``|x|>1``),
conjunctions and exclusions (``-2\\le x\\le4, x\\ne1``, ``x<2 \\land x>3``) and set-builder notation
(``\\{x \\mid x>1\\}``) -- is read into a canonical list of disjoint, sorted intervals, so two answers are the same
set exactly when their canonical forms are equal. Only rational endpoints are read (``\\sqrt{2}`` is left to the
structural comparison). :func:`integer_members` lists ``\\{n\\in\\mathbb{Z} : 1\\le n\\le 3\\}`` as ``1, 2, 3``.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from .brackets import StructureError, enclosed, split_top_level
from .numeric import parse_number

__all__ = ["Span", "real_set", "integer_members", "MAX_SPANS", "MAX_INTEGER_MEMBERS"]

MAX_SPANS = 64
MAX_INTEGER_MEMBERS = 200

Span = tuple  # (low or None for -inf, low closed, high or None for +inf, high closed)

_REALS = re.compile(r"\\mathbb\{R\}|\\R|\\Bbb\{R\}|\\mathbf\{R\}|\(-\\infty,\\infty\)")
_EMPTY = re.compile(r"\\varnothing|\\\{\\\}")
_OPERATOR = re.compile(r"\\le(?![a-zA-Z])|\\ge(?![a-zA-Z])|\\ne(?![a-zA-Z])|<|>")
_VARIABLE = r"([a-zA-Z])"
_TERM_PATTERNS = (
    (re.compile(_VARIABLE), "x"),
    (re.compile(r"-" + _VARIABLE), "-x"),
    (re.compile(r"\|" + _VARIABLE + r"\|"), "|x|"),
    (re.compile(r"\|" + _VARIABLE + r"([+-][^|]+)\|"), "|x+c|"),
    (re.compile(r"\|([^|a-zA-Z]+)-" + _VARIABLE + r"\|"), "|c-x|"),
)
_BUILDER = re.compile(r"\\\{([a-zA-Z])(?:\\in(\\mathbb\{[RZ]\}|\\[RZ]))?(?:\||:)(.+)\\\}")
_IN_PREFIX = re.compile(r"[a-zA-Z]\\in")
_FLIP = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le", "\\ne": "\\ne"}


class _NotASet(ValueError):
    pass


def _canonical(spans: list[Span]) -> list[Span]:
    """Sorts and merges overlapping or touching spans; drops empty ones."""
    kept = []
    for low, lc, high, hc in spans:
        if low is not None and high is not None and (low > high or (low == high and not (lc and hc))):
            continue
        kept.append((low, lc and low is not None, high, hc and high is not None))
    kept.sort(key=lambda s: (s[0] is not None, s[0] if s[0] is not None else 0, not s[1]))
    merged: list[Span] = []
    for low, lc, high, hc in kept:
        if merged:
            m_low, m_lc, m_high, m_hc = merged[-1]
            joined = m_high is None or low is None or low < m_high or (low == m_high and (m_hc or lc))
            if joined:
                if m_high is None or high is None:
                    merged[-1] = (m_low, m_lc, None, False)
                elif high > m_high:
                    merged[-1] = (m_low, m_lc, high, hc)
                elif high == m_high:
                    merged[-1] = (m_low, m_lc, m_high, m_hc or hc)
                continue
        merged.append((low, lc, high, hc))
    if len(merged) > MAX_SPANS:
        raise _NotASet("too many intervals")
    return merged


def _complement(spans: list[Span]) -> list[Span]:
    """The complement of canonical spans."""
    out: list[Span] = []
    low, lc = None, False
    for s_low, s_lc, s_high, s_hc in spans:
        if not (low is None and s_low is None):
            out.append((low, lc, s_low, not s_lc))
        if s_high is None:
            return _canonical(out)
        low, lc = s_high, not s_hc
    out.append((low, lc, None, False))
    return _canonical(out)


def _union(a: list[Span], b: list[Span]) -> list[Span]:
    return _canonical(a + b)


def _intersection(a: list[Span], b: list[Span]) -> list[Span]:
    return _complement(_union(_complement(a), _complement(b)))


def _number(s: str) -> Fraction | None:
    number = parse_number(s)
    return number.value if number is not None else None


def _endpoint(s: str) -> tuple[Fraction | None, int]:
    """``(value, infinity sign)``: ``("3", 0)``, ``(None, -1)`` for ``-\\infty``."""
    if s in ("\\infty", "+\\infty", "\\infty"):
        return None, 1
    if s == "-\\infty":
        return None, -1
    value = _number(s)
    if value is None:
        raise _NotASet(f"endpoint {s!r} is not a rational number")
    return value, 0


def _bracket_interval(s: str) -> list[Span] | None:
    if len(s) < 5 or s[0] not in "([" or s[-1] not in ")]" or not enclosed(s, s[0], s[-1]):
        return None
    inner = split_top_level(s[1:-1], ",")
    if len(inner) != 2:
        return None
    (low, low_inf), (high, high_inf) = _endpoint(inner[0]), _endpoint(inner[1])
    if low_inf == 1 or high_inf == -1:
        raise _NotASet("reversed infinite endpoint")
    return _canonical([(low, s[0] == "[", high, s[-1] == "]")])


def _points(s: str) -> list[Span] | None:
    if not enclosed(s, "\\{", "\\}"):
        return None
    values = [_number(p) for p in split_top_level(s[2:-2], ",")]
    if any(v is None for v in values):
        raise _NotASet("set elements are not rational numbers")
    return _canonical([(v, True, v, True) for v in values])


def _solve(term: str, op: str, bound: str, variables: set[str]) -> list[Span]:
    """The set of reals where ``term op bound`` holds, ``term`` being one of the variable forms."""
    for pattern, form in _TERM_PATTERNS:
        match = pattern.fullmatch(term)
        if match:
            break
    else:
        raise _NotASet(f"{term!r} is not a variable form")
    variables.add(match.group(2) if form == "|c-x|" else match.group(1))
    value = _number(bound)
    if value is None:
        raise _NotASet(f"bound {bound!r} is not a rational number")
    centre = Fraction(0)
    if form == "-x":
        op, value = _FLIP[op], -value
    if form in ("|x+c|", "|c-x|"):
        offset = _number(match.group(2) if form == "|x+c|" else match.group(1))
        if offset is None:
            raise _NotASet("offset is not a rational number")
        centre = -offset if form == "|x+c|" else offset
    if form in ("x", "-x"):
        return {
            "<": [(None, False, value, False)], "\\le": [(None, False, value, True)],
            ">": [(value, False, None, False)], "\\ge": [(value, True, None, False)],
            "\\ne": [(None, False, value, False), (value, False, None, False)],
        }[op]
    inside = {"<": False, "\\le": True}.get(op)
    if inside is not None:
        return _canonical([(centre - value, inside, centre + value, inside)])
    if op == "\\ne":
        return _canonical([(None, False, centre - value, False), (centre - value, False, centre + value, False),
                           (centre + value, False, None, False)])
    closed = op == "\\ge"
    return _canonical([(None, False, centre - value, closed), (centre + value, closed, None, False)])


def _relation(s: str, variables: set[str]) -> list[Span] | None:
    ops = _OPERATOR.findall(s)
    if not ops or len(ops) > 2:
        return None
    pieces = [p.strip() for p in _OPERATOR.split(s)]
    if any(not p for p in pieces):
        raise _NotASet("empty side of a relation")
    result: list[Span] = [(None, False, None, False)]
    for k, op in enumerate(ops):
        left, right = pieces[k], pieces[k + 1]
        if _number(right) is not None:
            part = _solve(left, op, right, variables)
        elif _number(left) is not None:
            part = _solve(right, _FLIP[op], left, variables)
        else:
            raise _NotASet("neither side of a relation is a number")
        result = _intersection(result, part)
    return result


def _atom(s: str, variables: set[str]) -> list[Span]:
    if _REALS.fullmatch(s):
        return [(None, False, None, False)]
    if _EMPTY.fullmatch(s):
        return []
    builder = _BUILDER.fullmatch(s)
    if builder is not None and builder.group(2) in (None, "\\mathbb{R}", "\\R"):
        inner: set[str] = set()
        found = _conditions(builder.group(3), inner)
        if inner - {builder.group(1)}:
            raise _NotASet("set-builder condition in another variable")
        return found
    for reader in (_bracket_interval, _points):
        found = reader(s)
        if found is not None:
            return found
    found = _relation(s, variables)
    if found is None:
        raise _NotASet(f"{s[:40]!r} is not a set of reals")
    return found


def _set_expression(s: str, variables: set[str]) -> list[Span]:
    result: list[Span] = []
    for part in split_top_level(s, "\\cup"):
        pieces = [p for chunk in split_top_level(part, "\\setminus") for p in split_top_level(chunk, "\\backslash")]
        current = _atom(pieces[0], variables)
        for removed in pieces[1:]:
            current = _intersection(current, _complement(_atom(removed, variables)))
        result = _union(result, current)
    return result


def _conditions(s: str, variables: set[str]) -> list[Span]:
    """Comma parts are alternatives (``x<2, x>3`` from "or"), except exclusions ``x\\ne a`` which restrict them;
    ``\\land`` parts must all hold."""
    result: list[Span] = [(None, False, None, False)]
    for conjunct in split_top_level(s, "\\land"):
        alternatives: list[Span] | None = None
        restriction: list[Span] = [(None, False, None, False)]
        for part in split_top_level(conjunct, ","):
            if not part:
                raise _NotASet("empty part")
            if "\\ne" in part and len(_OPERATOR.findall(part)) == 1:
                restriction = _intersection(restriction, _relation(part, variables) or [])
            else:
                found = _set_expression(part, variables)
                alternatives = found if alternatives is None else _union(alternatives, found)
        current = restriction if alternatives is None else _intersection(alternatives, restriction)
        result = _intersection(result, current)
    return result


def real_set(s: str) -> list[Span] | None:
    """Reads a normalised answer as a set of reals.

    Args:
        s: a normalised answer (see :func:`~.normalize.normalize`).

    Returns:
        The canonical disjoint sorted spans ``(low, low_closed, high, high_closed)`` (``None`` bounds are
        infinite), or ``None`` when ``s`` is not such a set, uses endpoints that are not rational numbers, or uses
        more than one variable letter.
    """
    if not s or len(s) > 2000:
        return None
    if _IN_PREFIX.match(s):
        s = s[s.index("\\in") + 3 :]
    variables: set[str] = set()
    try:
        spans = _conditions(s, variables)
    except (_NotASet, StructureError, ZeroDivisionError):
        return None
    return spans if len(variables) <= 1 else None


def integer_members(s: str) -> list[int] | None:
    """``\\{n\\in\\mathbb{Z} : 1\\le n\\le3\\}`` (normalised) -> ``[1, 2, 3]``; ``None`` for anything else or for
    more than :data:`MAX_INTEGER_MEMBERS` members."""
    builder = _BUILDER.fullmatch(s)
    if builder is None or builder.group(2) not in ("\\mathbb{Z}", "\\Z"):
        return None
    variables: set[str] = set()
    try:
        spans = _conditions(builder.group(3), variables)
    except (_NotASet, StructureError, ZeroDivisionError):
        return None
    if variables - {builder.group(1)}:
        return None
    members: list[int] = []
    for low, lc, high, hc in spans:
        if low is None or high is None:
            return None
        first = math.ceil(low) if lc or low.denominator != 1 else int(low) + 1
        last = math.floor(high) if hc or high.denominator != 1 else int(high) - 1
        if last - first + 1 + len(members) > MAX_INTEGER_MEMBERS:
            return None
        members.extend(range(first, last + 1))
    return members
