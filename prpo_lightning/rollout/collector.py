"""``RolloutCollector``: everything between a prompt batch and a scored rollout.

It owns the rollout engine's lifecycle (set up on the placed policy, weights synced after every update and checked by
version, asleep during scoring and the update, torn down at the end), the one generate → score round
(:meth:`~RolloutCollector.collect_round`), dynamic sampling's extra rounds (:meth:`~RolloutCollector.collect`), and
graded generation for evaluation (:meth:`~RolloutCollector.generate_and_grade`). Which extra forward passes run is
read from the :class:`~prpo_lightning.training.plan.PassPlan`, never re-derived.

Shapes: ``N`` prompts, ``G`` completions per prompt, ``B = N·G``, ``P`` padded prompt length, ``T`` completion length.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.batch import Round, RolloutBatch, StepContext, rollout_rows
from prpo_lightning.config import MismatchCheck, RolloutCorrectionConfig, SamplingConfig
from prpo_lightning.rollout.dynamic_sampling import fill_batch
from prpo_lightning.rollout.engine import RolloutEngine, SampleRequest
from prpo_lightning.rollout.offpolicy import correction_weights, mismatch_metrics
from prpo_lightning.rollout.prompts import PromptFormat
from prpo_lightning.rollout.sampling import left_pad, pad_token_id
from prpo_lightning.runtime.distributed import all_reduce_max, group_seed
from prpo_lightning.scoring.pipeline import Scorer, guarded_call
from prpo_lightning.training.logprobs import batched_logprobs
from prpo_lightning.training.packing import micro_batches, row_lengths
from prpo_lightning.training.plan import PassPlan


@dataclass
class Collected:
    """What a training step collected (after dynamic sampling's extra rounds, when on).

    Attributes:
        rollout: the scored rollout this rank trains on (None: nothing to train on).
        prm_error: the PRM failure that made this rank skip (``on_prm_error: skip``), or None.
        no_prompts: no prompt of this rank fitted ``max_prompt_length``.
        no_signal: dynamic sampling kept no group on any rank (the same on every rank).
        metrics: the step's rollout and scoring metrics.
    """

    rollout: RolloutBatch | None
    prm_error: str | None
    no_prompts: bool
    no_signal: bool
    metrics: dict[str, float]


@dataclass
class Sampled:
    """A sampled batch before the trainer's passes and scoring.

    Attributes:
        rollout: the sampled rows (on the CPU), or None when no prompt fitted ``max_prompt_length``.
        sampler_logprobs: ``(B, T)`` the engine's log-prob of every sampled token, or None (not returned).
        metrics: the sampling metrics (``data/skipped_long_prompts``; later the passes' ``time/*``).
    """

    rollout: RolloutBatch | None
    sampler_logprobs: Tensor | None
    metrics: dict[str, float]


class RolloutCollector:
    """Generates and scores rollouts for a :class:`~prpo_lightning.module.PRPOModule` (one per module).

    Args:
        engine: the rollout engine.
        policy: the trained policy (the engine's weights come from it; the log-prob passes run it).
        reference: the frozen reference model, or None.
        tokenizer: the policy's tokenizer.
        scorer: the scoring stage.
        plan: the forward passes of a step.
        sampling: the sampling settings.
        prompt_format: how problems become prompts.
        seed: the run seed (sampling is seeded from ``(seed, step, prompt id)``).
        micro_batch_size: rows per no-grad log-prob forward pass.
        rollout_check: the sampler-vs-trainer self-check.
        rollout_correction: the importance-sampling correction.
    """

    def __init__(
        self, engine: RolloutEngine, policy: torch.nn.Module, reference: Any, tokenizer: Any, scorer: Scorer,
        plan: PassPlan, sampling: SamplingConfig, prompt_format: PromptFormat, seed: int, micro_batch_size: int,
        rollout_check: MismatchCheck, rollout_correction: RolloutCorrectionConfig,
    ) -> None:
        self.engine, self.policy, self.reference, self.tokenizer = engine, policy, reference, tokenizer
        self.scorer, self.plan, self.sampling, self.prompt_format = scorer, plan, sampling, prompt_format
        self.seed, self.micro_batch_size = seed, micro_batch_size
        self.rollout_check, self.rollout_correction = rollout_check, rollout_correction
        self.weights_version = 0  # optimizer steps + checkpoint loads so far; the engine must hold this version
        self.engine_ready = False  # engine.setup was called (and teardown not since)
        self.engine_stale = False  # the policy's weights changed outside an update (a checkpoint load)
        self.asleep = False
        self.may_sleep = True  # False under asynchronous rollouts: the engine samples while the policy updates

    # ------------------------------------------------------------------ engine lifecycle
    def setup_engine(self, device: torch.device) -> RolloutEngine:
        """Set the engine up on the placed policy (once) and sync it when the policy's weights changed since (a
        checkpoint load). Called at fit/validate/test start and before every rollout, on every rank."""
        if not self.engine_ready:  # setup loads the policy's current weights (the engine contract): no sync follows
            self.engine.setup(self.policy, self.tokenizer, device, lockstep=self.plan.lockstep)
            self.engine.set_weight_version(self.weights_version)
            self.engine_ready, self.engine_stale = True, False
        if self.engine_stale:
            self.engine.sync_weights(self.policy, self.weights_version)
            self.engine_stale = False
        return self.engine

    def sync_engine(self) -> None:
        """Wake the engine (sleep mode) and, when the policy was updated since its last sync, stream the weights
        into it (on every rank: ZeRO-3 shards are gathered collectively)."""
        if not self.engine_ready:
            return
        if self.asleep:
            self.engine.wake_up()
            self.asleep = False
        if self.engine.weight_version != self.weights_version:
            self.engine.sync_weights(self.policy, self.weights_version)

    def sleep_engine(self) -> None:
        """Free the engine's memory for scoring and the update, when it supports sleep mode."""
        if self.may_sleep and self.engine_ready and self.engine.capabilities.supports_sleep and not self.asleep:
            self.engine.sleep()
            self.asleep = True

    def teardown_engine(self) -> None:
        """Release the engine's resources (fit/validate/test end); the next rollout sets it up again."""
        if self.engine_ready:
            self.engine.teardown()
            self.engine_ready, self.asleep = False, False

    def on_optimizer_step(self) -> None:
        """Count one weight update; :meth:`sync_engine` then brings the engine to this version."""
        self.weights_version += 1

    def on_checkpoint_loaded(self) -> None:
        """The policy's weights are replaced after this call: the engine syncs at the next stage start."""
        self.weights_version += 1
        self.engine_stale = True

    # ------------------------------------------------------------------ one step
    def collect(self, batch: dict[str, Any], ctx: StepContext) -> Collected:
        """Generate and score the loader's batch, then refill it under dynamic sampling (a collective call)."""
        first = self.collect_round(batch, ctx, 0)
        if not self.sampling.dynamic_sampling.enabled:
            return Collected(first.rollout, first.prm_error, not first.fitted, False, first.metrics)
        rollout, prm_error, no_prompts, no_signal = fill_batch(
            first, batch, self.sampling.dynamic_sampling, ctx, self.seed,
            lambda prompts, round_index: self.collect_round(prompts, ctx, round_index), pad_token_id(self.tokenizer),
        )
        return Collected(rollout, prm_error, no_prompts, no_signal, first.metrics)

    def collect_round(self, batch: dict[str, Any], ctx: StepContext, round_index: int) -> Round:
        """One generate → score round: wake and sync the engine, sample (with the planned log-prob passes), put the
        engine to sleep, then grade, segment, score and align. Times ``time/rollout_s`` (= ``generate_s`` +
        ``old_logprobs_s`` + ``ref_logprobs_s``) and ``time/scoring_s``; counts ``perf/sampled_tokens``."""
        t0 = time.perf_counter()
        self.sync_engine()
        rollout, metrics = self.make_rollout(batch, ctx, round_index=round_index)
        self.sleep_engine()
        t1 = time.perf_counter()
        passes = metrics.get("time/old_logprobs_s", 0.0) + metrics.get("time/ref_logprobs_s", 0.0)
        metrics.update({"time/generate_s": t1 - t0 - passes,  # all of the rollout but the log-prob passes
                        "perf/sampled_tokens": float(rollout.completion_mask.sum()) if rollout is not None else 0.0})
        prm_error = None
        if rollout is not None:
            rollout, prm_error, score_metrics = self.scorer.score(rollout, ctx)
            metrics.update(score_metrics)
        fitted = rollout is not None or prm_error is not None
        metrics.update({"time/rollout_s": t1 - t0, "time/scoring_s": time.perf_counter() - t1})
        return Round(rollout, prm_error, metrics, fitted)

    # ------------------------------------------------------------------ sampling
    def make_rollout(
        self, batch: dict[str, Any], ctx: StepContext, greedy: bool = False, num_generations: int | None = None,
        sampling: SamplingConfig | None = None, with_logprobs: bool | None = None, round_index: int = 0,
        tokenizer: Any = None,
    ) -> tuple[RolloutBatch | None, dict[str, float]]:
        """Sample completions for a prompt batch with the engine and run the planned log-prob passes.

        Prompts longer than ``sampling.max_prompt_length`` tokens are skipped and counted. Sampling is seeded from
        ``(seed, step, prompt id)`` per group (or ``(seed, step, rank)`` per batch when ``sampling.seed_per_group``
        is False), so reruns and resumed runs draw the same completions. The engine is called on every rank, even
        without prompts (under ZeRO-3 it keeps ranks in lock-step).

        Args:
            batch: collated prompts (``id``, ``problem``, ``answer``; an optional per-row ``prompt_template``).
            ctx: the step.
            greedy: greedy decoding (evaluation).
            num_generations: completions per prompt (default: ``sampling.num_generations``, or 1 when greedy).
            sampling: overrides the collector's sampling settings for this call (evaluation).
            with_logprobs: run the planned log-prob passes (default: when not greedy).
            round_index: dynamic sampling's extra rounds (1, 2, …) change the per-batch seed.
            tokenizer: the tokenizer that encodes prompts and decodes completions (default: the policy's; the
                asynchronous pipeline passes its own copy, since encoding is not thread-safe).

        Returns:
            ``(rollout, metrics)``; ``rollout`` lives on the CPU and is None when every prompt was skipped.

        Raises:
            StaleWeightsError: the engine was not synced after the policy's last update.
            SamplerMismatchError: the self-check (``rollout_check``, mode ``raise``) failed.
        """
        with_logprobs = (not greedy) if with_logprobs is None else with_logprobs
        sampled = self.sample(batch, ctx, greedy, num_generations, sampling,
                              with_logprobs and self.plan.generation_entropies, round_index, tokenizer=tokenizer)
        if with_logprobs:
            sampled.metrics.update(self.add_passes(sampled, ctx))
        elif self.plan.lockstep:
            self._lockstep_forwards(0, ctx.device)
        return sampled.rollout, sampled.metrics

    def sample(
        self, batch: dict[str, Any], ctx: StepContext, greedy: bool = False, num_generations: int | None = None,
        sampling: SamplingConfig | None = None, record_entropies: bool = False, round_index: int = 0,
        policy_version: int | None = None, tokenizer: Any = None,
    ) -> Sampled:
        """The engine's part of :meth:`make_rollout` (no trainer pass): format, tokenize, seed and sample.

        The engine must be set up (:meth:`setup_engine`, on the main thread); :mod:`~prpo_lightning.rollout.async_rollouts`
        calls this from its background thread when the engine holds its own weights, with the ``policy_version``
        the engine held when the batch was launched (default: the current one).
        """
        version = self.weights_version if policy_version is None else int(policy_version)
        tok = self.tokenizer if tokenizer is None else tokenizer
        sampling = sampling or self.sampling
        g = num_generations or (1 if greedy else sampling.num_generations)
        templates = batch.get("prompt_template") or [None] * len(batch["problem"])
        texts = [self.prompt_format(p, tok, t) for p, t in zip(batch["problem"], templates)]
        token_ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        keep = [i for i, ids in enumerate(token_ids) if len(ids) <= sampling.max_prompt_length]
        metrics = {"data/skipped_long_prompts": float(len(texts) - len(keep))}
        engine = self.setup_engine(ctx.device)
        batch_seed = None if sampling.seed_per_group else group_seed(self.seed, ctx.step, -1 - ctx.rank)
        if batch_seed is not None and round_index:
            batch_seed = group_seed(batch_seed, round_index, -1)
        result = engine.generate(SampleRequest(
            prompts=[torch.tensor(token_ids[i], dtype=torch.long) for i in keep], num_generations=g,
            sampling=sampling, seeds=[group_seed(self.seed, ctx.step, int(batch["id"][i])) for i in keep],
            greedy=greedy, record_entropies=record_entropies, batch_seed=batch_seed, policy_version=version,
        ))
        if not keep:
            return Sampled(None, None, metrics)
        rows = torch.tensor(keep).repeat_interleave(g)  # (B,) prompt row of each completion
        prompt_ids, prompt_mask = left_pad([token_ids[i] for i in keep], pad_token_id(tok), ctx.device)
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0)  # (B, P)
        rollout = RolloutBatch(
            prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(),
            completion_ids=result.completion_ids.cpu(), completion_mask=result.completion_mask.cpu(),
            group_ids=batch["id"].cpu()[rows],
            problems=[batch["problem"][i] for i in rows.tolist()],
            answers=[batch["answer"][i] for i in rows.tolist()],
            completions=tok.batch_decode(result.completion_ids, skip_special_tokens=True),
            truncated=result.truncated.cpu(),
            entropies=result.entropies.cpu() if result.entropies is not None else None,
            policy_versions=torch.full((len(rows),), version, dtype=torch.long),
        )
        sampler = result.sampler_logprobs.cpu() if result.sampler_logprobs is not None else None  # (B, T)
        return Sampled(rollout, sampler, metrics)

    def add_passes(self, sampled: Sampled, ctx: StepContext) -> dict[str, float]:
        """The planned trainer passes of a sampled batch (a collective call under ZeRO-3 and the self-check): old
        log-probs and entropies, the sampler-vs-trainer self-check and importance weights (when the engine returned
        log-probs), and reference log-probs.

        The self-check compares the sampler with the trainer at the same weights: it runs when every row was sampled
        at the policy's current version, and is only measured for rows sampled earlier (asynchronous rollouts),
        whose importance weights then correct the staleness too.
        """
        rollout = sampled.rollout
        if rollout is None:
            if self.plan.lockstep:
                self._lockstep_forwards(0, ctx.device)
            if self.plan.sampler_check:  # join the other ranks' self-check reduction
                empty = torch.zeros(0, 1)  # (0, 1)
                self._check_sampler(empty, empty, empty.bool(), ctx.step, check=True)
            return {}
        micro, temp, share = self.micro_batch_size, self.sampling.temperature, self.plan.share_prompt_prefix
        p_ids, p_mask = rollout.prompt_ids.to(ctx.device), rollout.prompt_mask.to(ctx.device)  # (B, P)
        c_ids, c_mask = rollout.completion_ids.to(ctx.device), rollout.completion_mask.to(ctx.device)  # (B, T)
        batching = {"micro_batch_tokens": self.plan.micro_batch_tokens, "packing": self.plan.packing}
        metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        if self.plan.old_logprobs:
            old, ent = batched_logprobs(
                self.policy, p_ids, p_mask, c_ids, c_mask, temp, micro, with_entropy=True, share_prompts=share,
                **batching,
            )  # (B, T), (B, T)
            rollout.old_logprobs, rollout.entropies = old.cpu(), ent.cpu()
            if self.plan.lockstep:
                lengths = row_lengths(p_mask, c_mask)  # (B,)
                self._lockstep_forwards(len(micro_batches(lengths, micro, self.plan.micro_batch_tokens,
                                                          self.plan.packing)), ctx.device)
            metrics["time/old_logprobs_s"] = time.perf_counter() - t0
        if self.plan.sampler_check:
            if sampled.sampler_logprobs is None:
                raise RuntimeError(f"{type(self.engine).__name__} declares sampler_logprobs but returned none")
            sampler = sampled.sampler_logprobs  # (B, T)
            current = bool((rollout.policy_versions == self.weights_version).all())
            metrics.update(self._check_sampler(sampler, rollout.old_logprobs, rollout.completion_mask, ctx.step,
                                               check=current))
            if self.rollout_correction.mode is not None:
                weights, is_metrics = correction_weights(
                    rollout.old_logprobs, sampler, rollout.completion_mask, self.rollout_correction
                )  # (B, T)
                rollout.is_weights = weights
                metrics.update(is_metrics)
        if self.reference is not None:
            t0 = time.perf_counter()
            ref, _ = batched_logprobs(
                self.reference, p_ids, p_mask, c_ids, c_mask, temp, micro, with_entropy=False, share_prompts=share,
                **batching,
            )
            rollout.ref_logprobs = ref.cpu()
            metrics["time/ref_logprobs_s"] = time.perf_counter() - t0
        return metrics

    def _check_sampler(self, sampler: Tensor, old: Tensor, mask: Tensor, step: int, check: bool) -> dict[str, float]:
        """The self-check on the global batch: metrics all-reduced over ranks (every rank calls, even without
        rollouts), so all ranks raise or warn together; ``check`` False (stale rows) only measures."""
        mismatch = mismatch_metrics(sampler, old, mask, across_ranks=True)
        if all_reduce_max(int(not check)) == 0:  # ranks decide alike: check unless some rank holds stale rows
            self.rollout_check(mismatch, step=step, dtype=self._compute_dtype())
        return mismatch

    def _compute_dtype(self) -> torch.dtype:
        """The dtype of the trainer's log-prob pass: autocast's under mixed precision (``bf16-mixed`` keeps float32
        parameters but computes in bfloat16, with bfloat16's noise), else the parameters'."""
        param = next(self.policy.parameters())
        kind = param.device.type
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
        return param.dtype

    def _lockstep_forwards(self, num_calls: int, device: torch.device) -> None:
        """ZeRO-3: make up the difference to the most policy forward passes any rank made."""
        extra = all_reduce_max(num_calls) - num_calls
        dummy = torch.full((1, 1), pad_token_id(self.tokenizer), dtype=torch.long, device=device)
        for _ in range(extra):
            with torch.no_grad():
                self.policy(input_ids=dummy)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def generate_and_grade(
        self, batch: dict[str, Any], ctx: StepContext, greedy: bool = True, num_samples: int = 1,
        temperature: float | None = None, top_p: float | None = None, max_new_tokens: int | None = None,
        seed_per_group: bool | None = None,
    ) -> RolloutBatch | None:
        """Greedily decode (or sample ``num_samples`` completions) for an evaluation batch and grade them.

        Generation goes through :meth:`make_rollout` (same seeding and lock-step, no log-probs); greedy decoding is
        batched. ``temperature``/``top_p``/``max_new_tokens`` override the sampling settings; ``seed_per_group``
        True seeds each problem's samples from ``(seed, step, problem id)``, independent of ranks.

        Returns:
            The graded rollout (``verdicts`` set; ``extras["batch_rows"]`` gives each row's position in ``batch``),
            or None when every prompt was longer than ``max_prompt_length``.
        """
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
        rollout, _ = self.make_rollout(batch, ctx, greedy, num_samples, sampling=sampling, with_logprobs=False)
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
        verifier = self.scorer.verifier  # under the training's guard and model.component_timeout_s
        rollout.verdicts = guarded_call("verifier", verifier, "verify_batch", lambda: verifier.verify_batch(
            rollout.completions, rollout.answers, rollout_rows(rollout)), rollout.size, self.scorer.component_timeout_s)
        return rollout
