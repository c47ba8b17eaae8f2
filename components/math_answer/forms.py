"""Rewrites of answer notations into forms the rest of the verifier reads (no sympy, linear scans only).

Each function handles one notation family:

* :func:`check_control_characters` -- control characters (other than tab/newline/carriage return) make an answer
  unreadable instead of being dropped, so ``1\\x002`` is never read as ``12``.
* :func:`rewrite_notations` -- repeating decimals (``0.\\overline{3}``, ``0.1\\dot{6}``, ``0.8(3)``) to exact
  fractions, ``\\log_b x`` to ``\\frac{\\ln(x)}{\\ln(b)}``, TeX's ``{a \\over b}`` to ``\\frac{a}{b}``, ``\\mp`` to
  ``\\pm`` and numeral bases written as words (``52_{\\text{eight}}``) to digits.
* :func:`split_percent` -- a trailing percent sign or word.
* :func:`parse_e_notation` -- ``2.5e4`` (read only for candidates against a plain-number gold).
* :func:`named_values` -- ``a=2, b=5`` as ``[(a, 2), (b, 5)]``.
* :func:`sentence_key` (short sentences naming a text answer), :func:`scaled_cell` / :func:`identity_rows`
  (``2\\begin{pmatrix}..``, ``-I``).
* :func:`excluded_points` / :func:`set_builder_condition` -- ``x \\ne 3``, ``\\mathbb{R}\\setminus\\{3\\}`` and
  ``\\{x \\mid 0 \\le x \\le 3\\}``.
"""

from __future__ import annotations

import re
from fractions import Fraction

from .numeric import parse_number
from .rewrites import rewrite_ecosystem

__all__ = [
    "UnreadableCharacters",
    "check_control_characters",
    "rewrite_notations",
    "split_percent",
    "parse_e_notation",
    "named_values",
    "excluded_points",
    "set_builder_condition",
    "fraction_latex",
    "text_key",
    "sentence_key",
    "scaled_cell",
    "identity_rows",
]

MAX_REPEAT_DIGITS = 60
MAX_OVER_REWRITES = 8
MAX_SENTENCE_WORDS = 12

_NEGATION = re.compile(r"\b(?:not|no|never|neither|nor|none|cannot|isnt|isn't|either)\b", re.IGNORECASE)
_IDENTITY = re.compile(r"(-?)((?:\d+(?:\.\d+)?|\\frac\{[^{}]{1,30}\}\{[^{}]{1,30}\})?)I(?:_\{?\d{1,2}\}?)?")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_OVERLINE = re.compile(r"(\d*)\.(\d{0,60})\\overline\s*(?:\{(\d{1,60})\}|(\d))")
_DOT = re.compile(r"(\d*)\.(\d{0,60})\\dot\s*(?:\{(\d)\}|(\d))(?![\d\\])")
_PAREN_REPEAT = re.compile(r"([+-]?)(\d*)\.(\d{0,60})\((\d{1,60})\)")
_LOG_BASE = re.compile(
    r"\\log\s*_\s*(?:\{([^{}]{1,40})\}|([0-9a-zA-Z]))\s*"
    r"(?:\{([^{}]{1,80})\}|\(([^()]{1,80})\)|\\left\(([^()]{1,80})\\right\)|(\d+(?:\.\d+)?|[a-zA-Z]|\\[a-zA-Z]+))"
)
_OVER = re.compile(r"\\over(?![a-zA-Z])")
_BASE_WORDS = {
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
}
_BASE_WORD = re.compile(
    r"_\s*\{\s*(?:\\(?:text|textrm|mathrm|mbox)\s*\{\s*)?(" + "|".join(_BASE_WORDS) + r")\s*\}?\s*\}"
)
_PERCENT_WORDS = r"(?:percent|pct|per\s?cent)"
_PERCENT_TAIL = re.compile(
    r"\s*(?:\\%|%|\\(?:text|mbox|textrm|mathrm)\s*\{\s*" + _PERCENT_WORDS + r"\s*\.?\s*\}|" + _PERCENT_WORDS + r")\s*\.?\s*$"
)
_E_NOTATION = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))[eE]([+-]?\d{1,4})")
_NAME = re.compile(r"[a-zA-Z](?:_\{?\w{1,3}\}?)?|\\[a-zA-Z]+(?:_\{?\w{1,3}\}?)?")
_NE = re.compile(r"\\ne(?![a-zA-Z])")
_REALS = r"(?:\\mathbb\{R\}|\\R(?![a-zA-Z])|\\Bbb\{R\}|\\mathbf\{R\}|R)"
_REALS_MINUS = re.compile(_REALS + r"(?:\\setminus|\\backslash|-)\\\{(.*)\\\}")
_SET_BUILDER = re.compile(r"\\\{\s*([a-zA-Z])\s*(?:\\in" + _REALS + r")?\s*(?:\||:)(.*)\\\}")


class UnreadableCharacters(ValueError):
    """Raised when an answer contains control characters."""


def check_control_characters(answer: str) -> None:
    """Refuses answers with control characters, which would otherwise be dropped and change a number.

    Raises:
        UnreadableCharacters: naming the first offending character.
    """
    match = _CONTROL.search(answer)
    if match:
        raise UnreadableCharacters(f"control character {match.group()!r} at position {match.start()}")


def fraction_latex(value: Fraction) -> str:
    """``Fraction(-3, 4)`` -> ``-\\frac{3}{4}``; integers are written plainly."""
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _repeating(whole: str, fixed: str, period: str) -> str:
    """``whole.fixed(period)`` repeating, as an exact LaTeX fraction."""
    base = Fraction(int(whole or "0"))
    fixed_value = Fraction(int(fixed), 10 ** len(fixed)) if fixed else Fraction(0)
    period_value = Fraction(int(period), 10 ** len(fixed) * (10 ** len(period) - 1))
    return "{" + fraction_latex(base + fixed_value + period_value) + "}"


def _rewrite_over(s: str) -> str:
    """``{a \\over b}`` -> ``{\\frac{a}{b}}`` (innermost enclosing group, or the whole string)."""
    for _ in range(MAX_OVER_REWRITES):
        match = _OVER.search(s)
        if match is None:
            return s
        depth, left = 0, -1
        for i in range(match.start() - 1, -1, -1):
            if s[i] == "}" and (i == 0 or s[i - 1] != "\\"):
                depth += 1
            elif s[i] == "{" and (i == 0 or s[i - 1] != "\\"):
                if depth == 0:
                    left = i
                    break
                depth -= 1
        depth, right = 0, len(s)
        for i in range(match.end(), len(s)):
            if s[i] == "{" and s[i - 1] != "\\":
                depth += 1
            elif s[i] == "}" and s[i - 1] != "\\":
                if depth == 0:
                    right = i
                    break
                depth -= 1
        if (left < 0) != (right == len(s)):
            return s  # unbalanced: leave it for the parser to refuse
        numerator = s[left + 1 : match.start()].strip()
        denominator = s[match.end() : right].strip()
        s = s[: left + 1] + f"\\frac{{{numerator}}}{{{denominator}}}" + s[right:]
    return s


def _log_base(match: re.Match) -> str:
    base = match.group(1) or match.group(2)
    argument = next(g for g in match.groups()[2:] if g is not None)
    return f"\\frac{{\\ln({argument})}}{{\\ln({base})}}"


def rewrite_notations(s: str) -> str:
    """Rewrites repeating decimals, based logarithms, ``\\over``, ``\\mp`` and base words (see module doc).

    Args:
        s: a raw answer (before normalisation).

    Returns:
        The rewritten answer (unchanged when none of the notations occurs).
    """
    s = rewrite_ecosystem(s)
    if "\\overline" in s:
        s = _OVERLINE.sub(lambda m: _repeating(m.group(1), m.group(2), m.group(3) or m.group(4)), s)
    if "\\dot" in s:
        s = _DOT.sub(lambda m: _repeating(m.group(1), m.group(2), m.group(3) or m.group(4)), s)
    stripped = s.strip().strip("$").strip()
    paren = _PAREN_REPEAT.fullmatch(stripped)
    if paren:
        sign = "-" if paren.group(1) == "-" else ""
        s = sign + _repeating(paren.group(2), paren.group(3), paren.group(4))
    if "\\log" in s:
        s = _LOG_BASE.sub(_log_base, s)
    if "\\over" in s:
        s = _rewrite_over(s)
    s = s.replace("\\mp", "\\pm")
    if "_" in s:
        s = _BASE_WORD.sub(lambda m: "_{" + str(_BASE_WORDS[m.group(1)]) + "}", s)
    return s


def split_percent(s: str) -> tuple[str, bool]:
    """Splits a trailing percent sign or word off a raw answer: ``"15\\%"`` -> ``("15", True)``."""
    match = _PERCENT_TAIL.search(s)
    if match is None or match.start() == 0:
        return s, False
    return s[: match.start()], True


def parse_e_notation(s: str) -> Fraction | None:
    """Reads ``2.5e4``/``3E-3`` exactly; ``None`` for anything else."""
    match = _E_NOTATION.fullmatch(s)
    if match is None:
        return None
    return Fraction(match.group(1)) * Fraction(10) ** int(match.group(2))


def named_values(parts: list[str]) -> list[tuple[str, str]] | None:
    """``["a=2", "b=5"]`` -> ``[("a", "2"), ("b", "5")]``; ``None`` unless every part names one value."""
    out = []
    for part in parts:
        sides = part.split("=")
        if len(sides) != 2 or not sides[1] or not _NAME.fullmatch(sides[0]):
            return None
        out.append((sides[0], sides[1]))
    return out


def in_name_order(pairs: list[tuple[str, str]]) -> list[str]:
    """Values ordered by variable name when all names are single Latin letters, else as written."""
    if all(len(name) == 1 for name, _ in pairs):
        pairs = sorted(pairs, key=lambda pair: pair[0])
    return [value for _, value in pairs]


def excluded_points(s: str) -> list[str] | None:
    """Points removed from the real line: ``x\\ne3``, ``x\\ne2,5``, ``x\\ne2,x\\ne5``, ``\\mathbb{R}\\setminus\\{3\\}``.

    Args:
        s: a normalised answer.

    Returns:
        The excluded points (as strings), or ``None`` when ``s`` is not of that form.
    """
    match = _REALS_MINUS.fullmatch(s)
    if match:
        points = [p for p in match.group(1).split(",") if p]
        return points or None
    if not _NE.search(s):
        return None
    points: list[str] = []
    variable = None
    for part in s.split(","):
        pieces = _NE.split(part)
        if len(pieces) == 2 and re.fullmatch(r"[a-zA-Z]", pieces[0]) and pieces[1]:
            if variable not in (None, pieces[0]):
                return None
            variable = pieces[0]
            points.append(pieces[1])
        elif len(pieces) == 1 and variable is not None and part and not re.search(r"[<>=]|\\[lg]e", part):
            points.append(part)
        else:
            return None
    return points or None


def set_builder_condition(s: str) -> str | None:
    """``\\{x\\mid0\\le x\\le3\\}`` -> ``0\\le x\\le3``; ``None`` when ``s`` is not set-builder notation."""
    match = _SET_BUILDER.fullmatch(s)
    return match.group(2) if match else None


def text_key(s: str) -> str:
    """Lower-case letters and digits only: the comparison key of text answers."""
    return re.sub(r"[^a-z0-9]", "", s.lower())


def sentence_key(candidate: str, gold_key: str) -> str:
    """A short sentence that names the gold word(s) once, without negation or alternatives, reads as the gold."""
    key = text_key(candidate)
    if key == gold_key or "," in candidate or _NEGATION.search(candidate):
        return key
    words = re.findall(r"[a-z0-9]+", candidate.lower())
    if len(words) > MAX_SENTENCE_WORDS:
        return key
    for start in range(len(words)):
        for end in range(start + 1, len(words) + 1):
            if "".join(words[start:end]) == gold_key:
                return gold_key
    return key


def scaled_cell(factor: str, sign: str, cell: str) -> str:
    """The LaTeX of ``sign * factor * cell`` (exact when both are plain numbers)."""

    f_num = parse_number(factor) if factor else None
    c_num = parse_number(cell)
    if (f_num is not None or not factor) and c_num is not None:
        value = (f_num.value if f_num is not None else 1) * c_num.value * (-1 if sign else 1)
        return fraction_latex(value)
    prefix = ("-" if sign else "") + (factor + "\\cdot" if factor else "")
    return f"{prefix}({cell})"


def identity_rows(candidate: str, size: int) -> tuple | None:
    """``I``, ``-I``, ``3I``, ``I_2`` (after normalisation) as the ``size`` x ``size`` rows they denote."""
    match = _IDENTITY.fullmatch(candidate)
    if match is None:
        return None
    sign, factor = match.group(1), match.group(2)
    one, zero = scaled_cell(factor, sign, "1"), "0"
    return tuple(tuple(one if i == j else zero for j in range(size)) for i in range(size))
