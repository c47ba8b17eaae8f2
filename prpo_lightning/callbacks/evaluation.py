"""Held-out accuracy during ``fit``: before RL, every N optimizer steps, and after RL."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm


class MathEvalCallback(L.Callback):
    """Greedy pass@1 on the datamodule's evaluation problems during training.

    The evaluation set is ``trainer.datamodule.eval_dataloader()``. Results are logged as
    ``eval/accuracy`` against ``trainer.global_step`` and kept in :attr:`history`.

    Args:
        every_n_steps: evaluate after every N optimizer steps (0 disables periodic evaluation).
        eval_at_start: evaluate before the first RL step (the "before" number).
        eval_at_end: evaluate when fit ends (the "after" number).

    Raises:
        ValueError: if ``every_n_steps`` is negative.
    """

    def __init__(self, every_n_steps: int = 0, eval_at_start: bool = True, eval_at_end: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.eval_at_start = eval_at_start
        self.eval_at_end = eval_at_end
        self.history: list[dict[str, float]] = []
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return f"MathEvalCallback[every_n_steps={self.every_n_steps}]"

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self._last_step = int(state_dict["last_step"])

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> float:
        """Greedy-decode every evaluation problem, grade it and return the accuracy."""
        loader = trainer.datamodule.eval_dataloader()
        correct = total = 0
        bar = tqdm(loader, desc=f"eval @ step {trainer.global_step}", leave=False, disable=not trainer.is_global_zero)
        for batch in bar:
            rollout = pl_module.generate_and_grade(batch, greedy=True)
            if rollout is None:
                continue
            correct += sum(v.is_correct for v in rollout.verdicts)
            total += len(rollout.verdicts)
        acc = correct / max(total, 1)
        step = trainer.global_step
        self.history.append({"step": float(step), "accuracy": acc, "num_problems": float(total)})
        self._last_step = step
        for logger in trainer.loggers:
            logger.log_metrics({"eval/accuracy": acc}, step=step)
        return acc

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.eval_at_start and not any(h["step"] == trainer.global_step for h in self.history):
            acc = self.evaluate(trainer, pl_module)
            rank_zero_info(f"[prpo] held-out accuracy before RL (step {trainer.global_step}): {acc:.1%}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            acc = self.evaluate(trainer, pl_module)
            rank_zero_info(f"[prpo] held-out accuracy at step {step}: {acc:.1%}")

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self.eval_at_end:
            return
        if self._last_step != trainer.global_step:
            self.evaluate(trainer, pl_module)
        before, after = self.history[0]["accuracy"], self.history[-1]["accuracy"]
        rank_zero_info(
            f"[prpo] held-out accuracy: before RL {before:.1%} -> after RL {after:.1%} "
            f"({(after - before) * 100:+.1f} points, {int(self.history[-1]['num_problems'])} problems)"
        )
