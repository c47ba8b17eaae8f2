"""Abstract outcome verifier: grades a completion's final answer against its own gold answer."""

from __future__ import annotations

import enum
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prpo_lightning.scoring.needs import ComponentNeeds, declare_needs


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

    Subclasses implement :meth:`verify` (one completion). :meth:`verify_batch` is the one batch method the training
    and evaluation loops call, with each row's other fields (:data:`~prpo_lightning.batch.ROW_FIELDS`); the default
    grades the pairs one after another, and subclasses may parallelise it or read the rows. Each pair is graded
    against **its own** gold answer.
    """

    #: A verifier reads only completions, answers and the row fields: it declares no needs.
    needs: ComponentNeeds = ComponentNeeds()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declare_needs(cls, "verifier")
        if "verify_rows" in vars(cls):
            raise TypeError(f"verifier {cls.__name__} defines verify_rows(completions, golds, rows): it was merged into "
                            "the one batch method verify_batch(completions, golds, rows=None); rename it")
        batch = vars(cls).get("verify_batch")
        if batch is not None and len(inspect.signature(batch).parameters) < 4:
            raise TypeError(f"verifier {cls.__name__}.verify_batch takes (completions, golds): the framework passes "
                            "each row's fields too; define verify_batch(self, completions, golds, rows=None)")

    @abstractmethod
    def verify(self, completion: str, gold: str) -> Verdict:
        """Grade one completion.

        Args:
            completion: the model's full response text (untrusted input).
            gold: the reference answer for this sample (e.g. MATH's ``answer`` field).

        Returns:
            The verdict, carrying the reward.
        """

    def verify_batch(
        self, completions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]] | None = None
    ) -> list[Verdict]:
        """Grade ``completions[i]`` against ``golds[i]`` for every i (the one batch method the framework calls).

        Args:
            completions: the ``B`` completion texts.
            golds: their ``B`` gold answers.
            rows: None, or ``B`` mappings with the other fields of each row (``problem``, ``id``, ``truncated``,
                ``num_tokens``; :func:`~prpo_lightning.batch.rollout_rows`); the default ignores them.

        Raises:
            ValueError: if the sequences differ in length.
        """
        if len(completions) != len(golds) or (rows is not None and len(rows) != len(golds)):
            raise ValueError(f"verify_batch got {len(completions)} completions, {len(golds)} gold answers and "
                             f"{'no' if rows is None else len(rows)} rows")
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

