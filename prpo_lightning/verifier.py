"""Abstract outcome verifier: grades a completion's final answer against its own gold answer."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


class VerdictStatus(str, enum.Enum):
    """The three possible outcomes of grading one completion."""

    CORRECT = "correct"
    INCORRECT = "incorrect"
    UNPARSABLE = "unparsable"


@dataclass(frozen=True)
class Verdict:
    """The result of grading one completion.

    Attributes:
        status: correct, incorrect or unparsable (no answer could be extracted or parsed).
        reward: the scalar outcome reward assigned to ``status`` by the verifier's configuration.
        extracted: the answer string extracted from the completion, or ``None`` when nothing was found.
        timed_out: ``True`` when the hard wall-clock limit stopped the check. Such a verdict is
            ``UNPARSABLE`` and is counted under ``verifier/timeouts``, never silently scored as wrong.
        error: a short description of an internal error (counted under ``verifier/errors``), if any.
    """

    status: VerdictStatus
    reward: float
    extracted: str | None = None
    timed_out: bool = False
    error: str | None = None

    @property
    def is_correct(self) -> bool:
        """Whether the completion's answer matched the gold answer."""
        return self.status is VerdictStatus.CORRECT


class OutcomeVerifier(ABC):
    """Grades completions against their gold answers.

    Subclasses implement :meth:`verify`. :meth:`verify_batch` grades many pairs; the default runs them one after
    another and subclasses may parallelise it. Each pair is graded against **its own** gold answer.
    """

    @abstractmethod
    def verify(self, completion: str, gold: str) -> Verdict:
        """Grade one completion.

        Args:
            completion: the model's full response text (untrusted input).
            gold: the reference answer for this sample (e.g. MATH's ``answer`` field).

        Returns:
            The verdict, carrying the reward.
        """

    def verify_batch(self, completions: Sequence[str], golds: Sequence[str]) -> list[Verdict]:
        """Grade ``completions[i]`` against ``golds[i]`` for every i.

        Raises:
            ValueError: if the two sequences differ in length.
        """
        if len(completions) != len(golds):
            raise ValueError(f"verify_batch got {len(completions)} completions but {len(golds)} gold answers")
        return [self.verify(c, g) for c, g in zip(completions, golds)]

    def batch_metrics(self, completions: Sequence[str], verdicts: Sequence[Verdict]) -> dict[str, float]:
        """Task-specific statistics of one graded batch, logged under ``train/<key>`` (default: none).

        The framework's own counts (unparsable, timeouts, errors) are generic; a verifier adds what only it can
        define, e.g. the math verifier's ``completion/no_boxed_frac``. Called under ``torch.no_grad()``.

        Args:
            completions: the ``B`` completion texts.
            verdicts: their ``B`` verdicts, in the same order.
        """
        return {}
