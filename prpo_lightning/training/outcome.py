"""What a training step does with what it collected: update, or count a skip (decide, then act).

A batch that no rank can update (every prompt longer than ``sampling.max_prompt_length``, or a skipped PRM failure
on every rank), or one whose groups all lack signal under dynamic sampling, still counts as one step:
:func:`advance_without_update` moves ``global_step`` and the LR schedule on, so ``max_steps`` is reached.
:class:`SkipBudget` decides, the same on every rank, whether the step updates and why
(:class:`StepOutcome`); after more than ``model.max_consecutive_skips`` batches in a row on which some rank had
nothing to update, whatever the reason (no prompt fitted, the PRM failed, or no group had signal), it stops the run with a :class:`SkippedBatchesError` naming the cause. Its count is saved in
checkpoints (:meth:`SkipBudget.state_dict`), so a resumed run keeps it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L

from prpo_lightning.runtime.distributed import all_reduce_sum, world_size


class SkippedBatchesError(RuntimeError):
    """More than ``model.max_consecutive_skips`` batches in a row updated nothing; the message names the cause."""


#: The reasons a :class:`StepOutcome` can give.
REASONS = ("update", "no_prompts", "prm_error", "no_signal")


@dataclass(frozen=True)
class StepOutcome:
    """The decision for one training step, the same on every rank.

    Attributes:
        update: the policy is updated on the collected rollout.
        reason: ``update``; or why not: ``no_prompts`` (no rank had a prompt that fitted
            ``max_prompt_length``), ``prm_error`` (the PRM failed on every rank that had prompts, under
            ``on_prm_error: skip``), ``no_signal`` (dynamic sampling kept no group on any rank).
    """

    update: bool
    reason: str


@dataclass(frozen=True)
class RankReport:
    """What one rank collected, as the decision needs it.

    Attributes:
        no_prompts: every prompt of this rank's batch was longer than ``max_prompt_length``.
        prm_error: the PRM failure that made this rank skip its batch (``on_prm_error: skip``), or None.
        no_signal: no rank kept a group under dynamic sampling (already the same on every rank).
    """

    no_prompts: bool
    prm_error: str | None
    no_signal: bool = False


class SkipBudget:
    """Counts consecutive batches after which at least one rank had nothing to update, and decides each step.

    Args:
        max_consecutive_skips: skipped batches in a row that are tolerated; one more stops training.

    Raises:
        ValueError: if ``max_consecutive_skips`` is negative.
    """

    def __init__(self, max_consecutive_skips: int) -> None:
        if max_consecutive_skips < 0:
            raise ValueError(f"model.max_consecutive_skips must be >= 0, got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive = 0

    def decide(self, report: RankReport, step: int, max_prompt_length: int) -> StepOutcome:
        """Record this rank's report and decide the step (a collective call: every rank calls it).

        Raises:
            SkippedBatchesError: after more than ``max_consecutive_skips`` skipped batches in a row (on every rank).
        """
        n_prompts, n_prm = all_reduce_sum([float(report.no_prompts), float(report.prm_error is not None)])
        world = world_size()
        skipped_ranks = int(n_prompts + n_prm)
        self.consecutive = self.consecutive + 1 if skipped_ranks or report.no_signal else 0
        if self.consecutive > self.max_consecutive_skips:
            raise SkippedBatchesError(self._message(step, int(n_prompts), int(n_prm), world, report,
                                                    max_prompt_length))
        if skipped_ranks == world:
            return StepOutcome(False, "no_prompts" if n_prompts >= n_prm else "prm_error")
        if report.no_signal:
            return StepOutcome(False, "no_signal")
        return StepOutcome(True, "update")

    def _message(self, step: int, n_prompts: int, n_prm: int, world: int, report: RankReport,
                 max_prompt_length: int) -> str:
        causes, prm_error = [], report.prm_error
        if n_prompts:
            causes.append(f"every prompt was longer than sampling.max_prompt_length={max_prompt_length} tokens (on "
                          f"{n_prompts} of {world} ranks); fix: raise model.sampling.max_prompt_length or drop the "
                          "long problems from the data")
        if n_prm:
            last = f"; this rank's error: {prm_error}" if prm_error else ""
            causes.append(f"the PRM failed and model.on_prm_error is 'skip' (on {n_prm} of {world} ranks){last}; "
                          "fix: make the PRM reachable (see the warnings above), or set model.on_prm_error: raise to "
                          "see the traceback")
        if report.no_signal:
            causes.append("dynamic sampling kept no group with learning signal on any rank (every group's rewards "
                          "were equal); fix: check the reward (a constant reward gives no signal), raise "
                          "model.sampling.dynamic_sampling.max_rounds, or use its criterion: advantage")
        return (f"{self.consecutive} batches in a row updated nothing (up to step {step}), more than "
                f"model.max_consecutive_skips={self.max_consecutive_skips}: " + "; ".join(causes))

    def metrics(self) -> dict[str, float]:
        """Metrics: ``faults/consecutive_skips``."""
        return {"faults/consecutive_skips": float(self.consecutive)}

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (None: a checkpoint from before the budget existed; nothing to restore)."""
        if state is not None:
            self.consecutive = int(state["consecutive"])


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
