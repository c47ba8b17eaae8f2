"""``PolicyUpdater``: the PPO update of one training step, epochs × mini-batches × micro-batches.

The module calls :meth:`PolicyUpdater.update` once per training step with the scored rollout. Each optimizer step
backpropagates one mini-batch in micro-batches whose summed gradient equals the gradient of the whole mini-batch
loss; with several ranks the normalisers are global and every rank makes the same number of passes.

The per-token policy-gradient term is the PPO-clip or CISPO loss of a token- or sequence-level importance ratio
(``loss.policy_loss``, ``loss.importance_sampling_level``), restricted to the highest-entropy tokens under
``loss.top_entropy_quantile``, and multiplied by the rollout's importance-sampling weights (``RolloutBatch.is_weights``,
:func:`~prpo_lightning.rollout.offpolicy.correction_weights`) when the rollout engine is not exactly the trainer's
distribution. The KL term (optionally weighted by the ratio, ``loss.kl_bias_correction``) and the entropy bonus
(``loss.entropy_coef``) are added to it.

The learning-rate schedule (:func:`lr_factor`) and the gradient-norm helpers of the manual optimisation loop live
here too.

Shapes: ``b`` rows of a mini-/micro-batch, ``t`` completion length (trimmed to the longest row).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.config import LossConfig, OptimConfig
from prpo_lightning.runtime.distributed import all_reduce_max, all_reduce_sum, is_distributed
from prpo_lightning.training.logprobs import completion_logprobs
from prpo_lightning.training.losses import (
    aggregate_loss,
    cispo_loss,
    clipped_surrogate,
    importance_ratio,
    kl_penalty,
    top_entropy_mask,
)
from prpo_lightning.training.packing import check_packing_support, micro_batches, row_lengths, trim_padding
from prpo_lightning.training.plan import PassPlan


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (linear warm-up, then constant/linear/cosine)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR schedule {schedule!r}; use constant, linear or cosine")


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the gradients of ``model`` (before clipping)."""
    norms = [p.grad.detach().norm(2) for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def deepspeed_engine(trainer: Any) -> Any | None:
    """The ``DeepSpeedEngine`` that wraps the module under Lightning's ``DeepSpeedStrategy``, else None."""
    strategy = getattr(trainer, "strategy", None)
    if type(strategy).__name__ != "DeepSpeedStrategy":
        return None
    return getattr(strategy, "model", None)


def _start_micro_step(engine: Any) -> None:
    """Start another micro-step of a DeepSpeed engine inside one training step, as its ``forward`` would.

    Lightning calls the engine's ``forward`` once per ``training_step``, and the update's micro-batches run inside
    it. ZeRO (DeepSpeed >= 0.17) counts micro-steps in that ``forward`` (``clear_backward_seen_flag``): without a
    new count, ZeRO-3 copies each micro-batch's gradient partition over the previous one instead of adding it, so
    the step would apply the last micro-batch's gradient only (``tests/test_packing_zero.py`` caught it).
    """
    clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
    if clear is not None:
        clear()


def engine_grad_norm(engine: Any) -> float:
    """The global gradient norm (before clipping) that a ``DeepSpeedEngine`` computed in its last ``step()``.

    Under ZeRO the gradients are partitioned and ``p.grad`` is None, so :func:`grad_norm` would read 0; DeepSpeed
    clips (its ``gradient_clipping`` setting) and records the norm itself.
    """
    value = engine.get_global_grad_norm()
    return float(value) if value is not None else float("nan")


def loss_mask(batch: RolloutBatch, loss_cfg: LossConfig) -> Tensor:
    """``(b, T)`` tokens that enter the loss: the completion mask, minus truncated completions when
    ``loss.mask_truncated_completions`` is set."""
    mask = batch.completion_mask
    if loss_cfg.mask_truncated_completions and batch.truncated is not None:
        mask = mask & ~batch.truncated.bool()[:, None]
    return mask


def policy_gradient_terms(
    logp: Tensor,
    old: Tensor,
    adv: Tensor,
    is_weights: Tensor | None,
    loss_cfg: LossConfig,
    seq_mask: Tensor | None = None,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token policy-gradient loss: PPO-clip or CISPO of the importance ratio, times the importance-sampling weight.

    Args:
        logp: ``(b, t)`` ``log π_θ`` of the sampled tokens (with grad).
        old: ``(b, t)`` ``log π_old`` (no grad).
        adv: ``(b, t)`` token advantages.
        is_weights: ``(b, t)`` off-policy correction weights ``w_t`` (no grad), or None (weights ≡ 1).
        loss_cfg: the policy loss, its importance-sampling level, clip ranges and dual clip.
        seq_mask: ``(b, t)`` bool, each sequence's tokens for the sequence-level ratio (default: all ``t``).
        keep: ``(b, t)`` bool, tokens kept by ``top_entropy_quantile`` (None: all); the others get loss 0.

    Returns:
        ``(pg, clipped)``: ``(b, t)`` ``w_t · ℓ_t`` and the ``(b, t)`` bool clip indicator.
    """
    seq_mask = torch.ones_like(logp, dtype=torch.bool) if seq_mask is None else seq_mask  # (b, t)
    ratio = importance_ratio(logp, old, seq_mask, loss_cfg.importance_sampling_level)  # (b, t)
    if loss_cfg.policy_loss == "cispo":
        pg, clipped = cispo_loss(logp, ratio, adv, loss_cfg.cispo_max_ratio)  # (b, t)
    else:
        pg, clipped = clipped_surrogate(ratio, adv, loss_cfg.eps_low, loss_cfg.eps_high, loss_cfg.dual_clip)  # (b, t)
    if keep is not None:
        pg = pg * keep.to(pg.dtype)  # (b, t)
        clipped = clipped & keep
    if is_weights is not None:
        pg = pg * is_weights.to(pg.dtype)  # (b, t)
    return pg, clipped


def kl_term(
    logp: Tensor, old: Tensor, ref: Tensor, loss_cfg: LossConfig, seq_mask: Tensor | None = None
) -> Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate, times the importance ratio ρ (with grad) under ``kl_bias_correction``.

    Args:
        logp: ``(b, t)`` ``log π_θ`` (with grad).
        old: ``(b, t)`` ``log π_old`` (no grad).
        ref: ``(b, t)`` ``log π_ref``.
        loss_cfg: the KL estimator, ``kl_bias_correction`` and the importance-sampling level of ρ.
        seq_mask: ``(b, t)`` bool, each sequence's tokens for a sequence-level ρ (default: all ``t``).

    Returns:
        ``(b, t)`` per-token KL term.
    """
    kl = kl_penalty(logp, ref, loss_cfg.kl_estimator)  # (b, t)
    if loss_cfg.kl_bias_correction:
        seq_mask = torch.ones_like(logp, dtype=torch.bool) if seq_mask is None else seq_mask  # (b, t)
        kl = kl * importance_ratio(logp, old, seq_mask, loss_cfg.importance_sampling_level)  # (b, t)
    return kl


class PolicyUpdater:
    """PPO-clip (or CISPO) updates of the policy over a scored rollout, with global normalisers across ranks.

    With several ranks, ``mini_batch_size`` is per rank, loss normalisers are global (summed over ranks) and every
    rank makes the same number of backward passes and optimizer steps: a rank with fewer rows (skipped prompts, or
    no rollout) backpropagates zero-weighted dummy passes. The returned statistics are summed over ranks, i.e. they
    are the loss of the global batch.

    Args:
        policy: the trained policy.
        loss: the loss settings.
        optim: the update structure (``ppo_epochs``, ``mini_batch_size``, ``micro_batch_size``, ``grad_clip``).
        plan: the step's passes (``old_logprobs`` off: on-policy, the update's own pass gives ``log π_old``;
            ``reference``: a KL term is possible; ``share_prompt_prefix``).
        temperature: divides the logits of the log-prob pass (the sampling temperature).
        max_new_tokens: the default ``norm_constant`` of ``seq-mean-token-sum-norm``.
        seed: the run seed (mini-batch shuffling is seeded from ``(seed, step)``).
        pad_id: the token of the lock-step dummy passes.
        backward: backpropagates a loss (Lightning's ``manual_backward``: strategy-aware).
        clip_gradients: Lightning's ``clip_gradients(optimizer, gradient_clip_val=, gradient_clip_algorithm=)``.
        on_optimizer_step: called after every optimizer step (weight versions, reference sync).
    """

    def __init__(
        self, policy: torch.nn.Module, loss: LossConfig, optim: OptimConfig, plan: PassPlan, temperature: float,
        max_new_tokens: int, seed: int, pad_id: int, backward: Callable[[Tensor], None],
        clip_gradients: Callable[..., None], on_optimizer_step: Callable[[], None],
    ) -> None:
        self.policy, self.loss_cfg, self.optim_cfg, self.plan = policy, loss, optim, plan
        self.temperature, self.max_new_tokens, self.seed, self.pad_id = temperature, max_new_tokens, seed, pad_id
        self.backward, self.clip_gradients, self.on_optimizer_step = backward, clip_gradients, on_optimizer_step
        if optim.packing:
            check_packing_support(policy)

    def update(self, rollout: RolloutBatch | None, optimizer: Any, scheduler: Any, step: int, device: torch.device,
               ds_engine: Any = None, max_updates: int | None = None) -> dict[str, float]:
        """Run ``ppo_epochs`` × mini-batches of optimizer steps on this rank's rollout (a collective call).

        Args:
            rollout: the scored rollout of this rank, or None when it has no rows.
            optimizer: the (Lightning-wrapped) optimizer.
            scheduler: the LR scheduler (stepped after every optimizer step).
            step: ``global_step`` at the start of the step (seeds the shuffling).
            device: the policy's device.
            ds_engine: the DeepSpeed engine (its gradients are partitioned: it clips and reports the norm), or None.
            max_updates: optimizer steps left before ``trainer.max_steps`` (the same on every rank): the update
                stops after that many, so a run never makes more than ``max_steps``; None: no limit.

        Returns:
            The mean loss statistics of the batch's optimizer steps and ``lr``, the mean rate they used.
        """
        cfg = self.optim_cfg
        n = rollout.size if rollout is not None else 0
        n_max = all_reduce_max(n)  # rows of the largest rank: sets the loop structure on every rank
        if n_max == 0:
            return {}
        mb = min(cfg.mini_batch_size or n_max, n_max)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        sums: dict[str, float] = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0}
        if self.loss_cfg.entropy_coef > 0:
            sums["entropy_bonus"] = 0.0
        if self.loss_cfg.top_entropy_quantile < 1.0:
            sums["top_entropy_frac"] = 0.0
        n_updates, lrs_used = 0, []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=gen) if (mb < n_max or cfg.ppo_epochs > 1) else torch.arange(n)
            for start in range(0, n_max, mb):
                if max_updates is not None and n_updates >= max_updates:
                    break
                idx = order[start : start + mb]  # (b,), possibly empty on a rank with fewer rows
                n_micro = (None if cfg.micro_batch_tokens is not None  # counted from the rows in accumulate
                           else math.ceil(min(mb, n_max - start) / cfg.micro_batch_size))
                optimizer.zero_grad()
                stats = self.accumulate(rollout, idx, device, n_micro, ds_engine)
                if cfg.grad_clip is not None and ds_engine is None:  # DeepSpeed clips inside its step
                    stats["grad_norm"] = grad_norm(self.policy)
                    self.clip_gradients(optimizer, gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm")
                lrs_used.append(float(scheduler.get_last_lr()[0]))  # the rate this step uses
                optimizer.step()
                if ds_engine is not None:
                    stats["grad_norm"] = engine_grad_norm(ds_engine)
                scheduler.step()
                self.on_optimizer_step()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        out = {k: v / max(n_updates, 1) for k, v in sums.items()}
        out["lr"] = sum(lrs_used) / len(lrs_used)  # mean rate of this batch's steps (not the next step's)
        return out

    def accumulate(self, rollout: RolloutBatch | None, idx: Tensor, device: torch.device,
                   n_micro: int | None = None, ds_engine: Any = None) -> dict[str, float]:
        """Backward the mini-batch ``idx`` in micro-batches; the summed gradient equals the full mini-batch loss.

        Token and sequence counts are summed over ranks and each rank's loss is multiplied by the world size, so the
        gradient that DDP/DeepSpeed average over ranks is the gradient of the global mini-batch loss. ``n_micro``
        (the same on every rank) pads this rank's micro-batches with zero-weighted dummy passes. With
        ``optim.micro_batch_tokens`` the micro-batches are cut by the token budget (the most any rank cuts sets
        ``n_micro``); the normalisers are the mini-batch's either way, so the grouping leaves the gradient unchanged
        up to float rounding.

        Under DeepSpeed every ``backward`` is a gradient-accumulation boundary by default (its config's
        ``gradient_accumulation_steps`` is 1: Lightning's), and ZeRO then keeps only the last micro-batch's gradient
        for the step: the engine is told that only the last micro-batch ends the accumulation, and each micro-batch
        starts a micro-step (:func:`_start_micro_step`).

        Args:
            rollout: the scored rollout (None: this rank only makes dummy passes).
            idx: ``(b,)`` rows of the mini-batch.
            device: the policy's device.
            n_micro: micro-batches every rank makes (default: this rank's own count).
            ds_engine: the DeepSpeed engine, or None.
        """
        lcfg, ocfg = self.loss_cfg, self.optim_cfg
        rows = rollout.select(idx) if rollout is not None and idx.numel() else None
        mask = loss_mask(rows, lcfg) if rows is not None else torch.zeros(0, 1, dtype=torch.bool)  # (b, T)
        n_seq = float(idx.numel())
        if rows is not None and lcfg.mask_truncated_completions and rows.truncated is not None:
            n_seq -= float(rows.truncated.sum())
        n_tok, n_seq = all_reduce_sum([float(mask.sum()), n_seq])
        n_tok, n_seq = max(n_tok, 1.0), max(n_seq, 1.0)
        scale = float(torch.distributed.get_world_size()) if is_distributed() else 1.0
        agg = dict(mode=lcfg.aggregation, norm_constant=lcfg.norm_constant or float(self.max_new_tokens),
                   num_tokens=n_tok, num_sequences=n_seq)
        on_policy = not self.plan.old_logprobs  # old log-probs come from this forward pass
        bonus_on, top_on = lcfg.entropy_coef > 0, lcfg.top_entropy_quantile < 1.0
        stats = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
        if on_policy:
            stats["entropy"] = 0.0
        if bonus_on:
            stats["entropy_bonus"] = 0.0
        if top_on:
            stats["top_entropy_frac"] = 0.0
        pieces: list[Tensor | None] = []
        if rows is not None:  # row-count micro-batches are idx.split(micro_batch_size)
            lengths = row_lengths(rows.prompt_mask, rows.completion_mask)  # (b,)
            pieces = [idx[p] for p in micro_batches(lengths, ocfg.micro_batch_size, ocfg.micro_batch_tokens,
                                                   ocfg.packing)]
        if ocfg.micro_batch_tokens is not None:
            n_micro = all_reduce_max(len(pieces))
        pieces += [None] * max((n_micro or len(pieces)) - len(pieces), 0)
        for k, micro_idx in enumerate(pieces):
            if ds_engine is not None:  # the same count on every rank: the boundaries (and reductions) line up
                ds_engine.set_gradient_accumulation_boundary(k == len(pieces) - 1)
                if k > 0:  # what the engine's forward does before a micro-step (ZeRO counts micro-steps there)
                    _start_micro_step(ds_engine)
            if micro_idx is None:  # lock-step dummy pass: all parameters take part, zero gradient
                dummy = torch.full((1, 1), self.pad_id, dtype=torch.long, device=device)
                logits = self.policy(input_ids=dummy).logits
                self.backward(logits.float().sum() * 0.0)
                continue
            micro = rollout.select(micro_idx)
            t_len = int(micro.completion_mask.sum(dim=1).max().clamp(min=1))  # trim right padding
            c_ids = micro.completion_ids[:, :t_len].to(device)  # (b, t)
            c_attn = micro.completion_mask[:, :t_len].to(device)  # (b, t)
            c_mask = loss_mask(micro, lcfg)[:, :t_len].to(device)  # (b, t) tokens in the loss
            p_ids, p_mask = micro.prompt_ids.to(device), micro.prompt_mask.to(device)  # (b, P)
            if ocfg.micro_batch_tokens is not None:  # and the prompts' left padding
                p_ids, p_mask, _, _ = trim_padding(p_ids, p_mask, c_ids, c_attn)  # (b, p)
            logp, ent = completion_logprobs(
                self.policy, p_ids, p_mask, c_ids, c_attn, self.temperature,
                with_entropy=on_policy or bonus_on or top_on, share_prompts=self.plan.share_prompt_prefix,
                entropy_grad=bonus_on, packed=ocfg.packing,
            )  # (b, t), (b, t) | None
            old = logp.detach() if on_policy else micro.old_logprobs[:, :t_len].to(device)  # (b, t)
            if on_policy:
                stats["entropy"] += float((ent.detach() * c_mask).sum()) / n_tok
            keep = top_entropy_mask(ent, c_mask, lcfg.top_entropy_quantile) if top_on else None  # (b, t)
            weights = micro.is_weights[:, :t_len].to(device) if micro.is_weights is not None else None  # (b, t)
            adv = micro.advantages[:, :t_len].to(device)  # (b, t)
            pg, clipped = policy_gradient_terms(logp, old, adv, weights, lcfg, seq_mask=c_attn.bool(), keep=keep)
            pg_loss = aggregate_loss(pg, c_mask, **agg)
            loss = pg_loss
            if self.plan.reference and lcfg.kl_coef > 0:
                ref = micro.ref_logprobs[:, :t_len].to(device)  # (b, t)
                kl = kl_term(logp, old, ref, lcfg, seq_mask=c_attn.bool())  # (b, t)
                kl_loss = aggregate_loss(kl, c_mask, **agg)
                loss = loss + lcfg.kl_coef * kl_loss
                stats["kl"] += float(kl_loss.detach())
            if bonus_on:  # token mean over the mini-batch's loss tokens, whatever the aggregation
                bonus_mask = c_mask if keep is None else keep  # (b, t)
                entropy_bonus = (ent * bonus_mask.to(ent.dtype)).sum() / n_tok
                loss = loss - lcfg.entropy_coef * entropy_bonus
                stats["entropy_bonus"] += float(entropy_bonus.detach())
            if top_on:
                stats["top_entropy_frac"] += float(keep.sum()) / n_tok
            self.backward(loss * scale)
            stats["loss"] += float(loss.detach())
            stats["pg_loss"] += float(pg_loss.detach())
            stats["clip_frac"] += float((clipped & c_mask).sum()) / n_tok
        if is_distributed():  # each rank holds its share of the global loss: sum them
            stats = dict(zip(stats, all_reduce_sum(list(stats.values()))))
        return stats
