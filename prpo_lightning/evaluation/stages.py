"""The ``validate``/``test`` state of a training module: one evaluator per running stage and the last results.

:class:`~prpo_lightning.module.PRPOModule` owns one :class:`EvaluationStages` and forwards its four evaluation hooks
to it. Generation goes through anything with a ``generate_and_grade(batch, ...)`` method (the module, which
delegates to its rollout collector), so evaluation decodes with the same engine as training.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from prpo_lightning.evaluation.runner import evaluator_for_trainer, output_dir_for


class EvaluationStages:
    """Evaluators of the running stages (created at a stage's first batch, when its benchmarks are known), the last
    finished result of each stage, and the training step the evaluated weights come from."""

    def __init__(self) -> None:
        self.evaluators: dict[str, Any] = {}
        self.results: dict[str, dict[str, Any]] = {}  # last finished evaluation per stage
        self.checkpoint_step: int | None = None  # ``global_step`` of the last checkpoint loaded

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Remember the checkpoint's ``global_step``: ``validate``/``test`` do not restore the fit loop, so
        ``trainer.global_step`` is 0 there."""
        step = checkpoint.get("global_step")
        self.checkpoint_step = int(step) if step is not None else None

    def step_of_weights(self, trainer: L.Trainer, global_step: int) -> int:
        """The training step that the weights being evaluated come from, which labels outputs and metrics.

        During ``fit``: ``global_step``. In ``validate``/``test``: the step stored in the checkpoint given by
        ``ckpt_path`` (or loaded into a module that has not trained since), else ``global_step``.
        """
        if trainer.state.fn == TrainerFn.FITTING or self.checkpoint_step is None:
            return global_step
        if trainer.ckpt_path is not None or global_step == 0:
            return self.checkpoint_step
        return global_step

    def run_batch(self, generator: Any, trainer: L.Trainer, device: torch.device, batch: dict[str, Any],
                  stage: str) -> None:
        """Generate and grade one batch into the stage's evaluator (greedy pass@1; pass@k when configured)."""
        if stage not in self.evaluators:
            self.evaluators[stage] = evaluator_for_trainer(trainer, device, stage)
        self.evaluators[stage].run_batch(generator, batch)

    def finish(self, trainer: L.Trainer, stage: str, global_step: int, log: Any) -> None:
        """Merge ranks (deduplicating padded repeats), write the outputs, keep the stage's result and log
        ``<stage>/<benchmark>/<metric>`` with ``log(name, value, prog_bar=..., sync_dist=False)`` (the module's
        ``log``; the values are already identical on every rank). Nothing happens when the stage ran no batch."""
        evaluator = self.evaluators.pop(stage, None)
        if evaluator is None:
            return
        step = self.step_of_weights(trainer, global_step)
        out_dir = None if trainer.sanity_checking else output_dir_for(trainer, evaluator.config, stage, step)
        result = evaluator.finalize(step=step, stage=stage, output_dir=out_dir, loggers=trainer.loggers,
                                    is_global_zero=trainer.is_global_zero)
        self.results[stage] = result
        for key, value in result["metrics"].items():
            log(f"{stage}/{key}", float(value), prog_bar=key == "accuracy", sync_dist=False)
        if step != global_step:  # Lightning takes a logged "step" as the loggers' step: the checkpoint's
            log("step", float(step), prog_bar=False, sync_dist=False)
