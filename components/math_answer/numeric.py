"""Exact parsing of plain numbers for the in-process fast path.

Integers, decimals, ``\\frac{a}{b}``, ``a/b``, mixed numbers (``2\\frac{1}{2}``) and scientific notation
(``3\\times10^{-4}``) are read into :class:`fractions.Fraction` without sympy. Anything else returns ``None`` and is
left to the symbolic path. Digit counts and exponents are bounded so no input can make this slow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["ParsedNumber", "parse_number", "numbers_equal"]

MAX_DIGITS = 300
MAX_TEN_EXPONENT = 400

_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SIGNED = r"[+-]?" + _NUM
_RE_NUMBER = re.compile(r"[+-]?" + _NUM)
_RE_FRAC = re.compile(r"([+-]?)\\frac\{(" + _SIGNED + r")\}\{(" + _SIGNED + r")\}")
_RE_SLASH = re.compile(r"([+-]?" + _NUM + r")/([+-]?" + _NUM + r")")
_RE_MIXED = re.compile(r"([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_RE_SCI = re.compile(r"([+-]?" + _NUM + r")(?:\\times|\\cdot|\*)10\^(?:\{([+-]?\d{1,4})\}|(\d))")


@dataclass(frozen=True)
class ParsedNumber:
    """A number read exactly from its decimal or fractional notation.

    Attributes:
        value: the exact value.
        inexact: ``True`` when written with a decimal point, i.e. possibly a rounded value.
    """

    value: Fraction
    inexact: bool


def _to_fraction(token: str) -> Fraction | None:
    digits = sum(ch.isdigit() for ch in token)
    if digits == 0 or digits > MAX_DIGITS:
        return None
    return Fraction(token)


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and "{" not in s[1:-1] and "}" not in s[1:-1]:
        s = s[1:-1]
    return s


def parse_number(s: str) -> ParsedNumber | None:
    """Reads a normalised answer as an exact number.

    Args:
        s: a normalised answer string (see :func:`components.math_answer.normalize.normalize`).

    Returns:
        The number, or ``None`` when ``s`` is not a plain number.
    """
    s = _strip_outer_braces(s)
    if not s or len(s) > 2 * MAX_DIGITS:
        return None
    if _RE_NUMBER.fullmatch(s):
        value = _to_fraction(s)
        return None if value is None else ParsedNumber(value, "." in s)
    match = _RE_FRAC.fullmatch(s)
    if match:
        num, den = _to_fraction(match.group(2)), _to_fraction(match.group(3))
        if num is None or den is None or den == 0:
            return None
        sign = -1 if match.group(1) == "-" else 1
        return ParsedNumber(sign * num / den, "." in s)
    match = _RE_SLASH.fullmatch(s)
    if match:
        num, den = _to_fraction(match.group(1)), _to_fraction(match.group(2))
        if num is None or den is None or den == 0:
            return None
        return ParsedNumber(num / den, "." in s)
    match = _RE_MIXED.fullmatch(s)
    if match:
        whole, num, den = (_to_fraction(match.group(i)) for i in (2, 3, 4))
        if whole is None or num is None or den is None or den == 0 or num >= den:
            return None
        sign = -1 if match.group(1) == "-" else 1
        return ParsedNumber(sign * (whole + num / den), False)
    match = _RE_SCI.fullmatch(s)
    if match:
        mantissa = _to_fraction(match.group(1))
        exponent = int(match.group(2) if match.group(2) is not None else match.group(3))
        if mantissa is None or abs(exponent) > MAX_TEN_EXPONENT:
            return None
        return ParsedNumber(mantissa * Fraction(10) ** exponent, "." in match.group(1))
    return None


def numbers_equal(gold: ParsedNumber, candidate: ParsedNumber, rel_tol: float) -> bool:
    """Compares two parsed numbers: exactly, or within ``rel_tol`` when either was written as a decimal.

    Args:
        gold: the gold number.
        candidate: the candidate number.
        rel_tol: relative tolerance, applied only when a decimal (possibly rounded) is involved.

    Returns:
        Whether the numbers are equal.
    """
    if gold.value == candidate.value:
        return True
    if not (gold.inexact or candidate.inexact) or rel_tol <= 0:
        return False
    scale = max(abs(gold.value), abs(candidate.value))
    return abs(gold.value - candidate.value) <= Fraction(rel_tol) * scale
