"""Typed configuration groups of :class:`~prpo_lightning.module.PRPOModule` (jsonargparse turns them into CLI groups)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from prpo_lightning.losses import ImportanceSamplingLevel, KLEstimator, LossAggregation, PolicyLoss


def _check(group: str, obj: Any, checks: list[tuple[str, bool, str]]) -> None:
    """Raise ``ValueError`` naming ``model.<group>.<key>``, its valid range and the value, for the first failed check."""
    for key, ok, rule in checks:
        if not ok:
            raise ValueError(f"model.{group}.{key} must be {rule}; got {getattr(obj, key)!r}")


@dataclass
class LossConfig:
    """The policy loss.

    Args:
        eps_low: PPO lower clip range ε_low.
        eps_high: PPO upper clip range ε_high (DAPO clip-higher: 0.28).
        dual_clip: dual-clip constant c (> 1) for negative advantages, or None.
        kl_coef: β_KL of the KL-to-reference loss term; a reference model is created only when > 0
            (or when a component needs reference log-probs).
        kl_estimator: ``k1``, ``k2`` or ``k3`` (verl's ``low_var_kl``).
        aggregation: ``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum`` | ``seq-mean-token-sum-norm``.
        norm_constant: C of ``seq-mean-token-sum-norm`` (Dr. GRPO); default: ``max_new_tokens``.
        mask_truncated_completions: leave completions that hit ``max_new_tokens`` without EOS out of the loss
            (and out of its token/sequence counts), as TRL's option of the same name; they are still graded,
            take part in group statistics and are counted under ``completion/truncated_frac``.
        importance_sampling_level: ``token`` (PPO) or ``sequence`` (GSPO: every token of a completion gets the ratio
            ``exp(mean_t(log π_θ − log π_old))`` of its sequence; TRL's ``importance_sampling_level``, verl's
            ``loss_mode=gspo``). Applies to both policy losses and to ``kl_bias_correction``.
        policy_loss: ``ppo_clip`` (clipped surrogate with ``eps_low``/``eps_high``/``dual_clip``) or ``cispo``
            (``−sg[min(ρ, cispo_max_ratio)]·A·log π_θ``, TRL's ``loss_type="cispo"``).
        cispo_max_ratio: ρ_max of ``cispo``, the cap of the detached importance weight (TRL's ``epsilon_high`` when
            ``loss_type="cispo"``; ScaleRL recommends 5).
        kl_bias_correction: multiply the per-token KL term by the importance ratio ρ (with grad), so its gradient is
            the unbiased reverse-KL gradient off-policy (TRL's ``use_bias_correction_kl``, DeepSeek-V3.2). Changes the
            KL gradient even on-policy, where ρ = 1 in value.
        entropy_coef: entropy bonus: the loss gets ``− entropy_coef · H̄``, H̄ the current policy's full-vocabulary
            entropy summed over the loss tokens (only the kept ones under ``top_entropy_quantile``) and divided by
            the mini-batch's loss-token count, whatever ``aggregation`` is. 0 disables it.
        top_entropy_quantile: ρ of "Beyond the 80/20 rule" (TRL's option of the same name): the policy-gradient term
            keeps only loss tokens whose entropy is ≥ the ``1 − ρ`` quantile of the entropies of the micro-batch's
            loss tokens (each rank's own); dropped tokens still count in the normalisers and in the KL term.
            1 keeps every token; 0 keeps only the highest-entropy token(s).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    aggregation: LossAggregation = "token-mean"
    norm_constant: float | None = None
    mask_truncated_completions: bool = False
    importance_sampling_level: ImportanceSamplingLevel = "token"
    policy_loss: PolicyLoss = "ppo_clip"
    cispo_max_ratio: float = 5.0
    kl_bias_correction: bool = False
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0

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


@dataclass
class OptimConfig:
    """AdamW, the LR schedule and the PPO update structure.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear warm-up in optimizer steps.
        schedule: ``constant``, ``linear`` (decay to 0) or ``cosine`` after warm-up.
        total_steps: optimizer steps for the decay; default: ``trainer.max_steps`` × updates per step.
        grad_clip: max global grad norm, or None.
        ppo_epochs: passes over each rollout batch.
        mini_batch_size: completions per optimizer step (None: the whole rollout batch, i.e. on-policy).
        micro_batch_size: completions per forward/backward (gradient accumulation inside a mini-batch).
        share_prompt_prefix: in every log-prob forward pass (training, old and reference log-probs), run each
            distinct prompt of a micro-batch once and let its completions attend to the shared KV cache, instead of
            recomputing the prompt for each of its G completions. Exact: the same log-probs and gradients up to
            float rounding (``tests/test_share_prompts.py``). Not applied under gradient checkpointing (Hugging
            Face disables the KV cache there) or DeepSpeed ZeRO-3 (ranks must make equal numbers of forward
            calls). On-policy, micro-batches hold consecutive rows and a prompt's G completions are consecutive, so
            a ``micro_batch_size`` that is a multiple of G computes each prompt once; with mini-batches rows are
            shuffled and prompts share only within a micro-batch.
    """

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    total_steps: int | None = None
    grad_clip: float | None = 1.0
    ppo_epochs: int = 1
    mini_batch_size: int | None = None
    micro_batch_size: int = 8
    share_prompt_prefix: bool = True

    def __post_init__(self) -> None:
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
        ])


def check_module_settings(aligner: Any, num_generations: int, policy: str | None, tokenizer: str | None) -> None:
    """Checks of ``PRPOModule``'s settings that involve more than one config group, before any model loads.

    Args:
        aligner: the advantage aligner (its ``group_relative`` flag).
        num_generations: ``model.sampling.num_generations``.
        policy: ``model.policy`` (a builtin name is checked against the registered builtins).
        tokenizer: ``model.tokenizer`` (likewise).

    Raises:
        ValueError: a group-relative aligner with ``num_generations: 1`` (every advantage would be 0, so the run
            would train with loss 0), or a misspelt builtin model name.
    """
    from prpo_lightning.models import check_builtin_name

    if getattr(aligner, "group_relative", False) and num_generations < 2:
        raise ValueError(f"model.sampling.num_generations must be >= 2 with {type(aligner).__name__}; got "
                         f"{num_generations}: its advantages are relative to the prompt's group, so a lone completion "
                         "gets advantage 0 and the run would train with loss 0; raise num_generations or choose an "
                         "aligner that is not group-relative")
    for key, name in (("model.policy", policy), ("model.tokenizer", tokenizer)):
        if name is not None:
            check_builtin_name(name, key)
