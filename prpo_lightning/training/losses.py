"""Policy-gradient loss pieces: importance ratios (token or sequence level), PPO-clip with dual clip, CISPO,
the top-entropy token mask, KL estimators and loss aggregation.

Conventions follow verl (``core_algos.py``) and process_methods_spec.md §0.3–0.5. Every function works on
``(B, T)`` token tensors with a ``(B, T)`` boolean mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prpo_lightning.config import ImportanceSamplingLevel, KLEstimator, LossAggregation, PolicyLoss  # noqa: E402,F401
LOSS_AGGREGATIONS: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def importance_ratio(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: ImportanceSamplingLevel = "token"
) -> Tensor:
    """The importance ratio ``π_θ / π_old`` of each token, at token or sequence level.

    - ``token``: ``ρ_t = exp(log π_θ(y_t) − log π_old(y_t))``;
    - ``sequence`` (GSPO, TRL ``importance_sampling_level="sequence"``): ``ρ_t = s = exp((1/|y|) Σ_{t∈y}
      (log π_θ(y_t) − log π_old(y_t)))`` for every token of the sequence, the sum and ``|y|`` over its ``mask`` tokens
      (a sequence without tokens gets ``s = 1``).

    The log-ratio is clamped to [−20, 20] before ``exp``.

    Args:
        logprobs: ``(B, T)`` log π_θ of the sampled tokens (with grad).
        old_logprobs: ``(B, T)`` log π_old (no grad).
        mask: ``(B, T)`` bool, the tokens of each sequence (used at sequence level only).
        level: ``"token"`` or ``"sequence"``.

    Raises:
        ValueError: for an unknown level.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    if level == "sequence":
        m = mask.to(log_ratio.dtype)  # (B, T)
        seq = (log_ratio * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
        log_ratio = seq.expand_as(log_ratio)  # (B, T)
    elif level != "token":
        raise ValueError(f"unknown importance sampling level {level!r}; use 'token' or 'sequence'")
    return torch.exp(log_ratio.clamp(-20.0, 20.0))  # (B, T)


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = 3.0
) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss ``ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)`` of a given ratio, with dual clip.

    Args:
        ratio: ``(B, T)`` importance ratio ρ (with grad), see :func:`importance_ratio`.
        advantages: ``(B, T)`` token advantages.
        eps_low: lower clip range ε_low.
        eps_high: upper clip range ε_high.
        dual_clip: the dual-clip constant c (> 1) for ``A < 0``, or None.

    Returns:
        ``(loss, clipped)``: ``(B, T)`` per-token loss and ``(B, T)`` bool clip indicator.

    Raises:
        ValueError: if ``dual_clip`` is not greater than 1.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    unclipped = -advantages * ratio  # (B, T)
    clipped_obj = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # (B, T)
    loss = torch.maximum(unclipped, clipped_obj)  # (B, T)
    clipped = clipped_obj > unclipped  # (B, T)
    if dual_clip is not None:
        cap = -advantages * dual_clip  # (B, T)
        dual = (advantages < 0) & (loss > cap)  # (B, T)
        loss = torch.where(dual, cap, loss)  # (B, T)
        clipped = clipped | dual
    return loss, clipped


def cispo_loss(logprobs: Tensor, ratio: Tensor, advantages: Tensor, max_ratio: float = 5.0) -> tuple[Tensor, Tensor]:
    """Per-token CISPO loss ``ℓ = −sg[min(ρ, ρ_max)] · A · log π_θ`` (MiniMax-M1; TRL ``loss_type="cispo"``).

    The importance weight is clipped from above only and detached, so every token keeps a gradient
    ``sg[min(ρ, ρ_max)] · A · ∇log π_θ``, unlike PPO-clip which zeroes the gradient of clipped tokens.

    Args:
        logprobs: ``(B, T)`` log π_θ of the sampled tokens (with grad).
        ratio: ``(B, T)`` importance ratio ρ (token or sequence level); only its value is used.
        advantages: ``(B, T)`` token advantages.
        max_ratio: ρ_max, the cap of the weight (TRL's ``epsilon_high`` under ``cispo``; ScaleRL's ε_max = 5).

    Returns:
        ``(loss, clipped)``: ``(B, T)`` per-token loss and ``(B, T)`` bool, True where ``ρ > ρ_max``.
    """
    weight = ratio.detach().clamp(max=max_ratio)  # (B, T)
    return -weight * advantages * logprobs, ratio.detach() > max_ratio


def top_entropy_mask(entropies: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """Tokens whose entropy is at or above the ``1 − quantile`` quantile of the masked tokens' entropies.

    As TRL's ``top_entropy_quantile`` ("Beyond the 80/20 rule"): ``quantile = ρ`` keeps the top-ρ fraction of the
    tokens by entropy; the threshold is ``torch.quantile`` (linear interpolation) of the entropies of the ``mask``
    tokens at ``1 − ρ``. ``ρ = 1`` keeps every masked token; ``ρ = 0`` keeps only the highest-entropy token(s).
    No masked token: nothing is kept.

    Args:
        entropies: ``(B, T)`` entropies of the current policy (no grad needed).
        mask: ``(B, T)`` bool, the tokens the quantile is taken over (the loss tokens).
        quantile: ρ in [0, 1].

    Returns:
        ``(B, T)`` bool, a subset of ``mask``.
    """
    values = entropies.detach()[mask].float()  # (N,)
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropies.detach() >= threshold) & mask  # (B, T)


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[Tensor, Tensor]:
    """Per-token clipped surrogate ``ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)``, with dual clip.

    For ``A < 0`` the dual clip caps the loss at ``−c·A`` (``c = dual_clip > 1``).

    Args:
        logprobs: ``(B, T)`` log π_θ of the sampled tokens (with grad).
        old_logprobs: ``(B, T)`` log π_old (no grad).
        advantages: ``(B, T)`` token advantages.
        eps_low: lower clip range ε_low.
        eps_high: upper clip range ε_high (DAPO's clip-higher uses 0.28).
        dual_clip: the constant c, or None to disable.

    Returns:
        ``(loss, clipped)``: ``(B, T)`` per-token loss and ``(B, T)`` bool, True where the clipped branch
        (or the dual clip) determined the loss.

    Raises:
        ValueError: if ``dual_clip`` is not greater than 1.
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))  # (B, T)
    return clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate from sampled-token log-probs, ``d = log π_θ − log π_ref``.

    - ``k1``: ``d``;
    - ``k2``: ``d²/2``;
    - ``k3``: ``exp(−d) + d − 1`` (≥ 0), with −d clamped to [−20, 20] and the result to [−10, 10] as in verl.

    Args:
        logprobs: ``(B, T)`` log π_θ.
        ref_logprobs: ``(B, T)`` log π_ref.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``(B, T)`` per-token KL estimate.

    Raises:
        ValueError: for an unknown estimator.
    """
    d = logprobs - ref_logprobs  # (B, T)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        neg = (-d).clamp(-20.0, 20.0)  # (B, T)
        return (torch.exp(neg) - neg - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1', 'k2' or 'k3'")


def aggregate_loss(
    loss: Tensor,
    mask: Tensor,
    mode: LossAggregation = "token-mean",
    norm_constant: float | None = None,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar.

    - ``token-mean``: ``Σ m·ℓ / Σ m``;
    - ``seq-mean-token-mean``: ``(1/B) Σ_i (Σ_t m·ℓ / Σ_t m)``;
    - ``seq-mean-token-sum``: ``(1/B) Σ_i Σ_t m·ℓ``;
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): ``Σ m·ℓ / (B·C)`` with C = ``norm_constant`` (default T).

    Args:
        loss: ``(B, T)`` per-token loss.
        mask: ``(B, T)`` bool valid-token mask.
        mode: the aggregation mode.
        norm_constant: the constant C of ``seq-mean-token-sum-norm``.
        num_tokens: global token count to divide by in ``token-mean`` (for mini-batch accumulation);
            defaults to ``Σ m`` of this call.
        num_sequences: global sequence count B for the ``seq-*`` modes; defaults to this call's B.

    Raises:
        ValueError: for an unknown mode.
    """
    m = mask.to(loss.dtype)  # (B, T)
    masked = loss * m  # (B, T)
    b = float(num_sequences) if num_sequences is not None else float(loss.shape[0])
    if mode == "token-mean":
        denom = num_tokens if num_tokens is not None else m.sum().clamp(min=1.0)
        return masked.sum() / denom
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B,)
        return per_seq.sum() / b
    if mode == "seq-mean-token-sum":
        return masked.sum() / b
    if mode == "seq-mean-token-sum-norm":
        c = float(norm_constant) if norm_constant is not None else float(loss.shape[1])
        return masked.sum() / (b * c)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGGREGATIONS}")

