"""Gold-guided decomposition of answers into shapes (tuple, interval, set, matrix, equation, choice, text, ...).

The gold answer decides how a candidate is read: ``58,500`` is one number when the gold is ``58500`` but a list
when the gold is ``3, 5, 7``; ``(2, 4)`` is compared bracket-for-bracket; ``x = 5`` is the value 5 when the gold is
a number. Reading the candidate through the gold's shape is the reward-hacking guard that math-verify also uses:
a candidate never gets a more lenient interpretation than the gold allows.

All functions work on normalised strings (see :mod:`.normalize`) and use linear scans only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .brackets import MAX_ITEMS, StructureError, enclosed, expand_pm, split_top_level
from .forms import (
    set_builder_condition,
    identity_rows,
    in_name_order,
    named_values,
    scaled_cell,
    sentence_key,
    text_key,
)
from .interval_sets import integer_members
from .matrix_ops import matrix_sum
from .named import NAME_PATTERN, named_candidate, named_gold
from .relations import IN_PREFIX, RELATION, interval, intervals, relation_to_interval

__all__ = ["Shape", "StructureError", "gold_shape", "candidate_shape", "split_top_level"]

_CHOICE = re.compile(r"\(?([A-Ea-e])\)?")
_CHOICE_WITH_VALUE = re.compile(r"\(([A-E])\)[^A-Za-z(].*|\(([A-E])\)[a-z].*|([A-E])[.:]\s*\S.*|([A-E]) [a-z0-9].*")
_OTHER_CHOICE = re.compile(r"\([A-E]\)|(?<![A-Za-z])[A-E](?![A-Za-z])")

_GOLD_TEXT = re.compile(
    r"\s*\\(?:text|textbf|textrm|textit|mbox|mathrm)\s*\{\s*([A-Za-z][A-Za-z '\-]*?)\s*\}\s*\.?\s*"
)
_GOLD_CHOICE = re.compile(r"\s*(?:\\(?:text|textbf|textrm|mbox|mathrm)\s*\{)?\s*\(?([A-E])\)?\s*\}?\s*")
_GOLD_CHOICE_START = re.compile(r"\s*(?:\\(?:text|textbf|textrm|mbox|mathrm)\s*\{)?\s*\([A-E]\)")
_CHOICE_VALUE = re.compile(r"\(([A-E])\)([^A-Za-z(].*)")
_WORDS = re.compile(r"[A-Za-z][A-Za-z ]{3,}")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BASE = re.compile(r"(\d+|[0-9A-F]+)_\{?(\d{1,2})\}?")
_DIGITS = re.compile(r"[0-9A-F]+")
_ASSIGN_LHS = re.compile(NAME_PATTERN)
_MATRIX_FACTOR = re.compile(r"(-?)((?:\d+(?:\.\d+)?|\\frac\{[^{}]{1,30}\}\{[^{}]{1,30}\}|\d+/\d+)?)(?:\\cdot)?")

_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[lcr|]*\})?(.*)\\end\{\1\}", re.DOTALL)


@dataclass(frozen=True)
class Shape:
    """An answer decomposed into its structure.

    Attributes:
        kind: one of ``choice``, ``text``, ``base``, ``intervals``, ``seq``, ``set``, ``matrix``, ``equation``,
            ``relation`` or ``scalar``.
        items: the element strings (``seq``/``set``/``scalar``), or ``(open, low, high, close)`` tuples for
            ``intervals``, or rows for ``matrix``, or ``(lhs, rhs)`` for ``equation``.
        brackets: the enclosing bracket characters of a ``seq``, e.g. ``"(]"``.
        text: the letter/word/digits of ``choice``/``text``/``base``/``relation`` answers.
        base: the numeral base of a ``base`` answer (``None`` when not written).
    """

    kind: str
    items: tuple = field(default_factory=tuple)
    brackets: str = ""
    text: str = ""
    base: str | None = None


def _strip_assignment(s: str) -> str:
    """``x=5`` -> ``5`` and ``k=2+3=5`` -> ``5`` (the last side of a chain whose first side is a variable)."""
    parts = split_top_level(s, "=")
    if len(parts) >= 2 and _ASSIGN_LHS.fullmatch(parts[0]) and parts[-1]:
        if any(len(split_top_level(part, ",")) > 1 for part in parts):
            return s  # ``a=2,b=5``: several named values, not one
        return parts[-1]
    return s


def _matrix_rows(s: str) -> tuple | None:
    sign = factor = ""
    if len(s) > 2 and s[0] + s[-1] in ("()", "[]") and _MATRIX.fullmatch(s[1:-1]):
        s = s[1:-1]  # ``\left(\begin{array}..\end{array}\right)``
    begin = s.find("\\begin{")
    if begin > 0:
        prefix = _MATRIX_FACTOR.fullmatch(s[:begin])
        if prefix is None:
            return None
        sign, factor = prefix.group(1), prefix.group(2)
        s = s[begin:]
    if len(s) > 2 and s[0] + s[-1] in ("()", "[]") and _MATRIX.fullmatch(s[1:-1]):
        s = s[1:-1]  # ``\left(\begin{array}..\end{array}\right)``
    match = _MATRIX.fullmatch(s)
    if not match or "\\begin{" in match.group(2) or "\\end{" in match.group(2):
        return None  # not one matrix (e.g. a sum of matrices, read by :func:`.matrix_ops.matrix_sum`)
    rows = [r for r in match.group(2).split("\\\\") if r.strip()]
    if not rows or len(rows) > MAX_ITEMS:
        raise StructureError("bad matrix")
    table = tuple(tuple(scaled_cell(factor, sign, cell.strip()) if sign or factor else cell.strip()
                        for cell in row.split("&")) for row in rows)
    if len({len(row) for row in table}) != 1 or len(table[0]) > MAX_ITEMS:
        return None
    return (match.group(1),) + table


def _list_items(s: str) -> list[str] | None:
    """Items of ``\\{a, b\\}`` or of a bare list ``a, b``; ``None`` for a single item."""
    if enclosed(s, "\\{", "\\}"):
        s = s[2:-2]
        items = split_top_level(s, ",") if s else []
    else:
        items = split_top_level(s, ",")
        if len(items) < 2:
            return None
    out: list[str] = []
    for item in items:
        if item:
            out.extend(expand_pm(_strip_assignment(item)))
    if len(out) > MAX_ITEMS:
        raise StructureError("too many items")
    return out


def gold_shape(gold: str, raw_gold: str) -> Shape:
    """Decides the shape of a gold answer.

    Args:
        gold: the normalised gold answer.
        raw_gold: the gold as written (needed to recognise ``\\text{...}`` answers).

    Returns:
        The gold's shape.

    Raises:
        StructureError: if the gold is too deeply nested.
    """
    choice = _GOLD_CHOICE.fullmatch(raw_gold)
    if choice:
        return Shape("choice", text=choice.group(1).upper())
    choice = _CHOICE_VALUE.fullmatch(gold) if _GOLD_CHOICE_START.match(raw_gold) else None
    if choice:  # a letter with its option's value: ``\textbf{(C) }7``
        return Shape("choice", text=choice.group(1), items=(choice.group(2),))
    text = _GOLD_TEXT.fullmatch(raw_gold)
    if text and not _CHOICE.fullmatch(text.group(1)):
        return Shape("text", text=_text_key(text.group(1)))
    if _WORDS.fullmatch(gold) and any(len(w) >= 4 for w in gold.split()) and "\\" not in raw_gold:
        return Shape("text", text=_text_key(gold))
    base = _BASE.fullmatch(gold)
    if base:
        return Shape("base", text=base.group(1), base=base.group(2))
    if ":" in gold and "\\begin" not in gold:  # times and ratios (``12:00``, ``3:1``) compare as written
        return Shape("relation", text=gold)
    if _THOUSANDS.fullmatch(gold):
        return Shape("scalar", items=(gold.replace(",", ""),))
    named = named_gold(gold)
    if named is not None:
        return Shape("named", items=named)
    return _structured_shape(IN_PREFIX.sub("", gold, count=1) if IN_PREFIX.match(gold) else gold)


def _structured_shape(s: str) -> Shape:
    rows = _matrix_rows(s)
    if rows is not None:
        return Shape("matrix", items=rows[1:], brackets=rows[0])
    if len(split_top_level(s, "\\cup")) > 1:
        found = intervals(s)
        if found is not None:
            return Shape("intervals", items=found)
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and enclosed(s, s[0], s[-1]):
        items = split_top_level(s[1:-1], ",")
        if len(items) >= 2:
            if len(items) == 2 and all(items) and ("\\infty" in s or s[0] + s[-1] != "()"):
                return Shape("intervals", items=(interval(s),))
            return Shape("seq", items=tuple(items), brackets=s[0] + s[-1])
    items = _list_items(s)
    if items is not None:
        return Shape("set", items=tuple(items), brackets="{}" if enclosed(s, "\\{", "\\}") else "")
    sides = split_top_level(s, "=")
    if len(sides) == 2 and all(sides):
        return Shape("equation", items=(sides[0], sides[1]))
    if RELATION.search(s) and len(split_top_level(s, ",")) == 1:
        found = relation_to_interval(s)
        if found is not None:
            return Shape("intervals", items=(found,))
        return Shape("relation", text=s)
    pm = expand_pm(s)
    if len(pm) == 2:
        return Shape("set", items=tuple(pm), brackets="pm")
    return Shape("scalar", items=(s,))


def _text_key(s: str) -> str:
    return text_key(s)


def candidate_shape(candidate: str, gold: Shape) -> Shape | None:
    """Reads a normalised candidate answer in the shape of its gold answer.

    Args:
        candidate: the normalised candidate answer.
        gold: the gold's shape.

    Returns:
        The candidate's shape, or ``None`` when it cannot be read in the gold's shape (a wrong answer).

    Raises:
        StructureError: if the candidate is too deeply nested.
    """
    kind = gold.kind
    if kind == "choice":
        match = _CHOICE.fullmatch(candidate)
        if match:
            return Shape("choice", text=match.group(1).upper())
        match = _CHOICE_WITH_VALUE.fullmatch(candidate)
        if match is None:
            return Shape("choice", items=(candidate,)) if gold.items else None  # the option's value alone
        letter = next(g for g in match.groups() if g)
        rest = candidate[candidate.index(letter) + 2 :]
        if _OTHER_CHOICE.search(rest):
            return None
        value = rest.lstrip(".:) ")
        return Shape("choice", text=letter, items=(value,) if gold.items and value else ())
    if kind == "text":
        return Shape("text", text=sentence_key(candidate, gold.text))
    if kind == "base":
        match = _BASE.fullmatch(candidate)
        if match:
            return Shape("base", text=match.group(1), base=match.group(2))
        return Shape("base", text=candidate) if _DIGITS.fullmatch(candidate) else None
    if kind == "relation":
        return Shape("relation", text=_strip_assignment(candidate))
    if kind == "named":
        found = named_candidate(candidate, len(gold.items))
        return None if found is None else Shape("named", items=found[1], brackets=found[0])
    if kind == "equation":
        sides = split_top_level(candidate, "=")
        if len(sides) == 2 and all(sides):
            return Shape("equation", items=(sides[0], sides[1]))
        return Shape("scalar", items=(candidate,)) if len(sides) == 1 else None
    stripped = _strip_assignment(candidate)
    if kind == "scalar":
        if enclosed(stripped, "\\{", "\\}") and len(split_top_level(stripped[2:-2], ",")) == 1:
            stripped = _strip_assignment(stripped[2:-2])  # a one-element set
        if _THOUSANDS.fullmatch(stripped):
            stripped = stripped.replace(",", "")
        if len(split_top_level(stripped, ",")) > 1 or len(split_top_level(stripped, "\\pm")) > 1:
            return None
        return Shape("scalar", items=(stripped,))
    if kind == "intervals":
        found = intervals(stripped)
        return Shape("intervals", items=found) if found is not None else None
    if kind == "matrix":
        rows = _matrix_rows(stripped) or matrix_sum(stripped, _matrix_rows)
        if rows is not None:
            return Shape("matrix", items=rows[1:], brackets=rows[0])
        gold_rows = gold.items
        if len(gold_rows) == len(gold_rows[0]):
            identity = identity_rows(stripped, len(gold_rows))
            if identity is not None:
                return Shape("matrix", items=identity, brackets=gold.brackets)
        flat = len(gold_rows) == 1 or all(len(r) == 1 for r in gold_rows)
        if flat and len(stripped) >= 2 and stripped[0] in "([" and enclosed(stripped, stripped[0], stripped[-1]):
            items = split_top_level(stripped[1:-1], ",")
            shape = tuple((x,) for x in items) if len(gold_rows) > 1 else (tuple(items),)
            return Shape("matrix", items=shape, brackets=gold.brackets)
        return None
    if kind == "seq":
        named = named_values(split_top_level(stripped, ","))
        if named is not None and len(named) == len(gold.items) > 1:
            return Shape("seq", items=tuple(in_name_order(named)), brackets=gold.brackets)
        if len(stripped) >= 2 and stripped[0] in "([" and enclosed(stripped, stripped[0], stripped[-1]):
            items = split_top_level(stripped[1:-1], ",")
            return Shape("seq", items=tuple(items), brackets=stripped[0] + stripped[-1])
        found = relation_to_interval(stripped) if len(gold.items) == 2 else None
        if found is not None:
            return Shape("seq", items=found[1:3], brackets=found[0] + found[3])
        items = split_top_level(stripped, ",")
        if gold.brackets == "()" and len(items) == len(gold.items):
            return Shape("seq", items=tuple(items), brackets="()")
        return None
    if kind == "set":
        stripped = IN_PREFIX.sub("", stripped, count=1) if IN_PREFIX.match(stripped) else stripped
        members = integer_members(stripped) if "\\mathbb{Z}" in stripped else None
        if members is not None:  # ``\{n\in\mathbb{Z} : 1\le n\le 3\}``
            return Shape("set", items=tuple(map(str, members)), brackets="{}")
        condition = set_builder_condition(stripped)
        if condition is not None:  # ``\{x : x=1, x=3\}`` (``or`` is normalised to a comma)
            values = [_strip_assignment(part) for part in split_top_level(condition, ",")]
            if all(value != part for value, part in zip(values, split_top_level(condition, ","))):
                return Shape("set", items=tuple(values), brackets="{}")
        items = _list_items(stripped)
        brackets = "{}" if enclosed(stripped, "\\{", "\\}") else ""
        if items is None:
            items = expand_pm(stripped)
            brackets = "pm" if len(items) > 1 else ""
        return Shape("set", items=tuple(items), brackets=brackets)
    return None
