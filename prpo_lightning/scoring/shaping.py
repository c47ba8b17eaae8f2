"""Reward shaping applied to the outcome rewards before the aligner: DAPO's soft overlong punishment.

``reward_shaping.overlong: {buffer_length, penalty}`` adds, to each completion's outcome reward, a length penalty
that is 0 up to ``max_new_tokens − buffer_length`` tokens and falls linearly to ``−penalty`` at ``max_new_tokens``
(DAPO eq. 13; TRL's ``get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`` with ``penalty = 1``;
verl's ``reward_model.overlong_buffer: {len, penalty_factor}``).
"""

from __future__ import annotations


from torch import Tensor

from prpo_lightning.config import OverlongConfig, RewardShapingConfig








def overlong_penalty(lengths: Tensor, max_new_tokens: int, cfg: OverlongConfig) -> Tensor:
    """``(B,)`` DAPO soft overlong reward ``r(L)`` of completions with ``L`` tokens (EOS included).

    With ``L_max = max_new_tokens`` and ``L_c = buffer_length``: ``r = 0`` for ``L ≤ L_max − L_c``,
    ``r = −penalty · (L − (L_max − L_c)) / L_c`` for ``L_max − L_c < L ≤ L_max`` and ``−penalty`` beyond ``L_max``.

    Args:
        lengths: ``(B,)`` completion lengths in tokens.
        max_new_tokens: L_max, the sampling budget.
        cfg: the buffer length and penalty.

    Raises:
        ValueError: if ``buffer_length`` exceeds ``max_new_tokens`` (the ramp would start below 0 tokens).
    """
    if cfg.buffer_length > max_new_tokens:
        raise ValueError(f"model.reward_shaping.overlong.buffer_length ({cfg.buffer_length}) must be at most "
                         f"model.sampling.max_new_tokens ({max_new_tokens}): lower the buffer or raise the budget")
    start = max_new_tokens - cfg.buffer_length
    excess = (lengths.float() - start).clamp(min=0.0, max=float(cfg.buffer_length))  # (B,)
    return -cfg.penalty * excess / cfg.buffer_length  # (B,)


def apply_reward_shaping(
    outcome_rewards: Tensor, lengths: Tensor, max_new_tokens: int, cfg: RewardShapingConfig | None
) -> tuple[Tensor, dict[str, float]]:
    """Outcome rewards plus the configured shaping, and its metrics.

    Args:
        outcome_rewards: ``(B,)`` the verifier's rewards.
        lengths: ``(B,)`` completion lengths in tokens.
        max_new_tokens: the sampling budget.
        cfg: the shaping, or None (rewards returned unchanged, no metrics).

    Returns:
        ``(rewards, metrics)``: ``(B,)`` shaped rewards; ``reward/overlong_penalty`` (mean penalty, ≤ 0) and
        ``reward/overlong_frac`` (fraction of completions penalised) when overlong shaping is on.
    """
    if cfg is None or cfg.overlong is None:
        return outcome_rewards, {}
    penalty = overlong_penalty(lengths, max_new_tokens, cfg.overlong)  # (B,)
    metrics = {
        "reward/overlong_penalty": float(penalty.mean()) if penalty.numel() else 0.0,
        "reward/overlong_frac": float((penalty < 0).float().mean()) if penalty.numel() else 0.0,
    }
    return outcome_rewards + penalty.to(outcome_rewards.dtype), metrics
