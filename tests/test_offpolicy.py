"""Self-check metrics and off-policy correction weights against hand-computed values."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from prpo_lightning.config import MismatchCheck, RolloutCorrectionConfig, SamplerMismatchError
from prpo_lightning.rollout.offpolicy import correction_weights, mismatch_metrics

# Two rows; ρ = π_old / π_sampler per token. Row 0: ρ = [4, 0.45, 1 | pad], row 1: ρ = [3, 0.4 | pad, pad].
RHO = torch.tensor([[4.0, 0.45, 1.0, 7.0], [3.0, 0.4, 9.0, 9.0]], dtype=torch.float64)  # (B, T)
MASK = torch.tensor([[True, True, True, False], [True, True, False, False]])  # (B, T)
SAMPLER = torch.full((2, 4), -2.0, dtype=torch.float64)  # (B, T)
OLD = SAMPLER + RHO.log()  # (B, T)


def _weights(mode, **bounds):
    w, m = correction_weights(OLD, SAMPLER, MASK, RolloutCorrectionConfig(mode=mode, **bounds))
    return w.double(), m


@pytest.mark.parametrize(
    "mode, bounds, expected, mean, key, frac",
    [
        # TIS: min(ρ, 2) per token
        ("token_truncate", {}, [[2, 0.45, 1, 0], [2, 0.4, 0, 0]], 5.85 / 5, "is/frac_clipped", 2 / 5),
        ("token_truncate", {"clip_min": 0.5}, [[2, 0.5, 1, 0], [2, 0.5, 0, 0]], 6.0 / 5, "is/frac_clipped", 4 / 5),
        # ρ where ρ <= 2, else 0
        ("token_mask", {}, [[0, 0.45, 1, 0], [0, 0.4, 0, 0]], 1.85 / 5, "is/frac_masked", 2 / 5),
        # IcePop: ρ inside [0.5, 5], else 0
        ("icepop", {}, [[4, 0, 1, 0], [3, 0, 0, 0]], 8.0 / 5, "is/frac_masked", 2 / 5),
        # ρ_seq = 4·0.45·1 = 1.8 and 3·0.4 = 1.2
        ("sequence_truncate", {}, [[1.8, 1.8, 1.8, 0], [1.2, 1.2, 0, 0]], 7.8 / 5, "is/frac_clipped", 0.0),
        ("sequence_truncate", {"clip_max": 1.5}, [[1.5, 1.5, 1.5, 0], [1.2, 1.2, 0, 0]], 6.9 / 5,
         "is/frac_clipped", 3 / 5),
        ("sequence_mask", {"clip_max": 1.5}, [[0, 0, 0, 0], [1.2, 1.2, 0, 0]], 2.4 / 5, "is/frac_masked", 3 / 5),
        ("sequence_mask", {}, [[1.8, 1.8, 1.8, 0], [1.2, 1.2, 0, 0]], 7.8 / 5, "is/frac_masked", 0.0),
    ],
)
def test_correction_weights_hand_computed(mode, bounds, expected, mean, key, frac):
    w, m = _weights(mode, **bounds)
    assert torch.allclose(w, torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert m["is/weight_mean"] == pytest.approx(mean, abs=1e-6)
    assert m[key] == pytest.approx(frac)


def test_correction_disabled_and_defaults():
    w, m = _weights(None)
    assert torch.equal(w, MASK.double()) and m["is/weight_mean"] == 1.0
    assert RolloutCorrectionConfig().clip_max == 2.0 and RolloutCorrectionConfig().clip_min is None
    ice = RolloutCorrectionConfig(mode="icepop")
    assert (ice.clip_min, ice.clip_max) == (0.5, 5.0)


def test_correction_weights_carry_no_gradient_and_survive_huge_ratios():
    old = OLD.clone().requires_grad_(True)
    huge = SAMPLER - 800.0  # ρ = e^800·ρ: overflows float64 if exponentiated before clamping
    w, _ = correction_weights(old, huge, MASK, RolloutCorrectionConfig(mode="sequence_truncate"))
    assert not w.requires_grad
    assert torch.equal(w, 2.0 * MASK.float())
    w, m = correction_weights(old, huge, MASK, RolloutCorrectionConfig(mode="token_mask"))
    assert torch.equal(w, torch.zeros_like(w)) and m["is/frac_masked"] == 1.0


@pytest.mark.parametrize("kwargs", [{"mode": "tis"}, {"clip_max": 0.0}, {"clip_min": 3.0, "clip_max": 2.0}])
def test_correction_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="RolloutCorrectionConfig"):
        RolloutCorrectionConfig(**kwargs)


def test_mismatch_metrics_hand_computed():
    ln2 = math.log(2.0)
    sampler = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-3.0, -3.0, -3.0, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    # log r = log π_trainer − log π_sampler: row 0 [ln2, −ln2, 0 | 5 pad], row 1 [0.1 | pads], row 2 all padding
    trainer = sampler + torch.tensor([[ln2, -ln2, 0.0, 5.0], [0.1, 9.0, 9.0, 9.0], [3.0, 3.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    m = mismatch_metrics(sampler, trainer, mask)
    assert m["rollout/logp_diff_mean"] == pytest.approx((2 * ln2 + 0.1) / 4, rel=1e-6)
    assert m["rollout/logp_diff_max"] == pytest.approx(ln2, rel=1e-6)
    # k3 = r − 1 − log r: r=2 → 1 − ln2, r=1/2 → ln2 − 1/2, r=1 → 0; row 1: e^0.1 − 1.1; row 2 has no token
    row0, row1 = (1 - ln2) + (ln2 - 0.5), math.exp(0.1) - 1.1
    assert m["rollout/kl"] == pytest.approx((row0 + row1) / 2, rel=1e-5)


def test_mismatch_metrics_degenerate_cases():
    x = torch.randn(3, 5)
    none = mismatch_metrics(x, x + 1.0, torch.zeros(3, 5, dtype=torch.bool))
    assert none == {"rollout/logp_diff_mean": 0.0, "rollout/logp_diff_max": 0.0, "rollout/kl": 0.0}
    same = mismatch_metrics(x, x, torch.ones(3, 5, dtype=torch.bool))
    assert same == {"rollout/logp_diff_mean": 0.0, "rollout/logp_diff_max": 0.0, "rollout/kl": 0.0}


def test_mismatch_check_warn_raise_and_pass(caplog):
    metrics = {"rollout/logp_diff_mean": 0.2, "rollout/logp_diff_max": 1.0, "rollout/kl": 0.01}
    assert MismatchCheck(metric="logp_diff_mean", threshold=0.3)(metrics)
    assert MismatchCheck(metric="kl", threshold=0.05, mode="raise")(metrics)
    with caplog.at_level(logging.WARNING):
        assert not MismatchCheck(metric="logp_diff_mean", threshold=0.1, mode="warn")(metrics, step=7)
    assert "rollout/logp_diff_mean = 0.2 exceeds 0.1 at step 7" in caplog.text
    with pytest.raises(SamplerMismatchError, match="logp_diff_max"):
        MismatchCheck(metric="logp_diff_max", threshold=0.5, mode="raise")(metrics)
    with pytest.raises(ValueError, match="rollout_check.mode"):
        MismatchCheck(mode="ignore")


def test_default_check_is_logp_diff_max_by_dtype_and_raises():
    """The default: ``logp_diff_max`` against the dtype's threshold (float32 1e-3, bfloat16 4.0), raise."""
    import torch

    check = MismatchCheck()
    assert (check.metric, check.mode, check.threshold) == ("logp_diff_max", "raise", None)
    assert check.threshold_for(torch.float32) == 1e-3 and check.threshold_for(None) == 1e-3
    assert check.threshold_for(torch.bfloat16) == 4.0 and check.threshold_for("bfloat16") == 4.0
    assert check({"rollout/logp_diff_max": 1e-3}, dtype=torch.float32)  # at the threshold: passes
    with pytest.raises(SamplerMismatchError, match="logp_diff_max = 0.0011 exceeds 0.001 at step 3"):
        check({"rollout/logp_diff_max": 1.1e-3}, step=3, dtype=torch.float32)
    assert check({"rollout/logp_diff_max": 1.43}, dtype=torch.bfloat16)  # bf16 kernel noise measured on CPU
    assert MismatchCheck(threshold=2.0).threshold_for(torch.float32) == 2.0  # a given threshold wins
    for dtype in (torch.float16, torch.float64):
        with pytest.raises(ValueError, match=f"no default for dtype {str(dtype)[6:]}"):
            check.threshold_for(dtype)
    with pytest.raises(ValueError, match="default for logp_diff_max only"):
        MismatchCheck(metric="kl")


def test_default_check_refuses_truncated_sampling_and_unmeasured_dtypes_at_start():
    MismatchCheck().check_settings(top_p=1.0, top_k=0, dtype="bfloat16")
    MismatchCheck(threshold=2.0).check_settings(top_p=0.9, top_k=0, dtype="float16")  # a chosen threshold
    for top_p, top_k in ((0.95, 0), (1.0, 20)):
        with pytest.raises(ValueError, match=f"top_p {top_p} / top_k {top_k}.*model.rollout_check.threshold"):
            MismatchCheck().check_settings(top_p=top_p, top_k=top_k, dtype="float32")
    with pytest.raises(ValueError, match="no default for dtype float16"):
        MismatchCheck().check_settings(top_p=1.0, top_k=0, dtype="float16")
