"""``RolloutHooks``: the rollout half of :class:`~prpo_lightning.module.PRPOModule`.

Prompt formatting, sampling through the rollout engine (``model.engine``) and the engine's lifecycle (set up at
fit/validate/test start, weights synced after updates, torn down at the end), the no-grad log-prob pass, the
sampler-vs-trainer self-check with importance weights, and reference log-probs. Kept apart from the module's
setup and training step the way :class:`~prpo_lightning.evaluation.hooks.EvaluationHooks` keeps evaluation apart;
the attributes it reads (``policy``, ``tokenizer``, ``engine``, ``sampling``, ``optim_cfg``, ``rollout_check``,
``rollout_correction``, ``_reference``, ``_weights_version``, ``_engine_ready``, ``_engine_stale``) are set by the
module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.distributed import all_reduce_max, group_seed
from prpo_lightning.engine import RolloutEngine, RolloutResult
from prpo_lightning.logprobs import batched_logprobs
from prpo_lightning.offpolicy import correction_weights, mismatch_metrics
from prpo_lightning.rollout import SamplingConfig, left_pad, pad_token_id


class RolloutHooks:
    """Mixin of :class:`~prpo_lightning.module.PRPOModule`: rollouts and the rollout engine's lifecycle."""

    def on_fit_end(self) -> None:
        self.teardown_engine()

    def on_validation_end(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "validate":  # not the validation loop of fit
            self.teardown_engine()

    def on_test_end(self) -> None:
        self.teardown_engine()

    def setup_engine(self) -> RolloutEngine:
        """Set the engine up on the placed policy (once) and sync it when the policy's weights changed since (a
        checkpoint load). Called at fit/validate/test start and lazily by :meth:`make_rollout`, on every rank."""
        if not self._engine_ready:
            self.engine.setup(self.policy, self.tokenizer, self.device, lockstep=self._synced_generation())
            self._engine_ready = True
            self._engine_stale = True
        if self._engine_stale:
            self.engine.sync_weights(self.policy, self._weights_version)
            self._engine_stale = False
        return self.engine

    def teardown_engine(self) -> None:
        """Release the engine's resources (fit/validate/test end); the next rollout sets it up again."""
        if self._engine_ready:
            self.engine.teardown()
            self._engine_ready = False

    def sync_engine(self) -> None:
        """Wake the engine (sleep mode) and, when the policy was updated since its last sync, stream the weights
        into it (on every rank: ZeRO-3 shards are gathered collectively)."""
        if not self._engine_ready:
            return
        self.engine.wake_up()
        if self.engine.weight_version != self._weights_version:
            self.engine.sync_weights(self.policy, self._weights_version)

    def format_prompt(self, problem: str, template: str | None = None) -> str:
        """Prompt text for one problem: ``template`` (default: the model's ``prompt_template``), wrapped by the
        chat template when enabled."""
        text = (template or self.hparams.prompt_template).format(problem=problem)
        use_chat = self.hparams.use_chat_template
        if use_chat is None:
            use_chat = getattr(self.tokenizer, "chat_template", None) is not None
        if not use_chat:
            return text
        messages = [{"role": "system", "content": self.hparams.system_prompt}] if self.hparams.system_prompt else []
        messages.append({"role": "user", "content": text})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def make_rollout(
        self,
        batch: dict[str, Any],
        greedy: bool = False,
        num_generations: int | None = None,
        sampling: SamplingConfig | None = None,
        with_logprobs: bool | None = None,
        round_index: int = 0,
    ) -> tuple[RolloutBatch | None, dict[str, float]]:
        """Sample completions for a prompt batch with the engine and compute old (and reference) log-probs.

        Prompts longer than ``sampling.max_prompt_length`` tokens are skipped and counted. Sampling is seeded
        from ``(seed, global_step, prompt id)`` per group (or ``(seed, global_step, rank)`` per batch when
        ``sampling.seed_per_group`` is False and the engine shares one random stream per batch), so reruns and
        resumed runs draw the same completions. The engine is called on every rank, even without prompts (under
        ZeRO-3 it keeps ranks in lock-step); the module keeps its own forward passes in lock-step.

        Args:
            batch: collated prompts (``id``, ``problem``, ``answer``; an optional per-row ``prompt_template``
                replaces the model's template for that row).
            greedy: greedy decoding (evaluation).
            num_generations: completions per prompt (default: ``sampling.num_generations``, or 1 when greedy).
            sampling: overrides the module's sampling settings for this call (evaluation).
            with_logprobs: compute old/reference log-probs and entropies (default: when not greedy).
            round_index: the generation round of this step (dynamic sampling's extra rounds are 1, 2, …); it
                changes the per-batch seed, so an extra round does not replay round 0's random stream.

        Returns:
            ``(rollout, metrics)``; ``rollout`` lives on the CPU and is None when every prompt was skipped.

        Raises:
            StaleWeightsError: the engine was not synced after the policy's last update.
            SamplerMismatchError: the self-check (``rollout_check``, mode ``raise``) failed.
        """
        sampling = sampling or self.sampling
        with_logprobs = (not greedy) if with_logprobs is None else with_logprobs
        g = num_generations or (1 if greedy else sampling.num_generations)
        templates = batch.get("prompt_template") or [None] * len(batch["problem"])
        texts = [self.format_prompt(p, t) for p, t in zip(batch["problem"], templates)]
        token_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        keep = [i for i, ids in enumerate(token_ids) if len(ids) <= sampling.max_prompt_length]
        metrics = {"data/skipped_long_prompts": float(len(texts) - len(keep))}
        engine = self.setup_engine()
        seeds = [group_seed(self.hparams.seed, self.global_step, int(batch["id"][i])) for i in keep]
        batch_seed = None if sampling.seed_per_group else group_seed(self.hparams.seed, self.global_step, -1 - self.global_rank)
        if batch_seed is not None and round_index:
            batch_seed = group_seed(batch_seed, round_index, -1)
        result = engine.generate(
            [torch.tensor(token_ids[i], dtype=torch.long) for i in keep], g, sampling, seeds, greedy,
            record_entropies=with_logprobs and self.records_generation_entropies, batch_seed=batch_seed,
            policy_version=self._weights_version,
        )
        if not keep:
            if self._synced_generation():
                self._lockstep_forwards(0)
            if with_logprobs and self._checks_sampler():  # join the other ranks' self-check reduction
                empty = torch.zeros(0, 1)  # (0, 1)
                self._check_sampler(empty, empty, empty.bool())
            return None, metrics
        rows = torch.tensor(keep).repeat_interleave(g)  # (B,) prompt row of each completion
        prompt_ids, prompt_mask = left_pad([token_ids[i] for i in keep], pad_token_id(self.tokenizer), self.device)
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0)  # (B, P)
        rollout = RolloutBatch(
            prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(),
            completion_ids=result.completion_ids.cpu(), completion_mask=result.completion_mask.cpu(),
            group_ids=batch["id"].cpu()[rows],
            problems=[batch["problem"][i] for i in rows.tolist()],
            answers=[batch["answer"][i] for i in rows.tolist()],
            completions=self.tokenizer.batch_decode(result.completion_ids, skip_special_tokens=True),
            truncated=result.truncated.cpu(),
            entropies=result.entropies.cpu() if result.entropies is not None else None,
        )
        if with_logprobs:
            metrics.update(self._add_logprobs(rollout, prompt_ids, prompt_mask, result))
        elif self._synced_generation():
            self._lockstep_forwards(0)
        return rollout, metrics

    def _add_logprobs(self, rollout: RolloutBatch, p_ids: Tensor, p_mask: Tensor, result: RolloutResult) -> dict[str, float]:
        """Old log-probs and entropies (no-grad pass, when :attr:`needs_rollout_logprobs`), the sampler-vs-trainer
        self-check and importance weights (when the engine returned log-probs), and reference log-probs."""
        micro_size = self.optim_cfg.micro_batch_size
        temp, share = self.sampling.temperature, self.shares_prompt_prefix
        c_ids, c_mask = result.completion_ids.to(self.device), result.completion_mask.to(self.device)  # (B, T)
        metrics: dict[str, float] = {}
        if self.needs_rollout_logprobs:
            old, ent = batched_logprobs(
                self.policy, p_ids, p_mask, c_ids, c_mask, temp, micro_size, with_entropy=True, share_prompts=share
            )  # (B, T), (B, T)
            rollout.old_logprobs, rollout.entropies = old.cpu(), ent.cpu()
            if self._synced_generation():
                self._lockstep_forwards(math.ceil(c_ids.shape[0] / micro_size))
        if self._checks_sampler():
            if result.sampler_logprobs is None:
                raise RuntimeError(f"{type(self.engine).__name__} declares sampler_logprobs but returned none")
            sampler = result.sampler_logprobs.cpu()  # (B, T)
            metrics.update(self._check_sampler(sampler, rollout.old_logprobs, rollout.completion_mask))
            if self.rollout_correction.mode is not None:
                weights, is_metrics = correction_weights(
                    rollout.old_logprobs, sampler, rollout.completion_mask, self.rollout_correction
                )  # (B, T)
                rollout.is_weights = weights
                metrics.update(is_metrics)
        if self._reference is not None:
            ref, _ = batched_logprobs(
                self._reference, p_ids, p_mask, c_ids, c_mask, temp, micro_size, with_entropy=False, share_prompts=share
            )
            rollout.ref_logprobs = ref.cpu()
        return metrics

    def _checks_sampler(self) -> bool:
        """Whether rollouts run the sampler-vs-trainer self-check (the same on every rank)."""
        return self.engine.capabilities.sampler_logprobs and self.needs_rollout_logprobs

    def _check_sampler(self, sampler: Tensor, old: Tensor, mask: Tensor) -> dict[str, float]:
        """The self-check on the global batch: metrics all-reduced over ranks (every rank calls, even without
        rollouts), so all ranks raise or warn together instead of one raising while the others wait."""
        mismatch = mismatch_metrics(sampler, old, mask, across_ranks=True)
        self.rollout_check(mismatch, step=self.global_step)
        return mismatch

    def _lockstep_forwards(self, num_calls: int) -> None:
        """ZeRO-3: make up the difference to the most policy forward passes any rank made (parameters are
        gathered collectively in every forward, so all ranks must make the same number)."""
        extra = all_reduce_max(num_calls) - num_calls
        for _ in range(extra):
            with torch.no_grad():
                self.policy(input_ids=self._dummy_ids())

    def _dummy_ids(self) -> Tensor:
        return torch.full((1, 1), pad_token_id(self.tokenizer), dtype=torch.long, device=self.device)

    def _synced_generation(self) -> bool:
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        zero_stage = getattr(strategy, "zero_stage_3", False)
        return bool(zero_stage) and self.trainer.world_size > 1
