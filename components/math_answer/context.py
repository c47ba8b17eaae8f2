"""What a problem's text asks of the answer's form: a rounding place, a list order, a percent.

The verifier's ``"problem"`` policies (``rounding``, ``list_order``, ``percent``) read these hints from the question
text the framework passes with each row (``verify_batch`` rows). Only explicit requests count ("to the nearest tenth",
"in increasing order", "what percent"); a problem that merely mentions a percent or a decimal asks nothing. The
problem text is data, never model output, but it is still scanned with bounded, linear patterns only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from .compare import CompareConfig

__all__ = ["ProblemHints", "problem_hints", "resolve_policies", "MAX_PROBLEM_CHARS"]

MAX_PROBLEM_CHARS = 20_000
"""Only this many characters of a problem are scanned (a real question is far shorter)."""

_PLACES = {
    "thousand": -3, "hundred": -2, "ten": -1, "whole number": 0, "integer": 0, "unit": 0, "dollar": 0,
    "whole": 0, "one": 0, "tenth": 1, "cent": 2, "penny": 2, "hundredth": 2, "thousandth": 3,
    "ten-thousandth": 4, "ten thousandth": 4, "hundred-thousandth": 5,
}
_NEAREST = re.compile(
    r"to\s+the\s+nearest\s+(ten[- ]thousandth|hundred[- ]thousandth|thousandth|hundredth|tenth|whole\s+number|"
    r"whole|integer|unit|dollar|cent|penny|thousand|hundred|ten|one)s?\b",
    re.IGNORECASE,
)
_WORD_DIGITS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_DECIMAL_PLACES = re.compile(r"\b(\d|one|two|three|four|five|six)\s+decimal\s+(?:places?|digits?)", re.IGNORECASE)
_ORDER = re.compile(
    r"in\s+(?:strictly\s+)?(?:increasing|decreasing|ascending|descending)\s+order|"
    r"from\s+(?:the\s+)?(?:least|smallest|lowest|greatest|largest|highest)\s+to\s+(?:the\s+)?"
    r"(?:greatest|largest|highest|least|smallest|lowest)|in\s+order\s+from",
    re.IGNORECASE,
)
_PERCENT_WORD = r"(?:\\?%|percent(?:age)?|per\s?cent)"
_ASKS_PERCENT = re.compile(
    r"\b(?:what|which|by\s+what|how\s+many)\s+" + _PERCENT_WORD + r"|"
    r"\b(?:as|in|into)\s+(?:a\s+)?" + _PERCENT_WORD + r"(?![a-z])|"
    r"\bpercent(?:age)?\s+(?:of|did|does|do|is|was|were|will|would|has|have|had|increase|decrease|change)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ProblemHints:
    """The answer form a problem asks for.

    Attributes:
        round_places: decimal places the answer is to be rounded to (``0`` = whole number, ``-2`` = nearest
            hundred), or ``None`` when the problem asks for no rounding.
        ordered: the problem asks for a list in a stated order (increasing, decreasing, least to greatest...).
        asks_percent: the problem asks for a percent ("what percent", "as a percentage").
    """

    round_places: int | None = None
    ordered: bool = False
    asks_percent: bool = False


def problem_hints(problem: str | None) -> ProblemHints:
    """Reads the answer-form requests of a problem text.

    Args:
        problem: the question text (``None`` or empty: nothing is asked).

    Returns:
        The hints; all off when the problem asks for nothing.
    """
    if not problem:
        return ProblemHints()
    text = str(problem)[:MAX_PROBLEM_CHARS]
    places = None
    nearest = _NEAREST.search(text)
    if nearest is not None:
        places = _PLACES[re.sub(r"\s+", " ", nearest.group(1).lower())]
    else:
        decimal = _DECIMAL_PLACES.search(text)
        if decimal is not None:
            word = decimal.group(1).lower()
            places = int(word) if word.isdigit() else _WORD_DIGITS[word]
    return ProblemHints(
        round_places=places,
        ordered=_ORDER.search(text) is not None,
        asks_percent=_ASKS_PERCENT.search(text) is not None,
    )


def resolve_policies(
    config: CompareConfig, problem: str | None, percent: str, rounding: str, list_order: str
) -> CompareConfig:
    """The comparison settings for one pair: the verifier's ``"problem"`` policies resolved against its problem.

    Args:
        config: the verifier's settings without a problem (``percent`` already ``"divide"`` for ``"problem"``).
        problem: the question text, or ``None``.
        percent: the verifier's ``percent`` policy.
        rounding: the verifier's ``rounding`` policy.
        list_order: the verifier's ``list_order`` policy.

    Returns:
        ``config`` itself when the problem asks for nothing a ``"problem"`` policy reads, else a copy with
        ``percent="divide_or_bare"``, ``round_places`` and/or ``ordered_lists`` set.
    """
    if not problem or "problem" not in (percent, rounding, list_order):
        return config
    hints = problem_hints(problem)
    changes: dict[str, Any] = {}
    if percent == "problem" and hints.asks_percent:
        changes["percent"] = "divide_or_bare"
    if rounding == "problem" and hints.round_places is not None:
        changes["round_places"] = hints.round_places
    if list_order == "problem" and hints.ordered:
        changes["ordered_lists"] = True
    return replace(config, **changes) if changes else config
