"""String canonicalisation of LaTeX answers (no sympy, bounded regexes only).

The normaliser removes presentation-only differences: ``\\dfrac``/``\\tfrac``, ``\\left``/``\\right``, thin spaces,
``\\text{}`` wrappers, units, degree marks, percent and dollar signs, malformed ``\\frac12``/``\\sqrt2`` and spacing.
It never changes a value: a trailing percent sign is split off before normalisation and handled by the comparison's
percent policy (see :mod:`.compare`); thousands separators are handled by :mod:`.structure` only where the gold answer
is a plain number. Unit words are removed only with ``ignore_units=True`` (the default).

All patterns are linear (no nested quantifiers), so adversarial input costs time proportional to its length.
"""

from __future__ import annotations

import re

__all__ = ["MAX_ANSWER_CHARS", "AnswerTooLong", "normalize", "strip_text_wrappers", "unwrap_math_delimiters"]

MAX_ANSWER_CHARS = 2000
"""Extracted answers longer than this are not interpreted at all (no real answer is this long)."""


class AnswerTooLong(ValueError):
    """Raised when an answer exceeds :data:`MAX_ANSWER_CHARS`."""


_UNIT_WORDS = (
    "units?|square units?|sq units?|cubic units?|degrees?|cents?|dollars?|inches|inch|in|feet|foot|ft|yards?|yd|miles?|"
    "mi|meters?|metres?|m|centimeters?|centimetres?|cm|millimeters?|mm|kilometers?|km|seconds?|sec|s|minutes?|min|"
    "hours?|hrs?|h|days?|weeks?|months?|years?|mph|kg|kilograms?|grams?|g|pounds?|lbs?|ounces?|oz|liters?|litres?|l|"
    "ml|gallons?|percent|people|students?|ways|points?|coins?|marbles?|pages?|dots?|handshakes?|games?|boxes?|tiles?|"
    "cups?|eggs?|apples?|books?|toothpicks?|triangles?|squares?|rectangles?|numbers?|integers?|digits?|times|steps?|"
    "cubes?|trees?|packs?|sides?|edges?|vertices|diagonals?|days|rows?|seats?|cookies?|slices?|bottles?|cans?|cars?|"
    "bags?|balls?|candies|candy|chairs?|tables?|buses|trips?|laps?|bricks?|blocks?|sheets?|stamps?|tickets?|"
    "rpm|sq ft|sq in|square feet|square inches|square meters?|square centimeters?|square yards?|cubic feet|"
    "cubic inches|cubic meters?|cubic centimeters?|USD|EUR|GBP|euros?|rupees?|yuan|yen"
)
_TEXT_CMD = r"\\(?:text|textrm|textnormal|textup|textbf|textit|textsf|texttt|mbox|mathrm|mathbf|mathit|mathsf|mathtt|bf|rm)"
_UNIT = r"(?:" + _UNIT_WORDS + r")(?:\s*\^\s*\{?[23]\}?)?"
_COMPOUND_UNIT = _UNIT + r"(?:\s*(?:/|\\cdot|\\,|\s|per\s)\s*" + _UNIT + r"){0,2}"
_UNIT_IN_TEXT = re.compile(_TEXT_CMD + r"\{\s*(?:" + _COMPOUND_UNIT + r")\s*\.?\s*\}(?:\^\{?[23]\}?)?")
# Bare (un-``\text``-ed) unit words are only stripped when they cannot be a variable: no single letters, no "in".
_BARE_UNIT_WORDS = "|".join(w for w in _UNIT_WORDS.split("|") if len(w.rstrip("?")) > 1 and w not in ("in", "mi", "s?"))
_BARE_UNIT_AT_END = re.compile(r"(?<=[\d}.])\s*(?:" + _BARE_UNIT_WORDS + r")\.?(?:\^\{?[23]\}?)?$")
_TEXT_WRAPPER = re.compile(_TEXT_CMD + r"\s*\{([^{}]*)\}")
_OLD_STYLE_TEXT = re.compile(r"\{\\(?:bf|rm|it|sf|tt)\s+([^{}]*)\}")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])\s*")
_LEFT_RIGHT_DOT = re.compile(r"\\(?:left|right)\s*\.")
_SPACING = re.compile(r"\\[,:;> ]|\\quad(?![a-zA-Z])|\\qquad(?![a-zA-Z])|\\enspace(?![a-zA-Z])|~")
_STYLE = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits)(?![a-zA-Z])")
_DEGREES = re.compile(
    r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\^\s*\{\s*\\degree\s*\}|\\degree(?![a-zA-Z])|°|\\circ(?![a-zA-Z])"
)
_FRAC_TWO_DIGITS = re.compile(r"\\frac\s*(\d)\s*(\d)")
_FRAC_DIGIT_GROUP = re.compile(r"\\frac\s*(\d)\s*\{")
_FRAC_GROUP_DIGIT = re.compile(r"\\frac\s*\{([^{}]*)\}\s*(\d)")
_FRAC_LETTER = re.compile(r"\\frac\s*(\d)\s*([a-zA-Z])(?![a-zA-Z])")
_SQRT_DIGIT = re.compile(r"\\sqrt\s*(\d)")
_SQRT_LETTER = re.compile(r"\\sqrt\s+([a-zA-Z])(?![a-zA-Z])")
_LEADING_DOT = re.compile(r"(?<![\d}A-Za-z])\.(\d)")
_WHITESPACE = re.compile(r"\s+")
_CONTROL_TO_SPACE = {code: " " for code in range(32)}
_SPACE_NOT_BETWEEN_LETTERS = re.compile(r"(?<![a-zA-Z]) | (?![a-zA-Z])")
_AND_WORD = re.compile(r",?\s*\band\b\s*|,?\s*\bor\b\s*")
_INFINITY = re.compile(r"\\infinity(?![a-zA-Z])|\\inf(?![a-zA-Z])|∞")
_RELATIONS = (
    ("\\leqslant", "\\le"), ("\\geqslant", "\\ge"), ("\\leq", "\\le"), ("\\geq", "\\ge"), ("\\lt", "<"),
    ("\\gt", ">"), ("≤", "\\le"), ("≥", "\\ge"), ("\\neq", "\\ne"), ("−", "-"), ("\\colon", ":"),
)
_SUBSTITUTIONS = (
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\dbinom", "\\binom"),
    ("\\tbinom", "\\binom"), ("{,}", ","), ("\\!", ""), ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("\\(", ""), ("\\)", ""),
    ("\\[", ""), ("\\]", ""), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"), ("\\lbrack", "["), ("\\rbrack", "]"),
    ("\\langle", "("), ("\\rangle", ")"), ("\\vert", "|"), ("\\lvert", "|"), ("\\rvert", "|"), ("\\mid", "|"),
    ("\\cdotp", "\\cdot"), ("\\ast", "*"), ("\\dots", "\\ldots"), ("\\cdots", "\\ldots"), ("\\hdots", "\\ldots"),
    ("\\tfrac", "\\frac"), ("\\varepsilon", "\\epsilon"), ("\\varphi", "\\phi"), ("\\emptyset", "\\varnothing"),
    ("×", "\\times"), ("·", "\\cdot"), ("π", "\\pi"), ("√", "\\sqrt"), ("\u2009", " "), ("\u00a0", " "),
)


def unwrap_math_delimiters(s: str) -> str:
    """Removes one layer of ``$...$``, ``\\(...\\)`` or ``\\[...\\]`` around a whole answer."""
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s


def strip_text_wrappers(s: str, max_rounds: int = 6) -> str:
    """Replaces ``\\text{X}``-style wrappers (without nested braces) by ``X``, innermost first.

    Args:
        s: a LaTeX string.
        max_rounds: bound on the number of unwrapping passes (nesting depth handled).

    Returns:
        The string with the wrappers removed.
    """
    for _ in range(max_rounds):
        new = _TEXT_WRAPPER.sub(r"\1", s)
        new = _OLD_STYLE_TEXT.sub(r"\1", new)
        if new == s:
            break
        s = new
    return s


def _fix_malformed(s: str) -> str:
    s = _FRAC_TWO_DIGITS.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_DIGIT_GROUP.sub(r"\\frac{\1}{", s)
    s = _FRAC_GROUP_DIGIT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_LETTER.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_DIGIT.sub(r"\\sqrt{\1}", s)
    return _SQRT_LETTER.sub(r"\\sqrt{\1}", s)


def normalize(answer: str, ignore_units: bool = True, max_chars: int = MAX_ANSWER_CHARS) -> str:
    """Canonicalises a LaTeX answer string for comparison.

    Args:
        answer: an extracted answer or a gold answer.
        ignore_units: remove unit words (``\\text{ cm}``, ``km/h``, ``square units``, ...).
        max_chars: length limit (callers grading long gold answers raise it; every step here is linear).

    Returns:
        The canonical form. Two answers with equal canonical forms are equivalent.

    Raises:
        AnswerTooLong: if ``answer`` is longer than :data:`MAX_ANSWER_CHARS`.
    """
    if len(answer) > max_chars:
        raise AnswerTooLong(f"answer has {len(answer)} characters (limit {max_chars})")
    s = unwrap_math_delimiters(answer)
    s = s.translate(_CONTROL_TO_SPACE)
    s = s.replace("\\\\", "\x02")  # protect LaTeX row breaks ``\\`` from the single-backslash rules
    for old, new in _SUBSTITUTIONS:
        s = s.replace(old, new)
    s = _LEFT_RIGHT_DOT.sub("", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub(" ", s)
    s = _STYLE.sub("", s)
    s = _DEGREES.sub("", s)
    s = _INFINITY.sub("\\\\infty", s)
    for old, new in _RELATIONS:
        s = s.replace(old, new)
    if ignore_units:
        s = _UNIT_IN_TEXT.sub("", s)
    s = strip_text_wrappers(s)
    s = s.replace("\\{", "\x00").replace("\\}", "\x01")  # protect set braces from the word rules below
    s = _WHITESPACE.sub(" ", s).strip()
    if ignore_units and re.search(r"\d", s):
        s = _BARE_UNIT_AT_END.sub("", s).strip()
    s = _AND_WORD.sub(",", s)
    s = _fix_malformed(s)
    s = _SPACE_NOT_BETWEEN_LETTERS.sub("", s)
    s = s.replace("\x00", "\\{").replace("\x01", "\\}").replace("\x02", "\\\\")
    s = _LEADING_DOT.sub(r"0.\1", s)
    s = s.replace("+\\infty", "\\infty")
    while s and s[-1] in ".,;" and not s.endswith("\\ldots"):
        s = s[:-1]
    while s.startswith(","):
        s = s[1:]
    return s.strip()
