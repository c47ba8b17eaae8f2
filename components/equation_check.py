"""``EquationCheckPRM``: an offline, rule-based PRM that checks the arithmetic equations each step states.

Equations are found in the text and both sides evaluated exactly with the safe, bounded evaluator of
:mod:`components.math_answer.arithmetic` (no ``eval``, no sympy), whose number leaves are read by the verifier's
own :func:`components.math_answer.numeric.parse_number`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from components.math_answer.arithmetic import ArithmeticUndefined, Token, evaluate_tokens, tokenize_arithmetic
from components.prm_common import segment_texts
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.prm import ProcessRewardModel, ProcessScores, pad_step_scores

__all__ = ["Equation", "EquationCheckPRM", "check_equation", "find_equations"]

_OPERATORS = {"add", "sub", "mul", "div", "pow"}


@dataclass(frozen=True)
class Equation:
    """A stated equation ``side_0 = side_1 (= side_2 …)``.

    Attributes:
        sides: the tokens of each side (whitespace removed).
        start: character offset of its first token in the searched text.
        end: character offset just after its last token.
    """

    sides: tuple[tuple[Token, ...], ...]
    start: int
    end: int

    @property
    def text(self) -> str:
        """The equation re-joined (for messages)."""
        return " = ".join("".join(t.text for t in side) for side in self.sides)


def _runs(tokens: list[Token]) -> list[tuple[int, int]]:
    """Maximal index ranges ``[a, b)`` of tokens that are not ``other``, trimmed of leading/trailing whitespace."""
    out, a = [], None
    for k, tok in enumerate([*tokens, Token("other", "", -1, -1)]):
        if tok.kind not in ("other", "nl"):
            a = k if a is None else a
            continue
        if a is not None:
            lo, hi = a, k
            while lo < hi and tokens[lo].kind == "skip":
                lo += 1
            while hi > lo and tokens[hi - 1].kind == "skip":
                hi -= 1
            if lo < hi:
                out.append((lo, hi))
        a = None
    return out


def find_equations(text: str) -> list[Equation]:
    """Find the arithmetic equations stated in ``text``.

    An equation is a maximal run of arithmetic tokens (numbers, operators, brackets, ``\\frac``, ``=``) with at
    least one ``=`` whose sides are all complete expressions (runs end at line breaks and words). A side
    that is a variable or word (``x = 3 + 4 = 7``) is dropped; at least two sides must remain. A run is not an
    equation when it is glued to a variable: it starts right after a letter with no space (``x2 = 2``), it starts with an operator after a
    word or symbol (``x + 3 = 7``), or it ends right before a letter or command (``2 = 2x``, ``= 2\\pi``).
    """
    tokens = tokenize_arithmetic(text)
    found: list[Equation] = []
    for lo, hi in _runs(tokens):
        run = [t for t in tokens[lo:hi] if t.kind != "skip"]
        if not any(t.kind == "eq" for t in run):
            continue
        k = lo - 1
        while k >= 0 and tokens[k].kind == "skip":  # tokens[k] is then "other", "nl" or nothing
            k -= 1
        prev = tokens[k] if k >= 0 and tokens[k].kind == "other" else None
        glued_prev = prev is not None and k == lo - 1
        k = hi
        while k < len(tokens) and tokens[k].kind == "skip":
            k += 1
        nxt = tokens[k] if k < len(tokens) and tokens[k].kind == "other" else None
        glued_next = nxt is not None and k == hi
        if glued_prev and prev is not None and (prev.text[-1:].isalnum() or prev.text[-1:] == "_"):
            continue
        if run[0].kind in _OPERATORS and prev is not None and (prev.text[-1:].isalnum() or prev.text.startswith("\\")):
            continue
        if glued_next and nxt is not None and (nxt.text[:1].isalpha() or nxt.text.startswith("\\")):
            continue
        sides: list[list[Token]] = [[]]
        for t in run:
            if t.kind == "eq":
                sides.append([])
            else:
                sides[-1].append(t)
        if not sides[0] and prev is not None:  # "x = 3 + 4 = 7": the variable's side is dropped
            sides = sides[1:]
        if sides and not sides[-1] and nxt is not None:  # "3 + 4 = x": likewise
            sides = sides[:-1]
        if len(sides) < 2 or any(not s for s in sides):
            continue
        found.append(Equation(tuple(tuple(s) for s in sides), run[0].start, run[-1].end))
    return found


def _decimals(tokens: tuple[Token, ...]) -> list[int]:
    return [len(t.text.split(".", 1)[1]) for t in tokens if t.kind == "num" and "." in t.text]


def check_equation(eq: Equation) -> bool | None:
    """Whether every side of ``eq`` has the same value.

    Exact over fractions; when a decimal literal appears, sides may differ by half a unit of the least precise
    decimal written (``1/3 = 0.33`` holds). A side with a division by zero makes the equation false.

    Returns:
        True/False, or ``None`` when a side is not plain arithmetic (then it is not a checkable equation).
    """
    values: list[Fraction] = []
    try:
        for side in eq.sides:
            out = evaluate_tokens(list(side))
            if out is None:
                return None
            values.append(out[0])
    except ArithmeticUndefined:
        return False
    decimals = [d for side in eq.sides for d in _decimals(side)]
    tol = Fraction(1, 2 * 10 ** min(decimals)) if decimals else Fraction(0)
    return all(abs(v - values[0]) <= tol for v in values[1:])


class EquationCheckPRM(ProcessRewardModel):
    """Rule-based PRM: a step's score is the fraction of the arithmetic equations it states that are true.

    The segments of a completion are decoded with the policy tokenizer and concatenated; equations are found in
    that text (:func:`find_equations`) and each is credited to the segment holding its **last character**, so an
    equation cut by a segment boundary is still checked. For step j with ``n_j`` checkable equations of which
    ``k_j`` hold (:func:`check_equation`): ``s_j = k_j / n_j``; a step with no equation gets
    ``no_equation_score`` (default 0.5, the PRPO prior mean, i.e. a neutral Z = 0).

    Output: ``step_scores (B, S)`` in [0, 1], ``step_mask (B, S)``; no token scores. CPU only, no model, no grad.

    Args:
        no_equation_score: score of a step without a checkable equation.
        skip_special_tokens: drop special tokens (EOS) when decoding segments.
    """


    def __init__(self, no_equation_score: float = 0.5, skip_special_tokens: bool = True) -> None:
        if not 0.0 <= no_equation_score <= 1.0:
            raise ValueError(f"no_equation_score must be in [0, 1], got {no_equation_score}")
        self.no_equation_score = no_equation_score
        self.skip_special_tokens = skip_special_tokens

    def score_steps(self, steps: list[str]) -> list[float]:
        """Scores of one completion's step texts."""
        bounds, pos = [], 0
        for s in steps:
            pos += len(s)
            bounds.append(pos)
        good = [0] * len(steps)
        total = [0] * len(steps)
        for eq in find_equations("".join(steps)):
            ok = check_equation(eq)
            if ok is None:
                continue
            j = next(k for k, b in enumerate(bounds) if eq.end - 1 < b)
            total[j] += 1
            good[j] += int(ok)
        return [g / n if n else self.no_equation_score for g, n in zip(good, total)]

    def score(self, batch: RolloutBatch, tokenizer: Any) -> ProcessScores:
        """Score every segment of every row (``B`` rows → ``(B, S)``)."""
        texts = segment_texts(batch, tokenizer, self.skip_special_tokens)
        return pad_step_scores([self.score_steps(row) for row in texts], device=batch.completion_ids.device)
