"""Raw-answer rewrites of notations from the wider ecosystem (no sympy, bounded linear patterns only).

Applied to gold and candidate alike before normalisation (by :func:`.forms.rewrite_notations`):

* currency symbols (``£``, ``€``, ``¥``, ``₹``, ``\\pounds``, ``\\euro``) are notation, like ``\\$``;
* thousands separators inside a fraction (``\\frac{12{,}500}{7}``) are dropped;
* trigonometric functions of degrees (``\\sin 60^\\circ``) become functions of radians before degree signs are
  dropped;
* ASCII relations (``>=``, ``<=``, ``!=``) become ``\\ge``/``\\le``/``\\ne``;
* "and" (``\\text{ and }``, ``\\wedge``) between relations becomes ``\\land``, so ``x<2 \\text{ and } x>3`` is an
  intersection and not the "or"-list that a comma means;
* named tuples (``(a,b)=(2,3)``) become named values (``a=2,b=3``) and solutions separated by semicolons, "or" or
  "and" (``x=1,y=2; x=3,y=4``) become tuples (``(1,2),(3,4)``).
"""

from __future__ import annotations

import re

__all__ = ["rewrite_ecosystem"]

_CURRENCY = re.compile(r"£|€|¥|₹|\\pounds(?![a-zA-Z])|\\euro(?![a-zA-Z])|\\yen(?![a-zA-Z])|\\textsterling(?![a-zA-Z])")
_GROUPED = r"\d{1,3}(?:(?:,|\{,\}|,\\!)\d{3})+"
_FRACTION_THOUSANDS = re.compile(r"(\\[dt]?frac\s*)\{((?:[^{}]|\{,\})*)\}\s*\{((?:[^{}]|\{,\})*)\}")
_GROUPED_FULL = re.compile(_GROUPED)
_TRIG_DEGREES = re.compile(
    r"(\\(?:sin|cos|tan|cot|sec|csc))\s*(?:(\^\s*(?:\{[^{}]{1,4}\}|\d))\s*)?(?:\\left\s*)?(?:(\()\s*)?"
    r"(\d{1,6}(?:\.\d{1,6})?)\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|°)(?(3)\s*(?:\\right\s*)?\))"
)
_ASCII_RELATIONS = ((">=", "\\ge "), ("<=", "\\le "), ("!=", "\\ne "))
_HAS_RELATION = re.compile(r"<|>|\\[lg]eq?(?![a-zA-Z])|\\neq?(?![a-zA-Z])|≤|≥|≠|\\[lg]eqslant")
_AND = re.compile(r"\\(?:text|mbox|textrm|mathrm)\s*\{\s*and\s*\}|(?<![\\a-zA-Z])and(?![a-zA-Z])|\\wedge(?![a-zA-Z])")
_NAMES = r"[a-zA-Z](?:_\{?\w{1,3}\}?)?"
_NAMED_TUPLE = re.compile(
    r"\(\s*(" + _NAMES + r"(?:\s*,\s*" + _NAMES + r"){1,7})\s*\)\s*=\s*(?:\\left\s*)?\(([^()=]*)\)"
)
_SOLUTION_SPLIT = re.compile(r";|\\text\s*\{\s*(?:or|and)\s*\}|(?<![a-zA-Z\\])(?:or|and)(?![a-zA-Z])")
_ASSIGNMENT = re.compile(r"\s*(" + _NAMES + r")\s*=([^=,;]+)")


def _fraction_thousands(match: re.Match) -> str:
    parts = [match.group(2), match.group(3)]
    cleaned = [re.sub(r",\\!|\{,\}|,", "", p.strip()) if _GROUPED_FULL.fullmatch(p.strip()) else p for p in parts]
    return f"{match.group(1)}{{{cleaned[0]}}}{{{cleaned[1]}}}"


def _trig_degrees(match: re.Match) -> str:
    power = match.group(2) or ""
    return f"{match.group(1)}{power}{{\\left(\\frac{{{match.group(4)}\\pi}}{{180}}\\right)}}"


def _named_tuple(match: re.Match) -> str:
    names = [n.strip() for n in match.group(1).split(",")]
    values = [v.strip() for v in match.group(2).removesuffix("\\right").split(",")]
    if len(names) != len(values) or not all(values):
        return match.group(0)
    return ", ".join(f"{n}={v}" for n, v in zip(names, values))


def _solutions(s: str) -> str:
    """``x=1, y=2; x=3, y=4`` -> ``(1, 2), (3, 4)`` (values in name order); other semicolon lists join by commas."""
    groups = [g.strip() for g in _SOLUTION_SPLIT.split(s.strip().rstrip(";"))]
    if len(groups) < 2:
        return s
    tuples = []
    for group in groups:
        parts = group.split(",")
        assignments = [_ASSIGNMENT.fullmatch(p) for p in parts]
        if len(parts) < 2 or not all(assignments):
            return ", ".join(groups) if ";" in s and not re.search(r"(?<![a-zA-Z])(?:or|and)(?![a-zA-Z])", s) else s
        pairs = sorted((m.group(1), m.group(2).strip()) for m in assignments)  # type: ignore[union-attr]
        if len({name for name, _ in pairs}) != len(pairs):
            return s
        tuples.append("(" + ", ".join(value for _, value in pairs) + ")")
    return ", ".join(tuples)


def rewrite_ecosystem(s: str) -> str:
    """Applies the rewrites listed in the module docstring.

    Args:
        s: a raw answer (gold or candidate, before normalisation).

    Returns:
        The rewritten answer (unchanged when none of the notations occurs).
    """
    s = _CURRENCY.sub("", s)
    if "frac" in s and "," in s:
        s = _FRACTION_THOUSANDS.sub(_fraction_thousands, s)
    if "\\circ" in s or "°" in s:
        s = _TRIG_DEGREES.sub(_trig_degrees, s)
    for old, new in _ASCII_RELATIONS:
        s = s.replace(old, new)
    if _HAS_RELATION.search(s):
        s = _AND.sub(" \\\\land ", s)
    if "=" in s and "(" in s:
        s = _NAMED_TUPLE.sub(_named_tuple, s)
    if "=" in s and "\\begin" not in s and (";" in s or "or" in s or "and" in s):
        s = _solutions(s)
    return s
