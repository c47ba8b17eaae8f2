"""Exact, bounded evaluation of plain arithmetic (no ``eval``, no sympy).

Grammar (recursive descent over a token list)::

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/" | "\\times" | "\\cdot" | "\\div" | "×" | "÷" | "·") factor)*
    factor := ("+" | "-") factor | power
    power  := atom ("^" factor)?
    atom   := NUMBER | "(" expr ")" | "[" expr "]" | "{" expr "}" | "\\frac" "{" expr "}" "{" expr "}"

Numbers are read exactly into :class:`fractions.Fraction` by :func:`components.math_answer.numeric.parse_number`
(the verifier's number parser), so ``3.5``, ``\\frac{1}{2}`` style leaves behave as in answer checking.
Everything is bounded: input length, token count, nesting depth, exponent size and the digit count of every
intermediate result. Anything outside the grammar or the bounds gives ``None``; a division by zero raises
:class:`ArithmeticUndefined`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from components.math_answer.numeric import parse_number

__all__ = ["ArithmeticUndefined", "Token", "evaluate_arithmetic", "evaluate_tokens", "tokenize_arithmetic"]

MAX_CHARS = 400
MAX_TOKENS = 200
MAX_DEPTH = 40
MAX_EXPONENT = 64
MAX_RESULT_DIGITS = 400

_TOKEN_RE = re.compile(
    r"(?P<num>\d+(?:\.\d+)?|\.\d+)"
    r"|(?P<frac>\\[dt]?frac)"
    r"|(?P<mul>\\times|\\cdot|\*|×|·)"
    r"|(?P<div>\\div|÷|/)"
    r"|(?P<add>\+)"
    r"|(?P<sub>-|−)"
    r"|(?P<pow>\^)"
    r"|(?P<lpar>\(|\[|\{|\\\{|\\left\(|\\left\[)"
    r"|(?P<rpar>\)|\]|\}|\\\}|\\right\)|\\right\])"
    r"|(?P<eq>=)"
    r"|(?P<nl>[^\S\n]*\n\s*)"
    r"|(?P<skip>[^\S\n]+|\$|\\,|\\!|\\;|\\ |\\left|\\right|\\boxed|\\quad)"
    r"|(?P<other>\\[A-Za-z]+|.)",
    re.DOTALL,
)


@dataclass(frozen=True)
class Token:
    """One lexical token: ``kind`` (num, frac, mul, div, add, sub, pow, lpar, rpar, eq, nl = whitespace with a
    line break, skip = other whitespace and layout commands, other), its text and its span ``[start, end)``."""

    kind: str
    text: str
    start: int
    end: int


class ArithmeticUndefined(ValueError):
    """The expression is well formed but undefined (division by zero, 0 to a negative power)."""


def tokenize_arithmetic(text: str) -> list[Token]:
    """Split ``text`` into tokens (every character belongs to exactly one token)."""
    return [Token(m.lastgroup or "other", m.group(), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]


def _check(x: Fraction) -> Fraction:
    if len(str(abs(x.numerator))) > MAX_RESULT_DIGITS or len(str(x.denominator)) > MAX_RESULT_DIGITS:
        raise OverflowError("intermediate result too large")
    return x


class _Parser:
    """Recursive-descent evaluator of the module grammar over tokens (whitespace dropped), depth-bounded."""

    def __init__(self, tokens: list[Token]) -> None:
        self.toks = [t for t in tokens if t.kind not in ("skip", "nl")]
        self.i = 0
        self.depth = 0
        self.inexact = False

    def peek(self) -> str | None:
        return self.toks[self.i].kind if self.i < len(self.toks) else None

    def take(self, kind: str) -> Token:
        if self.peek() != kind:
            raise SyntaxError(f"expected {kind}")
        self.i += 1
        return self.toks[self.i - 1]

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise OverflowError("nesting too deep")

    def expr(self) -> Fraction:
        self.enter()
        value = self.term()
        while self.peek() in ("add", "sub"):
            op = self.take(self.peek() or "").kind
            rhs = self.term()
            value = _check(value + rhs if op == "add" else value - rhs)
        self.depth -= 1
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("mul", "div"):
            op = self.take(self.peek() or "").kind
            rhs = self.factor()
            if op == "div" and rhs == 0:
                raise ArithmeticUndefined("division by zero")
            value = _check(value * rhs if op == "mul" else value / rhs)
        return value

    def factor(self) -> Fraction:
        if self.peek() in ("add", "sub"):
            op = self.take(self.peek() or "").kind
            self.enter()
            value = self.factor()
            self.depth -= 1
            return value if op == "add" else -value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "pow":
            return base
        self.take("pow")
        self.enter()
        exp = self.factor()
        self.depth -= 1
        if exp.denominator != 1 or abs(exp.numerator) > MAX_EXPONENT:
            raise OverflowError("exponent must be a small integer")
        if base == 0 and exp < 0:
            raise ArithmeticUndefined("0 to a negative power")
        return _check(base ** int(exp))

    def atom(self) -> Fraction:
        kind = self.peek()
        if kind == "num":
            tok = self.take("num")
            parsed = parse_number(tok.text)
            if parsed is None:
                raise SyntaxError("unreadable number")
            self.inexact |= parsed.inexact
            return parsed.value
        if kind == "lpar":
            self.take("lpar")
            value = self.expr()
            self.take("rpar")
            return value
        if kind == "frac":
            self.take("frac")
            self.take("lpar")
            num = self.expr()
            self.take("rpar")
            self.take("lpar")
            den = self.expr()
            self.take("rpar")
            if den == 0:
                raise ArithmeticUndefined("division by zero")
            return _check(num / den)
        raise SyntaxError("expected a number or a bracket")


def evaluate_tokens(tokens: list[Token]) -> tuple[Fraction, bool] | None:
    """Evaluate a token list exactly.

    Returns:
        ``(value, inexact)`` (``inexact`` when a decimal literal was used), or ``None`` if the tokens are not a
        complete expression of the grammar or exceed a bound.

    Raises:
        ArithmeticUndefined: on division by zero.
    """
    if len(tokens) > MAX_TOKENS:
        return None
    parser = _Parser(tokens)
    if not parser.toks:
        return None
    try:
        value = parser.expr()
    except (SyntaxError, OverflowError, ValueError, ZeroDivisionError) as err:
        if isinstance(err, ArithmeticUndefined):
            raise
        return None
    if parser.i != len(parser.toks):
        return None
    return value, parser.inexact


def evaluate_arithmetic(text: str) -> Fraction | None:
    """Evaluate a plain arithmetic expression such as ``"3 + 4*(2 - 1)"`` or ``"\\frac{6}{4}"`` exactly.

    Returns:
        The exact value, or ``None`` when ``text`` is not plain arithmetic, is too long, or is undefined.
    """
    if len(text) > MAX_CHARS:
        return None
    try:
        out = evaluate_tokens(tokenize_arithmetic(text))
    except ArithmeticUndefined:
        return None
    return None if out is None else out[0]
