"""Fault policy for user components: exceptions from a PRM or verifier become errors that name the component.

A PRM failure can be skipped (``model.on_prm_error: skip``, counted under ``train/faults/prm_errors``); a verifier
that raises instead of returning a verdict is a bug and stops training. Per-sample verifier problems are reported
in the verdict (timeouts → UNPARSABLE, counted under ``verifier/timeouts``).
"""

from __future__ import annotations

from typing import Any

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.prm import ProcessRewardModel, ProcessScores
from prpo_lightning.verifier import OutcomeVerifier, Verdict


class PRMError(RuntimeError):
    """A process reward model raised (or timed out) while scoring a batch; the message names the PRM."""


class GuardedPRM(ProcessRewardModel):
    """Wraps a PRM so that any exception from ``score`` becomes a :class:`PRMError` naming the PRM."""

    def __init__(self, prm: ProcessRewardModel) -> None:
        self.inner = prm
        self.requires_reference = prm.requires_reference

    def score(self, batch: RolloutBatch, tokenizer: Any) -> ProcessScores:
        try:
            return self.inner.score(batch, tokenizer)
        except Exception as err:  # noqa: BLE001 - re-raised with the PRM's name
            raise PRMError(f"PRM {type(self.inner).__name__} failed on {batch.size} completions: "
                           f"{type(err).__name__}: {err}") from err


class VerifierError(RuntimeError):
    """An outcome verifier raised instead of returning a verdict; the message names the verifier.

    Verifiers report per-sample problems in the verdict (``timed_out`` → UNPARSABLE, counted under
    ``verifier/timeouts``; ``error`` → counted under ``verifier/errors``); an exception is a bug and stops training.
    """


class GuardedVerifier(OutcomeVerifier):
    """Wraps a verifier so that an exception from ``verify_batch`` becomes a :class:`VerifierError`."""

    def __init__(self, verifier: OutcomeVerifier) -> None:
        self.inner = verifier

    def verify(self, completion: str, gold: str) -> Verdict:
        return self.verify_batch([completion], [gold])[0]

    def verify_batch(self, completions: Any, golds: Any) -> list[Verdict]:
        try:
            return self.inner.verify_batch(completions, golds)
        except Exception as err:  # noqa: BLE001 - re-raised with the verifier's name
            raise VerifierError(f"verifier {type(self.inner).__name__} failed on {len(completions)} completions: "
                                f"{type(err).__name__}: {err}") from err
