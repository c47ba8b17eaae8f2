"""Abstract outcome verifier: grades a completion's final answer against its own gold answer."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import prpo_lightning.batch

#: the per-row fields :func:`rollout_rows` gives :meth:`OutcomeVerifier.verify_rows`, besides completion and answer.
ROW_FIELDS = ("problem", "id", "truncated", "num_tokens")


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

    def verify_rows(
        self, completions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> list[Verdict]:
        """Grade ``completions[i]`` against ``golds[i]`` knowing the rest of row i (:data:`ROW_FIELDS`).

        The training and evaluation loops call this method. The default ignores ``rows`` and calls
        :meth:`verify_batch`; a verifier that reads the problem or the prompt id (e.g. a
        :class:`~components.rewards.CallableReward`) overrides it.

        Args:
            completions: the ``B`` completion texts.
            golds: their ``B`` gold answers.
            rows: ``B`` mappings with the other fields of each row (:func:`rollout_rows`).
        """
        return self.verify_batch(completions, golds)

    def batch_metrics(self, completions: Sequence[str], verdicts: Sequence[Verdict]) -> dict[str, float]:
        """Task-specific statistics of one graded batch, logged under ``train/<key>`` (default: none).

        The framework's own counts (unparsable, timeouts, errors) are generic; a verifier adds what only it can
        define, e.g. the math verifier's ``completion/no_boxed_frac``. Called under ``torch.no_grad()``.

        Args:
            completions: the ``B`` completion texts.
            verdicts: their ``B`` verdicts, in the same order.
        """
        return {}


def rollout_rows(batch: prpo_lightning.batch.RolloutBatch) -> list[dict[str, Any]]:
    """The per-row fields of a rollout batch a verifier may read besides the completion and the answer.

    Returns:
        One dict per row with ``problem`` (the question text), ``id`` (the prompt id, shared by the row's group),
        ``truncated`` (generation hit ``max_new_tokens`` without EOS) and ``num_tokens`` (valid completion tokens).
    """
    ids = batch.group_ids.tolist()
    truncated = batch.truncated.tolist() if batch.truncated is not None else [False] * len(ids)
    lengths = batch.completion_mask.sum(dim=1).tolist()
    return [
        {"problem": problem, "id": int(pid), "truncated": bool(cut), "num_tokens": int(n)}
        for problem, pid, cut, n in zip(batch.problems, ids, truncated, lengths)
    ]
