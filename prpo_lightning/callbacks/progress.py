"""A training progress bar that counts optimizer steps: ``step 8/40`` from the first step to the last, across
epochs and after a resume, without Lightning's ``v_num``.

Lightning's bars count batches within an epoch (``Epoch 0/-2``, ``8/2`` after a resume). RL runs are budgeted
in optimizer steps (``trainer.max_steps``), and one batch may make several (``ppo_epochs``, mini-batches), so the
bar follows ``trainer.global_step`` against the same budget the run stops at and the LR schedule decays over
(:mod:`prpo_lightning.training.schedule`). ``prpo-fit`` installs it in place of Lightning's default bar. From the
second step on, the postfix shows the step time (``step=1.23s``: :term:`train/time/step_s`, the last step start to
start, maxed over ranks).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from prpo_lightning.training.schedule import step_budget


def step_time_item(step_metrics: dict[str, float]) -> dict[str, str]:
    """``{"step": "1.23s"}`` from a module's ``train/time/step_s``, or ``{}`` before it is known (the first step).

    Example:
        >>> step_time_item({"train/time/step_s": 1.234})
        {'step': '1.23s'}
    """
    seconds = step_metrics.get("train/time/step_s")
    return {} if seconds is None else {"step": f"{float(seconds):.2f}s"}


class StepProgressBar(TQDMProgressBar):
    """:class:`~lightning.pytorch.callbacks.TQDMProgressBar` whose training bar is ``global_step / max_steps``.

    The total is ``trainer.max_steps``, or for an epoch-budgeted run the training batches × the optimizer steps
    each makes (no total when the run is unbounded). Validation and test bars are Lightning's.

    Args:
        refresh_rate: update the bar every N steps (0 disables it).
        process_position: bar position, for several bars in one terminal.
        leave: keep the finished bar on screen.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)

    @staticmethod
    def total_steps(trainer: L.Trainer) -> int | None:
        """The optimizer-step budget: ``max_steps``, else the estimate from ``max_epochs`` (None when unbounded)."""
        schedule = getattr(trainer.lightning_module, "lr_schedule", None)
        return step_budget(trainer, schedule.steps_per_batch if schedule is not None else 1)

    def init_train_tqdm(self) -> Tqdm:
        """The training bar: ``step`` from ``global_step`` (a resumed run's rate counts its own steps only)."""
        return Tqdm(
            desc="step", total=self.total_steps(self.trainer), initial=self.trainer.global_step,
            position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
            file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """One bar for the whole run: nothing restarts at an epoch boundary."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._show_step(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The bar stays open across epochs (closed in ``on_train_end``)."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Close the bar at the step reached, so the error follows it on its own line."""
        if self._train_progress_bar is not None:  # None when the run failed before training started
            self._train_progress_bar.close()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The progress-bar metrics without ``v_num`` (the logger version is not a training quantity), with the
        step time (``step``, e.g. ``1.23s``) once the module logged ``train/time/step_s``."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.update(step_time_item(getattr(pl_module, "step_metrics", None) or {}))
        return items

    def _show_step(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool = False) -> None:
        bar = self._train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable or not (force or self._should_update(step, bar.total)):
            return
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()
