"""The step budget and the learning-rate schedule of a run, both counted in optimizer steps.

``trainer.max_steps`` counts **optimizer steps** (Lightning's ``global_step`` under manual optimisation, TRL's
``max_steps``). One training batch (one rollout) makes ``ppo_epochs × ceil(rows / mini_batch_size)`` of them
(:func:`optimizer_steps_per_batch`), 1 by default. So that every number agrees:

- a run never makes more than ``max_steps`` optimizer steps: the last batch's update stops when the budget is
  spent (:meth:`LRSchedule.updates_left`), with one warning at the start when ``max_steps`` is not a multiple;
- the schedule's length (``model.optim.total_steps``) defaults to ``max_steps`` (an epoch-budgeted run: batches ×
  epochs × optimizer steps per batch), and a decaying schedule shorter than ``max_steps`` is refused, since the
  steps after it would train at lr 0;
- the progress bar counts ``global_step`` against the same budget (:func:`step_budget`).

**Resuming** (``--ckpt_path``) with another ``optim.lr``, ``weight_decay``, ``betas``, ``warmup_steps``,
``schedule`` or ``max_steps``/``total_steps``: the rate of optimizer step ``k`` is always
``lr × factor(k; warmup_steps, total, schedule)`` with the settings given now, so from the resumed step ``k0`` on
the run follows the schedule a run started with the new settings would follow at ``k0`` (never 0 at a step that
trains; with unchanged settings, exactly the interrupted run's rates). The Adam moments are kept. The change is
logged once, as a warning.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from prpo_lightning.config import OptimConfig
from prpo_lightning.training.updater import lr_factor


def optimizer_steps_per_batch(prompts_per_rank: int, num_generations: int, optim: OptimConfig) -> int:
    """Optimizer steps of one full training batch: ``ppo_epochs × ceil(rows / mini_batch_size)``, with
    ``rows = prompts_per_rank × num_generations`` (a batch with fewer rows may make fewer)."""
    rows = max(prompts_per_rank * num_generations, 1)
    mini = min(optim.mini_batch_size or rows, rows)
    return optim.ppo_epochs * math.ceil(rows / mini)


def prompts_per_rank(trainer: L.Trainer) -> int | None:
    """Prompts of one training batch on one rank (the train dataloader's ``batch_size``), or None when unknown."""
    loader = getattr(getattr(trainer.fit_loop, "_combined_loader", None), "iterables", None)
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def step_budget(trainer: L.Trainer, steps_per_batch: int) -> int | None:
    """The run's optimizer-step budget: ``trainer.max_steps``, else the training batches of ``max_epochs`` ×
    ``steps_per_batch`` (None when the run is unbounded)."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches  # training batches (manual optimisation)
    return int(estimate) * steps_per_batch if math.isfinite(estimate) else None


class LRSchedule:
    """Builds the run's ``LambdaLR``, keeps it in the step budget, and applies new settings on resume.

    Args:
        optim: the optimizer settings given now.
        num_generations: completions per prompt (rows of a batch = prompts × G).
    """

    def __init__(self, optim: OptimConfig, num_generations: int) -> None:
        self.cfg, self.num_generations = optim, num_generations
        self.total: int = 1
        self.steps_per_batch: int = 1
        self.resumed_from: dict[str, Any] | None = None  # the checkpoint's schedule settings, when resuming

    def build(self, optimizer: torch.optim.Optimizer, trainer: L.Trainer) -> torch.optim.lr_scheduler.LambdaLR:
        """The scheduler (stepped once per optimizer step) over :attr:`total` optimizer steps.

        Raises:
            ValueError: a decaying schedule with ``total_steps`` below ``max_steps``, or an unbounded run with
                a decaying schedule and no ``total_steps``.
        """
        cfg = self.cfg
        budget = step_budget(trainer, self._steps_per_batch(trainer))
        if cfg.total_steps is not None:
            self.total = int(cfg.total_steps)
        elif budget is not None:
            self.total = max(budget, 1)
        elif cfg.schedule != "constant":
            raise ValueError(f"model.optim.schedule is {cfg.schedule!r} but the run has no step budget "
                             "(trainer.max_steps and trainer.max_epochs are both unset): set trainer.max_steps, or "
                             "model.optim.total_steps (the optimizer steps the rate decays over)")
        if cfg.schedule != "constant" and budget is not None and self.total < budget:
            raise ValueError(f"model.optim.total_steps={self.total} is shorter than the run's {budget} optimizer "
                             f"steps (trainer.max_steps): with schedule {cfg.schedule!r} steps {self.total} to "
                             f"{budget - 1} would train at lr 0. Fix: leave model.optim.total_steps null (it "
                             f"defaults to max_steps) or set it >= {budget}")
        warmup, total, schedule = cfg.warmup_steps, self.total, cfg.schedule
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, schedule))

    def _steps_per_batch(self, trainer: L.Trainer) -> int:
        prompts = prompts_per_rank(trainer)
        self.steps_per_batch = (optimizer_steps_per_batch(prompts, self.num_generations, self.cfg)
                                if prompts is not None else self.cfg.ppo_epochs)
        return self.steps_per_batch

    def updates_left(self, trainer: L.Trainer) -> int | None:
        """Optimizer steps left before ``trainer.max_steps`` (None: no step limit)."""
        if trainer.max_steps is None or trainer.max_steps <= 0:
            return None
        return max(int(trainer.max_steps) - trainer.global_step, 0)

    def state_dict(self) -> dict[str, Any]:
        """The settings the schedule was built with (saved in checkpoints as ``prpo_lr_schedule``)."""
        cfg = self.cfg
        return {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": [float(b) for b in cfg.betas],
                "warmup_steps": cfg.warmup_steps, "schedule": cfg.schedule, "total": self.total}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Remember a checkpoint's schedule settings (None: a checkpoint written before they were saved)."""
        self.resumed_from = dict(state) if state is not None else {}

    def on_train_start(self, trainer: L.Trainer, optimizer: Any, scheduler: Any) -> None:
        """After the checkpoint is restored: warn when ``max_steps`` cuts a batch's update, and put the settings
        given now into the restored optimizer and scheduler (see the module docstring)."""
        spb, max_steps = self._steps_per_batch(trainer), trainer.max_steps  # the train loader is set up by now
        if max_steps is not None and max_steps > 0 and spb > 1 and max_steps % spb:
            rank_zero_warn(f"[prpo] trainer.max_steps={max_steps} counts optimizer steps and each training batch "
                           f"makes {spb} (model.optim.ppo_epochs × mini-batches): the last batch's update stops "
                           f"after {max_steps % spb} of them. Set max_steps to a multiple of {spb} to train every "
                           "batch fully.")
        if self.resumed_from is None:
            return
        then, now = self.resumed_from, self.state_dict()
        groups = optimizer.param_groups
        then.setdefault("lr", float(scheduler.base_lrs[0]))
        then.setdefault("weight_decay", groups[0].get("weight_decay"))
        then.setdefault("betas", [float(b) for b in groups[0].get("betas", ())])
        changed = [k for k in now if k in then and then[k] != now[k]]  # an older checkpoint lacks some keys
        self.resumed_from = None
        if not changed:
            return
        step = int(scheduler.last_epoch)
        factor = lr_factor(step, self.cfg.warmup_steps, self.total, self.cfg.schedule)
        for group in groups:
            group.update(initial_lr=self.cfg.lr, lr=self.cfg.lr * factor, weight_decay=self.cfg.weight_decay,
                         betas=tuple(self.cfg.betas))
        scheduler.base_lrs = [self.cfg.lr] * len(groups)
        scheduler._last_lr = [g["lr"] for g in groups]  # noqa: SLF001 - what get_last_lr() reports
        shown = ", ".join(f"{k} {then.get(k, '?')!r} -> {now[k]!r}" for k in changed)
        rank_zero_warn(f"[prpo] resumed at optimizer step {step} with new schedule settings ({shown}): the rate "
                       f"follows the new schedule from this step on (lr {self.cfg.lr:g} × {self.cfg.schedule} over "
                       f"{self.total} steps, warm-up {self.cfg.warmup_steps}): {self.cfg.lr * factor:.4g} now; the "
                       "Adam moments are kept")
