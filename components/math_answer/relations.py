"""Intervals written as brackets or as relations (``a<x\\le b``, ``x>a``, unions, ``or``-lists, set-builder).

Works on normalised strings and returns the string form ``(open, low, high, close)`` of each interval; the numeric
interval algebra (merging unions, complements, absolute values) is in :mod:`.interval_sets`.
"""

from __future__ import annotations

import re

from .brackets import enclosed, split_top_level
from .forms import excluded_points, set_builder_condition

__all__ = ["RELATION", "IN_PREFIX", "interval", "relation_to_interval", "intervals"]

RELATION = re.compile(r"\\le(?![a-zA-Z])|\\ge(?![a-zA-Z])|<|>")
IN_PREFIX = re.compile(r"[a-zA-Z](?:_\{?\w+\}?)?\\in")


def interval(s: str) -> tuple[str, str, str, str] | None:
    if len(s) < 5 or s[0] not in "([" or s[-1] not in ")]" or not enclosed(s, s[0], s[-1]):
        return None
    inner = split_top_level(s[1:-1], ",")
    if len(inner) != 2 or not inner[0] or not inner[1]:
        return None
    return (s[0], inner[0], inner[1], s[-1])


def relation_to_interval(s: str) -> tuple[str, str, str, str] | None:
    """``a<x\\le b``, ``x>a``, ``x\\le b`` ... -> an interval; anything else -> ``None``."""
    pieces = [p.strip() for p in RELATION.split(s)]
    ops = RELATION.findall(s)
    if not 1 <= len(ops) <= 2 or any(not p for p in pieces):
        return None
    var_positions = [i for i, p in enumerate(pieces) if re.fullmatch(r"[a-zA-Z]", p)]
    if len(var_positions) != 1:
        return None
    where = var_positions[0]
    inf, ninf = "\\infty", "-\\infty"
    if len(ops) == 2:
        less = {"<", "\\le"}
        if where != 1 or (ops[0] in less) != (ops[1] in less):
            return None  # only monotone chains ``a < x \le b`` or ``a > x > b``
        if ops[0] in less:
            return ("[" if ops[0] == "\\le" else "(", pieces[0], pieces[2], "]" if ops[1] == "\\le" else ")")
        return ("[" if ops[1] == "\\ge" else "(", pieces[2], pieces[0], "]" if ops[0] == "\\ge" else ")")
    op = ops[0]
    bound = pieces[1 - where]
    upper = (op in ("<", "\\le")) == (where == 0)  # ``x < b`` or ``b > x``: ``b`` is the upper bound
    closed = op in ("\\le", "\\ge")
    if upper:
        return ("(", ninf, bound, "]" if closed else ")")
    return ("[" if closed else "(", bound, inf, ")")


def intervals(s: str) -> tuple | None:
    s = IN_PREFIX.sub("", s, count=1) if IN_PREFIX.match(s) else s
    condition = set_builder_condition(s)
    if condition is not None:
        s = condition
    points = excluded_points(s)
    if points is not None:
        return ("excluded",) + tuple(points)
    parts = split_top_level(s, "\\cup")
    if len(parts) == 1:  # ``x<2 or x>3`` (``or`` is normalised to a comma): a union of relations
        parts = split_top_level(s, ",")
        if len(parts) > 1 and not all(RELATION.search(p) for p in parts):
            return None
    found = []
    for part in parts:
        found_interval = interval(part) or relation_to_interval(part)
        if found_interval is None:
            return None
        found.append(found_interval)
    return tuple(found)
