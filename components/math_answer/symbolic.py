"""Sympy-based equivalence of two answer elements (runs inside verifier worker processes only).

Numbers are compared by high-precision evaluation (exactly equal closed forms agree to every digit; a decimal is
compared within the configured relative tolerance). Expressions with free symbols are rejected early when they
differ at a random probe point and accepted when ``expand``/``simplify`` of their difference is zero.
"""

from __future__ import annotations

import random
import re

from .parse import LatexParseError, UnsafeExpression, to_sympy

__all__ = ["ElementUnreadable", "GoldUnreadable", "expressions_equal", "equations_equal"]

_EXACT_REL_TOL = 1e-20
_PRECISION = 60
_PROBES = 4
_DECIMAL = re.compile(r"(?<![\d.])(\d{1,200})\.(\d{1,200})(?![\d.])")


def exact_decimals(s: str) -> str:
    """``1.25`` -> ``\\frac{125}{100}``: decimals reach sympy as exact rationals, never as binary floats."""
    return _DECIMAL.sub(lambda m: f"\\frac{{{m.group(1)}{m.group(2)}}}{{1{'0' * len(m.group(2))}}}", s)


class ElementUnreadable(ValueError):
    """The candidate element could not be parsed (or was rejected by a guard)."""


class GoldUnreadable(ValueError):
    """The gold element could not be parsed: a data problem, reported as an error."""


def _parse_pair(gold: str, candidate: str, imaginary_i: bool):
    try:
        g = to_sympy(gold, imaginary_i)
    except (UnsafeExpression, LatexParseError) as exc:
        raise GoldUnreadable(f"gold {gold!r}: {exc}") from exc
    try:
        c = to_sympy(candidate, imaginary_i)
    except (UnsafeExpression, LatexParseError) as exc:
        raise ElementUnreadable(str(exc)) from exc
    return g, c


def _reject_undefined(g, c, gold: str) -> None:
    """Division by zero and the like (``12:00`` read as a ratio) never count as a value."""
    import sympy

    undefined = (sympy.zoo, sympy.nan)
    if isinstance(g, sympy.Basic) and g.has(*undefined):
        raise GoldUnreadable(f"gold {gold!r} is undefined as a number")
    if isinstance(c, sympy.Basic) and c.has(*undefined):
        raise ElementUnreadable("answer is undefined as a number")


def _is_expr(x) -> bool:
    import sympy

    return isinstance(x, sympy.Expr) and not isinstance(x, sympy.MatrixBase)


def _close(a, b, rel_tol: float) -> bool:
    """Relative closeness of two evaluated sympy numbers (complex allowed), in arbitrary-exponent arithmetic."""
    import sympy

    scale = sympy.Max(abs(a), abs(b))
    if scale == 0:
        return True
    return bool(abs(a - b) <= sympy.Float(rel_tol, _PRECISION) * scale)


def _numbers_equal(g, c, rel_tol: float, inexact: bool) -> bool:
    import sympy

    gv = sympy.N(g, _PRECISION)
    cv = sympy.N(c, _PRECISION)
    if not (gv.is_number and cv.is_number) or gv.has(sympy.zoo, sympy.nan) or cv.has(sympy.zoo, sympy.nan):
        return bool(sympy.simplify(g - c) == 0)
    if gv.has(sympy.oo, -sympy.oo) or cv.has(sympy.oo, -sympy.oo):
        return gv == cv
    try:
        return _close(gv, cv, max(rel_tol, _EXACT_REL_TOL) if inexact else _EXACT_REL_TOL)
    except (TypeError, ValueError, OverflowError):
        return bool(sympy.simplify(g - c) == 0)


def _probe_differs(g, c, symbols, rel_tol: float) -> bool:
    """True when the two expressions evaluate to clearly different values at some random point."""
    import sympy

    rng = random.Random(1234)
    for _ in range(_PROBES):
        point = {s: sympy.Rational(rng.randint(-97, 97) or 1, rng.randint(1, 13)) for s in symbols}
        try:
            gv = sympy.N(g.subs(point), 30)
            cv = sympy.N(c.subs(point), 30)
            if not (gv.is_number and cv.is_number) or gv.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
                continue
            if cv.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
                return True
            if not _close(gv, cv, max(rel_tol, 1e-12)):
                return True
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue
    return False


def expressions_equal(gold: str, candidate: str, rel_tol: float, imaginary_i: bool = False) -> bool:
    """Whether two scalar answer elements are mathematically equal.

    Args:
        gold: the normalised gold element.
        candidate: the normalised candidate element.
        rel_tol: relative tolerance used when a decimal number is involved.
        imaginary_i: read ``i`` as the imaginary unit.

    Returns:
        Whether they are equal.

    Raises:
        GoldUnreadable: if the gold cannot be parsed.
        ElementUnreadable: if the candidate cannot be parsed or is rejected by a guard.
    """
    import sympy

    inexact = bool(_DECIMAL.search(gold) or _DECIMAL.search(candidate)) and rel_tol > 0
    g, c = _parse_pair(exact_decimals(gold), exact_decimals(candidate), imaginary_i)
    _reject_undefined(g, c, gold)
    if not (_is_expr(g) and _is_expr(c)):
        if isinstance(g, sympy.MatrixBase) or isinstance(c, sympy.MatrixBase):
            return False
        return bool(g == c)
    if g == c:
        return True
    inexact = inexact or g.has(sympy.Float) or c.has(sympy.Float)
    symbols = g.free_symbols | c.free_symbols
    if not symbols:
        return _numbers_equal(g, c, rel_tol, inexact)
    if _probe_differs(g, c, sorted(symbols, key=str), rel_tol if inexact else 1e-12):
        return False
    if sympy.expand(g - c) == 0:
        return True
    if (g - c).has(sympy.functions.elementary.trigonometric.TrigonometricFunction):
        in_exponentials = sympy.expand((g - c).rewrite(sympy.exp))  # exact; far cheaper than simplify here
        if in_exponentials == 0 or sympy.cancel(in_exponentials) == 0:
            return True
    difference = sympy.simplify(g - c)
    if difference == 0:
        return True
    if inexact:
        return bool(difference.is_number and _close(sympy.N(difference, 30) + 1, sympy.Integer(1), rel_tol))
    return False


def equations_equal(gold: tuple[str, str], candidate: tuple[str, str], imaginary_i: bool = False) -> bool:
    """Whether two equations have the same solution set because one side-difference is a constant multiple
    of the other, e.g. ``2x+4y-3=0`` and ``y=-\\frac{1}{2}x+\\frac{3}{4}``.

    Args:
        gold: ``(lhs, rhs)`` of the gold equation (normalised).
        candidate: ``(lhs, rhs)`` of the candidate equation.
        imaginary_i: read ``i`` as the imaginary unit.

    Returns:
        Whether the equations are equivalent.

    Raises:
        GoldUnreadable: if the gold cannot be parsed.
        ElementUnreadable: if the candidate cannot be parsed or is rejected by a guard.
    """
    import sympy

    gl, cl = _parse_pair(gold[0], candidate[0], imaginary_i)
    gr, cr = _parse_pair(gold[1], candidate[1], imaginary_i)
    _reject_undefined(gl, cl, gold[0])
    _reject_undefined(gr, cr, gold[1])
    if not all(_is_expr(x) for x in (gl, gr, cl, cr)):
        return False
    fg = gl - gr
    fc = cl - cr
    if sympy.expand(fg) == 0 or sympy.expand(fc) == 0:
        return bool(sympy.expand(fg) == 0 and sympy.expand(fc) == 0)
    ratio = sympy.cancel(sympy.together(fc / fg))
    if ratio.free_symbols:
        ratio = sympy.simplify(ratio)
    return bool(not ratio.free_symbols and ratio.is_number and ratio != 0 and ratio.is_finite)
