"""Guarded LaTeX -> sympy conversion (runs inside verifier worker processes only).

Model text reaches sympy only through the ANTLR grammar parser of ``latex2sympy2_extended`` (never ``eval``,
``sympify`` or ``parse_expr`` on raw strings; the parser's own ``sympy.Number(token)`` calls see lexer-validated
digit tokens only). Two layers of guards come first:

1. :func:`check_latex` rejects, on the string, inputs that are too long, too deeply nested, power towers, factorials
   and binomials of big or non-literal arguments, and very long digit runs.
2. :func:`check_expr` walks the *unevaluated* expression tree and rejects it when the magnitude of any number it
   denotes could exceed :data:`MAX_BITS` bits, or when a symbolic power would expand too far.

Whatever slips through is still bounded by the worker's hard wall-clock timeout and memory limit.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

__all__ = ["UnsafeExpression", "LatexParseError", "check_latex", "check_expr", "to_sympy"]

MAX_LATEX_CHARS = 600
MAX_NESTING = 40
MAX_DIGIT_RUN = 300
MAX_FACTORIAL = 5000
MAX_BINOMIAL = 10000
MAX_BITS = 1 << 20
MAX_NODES = 3000
MAX_SYMBOLIC_EXPONENT = 64

_FACTORIAL = re.compile(r"(\d*)\s*(?:\}\s*)?!")
_BINOM = re.compile(r"\\binom\s*\{\s*(\d+)\s*\}")
_DIGIT_RUN = re.compile(r"\d{" + str(MAX_DIGIT_RUN + 1) + r"}")
_EXPONENT_GROUP = re.compile(r"\^\s*\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_EXPONENT_NUMBER = re.compile(r"-?\d+")


class UnsafeExpression(ValueError):
    """Raised when an answer is rejected by a size guard before or after parsing."""


class LatexParseError(ValueError):
    """Raised when the grammar parser cannot read an answer."""


def _nesting_depth(s: str) -> int:
    depth = best = 0
    for char in s:
        if char in "([{":
            depth += 1
            best = max(best, depth)
        elif char in ")]}":
            depth -= 1
    return best


def check_latex(s: str) -> None:
    """Rejects LaTeX strings that could make sympy slow or huge.

    Args:
        s: a normalised answer element.

    Raises:
        UnsafeExpression: if a guard fails.
    """
    if len(s) > MAX_LATEX_CHARS:
        raise UnsafeExpression(f"too long ({len(s)} characters)")
    if _nesting_depth(s) > MAX_NESTING:
        raise UnsafeExpression("nesting too deep")
    if _DIGIT_RUN.search(s):
        raise UnsafeExpression("number too long")
    if s.count("^") > 30:
        raise UnsafeExpression("too many powers")
    for match in _EXPONENT_GROUP.finditer(s):
        exponent = match.group(1)
        if "^" in exponent or "!" in exponent or "\\binom" in exponent:
            raise UnsafeExpression("power tower")
    if "!" in s:
        for match in _FACTORIAL.finditer(s):
            digits = match.group(1)
            if not digits or "}" in match.group(0) or int(digits) > MAX_FACTORIAL:
                raise UnsafeExpression("factorial of a large or non-literal argument")
    for match in _BINOM.finditer(s):
        if int(match.group(1)) > MAX_BINOMIAL:
            raise UnsafeExpression("binomial too large")
    if "\\binom" in s and _BINOM.search(s) is None:
        raise UnsafeExpression("binomial of a non-literal argument")


def _bits(expr, budget: list[int]) -> float:  # noqa: C901 - a flat dispatch on node types
    """Upper bound, in bits, of the magnitude of the number an unevaluated sympy tree denotes."""
    import sympy

    budget[0] -= 1
    if budget[0] < 0:
        raise UnsafeExpression("expression too large")
    if isinstance(expr, sympy.Integer):
        return float(abs(int(expr)).bit_length())
    if isinstance(expr, sympy.Rational):
        return float(max(abs(expr.p).bit_length(), expr.q.bit_length()))
    if isinstance(expr, sympy.Float):
        return float(abs(math.frexp(float(expr))[1])) if expr != 0 else 0.0
    if isinstance(expr, sympy.factorial | sympy.factorial2):
        arg = expr.args[0]
        if not isinstance(arg, sympy.Integer) or abs(int(arg)) > MAX_FACTORIAL:
            raise UnsafeExpression("factorial of a large or non-literal argument")
        n = max(int(arg), 2)
        return n * math.log2(n)
    if isinstance(expr, sympy.Pow):
        base, exponent = expr.args
        base_bits = _bits(base, budget)
        if isinstance(exponent, sympy.Rational):
            value = abs(float(exponent))
        elif exponent.free_symbols:
            exp_bits = _bits(exponent, budget)
            if exp_bits > 16:
                raise UnsafeExpression("symbolic exponent too large")
            value = 2.0**exp_bits
        else:
            exp_bits = _bits(exponent, budget)
            if exp_bits > 64:
                raise UnsafeExpression("power tower")
            value = 2.0**exp_bits
        if base.free_symbols and isinstance(base, sympy.Add) and value > MAX_SYMBOLIC_EXPONENT:
            raise UnsafeExpression("symbolic power too large to expand")
        return max(base_bits, 1.0) * value
    if isinstance(expr, sympy.Mul):
        return sum(_bits(arg, budget) for arg in expr.args)
    if not expr.args:
        return 2.0
    return max(_bits(arg, budget) for arg in expr.args) + 1.0


def check_expr(expr) -> None:
    """Rejects a parsed (unevaluated) expression whose evaluation could be huge.

    Args:
        expr: a sympy object as produced by the grammar parser.

    Raises:
        UnsafeExpression: if a guard fails.
    """
    import sympy

    if isinstance(expr, sympy.MatrixBase):
        for element in expr:
            check_expr(element)
        return
    if not isinstance(expr, sympy.Basic):
        raise UnsafeExpression(f"unexpected parse result {type(expr).__name__}")
    if _bits(expr, [MAX_NODES]) > MAX_BITS:
        raise UnsafeExpression("number too large")


@lru_cache(maxsize=4096)
def to_sympy(s: str, imaginary_i: bool = False):
    """Parses one normalised answer element to sympy, behind the guards.

    Args:
        s: a normalised answer element (LaTeX).
        imaginary_i: read the letter ``i`` as the imaginary unit (set when the gold answer is complex).

    Returns:
        The sympy expression (or relation/set/matrix as the grammar gives).

    Raises:
        UnsafeExpression: if a guard rejects the input.
        LatexParseError: if the grammar parser cannot read it.
    """
    check_latex(s)
    import sympy
    from latex2sympy2_extended.latex2sympy2 import ConversionConfig, latex2sympy

    config = ConversionConfig(
        interpret_as_mixed_fractions=True,
        interpret_simple_eq_as_assignment=False,
        interpret_contains_as_eq=False,
        lowercase_symbols=False,
    )
    try:
        expr = latex2sympy(s, normalization_config=None, conversion_config=config)
    except UnsafeExpression:
        raise
    except RecursionError as exc:
        raise UnsafeExpression("nesting too deep") from exc
    except Exception as exc:  # noqa: BLE001 - the grammar parser raises bare Exceptions
        raise LatexParseError(str(exc).split("\n", 1)[0][:200]) from exc
    check_expr(expr)
    if imaginary_i and isinstance(expr, sympy.Basic):
        expr = expr.subs(sympy.Symbol("i"), sympy.I)
    return expr
