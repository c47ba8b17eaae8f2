"""Evaluation hooks of :class:`~prpo_lightning.module.PRPOModule`: graded generation, ``validate`` and ``test``.

A mixin so that the training module stays one concern per file; it relies on the module's ``make_rollout``,
``sampling``, ``verifier`` and the evaluation state created in ``PRPOModule.__init__``.
"""

from __future__ import annotations

from typing import Any

import torch

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.verifier import rollout_rows


class EvaluationHooks:
    """Greedy/sampled generation graded by the verifier, and the ``validation_step``/``test_step`` loop hooks."""

    #: ``global_step`` stored in the last checkpoint loaded into this module (None: none loaded).
    _checkpoint_step: int | None = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Remember the checkpoint's ``global_step``: ``validate``/``test`` do not restore the fit loop, so
        ``trainer.global_step`` is 0 there."""
        step = checkpoint.get("global_step")
        self._checkpoint_step = int(step) if step is not None else None

    @property
    def evaluation_step(self) -> int:
        """The training step that the weights being evaluated come from, which labels outputs and metrics.

        During ``fit``: ``global_step``. In ``validate``/``test``: the step stored in the checkpoint given by
        ``ckpt_path`` (or loaded with ``load_from_checkpoint`` into a module that has not trained since),
        else ``global_step`` (the weights of a ``fit`` that ran in this process).
        """
        from lightning.pytorch.trainer.states import TrainerFn

        trainer = self.trainer
        if trainer.state.fn == TrainerFn.FITTING or self._checkpoint_step is None:
            return self.global_step
        if trainer.ckpt_path is not None or self.global_step == 0:
            return self._checkpoint_step
        return self.global_step

    @torch.no_grad()
    def generate_and_grade(
        self,
        batch: dict[str, Any],
        greedy: bool = True,
        num_samples: int = 1,
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        seed_per_group: bool | None = None,
    ) -> RolloutBatch | None:
        """Greedily decode (or sample ``num_samples`` completions) for an evaluation batch and grade them.

        Generation goes through :meth:`make_rollout` (same seeding and ZeRO-3 lock-step, no log-probs); greedy
        decoding is batched. A row's own
        ``prompt_template`` (a batch field, e.g. the AMC/AIME prompt) replaces the model's template; the chat
        template is applied as in training.

        Args:
            batch: collated problems (``id``, ``problem``, ``answer``; optional ``prompt_template``).
            greedy: greedy decoding; otherwise sampling at ``temperature``/``top_p`` with top-k off.
            num_samples: completions per problem.
            temperature / top_p / max_new_tokens: overrides of the model's ``sampling`` settings.
            seed_per_group: override ``sampling.seed_per_group`` for sampling: True seeds each problem's samples
                from ``(seed, global_step, problem id)``, so they do not depend on the rank or the number of ranks.

        Returns:
            The graded rollout (``verdicts`` set; ``extras["batch_rows"]`` gives each row's position in
            ``batch``), or None when every prompt was longer than ``max_prompt_length``.
        """
        import dataclasses

        overrides: dict[str, Any] = {} if max_new_tokens is None else {"max_new_tokens": int(max_new_tokens)}
        if greedy:  # no RNG involved: decode the whole batch in batched generate calls, not one call per problem
            overrides["seed_per_group"] = False
        else:
            overrides["top_k"] = 0
            if temperature is not None:
                overrides["temperature"] = float(temperature)
            if top_p is not None:
                overrides["top_p"] = float(top_p)
            if seed_per_group is not None:
                overrides["seed_per_group"] = bool(seed_per_group)
        sampling = dataclasses.replace(self.sampling, **overrides)
        rollout, _ = self.make_rollout(batch, greedy, num_samples, sampling=sampling, with_logprobs=False)
        if rollout is None:
            return None
        g = max(int(num_samples), 1)
        ids, gids = batch["id"].tolist(), rollout.group_ids.tolist()
        rows, j = [], 0
        for k in range(0, len(gids), g):  # kept rows appear in batch order, each repeated g times
            while ids[j] != gids[k]:
                j += 1
            rows += [j] * g
            j += 1
        rollout.extras["batch_rows"] = rows
        rollout.verdicts = self.verifier.verify_rows(rollout.completions, rollout.answers, rollout_rows(rollout))
        return rollout

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        """Generate and grade one batch into the stage's evaluator (greedy pass@1; pass@k when configured)."""
        from prpo_lightning.evaluation.runner import evaluator_for_trainer

        if stage not in self._evaluators:
            self._evaluators[stage] = evaluator_for_trainer(self.trainer, self.device, stage)
        self._evaluators[stage].run_batch(self, batch)

    def _finish_eval(self, stage: str) -> None:
        """Merge ranks (deduplicating padded repeats), log ``<stage>/<benchmark>/<metric>`` and write the outputs."""
        from prpo_lightning.evaluation.runner import output_dir_for

        evaluator = self._evaluators.pop(stage, None)
        if evaluator is None:
            return
        trainer, step = self.trainer, self.evaluation_step
        out_dir = None if trainer.sanity_checking else output_dir_for(trainer, evaluator.config, stage, step)
        result = evaluator.finalize(
            step=step, stage=stage, output_dir=out_dir, loggers=trainer.loggers,
            is_global_zero=trainer.is_global_zero,
        )
        self.eval_results[stage] = result
        metrics = {f"{stage}/{k}": float(v) for k, v in result["metrics"].items() if k != "accuracy"}
        self.log_dict(metrics, sync_dist=False)  # already identical on every rank
        self.log(f"{stage}/accuracy", float(result["metrics"]["accuracy"]), prog_bar=True, sync_dist=False)
        if step != self.global_step:  # Lightning takes a logged "step" as the loggers' step: the checkpoint's
            self.log("step", float(step), sync_dist=False)
