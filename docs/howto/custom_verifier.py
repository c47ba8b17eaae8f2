"""How-to: write your own OutcomeVerifier (included in the docs, executed by tests/test_docs_howto.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prpo_lightning import OutcomeVerifier, Verdict, VerdictStatus


# [verifier-class]
class LastIntegerVerifier(OutcomeVerifier):
    """Grades a completion by the last integer it contains (GSM8K-style answers).

    Args:
        correct_reward: reward of a correct answer.
        incorrect_reward: reward of a wrong answer.
        unparsable_reward: reward when the completion contains no integer.
        max_chars: only the last ``max_chars`` characters are searched (completions are untrusted input).
        num_workers: threads for :meth:`verify_batch` (1: sequential).
    """

    _INT = re.compile(r"-?\d[\d,]*")

    def __init__(
        self,
        correct_reward: float = 1.0,
        incorrect_reward: float = 0.0,
        unparsable_reward: float = 0.0,
        max_chars: int = 2000,
        num_workers: int = 1,
    ) -> None:
        self.rewards = {
            VerdictStatus.CORRECT: correct_reward,
            VerdictStatus.INCORRECT: incorrect_reward,
            VerdictStatus.UNPARSABLE: unparsable_reward,
        }
        self.max_chars = max_chars
        self.num_workers = num_workers

    def verify(self, completion: str, gold: str) -> Verdict:
        found = self._INT.findall(completion[-self.max_chars :])
        if not found:
            return Verdict(VerdictStatus.UNPARSABLE, self.rewards[VerdictStatus.UNPARSABLE])
        answer = found[-1].replace(",", "")
        try:
            ok = int(answer) == int(gold.replace(",", "").strip())
        except ValueError as err:  # an unusable gold answer is an error, never a silent "wrong"
            return Verdict(VerdictStatus.UNPARSABLE, self.rewards[VerdictStatus.UNPARSABLE], answer, error=str(err))
        status = VerdictStatus.CORRECT if ok else VerdictStatus.INCORRECT
        return Verdict(status, self.rewards[status], extracted=answer)

    def verify_batch(
        self, completions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]] | None = None
    ) -> list[Verdict]:
        if len(completions) != len(golds):
            raise ValueError(f"verify_batch got {len(completions)} completions but {len(golds)} gold answers")
        if self.num_workers <= 1:
            return [self.verify(c, g) for c, g in zip(completions, golds)]
        with ThreadPoolExecutor(self.num_workers) as pool:  # order is preserved: row i gets gold i
            return list(pool.map(self.verify, completions, golds))
# [verifier-class-end]


# [verifier-usage]
def demo() -> list[Verdict]:
    v = LastIntegerVerifier(incorrect_reward=-1.0, num_workers=2)
    return v.verify_batch(["so 3 + 4 = 7", "the answer is 1,024", "no idea"], ["7", "1024", "5"])


if __name__ == "__main__":
    for verdict in demo():
        print(verdict.status.value, verdict.reward, verdict.extracted)
    # correct 1.0 7 / correct 1.0 1024 / unparsable 0.0 None
# [verifier-usage-end]
