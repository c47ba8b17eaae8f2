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

from .forms import (
    excluded_points,
    identity_rows,
    in_name_order,
    named_values,
    scaled_cell,
    sentence_key,
    set_builder_condition,
    text_key,
)

__all__ = ["Shape", "StructureError", "gold_shape", "candidate_shape", "split_top_level"]

MAX_DEPTH = 60
MAX_ITEMS = 1024

_OPEN = "([{"
_CLOSE = ")]}"
_CHOICE = re.compile(r"\(?([A-Ea-e])\)?")
_CHOICE_WITH_VALUE = re.compile(r"\(([A-E])\)[^A-Za-z(].*|\(([A-E])\)[a-z].*|([A-E])[.:]\s*\S.*|([A-E]) [a-z0-9].*")
_OTHER_CHOICE = re.compile(r"\([A-E]\)|(?<![A-Za-z])[A-E](?![A-Za-z])")

_GOLD_TEXT = re.compile(
    r"\s*\\(?:text|textbf|textrm|textit|mbox|mathrm)\s*\{\s*([A-Za-z][A-Za-z '\-]*?)\s*\}\s*\.?\s*"
)
_GOLD_CHOICE = re.compile(r"\s*(?:\\(?:text|textbf|textrm|mbox|mathrm)\s*\{)?\s*\(([A-E])\)\s*\}?\s*")
_WORDS = re.compile(r"[A-Za-z][A-Za-z ]{3,}")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BASE = re.compile(r"(\d+|[0-9A-F]+)_\{?(\d{1,2})\}?")
_DIGITS = re.compile(r"[0-9A-F]+")
_IN_PREFIX = re.compile(r"[a-zA-Z](?:_\{?\w+\}?)?\\in")
_ASSIGN_LHS = re.compile(
    r"[a-zA-Z](?:_\{?\w{1,3}\}?)?(?:\([a-z0-9]{1,4}\))?|\\[a-zA-Z]+(?:_\{?\w{1,3}\}?)?|[a-zA-Z](?:[+*][a-zA-Z]){1,4}"
)
_MATRIX_FACTOR = re.compile(r"(-?)((?:\d+(?:\.\d+)?|\\frac\{[^{}]{1,30}\}\{[^{}]{1,30}\}|\d+/\d+)?)(?:\\cdot)?")

_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[lcr|]*\})?(.*)\\end\{\1\}", re.DOTALL)
_RELATION = re.compile(r"\\le(?![a-zA-Z])|\\ge(?![a-zA-Z])|<|>")


class StructureError(ValueError):
    """Raised when an answer's bracket structure is too deep or too large to interpret."""


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


def split_top_level(s: str, sep: str) -> list[str]:
    """Splits ``s`` at occurrences of ``sep`` that are outside all brackets.

    ``\\{``/``\\}`` count as brackets, and mismatched pairs such as ``(3, 4]`` are fine: only depth is tracked.

    Raises:
        StructureError: when the nesting is deeper than :data:`MAX_DEPTH` or there are too many parts.
    """
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    n = len(s)
    while i < n:
        char = s[i]
        if char == "\\" and i + 1 < n and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if char in _OPEN:
            depth += 1
            if depth > MAX_DEPTH:
                raise StructureError("nesting too deep")
        elif char in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            if len(parts) > MAX_ITEMS:
                raise StructureError("too many items")
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _enclosed(s: str, left: str, right: str) -> bool:
    """Whether ``s`` is one bracket group from its first to its last character (mismatched types allowed)."""
    if not (s.startswith(left) and s.endswith(right)) or len(s) < len(left) + len(right):
        return False
    depth = 0
    i = 0
    n = len(s)
    while i < n:
        if s[i] == "\\" and i + 1 < n and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
        else:
            if s[i] in _OPEN:
                depth += 1
            elif s[i] in _CLOSE:
                depth -= 1
            i += 1
        if depth == 0 and i < n:
            return False
    return depth == 0


def _expand_pm(item: str) -> list[str]:
    """``a\\pm b`` -> ``[a+b, a-b]``; ``\\pm a`` -> ``[a, -a]``; other items unchanged."""
    parts = split_top_level(item, "\\pm")
    if len(parts) != 2:
        return [item] if len(parts) == 1 else [item, item + "\\pm"]  # two ``\pm``: keep as one unmatched item
    head, tail = parts
    if not tail:
        return [item]
    if not head:
        return [tail, "-" + tail if not tail.startswith("-") else tail[1:]]
    return [f"{head}+{tail}", f"{head}-{tail}"]


def _strip_assignment(s: str) -> str:
    """``x=5`` -> ``5`` and ``k=2+3=5`` -> ``5`` (the last side of a chain whose first side is a variable)."""
    parts = split_top_level(s, "=")
    if len(parts) >= 2 and _ASSIGN_LHS.fullmatch(parts[0]) and parts[-1]:
        if any(len(split_top_level(part, ",")) > 1 for part in parts):
            return s  # ``a=2,b=5``: several named values, not one
        return parts[-1]
    return s


def _interval(s: str) -> tuple[str, str, str, str] | None:
    if len(s) < 5 or s[0] not in "([" or s[-1] not in ")]" or not _enclosed(s, s[0], s[-1]):
        return None
    inner = split_top_level(s[1:-1], ",")
    if len(inner) != 2 or not inner[0] or not inner[1]:
        return None
    return (s[0], inner[0], inner[1], s[-1])


def _relation_to_interval(s: str) -> tuple[str, str, str, str] | None:
    """``a<x\\le b``, ``x>a``, ``x\\le b`` ... -> an interval; anything else -> ``None``."""
    pieces = [p.strip() for p in _RELATION.split(s)]
    ops = _RELATION.findall(s)
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


def _intervals(s: str) -> tuple | None:
    s = _IN_PREFIX.sub("", s, count=1) if _IN_PREFIX.match(s) else s
    condition = set_builder_condition(s)
    if condition is not None:
        s = condition
    points = excluded_points(s)
    if points is not None:
        return ("excluded",) + tuple(points)
    parts = split_top_level(s, "\\cup")
    if len(parts) == 1:  # ``x<2 or x>3`` (``or`` is normalised to a comma): a union of relations
        parts = split_top_level(s, ",")
        if len(parts) > 1 and not all(_RELATION.search(p) for p in parts):
            return None
    found = []
    for part in parts:
        interval = _interval(part) or _relation_to_interval(part)
        if interval is None:
            return None
        found.append(interval)
    return tuple(found)


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
    if not match:
        return None
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
    if _enclosed(s, "\\{", "\\}"):
        s = s[2:-2]
        items = split_top_level(s, ",") if s else []
    else:
        items = split_top_level(s, ",")
        if len(items) < 2:
            return None
    out: list[str] = []
    for item in items:
        if item:
            out.extend(_expand_pm(_strip_assignment(item)))
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
    return _structured_shape(_IN_PREFIX.sub("", gold, count=1) if _IN_PREFIX.match(gold) else gold)


def _structured_shape(s: str) -> Shape:
    rows = _matrix_rows(s)
    if rows is not None:
        return Shape("matrix", items=rows[1:], brackets=rows[0])
    if len(split_top_level(s, "\\cup")) > 1:
        intervals = _intervals(s)
        if intervals is not None:
            return Shape("intervals", items=intervals)
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _enclosed(s, s[0], s[-1]):
        items = split_top_level(s[1:-1], ",")
        if len(items) >= 2:
            if len(items) == 2 and all(items) and ("\\infty" in s or s[0] + s[-1] != "()"):
                return Shape("intervals", items=(_interval(s),))
            return Shape("seq", items=tuple(items), brackets=s[0] + s[-1])
    items = _list_items(s)
    if items is not None:
        return Shape("set", items=tuple(items))
    sides = split_top_level(s, "=")
    if len(sides) == 2 and all(sides):
        return Shape("equation", items=(sides[0], sides[1]))
    if _RELATION.search(s) and len(split_top_level(s, ",")) == 1:
        interval = _relation_to_interval(s)
        if interval is not None:
            return Shape("intervals", items=(interval,))
        return Shape("relation", text=s)
    pm = _expand_pm(s)
    if len(pm) == 2:
        return Shape("set", items=tuple(pm))
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
            return None
        letter = next(g for g in match.groups() if g)
        rest = candidate[candidate.index(letter) + 2 :]
        return None if _OTHER_CHOICE.search(rest) else Shape("choice", text=letter)
    if kind == "text":
        return Shape("text", text=sentence_key(candidate, gold.text))
    if kind == "base":
        match = _BASE.fullmatch(candidate)
        if match:
            return Shape("base", text=match.group(1), base=match.group(2))
        return Shape("base", text=candidate) if _DIGITS.fullmatch(candidate) else None
    if kind == "relation":
        return Shape("relation", text=candidate)
    if kind == "equation":
        sides = split_top_level(candidate, "=")
        if len(sides) == 2 and all(sides):
            return Shape("equation", items=(sides[0], sides[1]))
        return Shape("scalar", items=(candidate,)) if len(sides) == 1 else None
    stripped = _strip_assignment(candidate)
    if kind == "scalar":
        if _enclosed(stripped, "\\{", "\\}") and len(split_top_level(stripped[2:-2], ",")) == 1:
            stripped = _strip_assignment(stripped[2:-2])  # a one-element set
        if _THOUSANDS.fullmatch(stripped):
            stripped = stripped.replace(",", "")
        if len(split_top_level(stripped, ",")) > 1 or len(split_top_level(stripped, "\\pm")) > 1:
            return None
        return Shape("scalar", items=(stripped,))
    if kind == "intervals":
        intervals = _intervals(stripped)
        return Shape("intervals", items=intervals) if intervals is not None else None
    if kind == "matrix":
        rows = _matrix_rows(stripped)
        if rows is not None:
            return Shape("matrix", items=rows[1:], brackets=rows[0])
        gold_rows = gold.items
        if len(gold_rows) == len(gold_rows[0]):
            identity = identity_rows(stripped, len(gold_rows))
            if identity is not None:
                return Shape("matrix", items=identity, brackets=gold.brackets)
        flat = len(gold_rows) == 1 or all(len(r) == 1 for r in gold_rows)
        if flat and len(stripped) >= 2 and stripped[0] in "([" and _enclosed(stripped, stripped[0], stripped[-1]):
            items = split_top_level(stripped[1:-1], ",")
            shape = tuple((x,) for x in items) if len(gold_rows) > 1 else (tuple(items),)
            return Shape("matrix", items=shape, brackets=gold.brackets)
        return None
    if kind == "seq":
        named = named_values(split_top_level(stripped, ","))
        if named is not None and len(named) == len(gold.items) > 1:
            return Shape("seq", items=tuple(in_name_order(named)), brackets=gold.brackets)
        if len(stripped) >= 2 and stripped[0] in "([" and _enclosed(stripped, stripped[0], stripped[-1]):
            items = split_top_level(stripped[1:-1], ",")
            return Shape("seq", items=tuple(items), brackets=stripped[0] + stripped[-1])
        interval = _relation_to_interval(stripped) if len(gold.items) == 2 else None
        if interval is not None:
            return Shape("seq", items=interval[1:3], brackets=interval[0] + interval[3])
        items = split_top_level(stripped, ",")
        if gold.brackets == "()" and len(items) == len(gold.items):
            return Shape("seq", items=tuple(items), brackets="()")
        return None
    if kind == "set":
        items = _list_items(stripped)
        if items is None:
            items = _expand_pm(stripped)
        return Shape("set", items=tuple(items))
    return None
