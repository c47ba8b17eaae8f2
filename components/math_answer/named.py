"""Names given with values: ``x=5``, ``AB=6``, ``\\angle ABC=30``, ``f(x)=...``, ``a=3, b=4`` (normalised strings).

:data:`NAME_PATTERN` is what may stand on the left of a value that names it: a variable (``x``, ``x_1``, ``\\alpha``),
a function (``f(x)``, ``f^{-1}(x)``), a sum of variables (``a+b``), a segment or area (``AB``, ``\\overline{AB}``,
``|AB|``, ``[ABC]``), an angle (``\\angle ABC``, ``m\\angle C``) or a ratio of segments (``\\frac{AB}{BC}``,
``AE:EC``). A gold answer of several named values (``AB=5, BC=12``) is compared name by name against named
candidates, and in the gold's order against a bare list or tuple.
"""

from __future__ import annotations

import re

from .brackets import enclosed, split_top_level

__all__ = ["NAME_PATTERN", "FUNCTION_NAME", "named_gold", "named_candidate"]

NAME_PATTERN = (
    r"[a-zA-Z](?:_\{?\w{1,3}\}?)?(?:\([a-z0-9]{1,4}\))?|[a-zA-Z]\^\{-1\}\([a-z]\)|\\[a-zA-Z]+(?:_\{?\w{1,3}\}?)?"
    r"|[a-zA-Z](?:[+*][a-zA-Z]){1,4}|[A-Z]{2,4}|\\overline\{[A-Z]{2}\}|\|[A-Z]{2}\||\[[A-Z]{3,4}\]"
    r"|(?:m ?)?\\angle ?[A-Z]{1,3}|\\frac\{[A-Z]{2}\}\{[A-Z]{2}\}|[A-Z]{2}:[A-Z]{2}"
)
FUNCTION_NAME = re.compile(r"y|[a-zA-Z](?:\^\{-1\})?\(([a-z])\)")
"""The left side of a function given by its formula: ``y``, ``f(x)``, ``g^{-1}(t)``."""

_NAME = re.compile(NAME_PATTERN)


def _named_parts(s: str) -> list[tuple[str, str]] | None:
    parts = split_top_level(s, ",")
    pairs = []
    for part in parts:
        sides = split_top_level(part, "=")
        if len(sides) != 2 or not sides[1] or not _NAME.fullmatch(sides[0].strip()):
            return None
        pairs.append((sides[0].strip(), sides[1].strip()))
    if len({name for name, _ in pairs}) != len(pairs):
        return None
    return pairs


def named_gold(gold: str) -> tuple[tuple[str, str], ...] | None:
    """``a=3,b=4`` -> ``(("a", "3"), ("b", "4"))``: a gold of at least two distinct named values, else ``None``."""
    if "=" not in gold or len(split_top_level(gold, ",")) < 2:
        return None
    pairs = _named_parts(gold)
    return tuple(pairs) if pairs is not None else None


def named_candidate(candidate: str, size: int) -> tuple[str, tuple] | None:
    """Reads a candidate against a named gold of ``size`` values.

    Returns:
        ``("named", pairs)`` for named values, ``("values", values)`` for a bare list or tuple of ``size`` values
        (compared in the gold's order), or ``None`` when neither fits.
    """
    pairs = _named_parts(candidate) if "=" in candidate else None
    if pairs is not None:
        return "named", tuple(pairs)
    body = candidate[1:-1] if len(candidate) >= 2 and candidate[0] in "([" and enclosed(candidate, candidate[0], candidate[-1]) else candidate
    values = split_top_level(body, ",")
    if len(values) == size and all(values) and "=" not in body:
        return "values", tuple(values)
    return None
