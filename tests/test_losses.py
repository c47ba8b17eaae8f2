"""Loss pieces against the hand-computed oracles of process_methods_spec.md §0.3–0.5 and prpo_spec.md §9 L1."""

import math

import pytest
import torch

from prpo_lightning.training.losses import aggregate_loss, kl_penalty, ppo_clip_loss


def _clip(ratio: float, adv: float, **kw) -> tuple[float, bool]:
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64)
    loss, clipped = ppo_clip_loss(logp, torch.zeros_like(logp), torch.tensor([[adv]], dtype=torch.float64), **kw)
    return float(loss), bool(clipped)


@pytest.mark.parametrize(
    "ratio, adv, kw, expected",
    [
        (1.3, 1.0, dict(eps_low=0.2, eps_high=0.2), -1.2),  # §0.3 row 1
        (1.3, 1.0, dict(eps_low=0.2, eps_high=0.28), -1.28),  # §0.3 clip-higher
        (0.7, -1.0, dict(), 0.8),  # §0.3 row 3
        (5.0, -1.0, dict(dual_clip=3.0), 3.0),  # §0.3 dual clip
        (5.0, -1.0, dict(dual_clip=None), 5.0),  # without dual clip
        (1.3, 2.0, dict(), -2.4),  # L1
        (0.7, -1.0, dict(dual_clip=3.0), 0.8),  # L1
        (4.0, -1.0, dict(dual_clip=3.0), 3.0),  # L1
        (1.0, 0.65, dict(), -0.65),  # L1 on-policy
    ],
)
def test_ppo_clip_oracles(ratio, adv, kw, expected):
    loss, _ = _clip(ratio, adv, **kw)
    assert loss == pytest.approx(expected, abs=1e-9)


def test_clip_indicator_marks_clipped_tokens_only():
    assert _clip(1.3, 1.0)[1] is True
    assert _clip(1.0, 0.65)[1] is False
    assert _clip(0.7, 1.0)[1] is False  # ratio below 1-eps with A>0: unclipped branch is the max
    assert _clip(5.0, -1.0)[1] is True  # dual clip


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        _clip(1.0, 1.0, dual_clip=0.5)


def test_kl_estimators_oracle():
    logp = torch.tensor([[-1.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5]], dtype=torch.float64)  # §0.5: d = 0.5
    assert float(kl_penalty(logp, ref, "k1")) == pytest.approx(0.5)
    assert float(kl_penalty(logp, ref, "k2")) == pytest.approx(0.125)
    assert float(kl_penalty(logp, ref, "k3")) == pytest.approx(0.1065307, abs=1e-7)
    # prpo_spec L1: log π = −1.0, log π_ref = −1.2
    assert float(kl_penalty(logp, torch.tensor([[-1.2]], dtype=torch.float64), "k3")) == pytest.approx(
        0.018731, abs=1e-6
    )
    with pytest.raises(ValueError, match="unknown KL"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_k3_is_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(50, 20, generator=g), torch.randn(50, 20, generator=g)
    assert bool((kl_penalty(logp, ref, "k3") >= 0).all())


def test_aggregation_oracle():
    """§0.4: ℓ = [[1, 3, ·, ·], [1, 1, 1, 1]], lengths 2 and 4, C = 4."""
    loss = torch.tensor([[1.0, 3.0, 99.0, 99.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert float(aggregate_loss(loss, mask, "token-mean")) == pytest.approx(8 / 6)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-mean")) == pytest.approx(1.5)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum")) == pytest.approx(4.0)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_constant=4)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss, mask, "sum")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batch_accumulation_equals_full_batch(mode):
    """Summing micro-batch losses with global normalisers gives the full mini-batch loss."""
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    full = aggregate_loss(loss, mask, mode, norm_constant=5)
    parts = sum(
        aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode, norm_constant=5, num_tokens=float(mask.sum()), num_sequences=6)
        for i in range(0, 6, 2)
    )
    assert float(parts) == pytest.approx(float(full), abs=1e-6)


def test_a1_token_mean_pg_loss():
    """prpo_spec A1: with ρ = 1 and no KL, the token-mean pg loss equals −mean(A) = −0.652407."""
    lengths = [40, 12, 30, 5]
    values = {
        0: [(18, 1.459592), (15, -0.010102), (6, -1.969694), (1, -0.3)],
        1: [(11, 3.704541), (1, 2.45)],
        2: [(27, 0.479796), (2, -1.479796), (1, -0.2)],
        3: [(4, -2.459592), (1, -0.4)],
    }
    adv = torch.zeros(4, 48, dtype=torch.float64)
    for i, runs in values.items():
        pos = 0
        for n, v in runs:
            adv[i, pos : pos + n] = v
            pos += n
    mask = torch.arange(48)[None, :] < torch.tensor(lengths)[:, None]
    logp = torch.zeros(4, 48, dtype=torch.float64)
    loss, _ = ppo_clip_loss(logp, logp, adv)
    assert float(aggregate_loss(loss, mask, "token-mean")) == pytest.approx(-0.652407, abs=1e-6)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-mean")) == pytest.approx(-0.557223, abs=1e-6)


def test_grad_norm_under_deepspeed_is_the_engines_own():
    """Under ZeRO the gradients are partitioned (``p.grad`` is None), so the logged norm is the one the engine
    computed in its step; without DeepSpeed there is no engine. (Found by the GPU check: ZeRO runs logged 0.)"""
    from types import SimpleNamespace

    from prpo_lightning.training.updater import deepspeed_engine, engine_grad_norm

    class DeepSpeedStrategy:  # the name Lightning's strategy class has
        model = SimpleNamespace(get_global_grad_norm=lambda: torch.tensor(2.5))

    assert deepspeed_engine(SimpleNamespace(strategy=DeepSpeedStrategy())) is DeepSpeedStrategy.model
    assert deepspeed_engine(SimpleNamespace(strategy=SimpleNamespace())) is None
    assert engine_grad_norm(DeepSpeedStrategy.model) == 2.5
    assert math.isnan(engine_grad_norm(SimpleNamespace(get_global_grad_norm=lambda: None)))
