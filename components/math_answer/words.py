"""Answers written with words around one number, and times of day (raw answers; bounded linear patterns only).

* :func:`lone_number` -- ``12 \\text{ red marbles}``, ``\\text{There are } 42 \\text{ apples.}``: the number when the
  words around it cannot change its value. Refused (``None``) when there is a second number, a negation, an
  alternative ("or", "to", "between"), a comparison ("at least", "more than", "about"), a multiplier ("hundred",
  "dozen", "half", "twice", "percent") or any other LaTeX than ``\\text``-style wrappers and math delimiters.
* :func:`time_of_day` -- ``2:30 \\text{ PM}``, ``14:30``, ``12:00 a.m.`` as minutes after midnight.
"""

from __future__ import annotations

import re

__all__ = ["lone_number", "time_of_day", "MAX_SENTENCE_CHARS"]

MAX_SENTENCE_CHARS = 200
_WRAPPER = re.compile(r"\\(?:text|textrm|textnormal|textup|textit|textbf|mbox|mathrm)\s*\{([^{}]*)\}")
_DELIMITERS = re.compile(r"\$|\\[()\[\]]|\\[,;:! ]|~|\\q?quad(?![a-zA-Z])")
_NUMBER = re.compile(r"(?<![\w.])[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])")
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_FORBIDDEN = frozenset(
    "not no never none neither nor cannot isnt arent wasnt or to between either than least most more less fewer "
    "over under about approximately roughly nearly almost around hundred hundreds thousand thousands million "
    "millions billion billions trillion dozen dozens half halves quarter quarters third thirds twice double "
    "triple percent pct percentage times squared cubed pi sqrt root roots plus minus divided multiplied "
    "negative positive square cube per cent each every other another except only if".split()
)
_ALLOWED_SHORT = frozenset("a an of in on at by is it he we".split())
_TIME = re.compile(r"(\d{1,2})(?::(\d{2})(?::\d{2})?)?\s*(am|pm|a\.m\.?|p\.m\.?)?")


def _plain_text(raw: str) -> str | None:
    """The answer with wrappers and delimiters removed, or ``None`` when other LaTeX remains."""
    text = raw
    for _ in range(4):
        new = _WRAPPER.sub(r" \1 ", text)
        if new == text:
            break
        text = new
    text = _DELIMITERS.sub(" ", text)
    if "\\" in text or "{" in text or "}" in text:
        return None
    return text


def lone_number(raw: str) -> str | None:
    """The one number of an answer that is a number with words around it (see the module docstring).

    Args:
        raw: a raw candidate answer.

    Returns:
        The number as written (thousands separators removed), or ``None``.
    """
    if len(raw) > MAX_SENTENCE_CHARS or not re.search(r"[A-Za-z]{2}", raw):
        return None
    text = _plain_text(raw)
    if text is None:
        return None
    numbers = _NUMBER.findall(text)
    if len(numbers) != 1:
        return None
    rest = _NUMBER.sub(" ", text, count=1)
    if re.search(r"\d|[=<>+*/^%&|_]", rest) or re.search(r"(?<!\w)-(?!\w)", rest):
        return None
    words = _WORD.findall(rest)
    if not words or re.sub(r"[A-Za-z']+|[\s.,:;!?-]", "", rest):
        return None
    for word in words:
        lower = word.lower().replace("'", "")
        if lower in _FORBIDDEN or (len(lower) < 3 and lower not in _ALLOWED_SHORT):
            return None
    return numbers[0].replace(",", "")


def time_of_day(raw: str) -> tuple[int, bool] | None:
    """``(minutes after midnight, written with AM/PM)`` of a time of day, or ``None``.

    ``12:xx AM`` is just after midnight and ``12:xx PM`` just after noon; without AM/PM the time is read as
    24-hour time (``00:00`` to ``23:59``).
    """
    text = _plain_text(raw)
    if text is None or len(text) > 40:
        return None
    match = _TIME.fullmatch(re.sub(r"\s+", " ", text.strip().lower()).rstrip("."))
    if match is None and text.strip().lower().endswith("."):
        match = _TIME.fullmatch(text.strip().lower())
    if match is None:
        return None
    if match.group(2) is None and match.group(3) is None:
        return None  # a bare number is not a time of day
    hour, minute, suffix = int(match.group(1)), int(match.group(2) or 0), match.group(3)
    if minute > 59:
        return None
    if suffix is None:
        return (hour * 60 + minute, False) if hour <= 23 else None
    if not 1 <= hour <= 12:
        return None
    hour = hour % 12 + (12 if suffix.startswith("p") else 0)
    return hour * 60 + minute, True
