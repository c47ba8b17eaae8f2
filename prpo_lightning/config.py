"""Typed configuration groups of :class:`~prpo_lightning.module.PRPOModule` (jsonargparse turns them into CLI groups)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prpo_lightning.losses import KLEstimator, LossAggregation


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
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    aggregation: LossAggregation = "token-mean"
    norm_constant: float | None = None
    mask_truncated_completions: bool = False


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
