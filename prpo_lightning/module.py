"""``PRPOModule``: critic-free policy optimisation with pluggable segmenter, PRM, verifier and aligner.

One training step (one batch of N prompts):

1. the rollout engine (``model.engine``, :class:`~prpo_lightning.engine.RolloutEngine`; default
   :class:`~components.engines.AutoEngine`) samples G completions per prompt;
2. when needed (off-policy updates, components that read them, an engine that is not exactly the trainer's
   distribution or cannot record entropies), one no-grad forward pass gives old log-probs and full-vocabulary
   entropies ``(B, T)``, ``B = N·G``; a frozen reference model gives reference log-probs. When the engine returns
   its own log-probs, the sampler-vs-trainer mismatch is logged and checked and the loss is importance-weighted
   (:mod:`prpo_lightning.offpolicy`);
3. the components grade, segment, score and align (:mod:`prpo_lightning.scoring`) → advantages ``(B, T)``;
4. manual optimisation (:mod:`prpo_lightning.update`): ``ppo_epochs`` × mini-batches of PPO-clip (+ KL) loss,
   gradient clipping, LR schedule; then the engine's weights are synced to the policy.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from prpo_lightning.aligner import AdvantageAligner
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.checkpoint import collect_rng_states, restore_rng_states
from prpo_lightning.compat import enable_activation_checkpointing
from prpo_lightning.config import LossConfig, OptimConfig, check_module_settings
from prpo_lightning.dynamic_sampling import fill_batch
from prpo_lightning.engine import RolloutEngine
from prpo_lightning.evaluation.benchmarks import PAPER_PROMPT
from prpo_lightning.evaluation.hooks import EvaluationHooks
from prpo_lightning.lora import AdapterDisabledReference, LoRAConfig, apply_lora, as_lora_config, trainable_state_keys
from prpo_lightning.faults import GuardedPRM, GuardedVerifier, PRMError, SkipBudget, advance_without_update
from prpo_lightning.optim import lr_factor
from prpo_lightning.models import load_causal_lm, load_tokenizer
from prpo_lightning.offpolicy import MismatchCheck, RolloutCorrectionConfig
from prpo_lightning.prm import ProcessRewardModel
from prpo_lightning.refsync import RefSyncConfig, ReferenceSync
from prpo_lightning.rollout_hooks import RolloutHooks
from prpo_lightning.rollout import SamplingConfig
from prpo_lightning import update
from prpo_lightning.scoring import compute_advantages
from prpo_lightning.shaping import RewardShapingConfig
from prpo_lightning.segmenter import Segmenter
from prpo_lightning.verifier import OutcomeVerifier
from prpo_lightning.zero3 import transformers_zero3, unpartitioned_copy, zero3_config


class PRPOModule(RolloutHooks, EvaluationHooks, L.LightningModule):
    """RL post-training of a causal LM with process-aware, outcome-anchored advantages.

    Args:
        verifier: grades each completion against its own gold answer; a list of verifiers is combined into a
            :class:`~components.rewards.WeightedVerifiers` (reward = weighted sum, verdict status from the first).
        aligner: turns rewards and step scores into ``(B, T)`` token advantages.
        segmenter: cuts completions into steps (needed when ``aligner.uses_process_scores``).
        prm: scores the steps (needed when ``aligner.uses_process_scores``).
        engine: samples the rollouts and evaluation completions (None: :class:`~components.engines.AutoEngine`,
            the static-cache decoder when the model supports it, else HF ``generate``, as ``sampling.engine``).
        policy: Hugging Face id, local path or builtin name of the policy (loaded with ``AutoModelForCausalLM``).
        policy_config: instead of ``policy``, a config dict (with ``model_type``) for a randomly
            initialised model (tests).
        tokenizer: tokenizer id/path; defaults to ``policy``.
        dtype: policy parameter dtype (``float32``, ``bfloat16``, ``float16``).
        gradient_checkpointing: enable activation checkpointing on the policy.
        sampling: rollout sampling settings (G, temperature, top_p, lengths).
        loss: PPO-clip, KL and aggregation settings.
        optim: optimizer, schedule and PPO update structure.
        prompt_template: format string with ``{problem}``.
        system_prompt: system message when a chat template is used.
        use_chat_template: apply the tokenizer's chat template (None: when the tokenizer has one).
        seed: seed for mini-batch shuffling, rollout sampling (per prompt group and step, see
            ``sampling.seed_per_group``) and random initialisation from ``policy_config``.
        on_prm_error: what an exception (or a timeout raised as an exception) in ``prm.score`` does: ``raise``
            stops training with a :class:`PRMError` naming the PRM; ``skip`` drops that batch's update and
            counts it under ``train/faults/prm_errors`` (logged as a warning).
        max_consecutive_skips: batches in a row that may update nothing (every prompt too long, or a skipped PRM
            failure); one more stops training with a ``SkippedBatchesError`` naming the cause. A skipped batch
            still counts as one step (``global_step`` and the LR schedule advance, the weights do not change).
        rollout_correction: importance-sampling correction of the loss by ``π_old / π_sampler``, applied when the
            engine returns sampler log-probs (``mode: null`` disables it).
        rollout_check: the sampler-vs-trainer self-check (metric, threshold, ``warn`` or ``raise``), run every step
            when the engine returns sampler log-probs.
        reward_shaping: shaping added to the outcome rewards before the aligner
            (:class:`~prpo_lightning.shaping.RewardShapingConfig`: DAPO's soft overlong punishment).
        reward_weights: one weight per verifier when ``verifier`` is a list (None: all 1.0).
        ref_sync: TRL's reference-model sync (:class:`~prpo_lightning.refsync.RefSyncConfig`): every
            ``ref_model_sync_steps`` optimizer steps the reference becomes ``α·π_θ + (1−α)·π_ref``.
        lora: LoRA adapters via PEFT (:class:`~prpo_lightning.lora.LoRAConfig`; None: full fine-tuning). Only the
            adapters train, the reference is the policy with its adapters disabled (no copy), checkpoints hold the
            adapters only and exports merge them.

    Raises:
        ValueError: if the aligner needs process scores and no segmenter/PRM is given, the policy is specified
            twice or not at all, or a setting is out of range (checked here, before any model loads; the
            sampling lengths are checked against the policy's context window before its weights load).
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
        if aligner.uses_process_scores and (segmenter is None or prm is None):
            raise ValueError(f"{type(aligner).__name__} uses process scores: set model.segmenter and model.prm")
        if on_prm_error not in ("raise", "skip"):
            raise ValueError(f"on_prm_error must be 'raise' or 'skip', got {on_prm_error!r}")
        if max_consecutive_skips < 0:
            raise ValueError(f"model.max_consecutive_skips must be >= 0, got {max_consecutive_skips}")
        if policy_config is not None and tokenizer is None:
            raise ValueError("a policy built from policy_config needs model.tokenizer (a local tokenizer path)")
        if lora is not None and ref_sync.sync_ref_model:
            raise ValueError("model.ref_sync.sync_ref_model cannot be used with model.lora: the reference is the "
                             "policy's own base weights with the adapters disabled; turn one of them off")
        check_module_settings(aligner, sampling.num_generations, policy, tokenizer)
        self.save_hyperparameters(ignore=["verifier", "aligner", "segmenter", "prm", "engine"])
        if isinstance(verifier, (list, tuple)) or reward_weights is not None:
            from components.rewards import combine_verifiers

            verifier = combine_verifiers(verifier, reward_weights)
        self.verifier, self.aligner, self.segmenter, self.prm = verifier, aligner, segmenter, prm
        self._ref_sync = ReferenceSync(ref_sync)  # counts optimizer steps; mixes the policy into the reference
        if engine is None:
            from components.engines import AutoEngine

            engine = AutoEngine()
        self.engine: RolloutEngine = engine
        self.rollout_correction, self.rollout_check = rollout_correction, rollout_check
        self.reward_shaping = reward_shaping
        self._weights_version = 0  # optimizer steps + checkpoint loads so far; the engine must hold this version
        self._engine_ready = False  # engine.setup was called (and teardown not since)
        self._engine_stale = False  # a checkpoint was loaded into the policy after the engine's last sync
        self.sampling, self.loss_cfg, self.optim_cfg = sampling, loss, optim
        self.automatic_optimization = False
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._reference: torch.nn.Module | None = None  # frozen, kept outside the module's parameters
        # --- evaluation state (validate/test): one BenchmarkEvaluator per running stage, holding the
        # deduplicating torchmetrics metrics (created at the first batch, when the benchmarks are known)
        self._evaluators: dict[str, Any] = {}
        self.eval_results: dict[str, dict[str, Any]] = {}  # last finished evaluation per stage
        # --- end of evaluation state
        if ref_sync.sync_ref_model and not self.needs_reference:
            raise ValueError("model.ref_sync.sync_ref_model needs a reference model: set model.loss.kl_coef > 0 (or use "
                             "a component that requires one), or turn ref_sync off")

    # ------------------------------------------------------------------ setup
    @property
    def needs_reference(self) -> bool:
        """A reference model is created only when the KL coefficient is > 0 or a component requires it."""
        comps = (self.aligner, self.prm)
        return self.loss_cfg.kl_coef > 0 or any(getattr(c, "requires_reference", False) for c in comps)

    @property
    def needs_rollout_logprobs(self) -> bool:
        """Whether old log-probs/entropies must be computed in a separate no-grad pass right after sampling.

        They are not needed when the update is on-policy (one PPO epoch over one mini-batch: π_old = π_θ, so
        the update's own forward pass gives ``log π_old = log π_θ.detach()``, ratio ≡ 1, as verl does), no
        component reads log-probs before the update (``requires_reference`` or ``requires_rollout_logprobs``) and
        the engine samples from exactly the trainer's distribution (``capabilities.exact_trainer_distribution``)
        and can record the entropies a segmenter needs (``capabilities.entropies``). Entropies for an entropy-spike
        segmenter then come from generation itself (:attr:`records_generation_entropies`). Skipping the pass saves
        one forward over every completion.
        """
        cfg = self.optim_cfg
        off_policy = cfg.ppo_epochs > 1 or cfg.mini_batch_size is not None
        flags = ("requires_reference", "requires_rollout_logprobs")
        reads_logprobs = any(getattr(c, f, False) for c in (self.aligner, self.prm) for f in flags)
        caps = self.engine.capabilities
        engine_needs_pass = not caps.exact_trainer_distribution or (self._segmenter_needs_entropies and not caps.entropies)
        return off_policy or reads_logprobs or engine_needs_pass

    @property
    def _segmenter_needs_entropies(self) -> bool:
        return self.aligner.uses_process_scores and getattr(self.segmenter, "requires_entropies", False)

    @property
    def shares_prompt_prefix(self) -> bool:
        """Whether forward passes compute each distinct prompt once per micro-batch (``optim.share_prompt_prefix``;
        off under gradient checkpointing, which disables the KV cache, and under ZeRO-3, whose ranks must make
        equal numbers of forward calls)."""
        cfg_on = self.optim_cfg.share_prompt_prefix and not self.hparams.gradient_checkpointing
        return cfg_on and not self._synced_generation()

    @property
    def records_generation_entropies(self) -> bool:
        """Whether entropies are recorded during sampling (:class:`~prpo_lightning.rollout.EntropyRecorder`):
        the segmenter needs them and no separate log-prob pass computes them."""
        return self._segmenter_needs_entropies and not self.needs_rollout_logprobs

    def configure_model(self) -> None:
        """Load tokenizer, policy and (if needed) the frozen reference model, and give the segmenter and PRM the
        tokenizer once (``setup_tokenizer``). Idempotent."""
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
        # from_pretrained returns eval mode; the policy trains in train mode (activation checkpointing only acts in
        # train mode, and Lightning warns about modules left in eval mode). Sampling and no-grad log-prob passes
        # switch to eval mode and back themselves.
        self.policy.train()
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(self.policy)
            self.policy.config.use_cache = False
        if hp.lora is not None:  # the base is frozen; the reference is the same model with the adapters disabled
            if zero3 is not None:
                raise ValueError("model.lora is not supported under DeepSpeed ZeRO-3: use ZeRO-2 or DDP")
            self.policy = apply_lora(self.policy, as_lora_config(hp.lora), hp.seed)
            if hp.gradient_checkpointing:
                self.policy.enable_input_require_grads()  # frozen embeddings: reentrant checkpointing needs a grad input
            if self.needs_reference:
                object.__setattr__(self, "_reference", AdapterDisabledReference(self.policy))
        elif self.needs_reference and zero3 is None:  # under ZeRO-3: built from the gathered policy at fit start
            ref = copy.deepcopy(self.policy).eval()
            ref.requires_grad_(False)
            object.__setattr__(self, "_reference", ref)

    def _place_frozen_models(self) -> None:
        if self._reference is not None:
            self._reference.to(self.device)
        if self.prm is not None:
            self.prm.setup(self.device)

    def on_fit_start(self) -> None:
        if self._reference is None and self.needs_reference and zero3_config(self._trainer) is not None:
            object.__setattr__(self, "_reference", unpartitioned_copy(self.policy, self.device))
        self._ref_sync.apply_pending(self._reference)  # a resumed synced reference (ZeRO-3: built just above)
        self._place_frozen_models()
        self.setup_engine()

    def on_validation_start(self) -> None:
        self._place_frozen_models()
        self.setup_engine()

    def on_test_start(self) -> None:
        self._place_frozen_models()
        self.setup_engine()

    def on_optimizer_step_done(self) -> None:
        """Count one weight update (:func:`prpo_lightning.update.update_policy` calls it after every optimizer
        step); :meth:`sync_engine` then brings the engine to this version. With ``ref_sync`` on, every
        ``ref_model_sync_steps`` steps the policy is mixed into the reference (:mod:`prpo_lightning.refsync`)."""
        self._weights_version += 1
        self._ref_sync.after_optimizer_step(self.policy, self._reference)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the global RNG states (torch, CUDA, numpy, python) of this rank with the checkpoint.

        Rollout sampling does not depend on them (it is seeded per group and step); they are kept so that
        user components that draw from the global RNG also resume exactly in single-process runs.
        """
        checkpoint["prpo_rng_states"] = collect_rng_states()
        checkpoint["prpo_ref_sync"] = self._ref_sync.state_dict(self._reference)  # the synced reference, if on
        if self.hparams.lora is not None and "state_dict" in checkpoint:  # the adapters only; the base reloads
            adapters = trainable_state_keys(self.policy, "policy.")
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in adapters}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # EvaluationHooks: the checkpoint's step labels validate/test
        self._weights_version += 1  # the weights load after this hook: the engine syncs at the next stage start
        self._engine_stale = True
        if checkpoint.get("prpo_rng_states") is not None:
            restore_rng_states(checkpoint["prpo_rng_states"])
        if self.hparams.lora is not None and "state_dict" in checkpoint:
            self._complete_adapter_state(checkpoint)
        if checkpoint.get("prpo_ref_sync") is not None:  # under ZeRO-3 the reference is built at fit start
            self._ref_sync.load_state_dict(checkpoint["prpo_ref_sync"], self._reference)

    def _complete_adapter_state(self, checkpoint: dict[str, Any]) -> None:
        """Fill an adapters-only ``state_dict`` with the frozen base weights already loaded, so that the strict
        load that follows checks every adapter tensor.

        Raises:
            ValueError: the checkpoint's adapters are not exactly this model's (other ``model.lora`` settings, or a
                full checkpoint loaded into a LoRA model).
        """
        adapters, saved = trainable_state_keys(self.policy, "policy."), set(checkpoint["state_dict"])
        if saved != adapters:
            missing, unexpected = sorted(adapters - saved)[:3], sorted(saved - adapters)[:3]
            raise ValueError(f"PRPOModule: the checkpoint's tensors do not match this model's LoRA adapters (missing "
                             f"{missing}, unexpected {unexpected}): resume with the model.lora settings it was "
                             "trained with")
        full = self.state_dict()
        full.update(checkpoint["state_dict"])
        checkpoint["state_dict"] = full

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        total = cfg.total_steps or max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg.warmup_steps, total, cfg.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        t0 = time.perf_counter()
        rollout, metrics = self.make_rollout(batch)
        if self.engine.capabilities.supports_sleep:
            self.engine.sleep()  # free the engine's memory for scoring and the update
        t1 = time.perf_counter()
        no_prompts, prm_error, no_signal = rollout is None, None, False
        if rollout is not None:
            rollout, prm_error = self.score_rollout(rollout, metrics)
        if self.sampling.dynamic_sampling.enabled:  # drop groups without signal, refill (prpo_lightning.dynamic_sampling)
            rollout, prm_error, no_prompts, no_signal = fill_batch(self, batch, rollout, prm_error, metrics)
        budget = SkipBudget.of(self, self.hparams.max_consecutive_skips)
        nothing_to_update = budget.record(self.global_step, no_prompts, prm_error, self.sampling.max_prompt_length)
        nothing_to_update = nothing_to_update or no_signal
        metrics.update({"faults/prm_errors": float(prm_error is not None), **budget.state()})
        if nothing_to_update:  # on every rank: the step and the LR schedule move on, the weights do not
            metrics["lr"] = float(self.lr_schedulers().get_last_lr()[0])
            advance_without_update(self.trainer, self.lr_schedulers())
            self.sync_engine()  # wakes the engine; the weights did not change, so nothing is streamed
            self.log_step_metrics(metrics)
            return None
        t2 = time.perf_counter()
        metrics.update(self.update_policy(rollout))  # a rank without rows joins with zero-weighted passes
        t3 = time.perf_counter()
        self.sync_engine()
        t4 = time.perf_counter()
        metrics.update({"time/rollout_s": t1 - t0, "time/scoring_s": t2 - t1, "time/update_s": t3 - t2,
                        "time/weight_sync_s": t4 - t3})
        self.log_step_metrics(metrics)
        if rollout is not None:
            self.log_dict({"reward": metrics["reward/mean"], "acc": metrics["accuracy"]}, prog_bar=True, logger=False)
        return None

    def log_step_metrics(self, metrics: dict[str, float]) -> None:
        """Log one step's metrics as ``train/<key>`` and keep exactly them in :attr:`step_metrics`, so that a
        callback can tell a metric this step did not log (e.g. ``advantage/process_to_outcome`` without outcome
        signal) from the previous step's value that ``trainer.callback_metrics`` still holds."""
        self.step_metrics = {f"train/{k}": float(v) for k, v in metrics.items()}
        self.log_dict(self.step_metrics, on_step=True, on_epoch=False)

    def score_rollout(self, rollout: RolloutBatch, metrics: dict[str, float]) -> tuple[RolloutBatch | None, str | None]:
        """Grade, segment, score and align ``rollout`` in place (:func:`prpo_lightning.scoring.compute_advantages`),
        adding its metrics to ``metrics``; returns ``(rollout, None)``, or ``(None, error)`` for a PRM failure
        under ``on_prm_error: skip`` (logged as a warning).

        Raises:
            PRMError: the PRM failed and ``on_prm_error`` is ``raise``.
        """
        prm = GuardedPRM(self.prm) if self.prm is not None else None
        try:
            metrics.update(compute_advantages(rollout, GuardedVerifier(self.verifier), self.aligner, self.segmenter,
                                              prm, self.tokenizer, self.reward_shaping, self.sampling.max_new_tokens))
        except PRMError as err:
            if self.hparams.on_prm_error == "raise":
                raise
            logging.getLogger(__name__).warning("rank %d, step %d: skipping the batch's update: %s",
                                                self.global_rank, self.global_step, err)
            return None, str(err)
        return rollout, None

    def update_policy(self, rollout: RolloutBatch | None) -> dict[str, float]:
        """PPO-clip updates over ``ppo_epochs`` × mini-batches of the rollout (:func:`prpo_lightning.update.update_policy`);
        returns the loss statistics of the global batch."""
        return update.update_policy(self, rollout)

    def _accumulate_gradients(self, rollout: RolloutBatch | None, idx: Tensor, n_micro: int | None = None) -> dict[str, float]:
        """Backward the mini-batch ``idx`` (:func:`prpo_lightning.update.accumulate_gradients`)."""
        return update.accumulate_gradients(self, rollout, idx, n_micro)
