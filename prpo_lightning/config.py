"""Every run argument of :class:`~prpo_lightning.module.PRPOModule`, in one place (LitGPT's ``args.py`` is the model).

Each dataclass is one ``model.<group>`` of the YAML/CLI; each field has its docstring right under it. Every value is
checked in ``__post_init__``, before any model loads, and an error names the key (``model.<group>.<key>``), its
valid range and the value given. This module imports nothing of the framework: every other module may import it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

KLEstimator = Literal["k1", "k2", "k3"]
ImportanceSamplingLevel = Literal["token", "sequence"]
PolicyLoss = Literal["ppo_clip", "cispo"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
CorrectionMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop"]
MismatchMetric = Literal["logp_diff_mean", "logp_diff_max", "kl"]

log = logging.getLogger(__name__)


def _check(group: str, obj: Any, checks: list[tuple[str, bool, str]]) -> None:
    """Raise ``ValueError`` naming ``model.<group>.<key>``, its valid range and the value, for the first failed check."""
    for key, ok, rule in checks:
        if not ok:
            raise ValueError(f"model.{group}.{key} must be {rule}; got {getattr(obj, key)!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------------- sampling
@dataclass
class DynamicSamplingConfig:
    """``model.sampling.dynamic_sampling`` (DAPO): drop prompt groups without learning signal, refill the batch."""

    enabled: bool = False
    """Drop groups without signal and refill the batch (False: every group is trained on)."""
    max_rounds: int = 3
    """Extra generation rounds allowed per step to refill the batch (0: only drop)."""
    criterion: Literal["outcome", "advantage"] = "outcome"
    """``outcome``: drop a group whose outcome rewards are all equal (DAPO, verl, OpenRLHF); ``advantage``: drop a
    group only when every token advantage in it is exactly 0 (keeps process signal)."""

    def __post_init__(self) -> None:
        key = "model.sampling.dynamic_sampling"
        if self.criterion not in ("outcome", "advantage"):
            raise ValueError(f"{key}.criterion must be 'outcome' (drop groups with equal rewards) or 'advantage' "
                             f"(drop groups whose token advantages are all 0); got {self.criterion!r}")
        if not _is_int(self.max_rounds) or self.max_rounds < 0:
            raise ValueError(f"{key}.max_rounds must be an integer >= 0 (extra generation rounds per step); "
                             f"got {self.max_rounds!r}")


@dataclass
class SamplingConfig:
    """``model.sampling``: how completions are sampled. The sampler itself is ``model.engine``."""

    num_generations: int = 8
    """G, completions sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature (also divides the logits of log-probs and entropies)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 disables it)."""
    top_k: int = 0
    """Top-k sampling (0 disables it; the paper samples with top-k off)."""
    max_new_tokens: int = 2048
    """Completion budget; a completion that reaches it without EOS is *truncated*."""
    max_prompt_length: int = 2048
    """Prompts longer than this many tokens are skipped and counted (``train/data/skipped_long_prompts``)."""
    generation_batch_size: int | None = None
    """Sequences per sampler call (None: all at once)."""
    seed_per_group: bool = False
    """False: one batched sampler call per rank seeded from ``(seed, step, rank)`` (fast; reruns with the same
    number of ranks draw the same completions). True: each prompt's G completions are seeded from ``(seed, step,
    prompt id)``, so they do not depend on batch composition, rank or world size (about 4x slower on CPU)."""
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    """DAPO's dynamic sampling, ``{enabled, max_rounds, criterion}`` (a dict is accepted)."""
    engine: str | None = None
    """Removed: the sampler is chosen with ``model.engine``. Any value is refused with a message saying so."""

    def __post_init__(self) -> None:
        if self.engine is not None:
            raise ValueError(
                f"model.sampling.engine was removed (got {self.engine!r}): choose the sampler with model.engine, e.g. "
                "model.engine: components.engines.AutoEngine (default), components.engines.HFGenerateEngine "
                "(for 'hf'), components.engines.StaticCacheEngine (for 'static') or components.engines.VLLMEngine")
        _check("sampling", self, [
            ("num_generations", _is_int(self.num_generations) and self.num_generations >= 1,
             "an integer >= 1 (completions per prompt)"),
            ("temperature", self.temperature > 0, "> 0: sampling needs a positive temperature, it also divides the "
             "logits of log-probs and entropies, and temperature 0 (greedy) would make the G completions of a "
             "prompt identical"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1.0 disables nucleus sampling)"),
            ("top_k", self.top_k >= 0, "an integer >= 0 (0 disables top-k)"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1 (the completion budget)"),
            ("max_prompt_length", self.max_prompt_length >= 1, "an integer >= 1"),
            ("generation_batch_size", self.generation_batch_size is None or self.generation_batch_size >= 1,
             "null (all at once) or an integer >= 1"),
        ])
        if isinstance(self.dynamic_sampling, dict):
            valid = ("enabled", "max_rounds", "criterion")
            unknown = sorted(set(self.dynamic_sampling) - set(valid))
            if unknown:
                raise ValueError(f"model.sampling.dynamic_sampling has unknown keys {unknown}; valid keys: {valid}")
            self.dynamic_sampling = DynamicSamplingConfig(**self.dynamic_sampling)
        if not isinstance(self.dynamic_sampling, DynamicSamplingConfig):
            raise TypeError("model.sampling.dynamic_sampling must be a mapping {enabled, max_rounds, criterion}; "
                            f"got {self.dynamic_sampling!r}")
        ds = self.dynamic_sampling
        if ds.enabled and ds.criterion == "outcome" and self.num_generations < 2:
            raise ValueError("model.sampling.dynamic_sampling.criterion 'outcome' needs num_generations >= 2 (a "
                             "single completion's rewards are always all equal, so every group would be dropped); "
                             "raise num_generations or use criterion 'advantage'")


# ----------------------------------------------------------------------------------------------------- loss
@dataclass
class LossConfig:
    """``model.loss``: the policy loss."""

    eps_low: float = 0.2
    """PPO lower clip range ε_low."""
    eps_high: float = 0.2
    """PPO upper clip range ε_high (DAPO clip-higher: 0.28)."""
    dual_clip: float | None = 3.0
    """Dual-clip constant c (> 1) for negative advantages, or None."""
    kl_coef: float = 0.0
    """β_KL of the KL-to-reference term; a reference model is created only when > 0 (or a component needs one)."""
    kl_estimator: KLEstimator = "k3"
    """``k1``, ``k2`` or ``k3`` (verl's ``low_var_kl``)."""
    aggregation: LossAggregation = "token-mean"
    """``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum`` | ``seq-mean-token-sum-norm``."""
    norm_constant: float | None = None
    """C of ``seq-mean-token-sum-norm`` (Dr. GRPO); default: ``max_new_tokens``."""
    mask_truncated_completions: bool = False
    """Leave completions that hit ``max_new_tokens`` without EOS out of the loss and its counts (TRL's option); they
    are still graded, take part in group statistics and are counted under ``completion/truncated_frac``."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """``token`` (PPO) or ``sequence`` (GSPO: every token gets its sequence's ratio ``exp(mean_t(log π_θ − log
    π_old))``). Applies to both policy losses and to ``kl_bias_correction``."""
    policy_loss: PolicyLoss = "ppo_clip"
    """``ppo_clip`` (clipped surrogate) or ``cispo`` (``−sg[min(ρ, cispo_max_ratio)]·A·log π_θ``, TRL's ``cispo``)."""
    cispo_max_ratio: float = 5.0
    """ρ_max of ``cispo``, the cap of the detached importance weight (ScaleRL recommends 5)."""
    kl_bias_correction: bool = False
    """Multiply the per-token KL by the importance ratio ρ (with grad): the unbiased reverse-KL gradient off-policy
    (TRL's ``use_bias_correction_kl``). Changes the KL gradient even on-policy, where ρ = 1 in value."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss gets ``− entropy_coef · H̄``, the full-vocabulary entropy summed over the (kept)
    loss tokens and divided by the mini-batch's loss-token count, whatever ``aggregation`` is. 0 disables it."""
    top_entropy_quantile: float = 1.0
    """ρ of "Beyond the 80/20 rule": the policy-gradient term keeps only loss tokens whose entropy is ≥ the ``1 − ρ``
    quantile of the micro-batch's loss tokens; dropped tokens still count in the normalisers and the KL term."""

    def __post_init__(self) -> None:
        _check("loss", self, [
            ("eps_low", self.eps_low >= 0, ">= 0"),
            ("eps_high", self.eps_high >= 0, ">= 0"),
            ("dual_clip", self.dual_clip is None or self.dual_clip > 1, "null or > 1"),
            ("kl_coef", self.kl_coef >= 0, ">= 0 (0 disables the KL term)"),
            ("kl_estimator", self.kl_estimator in get_args(KLEstimator), f"one of {get_args(KLEstimator)}"),
            ("aggregation", self.aggregation in get_args(LossAggregation), f"one of {get_args(LossAggregation)}"),
            ("norm_constant", self.norm_constant is None or self.norm_constant > 0, "null or > 0"),
            ("importance_sampling_level", self.importance_sampling_level in get_args(ImportanceSamplingLevel),
             f"one of {get_args(ImportanceSamplingLevel)}"),
            ("policy_loss", self.policy_loss in get_args(PolicyLoss), f"one of {get_args(PolicyLoss)}"),
            ("cispo_max_ratio", self.cispo_max_ratio > 0, "> 0 (the cap of CISPO's importance weight)"),
            ("entropy_coef", self.entropy_coef >= 0, ">= 0 (0 disables the entropy bonus)"),
            ("top_entropy_quantile", 0.0 <= self.top_entropy_quantile <= 1.0, "in [0, 1] (1 keeps every token)"),
        ])


# ----------------------------------------------------------------------------------------------------- optimisation
@dataclass
class OptimConfig:
    """``model.optim``: AdamW, the LR schedule and the PPO update structure."""

    lr: float = 1e-6
    """Peak learning rate. A resumed run (``--ckpt_path``) with another value follows the new schedule from the
    resumed step (logged once; the Adam moments are kept)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps (the unit of ``trainer.max_steps``)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After warm-up: ``constant``, ``linear`` (decay to 0) or ``cosine``."""
    total_steps: int | None = None
    """Optimizer steps the schedule decays over; default: ``trainer.max_steps``, which counts optimizer steps (an
    epoch-budgeted run: training batches × optimizer steps per batch). A ``linear``/``cosine`` schedule shorter
    than ``max_steps`` is refused (its last steps would train at lr 0). On resume the value given now applies
    from the resumed step."""
    grad_clip: float | None = 1.0
    """Max global gradient norm, or None."""
    ppo_epochs: int = 1
    """Passes over each rollout batch. Each training batch makes ``ppo_epochs × ceil(rows / mini_batch_size)``
    optimizer steps, and each counts towards ``trainer.max_steps``; the last batch's update stops when
    ``max_steps`` is reached (a warning says so at the start when ``max_steps`` is not a multiple)."""
    mini_batch_size: int | None = None
    """Completions per optimizer step, per rank (None: the whole rollout batch, i.e. on-policy)."""
    micro_batch_size: int = 8
    """Completions per forward/backward (gradient accumulation inside a mini-batch)."""
    share_prompt_prefix: bool = True
    """Run each distinct prompt of a micro-batch once in every log-prob pass and let its completions attend to the
    shared KV cache. Exact up to float rounding. Not applied under gradient checkpointing (no KV cache there) or
    ZeRO-3 with several ranks (equal forward calls). A ``micro_batch_size`` that is a multiple of G computes each
    prompt once on-policy. Not combined with ``packing``."""
    micro_batch_tokens: int | None = None
    """Token budget of a micro-batch in the reference, old-log-prob and update passes (None: ``micro_batch_size`` rows
    per micro-batch). The rows are sorted by length, longest first, and each micro-batch takes rows while its tokens
    stay within the budget: with ``packing`` the sum of the rows' prompt + completion tokens, without it the rows times
    the longest row (the padded input). ``micro_batch_size`` is then ignored; a row longer than the budget goes alone
    (never split, never dropped), so a budget >= ``max_prompt_length + max_new_tokens`` bounds every pass. The loss
    and its gradient do not depend on the grouping (the normalisers are the mini-batch's), except under
    ``loss.top_entropy_quantile < 1``, whose quantile is per micro-batch: that combination is refused. Choosing it:
    a pass's peak memory grows with its tokens (activations, and ``completion tokens × vocabulary`` float32 logits),
    not with its rows; start at ``max_prompt_length + max_new_tokens`` (one longest row per pass) and double it while
    the update pass's peak memory fits with headroom. Larger budgets mean fewer, larger passes (faster on a GPU); on a
    CPU the time hardly depends on it beyond a few thousand tokens (``benchmarks/packing.py``)."""
    packing: bool = False
    """Padding-free passes: the rows of a micro-batch are concatenated into one sequence whose ``position_ids``
    restart at 0 on every row, so no compute or memory goes to padding and no row attends to another. Needs an
    attention implementation that reads packed position ids (``sdpa``, ``eager``, ``flex_attention``, flash-attention
    2/3/4; anything else is refused when the updater is built) and ``share_prompt_prefix: false``. Works with LoRA,
    gradient checkpointing and DeepSpeed. Same log-probs and gradients as the padded passes up to float rounding.
    The attention skips the pairs of rows with flash-attention's varlen kernels and with ``sdpa`` (the packed pass
    switches an ``sdpa`` model to ``prpo_sdpa_varlen``: one SDPA call per row, every other pass unchanged);
    ``eager`` and ``flex_attention`` apply a block-diagonal mask over the whole packed sequence (cost ∝ its tokens
    squared), which ``micro_batch_tokens`` bounds."""

    def __post_init__(self) -> None:
        if self.packing and self.share_prompt_prefix:
            raise ValueError("model.optim.packing: true cannot be combined with model.optim.share_prompt_prefix: true "
                             "(the default): a packed pass runs every row's prompt itself; set "
                             "model.optim.share_prompt_prefix: false, or model.optim.packing: false")
        _check("optim", self, [
            ("lr", self.lr > 0, "> 0 (the peak learning rate)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two values in [0, 1)"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0"),
            ("schedule", self.schedule in ("constant", "linear", "cosine"), "'constant', 'linear' or 'cosine'"),
            ("total_steps", self.total_steps is None or self.total_steps >= 1, "null or an integer >= 1"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "null (no clipping) or > 0"),
            ("ppo_epochs", self.ppo_epochs >= 1, "an integer >= 1"),
            ("mini_batch_size", self.mini_batch_size is None or self.mini_batch_size >= 1,
             "null (the whole rollout batch) or an integer >= 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, "an integer >= 1"),
            ("micro_batch_tokens", self.micro_batch_tokens is None or (_is_int(self.micro_batch_tokens)
                                                                      and self.micro_batch_tokens >= 1),
             "null (micro_batch_size rows per micro-batch) or an integer >= 1 (tokens per micro-batch)"),
            ("packing", isinstance(self.packing, bool), "true or false"),
        ])


# ----------------------------------------------------------------------------------------------------- off-policy
class SamplerMismatchError(RuntimeError):
    """The sampler's log-probs are too far from the trainer's (e.g. a weight sync was missed)."""


#: Default ``logp_diff_max`` thresholds of :class:`MismatchCheck` by the trainer's parameter dtype, from
#: ``benchmarks/sync_check.py`` (``benchmarks/results/sync_check.json``; docs/engines.rst "Self-check"). float32: a
#: synced vLLM engine's largest difference was 6.0e-5 over 3 × 19.6k tokens and the smallest fault 0.013 (a sync that
#: skipped two layers after one lr-1e-5 step): 1e-3 sits 17x above the noise and 13x below the fault. bfloat16: the
#: noise (1.43) is as large as the faults (0.83-1.20), so 4.0 stops gross faults only. float16: not measured, no
#: default.
DEFAULT_MISMATCH_THRESHOLDS: dict[str, float] = {"float32": 1e-3, "bfloat16": 4.0}


@dataclass
class MismatchCheck:
    """``model.rollout_check``: the sampler-vs-trainer self-check, run every step when the engine returns log-probs."""

    metric: MismatchMetric = "logp_diff_max"
    """``logp_diff_max`` (default: one stale layer moves it by orders of magnitude), ``logp_diff_mean`` or ``kl`` (see
    :func:`~prpo_lightning.rollout.offpolicy.mismatch_metrics`)."""
    threshold: float | None = None
    """The largest acceptable value. None (default, ``logp_diff_max`` only): by the policy's dtype, from
    :data:`DEFAULT_MISMATCH_THRESHOLDS` (float32 1e-3; bfloat16 4.0, which stops gross faults only; other dtypes: set
    it)."""
    mode: Literal["warn", "raise"] = "raise"
    """``raise`` (default) raises :class:`SamplerMismatchError`; ``warn`` logs a warning and trains on."""

    def __post_init__(self) -> None:
        if self.metric not in get_args(MismatchMetric):
            raise ValueError(f"model.rollout_check.metric must be one of {get_args(MismatchMetric)}, got {self.metric!r}")
        if self.mode not in ("warn", "raise"):
            raise ValueError(f"model.rollout_check.mode must be 'warn' or 'raise', got {self.mode!r}")
        if self.threshold is None and self.metric != "logp_diff_max":
            raise ValueError(f"model.rollout_check.threshold has a default for logp_diff_max only: set it for "
                             f"metric {self.metric!r}")
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"model.rollout_check.threshold must be >= 0, got {self.threshold}")

    def threshold_for(self, dtype: Any = None) -> float:
        """The threshold in force: the one given, else the default of ``dtype`` (a torch dtype or its name; None:
        float32).

        Raises:
            ValueError: no default for that dtype (set ``model.rollout_check.threshold``).
        """
        if self.threshold is not None:
            return float(self.threshold)
        name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
        if name not in DEFAULT_MISMATCH_THRESHOLDS:
            raise ValueError(f"model.rollout_check.threshold has no default for dtype {name} (defaults: "
                             f"{DEFAULT_MISMATCH_THRESHOLDS}): set it")
        return DEFAULT_MISMATCH_THRESHOLDS[name]

    def check_settings(self, top_p: float, top_k: int, dtype: Any = None, runs: bool = True) -> None:
        """Refuse at start what the check could only refuse mid-run: no default threshold for ``dtype``, or the
        default threshold with ``top_p < 1`` or ``top_k > 0`` (it assumes untruncated sampling). Nothing to check
        when the check does not ``runs`` (an engine without sampler log-probs).

        With truncation the sampler's (processed) log-probs are of the renormalised distribution, so every token
        differs from the trainer's by ``-log(mass kept)`` and a tight ``logp_diff_max`` would fail at every step.

        Raises:
            ValueError: naming the dtype or the sampling settings and the ways out.
        """
        if not runs:
            return
        self.threshold_for(dtype)
        if self.threshold is None and (top_p < 1.0 or top_k > 0):
            raise ValueError(
                f"model.rollout_check: the default check (logp_diff_max within the dtype's noise) cannot hold with "
                f"model.sampling.top_p {top_p} / top_k {top_k}: the engine's log-probs are those of the truncated, "
                "renormalised distribution. Set model.rollout_check.threshold to the offset you accept (e.g. 2.0) "
                "or mode: warn, or sample with top_p: 1 and top_k: 0"
            )

    def __call__(self, metrics: dict[str, float], step: int | None = None, dtype: Any = None) -> bool:
        """Check ``metrics`` (``rollout/<metric>``) against :meth:`threshold_for` ``dtype``; True when within it.

        Raises:
            SamplerMismatchError: the metric exceeds the threshold and ``mode`` is ``raise``.
        """
        value, limit = metrics[f"rollout/{self.metric}"], self.threshold_for(dtype)
        if value <= limit:
            return True
        msg = (f"rollout/{self.metric} = {value:.4g} exceeds {limit:.4g}"
               f"{'' if step is None else f' at step {step}'}: the sampler does not sample from the trained weights "
               "(a missed or partial engine.sync_weights, or a sampler with other numerics); check the weight sync, "
               "or set model.rollout_check.threshold (or mode: warn) if this mismatch is expected")
        if self.mode == "raise":
            raise SamplerMismatchError(msg)
        log.warning(msg)
        return False


@dataclass
class RolloutCorrectionConfig:
    """``model.rollout_correction``: importance-sampling correction of the loss by ``ρ = π_old / π_sampler``.

    Modes (``ρ_t`` per token, ``ρ_seq = exp(Σ_t log ρ_t)``): ``token_truncate`` (TIS) ``clamp(ρ_t, min, max)``;
    ``token_mask`` ``ρ_t`` inside ``[min, max]`` else 0; ``sequence_truncate`` / ``sequence_mask`` the same with
    ``ρ_seq``; ``icepop`` ``token_mask`` with bounds ``[0.5, 5]``.
    """

    mode: CorrectionMode | None = "token_truncate"
    """One of the modes above, or None to disable the correction (weights ≡ 1)."""
    clip_max: float | None = None
    """Upper bound C (default 2.0, TIS's; ``icepop``: 5.0)."""
    clip_min: float | None = None
    """Lower bound (default: none, i.e. 0; ``icepop``: 0.5)."""

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in get_args(CorrectionMode):
            raise ValueError(f"RolloutCorrectionConfig.mode must be one of {get_args(CorrectionMode)} or None, got "
                             f"{self.mode!r}")
        if self.clip_max is None:
            self.clip_max = 5.0 if self.mode == "icepop" else 2.0
        if self.clip_min is None and self.mode == "icepop":
            self.clip_min = 0.5
        if self.clip_max <= 0 or (self.clip_min is not None and self.clip_min > self.clip_max):
            raise ValueError(f"RolloutCorrectionConfig: need 0 < clip_max and clip_min <= clip_max, got "
                             f"[{self.clip_min}, {self.clip_max}]")



@dataclass
class AsyncRolloutConfig:
    """``model.async_rollout``: sample (and score) the next batch while the policy updates on the current one
    (:mod:`prpo_lightning.rollout.async_rollouts`; ``docs/async.md``)."""

    enabled: bool = False
    """Train on a batch sampled ``max_staleness`` weight versions ago, generated and scored in the background."""
    max_staleness: int = 1
    """The pipeline's depth, >= 1: every batch is sampled exactly this many optimizer steps before its update (the
    first ``max_staleness`` loader batches only fill the pipeline)."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_staleness) or self.max_staleness < 1:
            raise ValueError(f"model.async_rollout.max_staleness must be an integer >= 1 (weight versions between "
                             f"sampling a batch and its update), got {self.max_staleness!r}")

# ----------------------------------------------------------------------------------------------------- rewards
@dataclass
class OverlongConfig:
    """``model.reward_shaping.overlong``: DAPO's soft overlong punishment (0 up to ``max_new_tokens −
    buffer_length`` tokens, then linear to ``−penalty`` at ``max_new_tokens``)."""

    buffer_length: int
    """L_cache, the length of the punishment ramp in tokens (>= 1, at most ``max_new_tokens``)."""
    penalty: float = 1.0
    """The penalty at ``max_new_tokens`` tokens (>= 0; DAPO and TRL: 1)."""

    def __post_init__(self) -> None:
        if self.buffer_length < 1:
            raise ValueError(f"model.reward_shaping.overlong.buffer_length must be an integer >= 1 (the length of the "
                             f"punishment ramp in tokens); got {self.buffer_length!r}")
        if self.penalty < 0:
            raise ValueError(f"model.reward_shaping.overlong.penalty must be >= 0 (the penalty at max_new_tokens); "
                             f"got {self.penalty!r}")


@dataclass
class RewardShapingConfig:
    """``model.reward_shaping``: shaping added to the outcome rewards after grading, before the aligner."""

    overlong: OverlongConfig | None = None
    """DAPO's soft overlong punishment, or None (off)."""


# ----------------------------------------------------------------------------------------------------- reference, LoRA
@dataclass
class RefSyncConfig:
    """``model.ref_sync``: TRL's reference-model sync, ``θ_ref ← α·θ + (1 − α)·θ_ref`` every k optimizer steps."""

    sync_ref_model: bool = False
    """Mix the policy into the reference (needs a reference: ``loss.kl_coef > 0`` or a component that needs one)."""
    ref_model_mixup_alpha: float = 0.6
    """α, in [0, 1] (TRL's default 0.6)."""
    ref_model_sync_steps: int = 512
    """Optimizer steps between syncs, >= 1 (TRL's default 512)."""

    def __post_init__(self) -> None:
        alpha = self.ref_model_mixup_alpha
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"model.ref_sync.ref_model_mixup_alpha must be in [0, 1], got {alpha!r}")
        if not _is_int(self.ref_model_sync_steps) or self.ref_model_sync_steps < 1:
            raise ValueError(f"model.ref_sync.ref_model_sync_steps must be an integer >= 1, "
                             f"got {self.ref_model_sync_steps!r}")


@dataclass
class LoRAConfig:
    """``model.lora``: LoRA adapters via PEFT (only the adapters train; the reference is the base)."""

    r: int = 8
    """Rank of the adapters (``A``: r × in, ``B``: out × r)."""
    alpha: float = 16.0
    """Scaling numerator; the update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter input during training (0 = none)."""
    target_modules: list[str] | str = field(default="all-linear")
    """Module names to adapt (e.g. ``[q_proj, v_proj]``), or ``all-linear`` (every linear layer but the head)."""

    def __post_init__(self) -> None:
        if int(self.r) < 1:
            raise ValueError(f"model.lora.r must be >= 1, got {self.r}")
        if not float(self.alpha) > 0:
            raise ValueError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty: name the modules to adapt, or use 'all-linear'")


#: Every config dataclass (registered as safe globals for ``torch.load(weights_only=True)`` of checkpoints).
CONFIGS: tuple[type, ...] = (SamplingConfig, DynamicSamplingConfig, LossConfig, OptimConfig, MismatchCheck,
                             RolloutCorrectionConfig, AsyncRolloutConfig, OverlongConfig, RewardShapingConfig,
                             RefSyncConfig, LoRAConfig)


def check_module_settings(
    *, policy: str | None, policy_config: dict[str, Any] | None, tokenizer: str | None, on_prm_error: str,
    component_timeout_s: float | None, lora: LoRAConfig | None, ref_sync: RefSyncConfig, num_generations: int,
    aligner_name: str, group_relative: bool,
    process_scores: bool, has_segmenter_and_prm: bool, has_reference: bool,
) -> None:
    """Checks of ``PRPOModule``'s arguments that involve more than one group, before any model loads.

    Raises:
        ValueError: naming the keys: the policy given twice or not at all, ``policy_config`` without a tokenizer, an
            unknown ``on_prm_error``, a ``component_timeout_s`` that is not a positive number, LoRA with reference
            sync, ref sync without a reference, an aligner that reads process scores without a segmenter and a PRM,
            a group-relative aligner with ``num_generations: 1`` (every advantage would be 0), or a misspelt builtin
            model name.
    """
    from prpo_lightning.runtime.models import check_builtin_name  # the builtin registry: checked, never loaded

    if (policy is None) == (policy_config is None):
        raise ValueError("give exactly one of model.policy (name/path) or model.policy_config (config dict)")
    if process_scores and not has_segmenter_and_prm:
        raise ValueError(f"{aligner_name} uses process scores: set model.segmenter and model.prm")
    if on_prm_error not in ("raise", "skip"):
        raise ValueError(f"on_prm_error must be 'raise' or 'skip', got {on_prm_error!r}")
    timeout = component_timeout_s
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise ValueError(f"model.component_timeout_s must be null (no limit) or a number of seconds > 0; got "
                         f"{timeout!r}: the longest one verifier (reward) or PRM call may take")
    if policy_config is not None and tokenizer is None:
        raise ValueError("a policy built from policy_config needs model.tokenizer (a local tokenizer path)")
    if lora is not None and ref_sync.sync_ref_model:
        raise ValueError("model.ref_sync.sync_ref_model cannot be used with model.lora: the reference is the "
                         "policy's own base weights with the adapters disabled; turn one of them off")
    if group_relative and num_generations < 2:
        raise ValueError(f"model.sampling.num_generations must be >= 2 with {aligner_name}; got {num_generations}: "
                         "its advantages are relative to the prompt's group, so a lone completion gets advantage 0 "
                         "and the run would train with loss 0; raise num_generations or choose an aligner that is "
                         "not group-relative")
    for key, name in (("model.policy", policy), ("model.tokenizer", tokenizer)):
        if name is not None:
            check_builtin_name(name, key)
    if ref_sync.sync_ref_model and not has_reference:
        raise ValueError("model.ref_sync.sync_ref_model needs a reference model: set model.loss.kl_coef > 0 (or use "
                         "a component that requires one), or turn ref_sync off")
