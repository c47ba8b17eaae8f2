"""Sums and differences of (scaled) matrices in an answer: ``\\begin{pmatrix}..\\end{pmatrix} - 3\\begin{pmatrix}..``.

Works on normalised strings. Each term is read by the caller's matrix reader (which handles a scalar factor or sign
in front); the cells are added exactly when they are plain numbers and as ``(a)+(b)`` LaTeX otherwise (compared
later by the symbolic path).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .forms import fraction_latex
from .numeric import parse_number

__all__ = ["matrix_sum", "MAX_MATRIX_TERMS"]

MAX_MATRIX_TERMS = 8
_ENV = re.compile(r"\\(begin|end)\{[a-zA-Z]*\}")


def _terms(s: str) -> list[tuple[str, str]] | None:
    """Splits ``s`` at ``+``/``-`` outside environments and brackets into ``(sign, term)``."""
    ends = {m.start(): (m.group(1), m.end()) for m in _ENV.finditer(s)}
    terms: list[tuple[str, str]] = []
    env_depth = depth = 0
    sign, start, i = "+", 0, 0
    while i < len(s):
        if i in ends:
            kind, end = ends[i]
            env_depth += 1 if kind == "begin" else -1
            i = end
            continue
        char = s[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char in "+-" and env_depth == 0 and depth == 0 and i > start:
            terms.append((sign, s[start:i]))
            sign, start = char, i + 1
            if len(terms) > MAX_MATRIX_TERMS:
                return None
        i += 1
    terms.append((sign, s[start:]))
    return terms if len(terms) > 1 else None


def _add(a: str, b: str, negate: bool) -> str:
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return fraction_latex(x.value - y.value if negate else x.value + y.value)
    return f"({a}){'-' if negate else '+'}({b})"


def matrix_sum(s: str, read_rows: Callable[[str], tuple | None]) -> tuple | None:
    """Reads a sum of matrices as one matrix.

    Args:
        s: a normalised answer.
        read_rows: the reader of one (possibly scaled) matrix, returning ``(environment, *rows)`` or ``None``.

    Returns:
        ``(environment, *rows)`` of the sum, or ``None`` when ``s`` is not a sum of matrices of one size.
    """
    if s.count("\\begin{") < 2:
        return None
    terms = _terms(s)
    if terms is None or terms[0][1].startswith("\\end"):
        return None
    total = None
    for sign, term in terms:
        rows = read_rows(term)
        if rows is None:
            return None
        env, cells = rows[0], [list(row) for row in rows[1:]]
        if total is None:
            total = (env, [[cell if sign == "+" else _add("0", cell, True) for cell in row] for row in cells])
            continue
        if len(cells) != len(total[1]) or any(len(a) != len(b) for a, b in zip(cells, total[1])):
            return None
        total = (total[0], [[_add(a, b, sign == "-") for a, b in zip(r1, r2)] for r1, r2 in zip(total[1], cells)])
    assert total is not None
    return (total[0],) + tuple(tuple(row) for row in total[1])
