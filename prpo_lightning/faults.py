"""Fault policy for user components, and the budget of consecutive batches that update nothing.

A PRM failure can be skipped (``model.on_prm_error: skip``, counted under ``train/faults/prm_errors``); a verifier
that raises instead of returning a verdict is a bug and stops training. Per-sample verifier problems are reported
in the verdict (timeouts → UNPARSABLE, counted under ``verifier/timeouts``).

Programming errors in a component (:data:`PROGRAMMING_ERRORS`, or a return value of the wrong type) always stop
training with a :class:`ComponentError` naming the component, whatever ``on_prm_error`` says: skipping them would
silently train without the component.

A batch that no rank can update (every prompt longer than ``sampling.max_prompt_length``, or a skipped PRM
failure on every rank) still counts as one step: :func:`advance_without_update` moves ``global_step`` and the LR
schedule on, so ``max_steps`` is reached. :class:`SkipBudget` stops the run with a :class:`SkippedBatchesError`
naming the cause after more than ``model.max_consecutive_skips`` such batches in a row.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch

from prpo_lightning.batch import ComponentContractError, RolloutBatch
from prpo_lightning.distributed import all_reduce_sum, is_distributed
from prpo_lightning.prm import ProcessRewardModel, ProcessScores
from prpo_lightning.verifier import OutcomeVerifier, Verdict

#: Exceptions that mean the component's code is wrong, not that a service is down: never skipped.
PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (TypeError, AttributeError, NameError, ImportError,
                                                       NotImplementedError)


class ComponentError(ComponentContractError):
    """A user component has a programming error or returned the wrong type; the message names the component,
    the rule it broke and the fix. Never skipped, whatever ``model.on_prm_error`` says. A
    :class:`~prpo_lightning.batch.ComponentContractError` (hence a ``TypeError``), so one ``except`` catches every
    broken component contract."""


class PRMError(RuntimeError):
    """A process reward model raised (or timed out) while scoring a batch; the message names the PRM."""


class VerifierError(RuntimeError):
    """An outcome verifier raised instead of returning a verdict; the message names the verifier.

    Verifiers report per-sample problems in the verdict (``timed_out`` → UNPARSABLE, counted under
    ``verifier/timeouts``; ``error`` → counted under ``verifier/errors``); an exception is a bug and stops training.
    """


class SkippedBatchesError(RuntimeError):
    """More than ``model.max_consecutive_skips`` batches in a row updated nothing; the message names the cause."""


def _exit_error(kind: str, component: Any, method: str, err: SystemExit) -> ComponentError:
    """``sys.exit()`` inside a component: a named error instead of a silent end of the run."""
    name = type(component).__name__
    return ComponentError(f"{kind} {name}.{method} called sys.exit({err.code!r}): a component must return its result "
                          f"or raise an exception, never exit the process. Fix {name}.{method}.")


def _programming_error(kind: str, component: Any, method: str, err: BaseException) -> ComponentError:
    name = type(component).__name__
    return ComponentError(
        f"{kind} {name}.{method} raised {type(err).__name__}: {err}. This is a programming error in the {kind} "
        f"({', '.join(e.__name__ for e in PROGRAMMING_ERRORS)} are never skipped, whatever model.on_prm_error "
        f"says); fix {name}.{method} (the traceback above points to the line)."
    )


class GuardedPRM(ProcessRewardModel):
    """Wraps a PRM: programming errors and a wrong return type become a :class:`ComponentError`, any other
    exception from ``score`` a (skippable) :class:`PRMError`; both name the PRM. Other attributes are the PRM's."""

    def __init__(self, prm: ProcessRewardModel) -> None:
        self.inner = prm
        self.requires_reference = prm.requires_reference
        self.requires_rollout_logprobs = prm.requires_rollout_logprobs

    def __getattr__(self, name: str) -> Any:  # only for attributes not found on the wrapper
        if "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)

    def score(self, batch: RolloutBatch, tokenizer: Any) -> ProcessScores:
        name = type(self.inner).__name__
        try:
            scores = self.inner.score(batch, tokenizer)
        except SystemExit as err:
            raise _exit_error("PRM", self.inner, "score", err) from err
        except PROGRAMMING_ERRORS as err:
            raise _programming_error("PRM", self.inner, "score", err) from err
        except Exception as err:  # noqa: BLE001 - re-raised with the PRM's name
            raise PRMError(f"PRM {name} failed on {batch.size} completions: {type(err).__name__}: {err}") from err
        return scores  # its type and shapes are checked by scoring.check_process_scores


class GuardedVerifier(OutcomeVerifier):
    """Wraps a verifier: an exception from ``verify_batch`` becomes a :class:`VerifierError` (a programming error
    a :class:`ComponentError`), naming the verifier."""

    def __init__(self, verifier: OutcomeVerifier) -> None:
        self.inner = verifier

    def verify(self, completion: str, gold: str) -> Verdict:
        return self.verify_batch([completion], [gold])[0]

    def verify_batch(self, completions: Any, golds: Any) -> list[Verdict]:
        return self._guarded("verify_batch", completions, golds)

    def verify_rows(self, completions: Any, golds: Any, rows: Any) -> list[Verdict]:
        return self._guarded("verify_rows", completions, golds, rows)

    def _guarded(self, method: str, completions: Any, *args: Any) -> list[Verdict]:
        name = type(self.inner).__name__
        try:
            verdicts = getattr(self.inner, method)(completions, *args)
        except SystemExit as err:
            raise _exit_error("verifier", self.inner, method, err) from err
        except PROGRAMMING_ERRORS as err:
            raise _programming_error("verifier", self.inner, method, err) from err
        except Exception as err:  # noqa: BLE001 - re-raised with the verifier's name
            raise VerifierError(f"verifier {name} failed on {len(completions)} completions: "
                                f"{type(err).__name__}: {err}") from err
        return verdicts  # their type and number are checked by scoring.compute_advantages


class SkipBudget:
    """Counts consecutive batches after which at least one rank had nothing to update, the same on every rank.

    Args:
        max_consecutive_skips: skipped batches in a row that are tolerated; one more stops training.

    Raises:
        ValueError: if ``max_consecutive_skips`` is negative.
    """

    def __init__(self, max_consecutive_skips: int) -> None:
        if max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be >= 0, got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive = 0

    @classmethod
    def of(cls, module: L.LightningModule, max_consecutive_skips: int) -> SkipBudget:
        """The budget kept on ``module`` (created at its first training step; not saved in checkpoints)."""
        if "_skip_budget" not in module.__dict__:
            module.__dict__["_skip_budget"] = cls(max_consecutive_skips)
        return module.__dict__["_skip_budget"]

    def record(self, step: int, no_prompts: bool, prm_error: str | None, max_prompt_length: int) -> bool:
        """Record this rank's batch and return whether *no* rank has anything to update (a collective call).

        Args:
            step: ``global_step`` of the batch (for the message).
            no_prompts: every prompt of this rank's batch was longer than ``max_prompt_length``.
            prm_error: the PRM failure that made this rank skip its batch (``on_prm_error: skip``), or None.
            max_prompt_length: ``sampling.max_prompt_length`` (for the message).

        Raises:
            SkippedBatchesError: after more than ``max_consecutive_skips`` skipped batches in a row (on every rank).
        """
        n_prompts, n_prm = all_reduce_sum([float(no_prompts), float(prm_error is not None)])
        world = torch.distributed.get_world_size() if is_distributed() else 1
        skipped_ranks = int(n_prompts + n_prm)
        self.consecutive = self.consecutive + 1 if skipped_ranks else 0
        if self.consecutive > self.max_consecutive_skips:
            causes = []
            if n_prompts:
                causes.append(
                    f"every prompt was longer than sampling.max_prompt_length={max_prompt_length} tokens (on "
                    f"{int(n_prompts)} of {world} ranks); fix: raise model.sampling.max_prompt_length or drop the "
                    "long problems from the data"
                )
            if n_prm:
                last = f"; this rank's error: {prm_error}" if prm_error else ""
                causes.append(
                    f"the PRM failed and model.on_prm_error is 'skip' (on {int(n_prm)} of {world} ranks){last}; "
                    "fix: make the PRM reachable (see the warnings above), or set model.on_prm_error: raise to see "
                    "the traceback"
                )
            raise SkippedBatchesError(
                f"{self.consecutive} batches in a row updated nothing (up to step {step}), more than "
                f"model.max_consecutive_skips={self.max_consecutive_skips}: " + "; ".join(causes)
            )
        return skipped_ranks == world

    def state(self) -> dict[str, float]:
        """Metrics: ``faults/consecutive_skips``."""
        return {"faults/consecutive_skips": float(self.consecutive)}


def advance_without_update(trainer: L.Trainer, scheduler: Any) -> None:
    """Count a batch that no rank can update as one step: ``global_step`` and the LR schedule move on, so
    ``max_steps`` is reached and the rate at step k stays the schedule's value at k. No optimizer step is
    taken: weights and optimizer moments are untouched. Every rank must call it (the decision is collective)."""
    with warnings.catch_warnings():  # a skip before the first optimizer step: the schedule must still advance
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress  # counts global_step
    progress.increment_ready()
    progress.increment_completed()
