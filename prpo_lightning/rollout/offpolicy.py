"""Sampler-vs-trainer mismatch: the weight-sync self-check and off-policy (importance-sampling) correction.

When the rollout engine is not exactly the trainer (vLLM: other kernels, other numerics, and a stale engine if a
weight sync is missed), the tokens are drawn from ``π_sampler`` while the loss assumes ``π_old``. Two tools:

- :func:`mismatch_metrics` / :class:`MismatchCheck`: mean and max ``|log π_sampler − log π_old|`` over sampled
  tokens and a sequence-level KL estimate, logged every step and checked against a threshold (``warn`` or
  ``raise``). A missed sync shows up as a jump of these numbers (TRL #5312: 0.015 → 0.2).
- :func:`correction_weights`: per-token loss weights from ``ρ = π_old / π_sampler`` (TRL's
  ``vllm_importance_sampling_*``, verl's ``rollout_correction``, OpenRLHF's ``is_correction_*``).

Shapes: ``B`` completions, ``T`` completion length. All inputs are log-probs of the *sampled* tokens.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import Tensor

from prpo_lightning.config import MismatchCheck, RolloutCorrectionConfig, SamplerMismatchError  # noqa: F401
from prpo_lightning.runtime.distributed import all_reduce_sum, is_distributed

log = logging.getLogger(__name__)






def mismatch_metrics(
    sampler_logprobs: Tensor, trainer_logprobs: Tensor, mask: Tensor, across_ranks: bool = False
) -> dict[str, float]:
    """How far the sampler's distribution is from the trainer's, on the sampled tokens.

    The KL is ``KL(π_sampler ‖ π_trainer)`` of whole sequences, estimated with Schulman's k3 estimator summed over
    each sequence's tokens and averaged over sequences: with ``r_t = π_trainer(y_t) / π_sampler(y_t)``,
    ``k3_t = r_t − 1 − log r_t ≥ 0``. Because ``y_t`` is drawn from ``π_sampler``, ``E[k3_t | prefix]`` is the
    per-token KL, and by the chain rule their sum estimates the sequence KL without bias.

    Args:
        sampler_logprobs: ``(B, T)`` ``log π_sampler(y_t)`` from the engine (``B = 0`` allowed: a rank without
            rollouts still joins the reduction).
        trainer_logprobs: ``(B, T)`` ``log π_trainer(y_t)`` (the no-grad ``log π_old`` pass).
        mask: ``(B, T)`` bool, the sampled tokens (completion mask).
        across_ranks: reduce over all ranks of the ``torch.distributed`` group (a collective: every rank must
            call), so that every rank gets the metrics of the global batch and a check on them decides the same
            everywhere. No-op in a single process.

    Returns:
        ``rollout/logp_diff_mean``, ``rollout/logp_diff_max`` (over masked tokens) and ``rollout/kl`` (mean over
        rows with at least one token). All three are 0.0 when no token is masked in (on any rank).
    """
    mask = mask.bool()
    rows = mask.any(dim=1)  # (B,)
    log_r = (trainer_logprobs.double() - sampler_logprobs.double()).masked_fill(~mask, 0.0)  # (B, T)
    diff = log_r.abs()  # (B, T), 0 off the mask
    k3 = (torch.expm1(log_r) - log_r).masked_fill(~mask, 0.0)  # (B, T): r − 1 − log r
    # [Σ|Δ|, tokens, Σ sequence KL, rows with tokens]; the max is 0 on a rank without tokens (|Δ| >= 0)
    sums = [float(diff.sum()), float(mask.sum()), float(k3.sum()), float(rows.sum())]
    diff_max = float(diff.max()) if diff.numel() else 0.0
    if across_ranks and is_distributed():
        sums = all_reduce_sum(sums)
        diff_max = _all_reduce_max_float(diff_max)
    diff_sum, tokens, kl_sum, seqs = sums
    if tokens == 0:
        return {"rollout/logp_diff_mean": 0.0, "rollout/logp_diff_max": 0.0, "rollout/kl": 0.0}
    return {"rollout/logp_diff_mean": diff_sum / tokens, "rollout/logp_diff_max": diff_max, "rollout/kl": kl_sum / seqs}


def _all_reduce_max_float(value: float) -> float:
    """Maximum of a float over all ranks (float64, on the backend's device)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())








def correction_weights(
    old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, config: RolloutCorrectionConfig
) -> tuple[Tensor, dict[str, float]]:
    """Per-token loss weights ``(B, T)`` from ``log ρ = log π_old − log π_sampler`` (no gradient).

    Args:
        old_logprobs: ``(B, T)`` ``log π_old`` of the sampled tokens (trainer, no grad).
        sampler_logprobs: ``(B, T)`` ``log π_sampler`` of the same tokens (engine).
        mask: ``(B, T)`` bool, the tokens in the loss.
        config: the correction mode and bounds.

    Returns:
        ``(weights, metrics)``: ``(B, T)`` float32 weights, 0 off the mask (1 on it when ``config.mode`` is None),
        and ``is/weight_mean`` (over masked tokens) and ``is/frac_masked`` (fraction of masked tokens whose
        weight was zeroed, 0 for truncate modes) or ``is/frac_clipped`` (fraction clamped, 0 for mask modes).
    """
    mask = mask.bool()
    n_tok = max(int(mask.sum()), 1)
    if config.mode is None:
        weights = mask.float()  # (B, T)
        return weights, {"is/weight_mean": float(weights.sum()) / n_tok}
    log_rho = (old_logprobs.detach().double() - sampler_logprobs.double()).masked_fill(~mask, 0.0)  # (B, T)
    if config.mode.startswith("sequence"):
        log_rho = log_rho.sum(dim=1, keepdim=True).expand_as(log_rho)  # (B, T): log ρ_seq on every token
    log_hi = math.log(config.clip_max)
    log_lo = math.log(config.clip_min) if config.clip_min else -math.inf
    below, above = log_rho < log_lo, log_rho > log_hi  # (B, T) each, compared in log space (no overflow)
    if config.mode.endswith("truncate"):
        weights = log_rho.clamp(min=log_lo, max=log_hi).exp()  # (B, T)
        out_of_range = ("is/frac_clipped", below | above)
    else:  # token_mask, sequence_mask, icepop
        weights = torch.where(below | above, torch.zeros_like(log_rho), log_rho.exp())  # (B, T)
        out_of_range = ("is/frac_masked", below | above)
    weights = (weights * mask).float()  # (B, T)
    metrics = {
        "is/weight_mean": float(weights.sum()) / n_tok,
        out_of_range[0]: float((out_of_range[1] & mask).sum()) / n_tok,
    }
    return weights, metrics
