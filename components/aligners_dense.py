"""Dense process-credit aligners: SPRO (masked step advantage), PURE (min-form credit) and PRIME.

Formulas follow process_methods_spec.md §1 (SPRO), §3 (PURE, main-branch definition) and §4 (PRIME).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from components.aligners_base import (
    CALC,
    broadcast,
    finish,
    loo_advantage,
    masked_whiten,
    normalized_outcome,
    outcome_rewards,
    register_aligner,
    resolve_scale_rewards,
)
from prpo_lightning.scoring.aligner import AdvantageAligner, checked_step_scores, step_values_to_tokens
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.needs import ComponentNeeds
from prpo_lightning.scoring.grouping import (
    group_count,
    group_loo_mean,
    group_position_mean,
    group_sum,
    masked_row_mean,
)

__all__ = ["PRIMEAligner", "PUREAligner", "SPROAligner", "reverse_cumsum"]


def reverse_cumsum(x: Tensor, dim: int = -1) -> Tensor:
    """``y_t = Σ_{s ≥ t} x_s`` along ``dim`` (γ = 1 returns)."""
    return torch.flip(torch.cumsum(torch.flip(x, (dim,)), dim), (dim,))


def _log_ratio(batch: RolloutBatch) -> Tensor:
    """``(B, T)`` float64 ``log π_old − log π_ref`` on valid tokens, 0 on padding."""
    if batch.old_logprobs is None or batch.ref_logprobs is None:
        raise ValueError("this aligner needs batch.old_logprobs and batch.ref_logprobs (a reference model)")
    mask = batch.completion_mask
    d = batch.old_logprobs.to(mask.device, CALC) - batch.ref_logprobs.to(mask.device, CALC)  # (B, T)
    return torch.where(mask, d, torch.zeros_like(d))


@register_aligner("spro")
class SPROAligner(AdvantageAligner):
    """SPRO (arXiv 2507.01551): GRPO outcome advantage plus the Masked Step Advantage of the self-guided CPR.

    ``δ_{i,t} = log π_old − log π_ref``; cumulative process reward ``R̃_{i,t} = β Σ_{s≤t} δ_{i,s}``;
    masked step baseline ``b_{g,t} = Σ_{i∈g} M_{i,t} R̃_{i,t} / Σ_{i∈g} M_{i,t}`` over the group's responses still
    alive at t; ``MSA_{i,t} = M_{i,t}(R̃_{i,t} − b_{g,t})``; ``A_{i,t} = Â^o_i + c·MSA_{i,t}`` with the GRPO
    ``Â^o_i = (r_i − mean_g r)/(std_g r + ε)``. If π_old = π_ref, MSA ≡ 0 and SPRO = GRPO. Exact degenerate
    values: a position with one alive response (so a singleton group) or whose alive responses share the same
    R̃ (e.g. identical completions) has MSA = 0; a group whose rewards are all equal, or a singleton, has
    ``Â^o = 0`` for every ε; an empty completion's row is 0.

    Shapes: ``old_logprobs, ref_logprobs (B, T)``, ``outcome_rewards (B,)`` → ``(B, T)``. Needs a reference
    model; no PRM.

    Args:
        beta: β, the implicit-reward scale.
        msa_coef: c, weight of the MSA term (the paper's plain sum: 1).
        std_normalize: GRPO std division of the outcome term (False: ``scale_rewards="none"``).
        epsilon: ε of the outcome term.
        scale_rewards: std of the outcome term: ``"group"`` (default), ``"batch"`` or ``"none"`` (TRL's names).
        max_process_to_outcome: κ, an optional cap on the process term (not in the paper; None, the default, is
            the paper's SPRO). When the batch's mean ``|c·MSA|`` over valid tokens exceeds κ times its mean
            ``|Â^o|``, the process term is scaled down to exactly that size: ``c·MSA·κ·mean|Â^o| / mean|c·MSA|``.
            A batch with no outcome signal (every group's rewards equal) then gets a process term of exactly 0.
            κ = 0 gives GRPO exactly. The cap bounds the process term's size, not the policy's drift: in the
            replication (docs/replication.md, "SPRO") κ = 0.25 softened SPRO's collapse at large lr·β but did
            not prevent it.

    Raises:
        ValueError: for an unknown ``scale_rewards`` or a negative ``max_process_to_outcome``.
    """

    needs = ComponentNeeds(group_relative=True, reference_logprobs=True)

    def __init__(
        self,
        beta: float = 0.05,
        msa_coef: float = 1.0,
        std_normalize: bool = True,
        epsilon: float = 1e-6,
        scale_rewards: str = "group",
        max_process_to_outcome: float | None = None,
    ) -> None:
        if max_process_to_outcome is not None and not max_process_to_outcome >= 0:
            raise ValueError(f"SPROAligner: max_process_to_outcome must be None (no cap) or >= 0, "
                             f"got {max_process_to_outcome}")
        self.max_process_to_outcome = max_process_to_outcome
        self.scale_rewards = resolve_scale_rewards("SPROAligner", scale_rewards, std_normalize)
        self.beta = beta
        self.msa_coef = msa_coef
        self.std_normalize = std_normalize
        self.epsilon = epsilon

    def masked_step_advantage(self, batch: RolloutBatch) -> Tensor:
        """``(B, T)`` float64 MSA, 0 on padding."""
        mask = batch.completion_mask  # (B, T)
        m = mask.to(CALC)
        cpr = self.beta * torch.cumsum(_log_ratio(batch), dim=1) * m  # (B, T)
        base = group_position_mean(cpr, mask, batch.group_ids)  # (B, T) b_{g,t}, exact for equal R̃
        return (cpr - base) * m

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """``{"outcome": Â^o broadcast, "process": c·MSA}`` (capped by ``max_process_to_outcome``), both ``(B, T)``
        float64, 0 on padding."""
        mask = batch.completion_mask
        ao = normalized_outcome(outcome_rewards(batch), batch.group_ids, True, self.epsilon,
                                scale_rewards=self.scale_rewards)  # (B,)
        outcome = broadcast(ao, mask)  # (B, T)
        process = self.msa_coef * self.masked_step_advantage(batch)  # (B, T)
        if self.max_process_to_outcome is not None:
            limit = self.max_process_to_outcome * outcome.abs().sum()  # κ·Σ|Â^o| (the token counts cancel)
            size = process.abs().sum()  # Σ|c·MSA|
            if size > limit:
                process = process * (limit / size)  # (B, T) mean |process| = κ·mean |outcome| exactly
        return {"outcome": outcome, "process": process}

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """The implicit process reward: ``implicit_reward/token_mean`` and ``token_abs_mean`` (β·δ per valid token),
        ``cpr_final_mean`` and ``cpr_final_std`` (β·Σ δ over each non-empty completion: R̃ at its last token)."""
        mask = batch.completion_mask  # (B, T)
        reward = self.beta * _log_ratio(batch)  # (B, T) 0 on padding
        n_tok = mask.sum().clamp(min=1)
        alive = mask.any(dim=1)  # (B,)
        final = reward.sum(dim=1)[alive]  # (B',) R̃ at each completion's last token
        return {
            "implicit_reward/token_mean": float(reward.sum() / n_tok),
            "implicit_reward/token_abs_mean": float(reward.abs().sum() / n_tok),
            "implicit_reward/cpr_final_mean": float(final.mean()) if final.numel() else 0.0,
            "implicit_reward/cpr_final_std": float(final.std()) if final.numel() > 1 else 0.0,
        }


@register_aligner("pure")
class PUREAligner(AdvantageAligner):
    """PURE (arXiv 2504.15275): min-form credit assignment of PRM step rewards, plus RLOO verifiable reward.

    With ``P_{i,k}`` the PRM's P(step k correct): ``p = 2P − 1`` (``score_transform="2p-1"``).

    * ``credit="soft_min"`` (default): ``w_{i,k} = softmax_k(−p_{i,k}/T)`` over row i's steps,
      ``r*_{i,k} = w_{i,k} p_{i,k}`` (so ``Σ_k r* → min_k p`` as T → 0); ``"sum"``: ``r* = p``.
      Baseline with ``R_j = Σ_k r*_{j,k}``: ``"token"`` (default) ``r̂_{i,k} = r*_{i,k} − a_i·n_{i,k}``,
      ``a_i = Σ_{j≠i} R_j / Σ_{j≠i} |y_j|`` (``n_{i,k}`` = tokens of step k); ``"step"``
      ``r̂_{i,k} = r*_{i,k} − mean_{j≠i}(R_j / K_j)``; ``"none"``. Step return ``G_{i,k} = Σ_{k'≥k} r̂_{i,k'}``.
    * ``credit="strict_min"``: ``G_{i,k} = min_{k'≥k} p_{i,k'}``; a baseline other than ``"none"`` subtracts
      the leave-one-out mean of the other responses' ``G_{j,0}``.

    Verifiable reward: ``v_i = solved_i − 1``, ``v̂_i = v_i − mean_{j≠i} v_j`` (singletons 0), solved =
    ``outcome_reward > solved_threshold``. Token advantage ``A_{i,t} = G_{i,seg(t)} + c_VR v̂_i``, then
    (``whiten=True``) whitened over all valid batch tokens. Padding 0.

    Exact degenerate values: ``v̂ = 0`` for a group whose rewards are all equal and for a singleton; the
    leave-one-out baselines of a singleton are 0; after whitening, a batch whose valid tokens all hold the same
    advantage gives 0; an empty completion's row is 0.

    Shapes: ``step_scores (B, S)``, ``segment_spans``, ``outcome_rewards (B,)`` → ``(B, T)``.

    Args:
        temperature: T of the soft-min weights (0.1).
        credit: ``"soft_min"``, ``"strict_min"`` or ``"sum"`` (the collapsing sum-form).
        score_transform: ``"2p-1"`` or ``"identity"``.
        baseline: ``"token"``, ``"step"`` or ``"none"``.
        vr_coef: c_VR (0 = PRM only).
        solved_threshold: a reward above this counts as solved.
        whiten: whiten the final advantages over the batch.
    """

    needs = ComponentNeeds(process_scores=True)

    def __init__(
        self,
        temperature: float = 0.1,
        credit: Literal["soft_min", "strict_min", "sum"] = "soft_min",
        score_transform: Literal["2p-1", "identity"] = "2p-1",
        baseline: Literal["token", "step", "none"] = "token",
        vr_coef: float = 1.0,
        solved_threshold: float = 0.0,
        whiten: bool = True,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for name, val, ok in (
            ("credit", credit, ("soft_min", "strict_min", "sum")),
            ("score_transform", score_transform, ("2p-1", "identity")),
            ("baseline", baseline, ("token", "step", "none")),
        ):
            if val not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {val!r}")
        self.temperature = temperature
        self.credit = credit
        self.score_transform = score_transform
        self.baseline = baseline
        self.vr_coef = vr_coef
        self.solved_threshold = solved_threshold
        self.whiten = whiten

    def step_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """``(G (B, S) float64 step returns, segment ids (B, T))``; G is 0 on missing steps."""
        scores, has, seg = checked_step_scores(batch)  # (B, S), (B, S), (B, T)
        mask = batch.completion_mask
        hf = has.to(CALC)
        p = (2 * scores - 1 if self.score_transform == "2p-1" else scores) * hf  # (B, S)
        n_steps = hf.sum(dim=1)  # (B,)
        if self.credit == "strict_min":
            big = torch.finfo(CALC).max
            g = torch.flip(torch.cummin(torch.flip(torch.where(has, p, torch.full_like(p, big)), (1,)), 1).values, (1,))
            g = torch.where(has, g, torch.zeros_like(g))  # (B, S)
            if self.baseline != "none":
                b = group_loo_mean(g[:, 0], batch.group_ids)  # (B,), 0 for singletons
                g = (g - b[:, None]) * hf
            return g, seg
        if self.credit == "soft_min":
            logits = torch.where(has, -p / self.temperature, torch.full_like(p, float("-inf")))  # (B, S)
            w = torch.softmax(logits, dim=1).nan_to_num(0.0) * hf  # (B, S); rows without steps → 0
            r_star = w * p
        else:
            r_star = p
        total = r_star.sum(dim=1)  # (B,) R_j
        gid = batch.group_ids.to(total.device)
        if self.baseline == "step":
            b = group_loo_mean(torch.where(n_steps > 0, total / n_steps.clamp(min=1), torch.zeros_like(total)), gid)
            r_hat = (r_star - b[:, None]) * hf
        elif self.baseline == "token":
            lengths = mask.sum(dim=1).to(CALC)  # (B,)
            others_r = group_sum(total, gid) - total  # (B,)
            others_len = group_sum(lengths, gid) - lengths  # (B,)
            a = torch.where(others_len > 0, others_r / others_len.clamp(min=1), torch.zeros_like(total))  # (B,)
            counts = torch.zeros_like(p).scatter_add_(1, seg.clamp(min=0), mask.to(CALC))  # (B, S) tokens per step
            r_hat = (r_star - a[:, None] * counts) * hf
        else:
            r_hat = r_star
        return reverse_cumsum(r_hat, dim=1) * hf, seg

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """``{"process": (B, T)}`` float32 advantages (per token)."""
        mask = batch.completion_mask
        g, seg = self.step_returns(batch)
        adv = step_values_to_tokens(g, seg)  # (B, T)
        if self.vr_coef != 0:
            v = (outcome_rewards(batch) > self.solved_threshold).to(CALC) - 1.0  # (B,)
            adv = adv + broadcast(self.vr_coef * loo_advantage(v, batch.group_ids), mask)
        if self.whiten:
            adv = masked_whiten(adv, mask)
        return {"process": finish(adv, mask)}


@register_aligner("prime")
class PRIMEAligner(AdvantageAligner):
    """PRIME (arXiv 2502.01456): leave-one-out implicit process returns plus RLOO outcome, then whitening.

    Token implicit reward ``r_{i,t}``: ``β (log π_old − log π_ref)`` (``reward_source="logprobs"``, the
    self-reference variant, needs a reference model) or ``batch.token_scores`` from a PRM such as
    ``ImplicitPRM`` (``"token_scores"``). With ``r̄_i`` the mean token reward of response i over its valid
    tokens and K the group size:

    * ``loo_mode="paper"``: ``A_{i,t} = Σ_{s≥t} (r_{i,s} − mean_{j≠i} r̄_j) + (r^o_i − mean_{j≠i} r^o_j)``;
    * ``loo_mode="code"``: the process baseline at t is ``(Σ_{j∈g} r̄_j − r_{i,t})/(K − 1)``.

    Then (``whiten=True``) ``A`` is whitened over all valid batch tokens. Padding 0. Exact degenerate values:
    for a singleton both baselines are 0 and the outcome term is 0; a group whose outcome rewards are all equal
    has outcome term 0; in ``"paper"`` mode a group whose responses share the same mean token reward has
    process term ``Σ_{s≥t}(r_{i,s} − r̄)`` (0 when the token rewards are constant, e.g. π_old = π_ref); after
    whitening, a batch whose valid tokens all hold the same advantage gives 0; an empty completion's row is 0.

    Shapes: ``old_logprobs, ref_logprobs`` or ``token_scores (B, T)``, ``outcome_rewards (B,)`` → ``(B, T)``.

    Args:
        beta: β for ``reward_source="logprobs"``.
        reward_source: ``"logprobs"`` or ``"token_scores"``.
        loo_mode: ``"paper"`` or ``"code"``.
        process_coef: weight of the process returns.
        outcome_coef: weight of the outcome RLOO term.
        whiten: whiten over the batch's valid tokens.
    """

    def __init__(
        self,
        beta: float = 0.05,
        reward_source: Literal["logprobs", "token_scores"] = "logprobs",
        loo_mode: Literal["paper", "code"] = "paper",
        process_coef: float = 1.0,
        outcome_coef: float = 1.0,
        whiten: bool = True,
    ) -> None:
        if reward_source not in ("logprobs", "token_scores"):
            raise ValueError(f"reward_source must be 'logprobs' or 'token_scores', got {reward_source!r}")
        if loo_mode not in ("paper", "code"):
            raise ValueError(f"loo_mode must be 'paper' or 'code', got {loo_mode!r}")
        self.beta = beta
        self.reward_source = reward_source
        self.loo_mode = loo_mode
        self.process_coef = process_coef
        self.outcome_coef = outcome_coef
        self.whiten = whiten
        self.needs = ComponentNeeds(reference_logprobs=reward_source == "logprobs",
                                    process_scores=reward_source == "token_scores")

    def token_rewards(self, batch: RolloutBatch) -> Tensor:
        """``(B, T)`` float64 implicit token rewards, 0 on padding."""
        mask = batch.completion_mask
        if self.reward_source == "logprobs":
            return self.beta * _log_ratio(batch)
        if batch.token_scores is None:
            raise ValueError("PRIMEAligner(reward_source='token_scores') needs a PRM that fills token_scores")
        r = batch.token_scores.to(mask.device, CALC)
        return torch.where(mask, r, torch.zeros_like(r))

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """``{"process": (B, T)}`` float32 advantages (per token)."""
        mask = batch.completion_mask
        m = mask.to(CALC)
        r = self.token_rewards(batch)  # (B, T)
        r_bar = masked_row_mean(r, mask)  # (B,) mean token reward, 0 for an empty completion
        gid = batch.group_ids.to(r.device)
        if self.loo_mode == "paper":
            base = group_loo_mean(r_bar, gid)[:, None].expand_as(r)  # (B, T)
        else:
            k = group_count(gid).to(r.dtype)  # (B,)
            base = torch.where(k[:, None] > 1, (group_sum(r_bar, gid)[:, None] - r) / (k - 1).clamp(min=1)[:, None], 0)
        process = reverse_cumsum((r - base) * m, dim=1)  # (B, T)
        ro = outcome_rewards(batch)  # (B,)
        adv = self.process_coef * process + broadcast(self.outcome_coef * loo_advantage(ro, gid), mask)
        if self.whiten:
            adv = masked_whiten(adv, mask)
        return {"process": finish(adv, mask)}
