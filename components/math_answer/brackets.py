"""Bracket-aware splitting of normalised answers (linear scans only, bounded depth and item count)."""

from __future__ import annotations

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "StructureError", "split_top_level", "enclosed", "expand_pm"]

MAX_DEPTH = 60
MAX_ITEMS = 1024

_OPEN = "([{"
_CLOSE = ")]}"


class StructureError(ValueError):
    """Raised when an answer's bracket structure is too deep or too large to interpret."""


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


def enclosed(s: str, left: str, right: str) -> bool:
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


def expand_pm(item: str) -> list[str]:
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
