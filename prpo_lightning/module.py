"""``PRPOModule``: critic-free policy optimisation with pluggable engine, verifier, segmenter, PRM and aligner.

One training step reads top to bottom in :meth:`PRPOModule.training_step`:

1. :class:`~prpo_lightning.rollout.collector.RolloutCollector` samples G completions per prompt with the rollout
   engine, runs the planned log-prob passes, then grades, segments, scores and aligns them into ``(B, T)``
   advantages (refilling the batch under dynamic sampling);
2. :class:`~prpo_lightning.training.outcome.SkipBudget` decides whether the step updates, and why;
3. :class:`~prpo_lightning.training.updater.PolicyUpdater` runs ``ppo_epochs`` × mini-batches × micro-batches of
   the loss, then the collector syncs the engine's weights.

Which forward passes run is decided once, when the model is configured (:func:`~prpo_lightning.training.plan.plan_passes`).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from prpo_lightning.batch import RolloutBatch, StepContext
from prpo_lightning.config import (
    LoRAConfig, LossConfig, MismatchCheck, OptimConfig, RefSyncConfig, RewardShapingConfig, RolloutCorrectionConfig,
    SamplingConfig, check_module_settings,
)
from prpo_lightning.evaluation.benchmarks import PAPER_PROMPT
from prpo_lightning.evaluation.stages import EvaluationStages
from prpo_lightning.rollout.collector import PromptFormat, RolloutCollector
from prpo_lightning.rollout.engine import RolloutEngine
from prpo_lightning.rollout.engines import AutoEngine
from prpo_lightning.rollout.sampling import pad_token_id
from prpo_lightning.runtime.checkpoint import collect_rng_states, restore_rng_states
from prpo_lightning.runtime.compat import enable_activation_checkpointing
from prpo_lightning.runtime.models import check_builtin_name, load_causal_lm, load_tokenizer
from prpo_lightning.runtime.zero3 import transformers_zero3, unpartitioned_copy, zero3_config
from prpo_lightning.scoring.aligner import AdvantageAligner
from prpo_lightning.scoring.combined import combine_verifiers
from prpo_lightning.scoring.pipeline import Scorer
from prpo_lightning.scoring.prm import ProcessRewardModel
from prpo_lightning.scoring.segmenter import Segmenter
from prpo_lightning.scoring.verifier import OutcomeVerifier
from prpo_lightning.training.lora import (
    AdapterDisabledReference, apply_lora, as_lora_config, check_adapter_state, trainable_state_keys,
)
from prpo_lightning.training.optim import deepspeed_engine, lr_factor
from prpo_lightning.training.outcome import RankReport, SkipBudget, advance_without_update
from prpo_lightning.training.plan import PassPlan, combine_needs, needs_reference_model, plan_passes
from prpo_lightning.training.refsync import ReferenceSync
from prpo_lightning.training.updater import PolicyUpdater


class PRPOModule(L.LightningModule):
    """RL post-training of a causal LM with process-aware, outcome-anchored advantages.

    Args:
        verifier: grades each completion against its own gold answer (a list is combined with ``reward_weights``).
        aligner: turns rewards and step scores into ``(B, T)`` token advantages.
        segmenter / prm: cut completions into steps and score them (needed when the aligner reads process scores).
        policy: Hugging Face id, local path or builtin name of the policy; ``policy_config``: instead, a config
            dict (with ``model_type``) for a randomly initialised model (tests; needs ``tokenizer``).
        tokenizer: tokenizer id/path (default: ``policy``).
        dtype / gradient_checkpointing: the policy's parameter dtype; activation checkpointing.
        sampling / loss / optim: :mod:`prpo_lightning.config` groups (every field is documented there).
        prompt_template / system_prompt / use_chat_template: how a problem becomes a prompt.
        seed: seeds sampling (per group and step), mini-batch shuffling and ``policy_config`` initialisation.
        on_prm_error: ``raise`` (a :class:`~prpo_lightning.scoring.faults.PRMError` stops training) or ``skip``
            (the batch's update is skipped, counted under ``train/faults/prm_errors``).
        max_consecutive_skips: batches in a row that may update nothing; one more raises ``SkippedBatchesError``.
        engine: the rollout engine (default :class:`~prpo_lightning.rollout.engines.AutoEngine`).
        rollout_correction / rollout_check / reward_shaping / reward_weights / ref_sync / lora: see
            :mod:`prpo_lightning.config`.

    Raises:
        ValueError: a setting out of range or inconsistent, checked here before any model loads.
        TypeError: a component whose ``needs`` are invalid for its role.
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
        engine: RolloutEngine | None = None,
        rollout_correction: RolloutCorrectionConfig = RolloutCorrectionConfig(),
        rollout_check: MismatchCheck = MismatchCheck(),
        reward_shaping: RewardShapingConfig = RewardShapingConfig(),
        reward_weights: list[float] | None = None,
        ref_sync: RefSyncConfig = RefSyncConfig(),
        lora: LoRAConfig | None = None,
    ) -> None:
        super().__init__()
        if (policy is None) == (policy_config is None):
            raise ValueError("give exactly one of model.policy (name/path) or model.policy_config (config dict)")
        if on_prm_error not in ("raise", "skip"):
            raise ValueError(f"on_prm_error must be 'raise' or 'skip', got {on_prm_error!r}")
        if policy_config is not None and tokenizer is None:
            raise ValueError("a policy built from policy_config needs model.tokenizer (a local tokenizer path)")
        if lora is not None and ref_sync.sync_ref_model:
            raise ValueError("model.ref_sync.sync_ref_model cannot be used with model.lora: the reference is the "
                             "policy's own base weights with the adapters disabled; turn one of them off")
        verifier = combine_verifiers(verifier, reward_weights)
        self.needs = combine_needs(verifier, aligner, segmenter, prm)
        if self.needs.process_scores and (segmenter is None or prm is None):
            raise ValueError(f"{type(aligner).__name__} uses process scores: set model.segmenter and model.prm")
        check_module_settings(self.needs.group_relative, sampling.num_generations, type(aligner).__name__)
        for key, name in (("model.policy", policy), ("model.tokenizer", tokenizer)):
            if name is not None:
                check_builtin_name(name, key)
        if ref_sync.sync_ref_model and not needs_reference_model(self.needs, loss):
            raise ValueError("model.ref_sync.sync_ref_model needs a reference model: set model.loss.kl_coef > 0 (or use "
                             "a component that requires one), or turn ref_sync off")
        self.save_hyperparameters(ignore=["verifier", "aligner", "segmenter", "prm", "engine"])
        self.verifier, self.aligner, self.segmenter, self.prm = verifier, aligner, segmenter, prm
        self.engine: RolloutEngine = engine if engine is not None else AutoEngine()
        self.sampling, self.loss_cfg, self.optim_cfg = sampling, loss, optim
        self.skip_budget = SkipBudget(max_consecutive_skips)
        self.ref_sync = ReferenceSync(ref_sync)  # counts optimizer steps; mixes the policy into the reference
        self.evaluation = EvaluationStages()
        self.automatic_optimization = False
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._reference: Any = None  # frozen, kept outside the module's parameters
        self.plan: PassPlan | None = None
        self.collector: RolloutCollector | None = None
        self.updater: PolicyUpdater | None = None
        self.step_metrics: dict[str, float] = {}

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
        zero3 = zero3_config(self._trainer)
        with transformers_zero3(zero3):  # under ZeRO-3 transformers initialises/loads the partitioned weights
            self.policy = load_causal_lm(hp.policy, hp.policy_config, dtype=hp.dtype, seed=hp.seed, sampling=self.sampling)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(self.policy)
            self.policy.config.use_cache = False
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        lockstep = bool(getattr(strategy, "zero_stage_3", False)) and self.trainer.world_size > 1
        self.plan = plan_passes(self.needs, self.engine.capabilities, self.loss_cfg, self.optim_cfg,
                                hp.gradient_checkpointing, lockstep)
        rank_zero_info(self.plan.describe())
        if hp.lora is not None:  # the base is frozen; the reference is the same model with the adapters disabled
            if zero3 is not None:
                raise ValueError("model.lora is not supported under DeepSpeed ZeRO-3: use ZeRO-2 or DDP")
            self.policy = apply_lora(self.policy, as_lora_config(hp.lora), hp.seed)
            if hp.gradient_checkpointing:
                self.policy.enable_input_require_grads()  # frozen embeddings: reentrant checkpointing needs a grad input
            if self.plan.reference:
                self._reference = AdapterDisabledReference(self.policy)
        elif self.plan.reference and zero3 is None:  # under ZeRO-3: built from the gathered policy at fit start
            self._reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        scorer = Scorer(self.verifier, self.aligner, self.segmenter, self.prm, self.tokenizer, hp.reward_shaping,
                        self.sampling.max_new_tokens, hp.on_prm_error)
        self.collector = RolloutCollector(
            self.engine, self.policy, self._reference, self.tokenizer, scorer, self.plan, self.sampling,
            PromptFormat(hp.prompt_template, hp.system_prompt, hp.use_chat_template), hp.seed,
            self.optim_cfg.micro_batch_size, hp.rollout_check, hp.rollout_correction)
        self.updater = PolicyUpdater(
            self.policy, self.loss_cfg, self.optim_cfg, self.plan, self.sampling.temperature,
            self.sampling.max_new_tokens, hp.seed, pad_token_id(self.tokenizer), backward=self.manual_backward,
            clip_gradients=lambda opt, max_norm: self.clip_gradients(opt, gradient_clip_val=max_norm,
                                                                     gradient_clip_algorithm="norm"),
            on_optimizer_step=self._on_optimizer_step)

    def _on_optimizer_step(self) -> None:
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
        if self._reference is None and self.plan.reference and zero3_config(self._trainer) is not None:
            self._reference = self.collector.reference = unpartitioned_copy(self.policy, self.device)
        self.ref_sync.apply_pending(self._reference)  # a resumed synced reference (ZeRO-3: built just above)
        self._start_stage()

    def on_validation_start(self) -> None:
        self._start_stage()

    def on_test_start(self) -> None:
        self._start_stage()

    def on_fit_end(self) -> None:
        self.collector.teardown_engine()

    def on_validation_end(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "validate":  # not the validation loop of fit
            self.collector.teardown_engine()

    def on_test_end(self) -> None:
        self.collector.teardown_engine()

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        total = cfg.total_steps or max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg.warmup_steps, total, cfg.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store this rank's global RNG states (for user components that draw from them), the skip budget, the
        synced reference (with ``ref_sync``) and, with LoRA, the adapters only (the base reloads)."""
        checkpoint["prpo_rng_states"] = collect_rng_states()
        checkpoint["prpo_skip_budget"] = self.skip_budget.state_dict()
        checkpoint["prpo_ref_sync"] = self.ref_sync.state_dict(self._reference)
        if self.hparams.lora is not None and "state_dict" in checkpoint:
            adapters = trainable_state_keys(self.policy, "policy.")
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in adapters}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.evaluation.on_load_checkpoint(checkpoint)  # the checkpoint's step labels validate/test outputs
        if self.collector is not None:  # the weights load after this hook: the engine syncs at the next stage start
            self.collector.on_checkpoint_loaded()
        if checkpoint.get("prpo_rng_states") is not None:
            restore_rng_states(checkpoint["prpo_rng_states"])
        if checkpoint.get("prpo_skip_budget") is not None:
            self.skip_budget.load_state_dict(checkpoint["prpo_skip_budget"])
        if self.hparams.lora is not None and "state_dict" in checkpoint:  # adapters only: complete with the base
            check_adapter_state(self.policy, checkpoint["state_dict"])
            checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}
        if checkpoint.get("prpo_ref_sync") is not None:  # under ZeRO-3 the reference is built at fit start
            self.ref_sync.load_state_dict(checkpoint["prpo_ref_sync"], self._reference)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ctx = self._context()
        t_start = time.perf_counter()
        collected = self.collector.collect(batch, ctx)  # generate → score (→ refill, under dynamic sampling)
        report = RankReport(collected.no_prompts, collected.prm_error, collected.no_signal)
        outcome = self.skip_budget.decide(report, ctx.step, self.sampling.max_prompt_length)
        metrics = {**collected.metrics, "faults/prm_errors": float(collected.prm_error is not None),
                   **self.skip_budget.metrics()}
        if not outcome.update:  # on every rank: the step and the LR schedule move on, the weights do not
            metrics["lr"] = float(self.lr_schedulers().get_last_lr()[0])
            advance_without_update(self.trainer, self.lr_schedulers())
            self.collector.sync_engine()  # wakes the engine; the weights did not change, so nothing is streamed
            self.log_step_metrics(metrics)
            return None
        t_update = time.perf_counter()
        metrics.update(self.update_policy(collected.rollout))  # a rank without rows joins with zero-weighted passes
        t_sync = time.perf_counter()
        self.collector.sync_engine()
        metrics.update({"time/scoring_s": t_update - t_start - metrics["time/rollout_s"],
                        "time/update_s": t_sync - t_update, "time/weight_sync_s": time.perf_counter() - t_sync})
        self.log_step_metrics(metrics)
        if collected.rollout is not None:
            self.log_dict({"reward": metrics["reward/mean"], "acc": metrics["accuracy"]}, prog_bar=True, logger=False)
        return None

    def update_policy(self, rollout: RolloutBatch | None) -> dict[str, float]:
        """PPO updates over ``ppo_epochs`` × mini-batches of this rank's rollout; the global batch's loss statistics."""
        return self.updater.update(rollout, self.optimizers(), self.lr_schedulers(), self.global_step, self.device,
                                   deepspeed_engine(self.trainer))

    def log_step_metrics(self, metrics: dict[str, float]) -> None:
        """Log one step's metrics as ``train/<key>`` and keep exactly them in :attr:`step_metrics`, so that a
        callback can tell a metric this step did not log from the previous step's value."""
        self.step_metrics = {f"train/{k}": float(v) for k, v in metrics.items()}
        self.log_dict(self.step_metrics, on_step=True, on_epoch=False)

    def _context(self) -> StepContext:
        trainer = self._trainer
        return StepContext(self.global_step, self.global_rank, trainer.world_size if trainer is not None else 1,
                           self.device, getattr(trainer, "datamodule", None) if trainer is not None else None)

    # ------------------------------------------------------------------ evaluation
    def generate_and_grade(self, batch: dict[str, Any], greedy: bool = True, num_samples: int = 1,
                           **overrides: Any) -> RolloutBatch | None:
        """Decode (greedy, or ``num_samples`` samples) and grade an evaluation batch
        (:meth:`~prpo_lightning.rollout.collector.RolloutCollector.generate_and_grade`)."""
        return self.collector.generate_and_grade(batch, self._context(), greedy, num_samples, **overrides)

    @property
    def eval_results(self) -> dict[str, dict[str, Any]]:
        """The last finished evaluation of each stage (``val``, ``test``)."""
        return self.evaluation.results

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.run_batch(self, self.trainer, self.device, batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.run_batch(self, self.trainer, self.device, batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, stage: str) -> None:
        """Log ``<stage>/<benchmark>/<metric>`` of the finished stage (already identical on every rank)."""
        step = self.evaluation.step_of_weights(self.trainer, self.global_step)
        result = self.evaluation.finish(self.trainer, stage, step)
        if result is None:
            return
        metrics = {f"{stage}/{k}": float(v) for k, v in result["metrics"].items() if k != "accuracy"}
        self.log_dict(metrics, sync_dist=False)
        self.log(f"{stage}/accuracy", float(result["metrics"]["accuracy"]), prog_bar=True, sync_dist=False)
        if step != self.global_step:  # Lightning takes a logged "step" as the loggers' step: the checkpoint's
            self.log("step", float(step), sync_dist=False)
