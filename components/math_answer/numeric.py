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
_ARTEFACT_REL = Fraction(1, 10**9)

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
        half_unit: for an inexact number, half a unit in its last written decimal place (the largest error a
            correctly rounded value can have); ``0`` for exact numbers.
    """

    value: Fraction
    inexact: bool
    half_unit: Fraction = Fraction(0)


def _to_fraction(token: str) -> Fraction | None:
    digits = sum(ch.isdigit() for ch in token)
    if digits == 0 or digits > MAX_DIGITS:
        return None
    return Fraction(token)


def _half_unit(token: str, ten_exponent: int = 0) -> Fraction:
    """Half a unit in the last place of a decimal literal (times ``10**ten_exponent``)."""
    if "." not in token:
        return Fraction(0)
    places = len(token.split(".", 1)[1])
    return Fraction(1, 2) * Fraction(10) ** (ten_exponent - places)


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
        return None if value is None else ParsedNumber(value, "." in s, _half_unit(s))
    match = _RE_FRAC.fullmatch(s)
    if match:
        num, den = _to_fraction(match.group(2)), _to_fraction(match.group(3))
        if num is None or den is None or den == 0:
            return None
        sign = -1 if match.group(1) == "-" else 1
        return ParsedNumber(sign * num / den, "." in s, _half_unit(match.group(2)) / abs(den) if "." in s else 0)
    match = _RE_SLASH.fullmatch(s)
    if match:
        num, den = _to_fraction(match.group(1)), _to_fraction(match.group(2))
        if num is None or den is None or den == 0:
            return None
        return ParsedNumber(num / den, "." in s, _half_unit(match.group(1)) / abs(den) if "." in s else 0)
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
        token = match.group(1)
        return ParsedNumber(mantissa * Fraction(10) ** exponent, "." in token, _half_unit(token, exponent))
    return None


def numbers_equal(gold: ParsedNumber, candidate: ParsedNumber, rel_tol: float) -> bool:
    """Compares two parsed numbers: exactly, or as a rounded decimal when either was written as a decimal.

    A decimal matches when the difference is both within ``rel_tol`` (relative) and no more than half a unit in
    the last written place of the coarser decimal, i.e. when it could be a correct rounding, or (floating-point
    artefacts such as ``0.30000000000000004``) within a relative ``1e-9``. So ``0.333333`` matches ``1/3`` but
    ``0.33`` does not, and ``1000001.0`` never matches ``1000000``.

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
    diff = abs(gold.value - candidate.value)
    scale = max(abs(gold.value), abs(candidate.value))
    rounding = max(gold.half_unit, candidate.half_unit)
    if diff > Fraction(repr(float(rel_tol))) * scale:
        return False
    return diff <= rounding or diff <= _ARTEFACT_REL * scale
