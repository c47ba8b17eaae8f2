"""``PRPOModule``: critic-free policy optimisation with pluggable engine, verifier, segmenter, PRM and aligner.

:meth:`PRPOModule.training_step` reads top to bottom: the :class:`~prpo_lightning.rollout.collector.RolloutCollector`
samples, scores and aligns a batch (``docs/architecture.md``), the :class:`~prpo_lightning.training.outcome.SkipBudget`
decides whether it updates, the :class:`~prpo_lightning.training.updater.PolicyUpdater` runs the PPO update.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from prpo_lightning.batch import RolloutBatch, StepContext
from prpo_lightning.config import (
    AsyncRolloutConfig, LoRAConfig, LossConfig, MismatchCheck, OptimConfig, RefSyncConfig, RewardShapingConfig, RolloutCorrectionConfig,
    SamplingConfig, check_module_settings,
)
from prpo_lightning.evaluation.benchmarks import PAPER_PROMPT
from prpo_lightning.evaluation.stages import EvaluationStages
from prpo_lightning.callbacks.async_rollouts import AsyncRolloutsHooks
from prpo_lightning.rollout.async_rollouts import AsyncRollouts, pipeline_for
from prpo_lightning.rollout.collector import PromptFormat, RolloutCollector
from prpo_lightning.rollout.engine import RolloutEngine
from prpo_lightning.rollout.engines import AutoEngine
from prpo_lightning.rollout.sampling import pad_token_id
from prpo_lightning.runtime.checkpoint import collect_rng_states, restore_rng_states
from prpo_lightning.runtime.models import load_tokenizer
from prpo_lightning.runtime.zero3 import unpartitioned_copy, zero3_config
from prpo_lightning.scoring.aligner import AdvantageAligner
from prpo_lightning.scoring.combined import combine_verifiers
from prpo_lightning.scoring.pipeline import Scorer
from prpo_lightning.scoring.prm import ProcessRewardModel
from prpo_lightning.scoring.segmenter import Segmenter
from prpo_lightning.scoring.verifier import OutcomeVerifier
from prpo_lightning.training.lora import check_adapter_state, trainable_state_keys
from prpo_lightning.training.schedule import LRSchedule
from prpo_lightning.training.updater import PolicyUpdater, deepspeed_engine
from prpo_lightning.training.outcome import RankReport, SkipBudget, advance_without_update
from prpo_lightning.training.plan import PassPlan, combine_needs, needs_reference_model, plan_passes
from prpo_lightning.training.policy import build_policy
from prpo_lightning.training.refsync import ReferenceSync
from prpo_lightning.training.timing import StepTimer, trained_tokens


class PRPOModule(L.LightningModule):
    """RL post-training of a causal LM with process-aware, outcome-anchored advantages.

    Args:
        verifier: grades each completion against its own gold answer (a list is combined with ``reward_weights``).
        aligner / segmenter / prm: token advantages ``(B, T)`` from rewards and step scores; steps and their scores.
        policy / policy_config / tokenizer: the policy's Hugging Face id, local path or builtin name, or a config dict
            (with ``model_type``) of a random model (tests); the tokenizer's id/path (default: ``policy``).
        dtype / gradient_checkpointing / sampling / loss / optim: parameter dtype, activation checkpointing, and
            :mod:`prpo_lightning.config` groups (every field is documented there).
        prompt_template / system_prompt / use_chat_template: how a problem becomes a prompt.
        seed: seeds sampling (per group and step), mini-batch shuffling and ``policy_config`` initialisation.
        on_prm_error: ``raise`` (a ``PRMError`` stops training) or ``skip`` (the update is skipped and counted).
        max_consecutive_skips: batches in a row that may update nothing; one more raises ``SkippedBatchesError``.
        component_timeout_s: seconds a verifier or PRM call may take (default one hour; None: no limit).
        engine: the rollout engine (default :class:`~prpo_lightning.rollout.engines.AutoEngine`); rollout_correction,
            rollout_check, reward_shaping, reward_weights, ref_sync, lora, async_rollout: see the config.

    Raises:
        ValueError / TypeError: an inconsistent setting or invalid component ``needs``, before any model loads.
    """

    def __init__(
        self,
        verifier: OutcomeVerifier | list[OutcomeVerifier],
        aligner: AdvantageAligner,
        segmenter: Segmenter | None = None,
        prm: ProcessRewardModel | None = None,
        policy: str | None = None,
        policy_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        sampling: SamplingConfig = SamplingConfig(),
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        prompt_template: str = PAPER_PROMPT,
        system_prompt: str | None = "Please reason step by step, and put your final answer within \\boxed{}.",
        use_chat_template: bool | None = None,
        seed: int = 0,
        on_prm_error: Literal["raise", "skip"] = "raise",
        max_consecutive_skips: int = 3,
        component_timeout_s: float | None = 3600.0,
        engine: RolloutEngine | None = None,
        rollout_correction: RolloutCorrectionConfig = RolloutCorrectionConfig(),
        rollout_check: MismatchCheck = MismatchCheck(),
        reward_shaping: RewardShapingConfig = RewardShapingConfig(),
        reward_weights: list[float] | None = None,
        ref_sync: RefSyncConfig = RefSyncConfig(),
        lora: LoRAConfig | None = None,
        async_rollout: AsyncRolloutConfig = AsyncRolloutConfig(),
    ) -> None:
        super().__init__()
        verifier = combine_verifiers(verifier, reward_weights)
        self.needs = combine_needs(verifier, aligner, segmenter, prm)
        check_module_settings(
            policy=policy, policy_config=policy_config, tokenizer=tokenizer, on_prm_error=on_prm_error, lora=lora,
            component_timeout_s=component_timeout_s, ref_sync=ref_sync, num_generations=sampling.num_generations,
            aligner_name=type(aligner).__name__,
            group_relative=self.needs.group_relative, process_scores=self.needs.process_scores,
            has_segmenter_and_prm=segmenter is not None and prm is not None,
            has_reference=needs_reference_model(self.needs, loss))
        self.save_hyperparameters(ignore=["verifier", "aligner", "segmenter", "prm", "engine"])
        self.verifier, self.aligner, self.segmenter, self.prm = verifier, aligner, segmenter, prm
        self.engine: RolloutEngine = engine if engine is not None else AutoEngine()
        self.engine.check_sampling(sampling)  # e.g. vLLM's max_model_len against the sampling lengths, before loading
        rollout_check.check_settings(sampling.top_p, sampling.top_k, dtype, self.engine.capabilities.sampler_logprobs)
        self.sampling, self.loss_cfg, self.optim_cfg, self.async_cfg = sampling, loss, optim, async_rollout
        self.reward_shaping, self.rollout_check, self.rollout_correction = reward_shaping, rollout_check, rollout_correction
        self.skip_budget = SkipBudget(max_consecutive_skips)
        self.lr_schedule = LRSchedule(optim, sampling.num_generations)  # max_steps and the rate, in optimizer steps
        self.ref_sync = ReferenceSync(ref_sync)  # counts optimizer steps; mixes the policy into the reference
        self.evaluation = EvaluationStages()
        self.automatic_optimization = False
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        object.__setattr__(self, "_reference", None)  # frozen, kept outside the module's parameters
        # the forward passes of a step (ZeRO-3 with several ranks plans them again, in lock-step, in configure_model)
        self.plan: PassPlan = plan_passes(self.needs, self.engine.capabilities, loss, optim, gradient_checkpointing,
                                          asynchronous=async_rollout.enabled)
        self.collector: RolloutCollector | None = None
        self.rollouts: RolloutCollector | AsyncRollouts | None = None  # the collector, or the async pipeline over it
        self.updater: PolicyUpdater | None = None  # the three built in configure_model
        self.step_metrics: dict[str, float] = {}
        self.timer = StepTimer()  # train/time/* and train/perf/* (prpo_lightning/training/timing.py)

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        """Load tokenizer, policy and (if planned) the frozen reference; plan the passes; build the collector and the
        updater. Idempotent."""
        if self.policy is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer or hp.policy)
        for component in (self.segmenter, self.prm):
            if component is not None and hasattr(component, "setup_tokenizer"):
                component.setup_tokenizer(self.tokenizer)
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        if bool(getattr(strategy, "zero_stage_3", False)) and self.trainer.world_size > 1:
            self.plan = plan_passes(self.needs, self.engine.capabilities, self.loss_cfg, self.optim_cfg,
                                    hp.gradient_checkpointing, lockstep=True, asynchronous=self.async_cfg.enabled)
        rank_zero_info(self.plan.describe())
        self.policy, reference = build_policy(hp.policy, hp.policy_config, hp.dtype, hp.seed, self.sampling,
                                              hp.gradient_checkpointing, hp.lora, zero3_config(self._trainer),
                                              self.plan.reference)
        object.__setattr__(self, "_reference", reference)
        scorer = Scorer(self.verifier, self.aligner, self.segmenter, self.prm, self.tokenizer, self.reward_shaping,
                        self.sampling.max_new_tokens, hp.on_prm_error, hp.component_timeout_s)
        self.collector = RolloutCollector(
            self.engine, self.policy, self._reference, self.tokenizer, scorer, self.plan, self.sampling,
            PromptFormat(hp.prompt_template, hp.system_prompt, hp.use_chat_template), hp.seed,
            self.optim_cfg.micro_batch_size, self.rollout_check, self.rollout_correction)
        self.rollouts = pipeline_for(self.collector, self.async_cfg, self.needs, hp.seed)  # sync: the collector
        self.updater = PolicyUpdater(
            self.policy, self.loss_cfg, self.optim_cfg, self.plan, self.sampling.temperature,
            self.sampling.max_new_tokens, hp.seed, pad_token_id(self.tokenizer), backward=self.manual_backward,
            clip_gradients=self.clip_gradients, on_optimizer_step=lambda: self.after_optimizer_step())

    def after_optimizer_step(self) -> None:
        """Count a weight update (the engine syncs to it) and mix the policy into the reference under ``ref_sync``."""
        self.collector.on_optimizer_step()
        self.ref_sync.after_optimizer_step(self.policy, self._reference)

    def _start_stage(self) -> None:
        """Place the frozen models and set the engine up (fit/validate/test start)."""
        if self._reference is not None:
            self._reference.to(self.device)
        if self.prm is not None:
            self.prm.setup(self.device)
        self.collector.setup_engine(self.device)

    def on_fit_start(self) -> None:
        self.timer.reset()
        if self._reference is None and self.plan.reference and zero3_config(self._trainer) is not None:
            object.__setattr__(self, "_reference", unpartitioned_copy(self.policy, self.device))
            self.collector.reference = self._reference
        self.ref_sync.apply_pending(self._reference)  # a resumed synced reference (ZeRO-3: built just above)
        self._start_stage()

    on_validation_start = on_test_start = _start_stage  # the frozen models and the engine, as at fit start

    def on_fit_end(self) -> None:  # (validate/test: on_validation_end below, on_test_end)
        self.collector.teardown_engine()

    def on_validation_end(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "validate":  # not the validation loop of fit
            self.collector.teardown_engine()

    on_test_end = on_fit_end

    def configure_callbacks(self) -> list[L.Callback]:  # checkpoints and shutdown of the async pipeline
        return [AsyncRolloutsHooks()] if self.async_cfg.enabled else []

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        sched = self.lr_schedule.build(opt, self.trainer)  # over max_steps optimizer steps (training/schedule.py)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:  # after a resume's restore: the settings given now take effect
        self.lr_schedule.on_train_start(self.trainer, self.optimizers(), self.lr_schedulers())

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store this rank's RNG states, the skip budget, the synced reference and (LoRA) the adapters only."""
        checkpoint["prpo_rng_states"] = collect_rng_states()
        checkpoint["prpo_skip_budget"] = self.skip_budget.state_dict()
        checkpoint["prpo_ref_sync"] = self.ref_sync.state_dict(self._reference)
        checkpoint["prpo_lr_schedule"] = self.lr_schedule.state_dict()
        if self.hparams.lora is not None and "state_dict" in checkpoint:
            adapters = trainable_state_keys(self.policy, "policy.")
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in adapters}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.evaluation.on_load_checkpoint(checkpoint)  # the checkpoint's step labels validate/test outputs
        if self.collector is not None:  # the weights load after this hook: the engine syncs at the next stage start
            self.collector.on_checkpoint_loaded()
        if checkpoint.get("prpo_rng_states") is not None:
            restore_rng_states(checkpoint["prpo_rng_states"])
        self.lr_schedule.load_state_dict(checkpoint.get("prpo_lr_schedule"))
        self.skip_budget.load_state_dict(checkpoint.get("prpo_skip_budget"))
        if self.hparams.lora is not None and "state_dict" in checkpoint:  # adapters only: complete with the base
            check_adapter_state(self.policy, checkpoint["state_dict"])
            checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}
        if checkpoint.get("prpo_ref_sync") is not None:  # under ZeRO-3 the reference is built at fit start
            self.ref_sync.load_state_dict(checkpoint["prpo_ref_sync"], self._reference)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ctx = self.step_context()
        self.timer.start()
        collected = self.rollouts.collect(batch, ctx)  # generate → score (→ refill, under dynamic sampling)
        if collected is None:  # asynchronous rollouts: the pipeline is still filling, nothing to train on yet
            return None
        report = RankReport(collected.no_prompts, collected.prm_error, collected.no_signal)
        outcome = self.skip_budget.decide(report, ctx.step, self.sampling.max_prompt_length)
        metrics = {**collected.metrics, "faults/prm_errors": float(collected.prm_error is not None),
                   **self.skip_budget.metrics()}
        if not outcome.update:  # on every rank: the step and the LR schedule move on, the weights do not
            metrics["lr"] = float(self.lr_schedulers().get_last_lr()[0])
            advance_without_update(self.trainer, self.lr_schedulers())
            self.rollouts.sync_engine()  # wakes the engine; the weights did not change, so nothing is streamed
            self.log_step_metrics(self.timer.finish(metrics))
            return None
        self.timer.mark("update")
        metrics.update(self.update_policy(collected.rollout))  # a rank without rows joins with zero-weighted passes
        self.timer.mark("sync")
        self.rollouts.sync_engine()
        trained = trained_tokens(collected.rollout, self.loss_cfg, self.optim_cfg.ppo_epochs)
        self.log_step_metrics(self.timer.finish(metrics, trained))  # times maxed, tokens summed over ranks
        if collected.rollout is not None:
            self.log_dict({"reward": metrics["reward/mean"], "acc": metrics["accuracy"]}, prog_bar=True, logger=False)
        return None

    def update_policy(self, rollout: RolloutBatch | None) -> dict[str, float]:
        """The PPO update of this rank's rollout (all ranks join); the global batch's loss statistics."""
        return self.updater.update(rollout, self.optimizers(), self.lr_schedulers(), self.global_step, self.device,
                                   deepspeed_engine(self.trainer), self.lr_schedule.updates_left(self.trainer))

    def log_step_metrics(self, metrics: dict[str, float]) -> None:
        """Log ``train/<key>`` metrics; :attr:`step_metrics` holds exactly this step's (callbacks read it)."""
        self.step_metrics = {f"train/{k}": float(v) for k, v in metrics.items()}
        self.log_dict(self.step_metrics, on_step=True, on_epoch=False)

    def step_context(self) -> StepContext:
        """Where this step runs (step, rank, world size, device, datamodule)."""
        trainer = self._trainer
        return StepContext(self.global_step, self.global_rank, trainer.world_size if trainer is not None else 1,
                           self.device, getattr(trainer, "datamodule", None) if trainer is not None else None)

    # ------------------------------------------------------------------ evaluation
    def generate_and_grade(self, batch: dict[str, Any], greedy: bool = True, num_samples: int = 1,
                           **overrides: Any) -> RolloutBatch | None:
        """Decode and grade an evaluation batch (:meth:`RolloutCollector.generate_and_grade`)."""
        return self.collector.generate_and_grade(batch, self.step_context(), greedy, num_samples, **overrides)

    @property
    def eval_results(self) -> dict[str, dict[str, Any]]:
        """The last finished evaluation of each stage (``val``, ``test``)."""
        return self.evaluation.results

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.run_batch(self, self.trainer, self.device, batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.run_batch(self, self.trainer, self.device, batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.evaluation.finish(self.trainer, "val", self.global_step, self.log)

    def on_test_epoch_end(self) -> None:
        self.evaluation.finish(self.trainer, "test", self.global_step, self.log)
