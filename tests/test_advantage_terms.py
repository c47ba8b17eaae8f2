"""Advantage parts and aligner diagnostics: ``advantage_terms`` splits each bundled aligner's advantages exactly,
SPRO's implicit-reward metrics and the logged ``advantage/*_abs_mean`` values equal hand-computed ones, and a
broken split is refused (docs/replication.md, "What drives SPRO's collapse")."""

from __future__ import annotations

import pytest
import torch
from test_aligners import A1_CODE, A1_LENGTHS, a1_batch, make_batch, spro_batch
from test_faults import _ByText

from components.aligners import GRPOAligner, ProcessOnlyAligner, PRPOAligner, SPROAligner
from prpo_lightning.scoring.aligner import AdvantageAligner, sum_of_terms
from prpo_lightning.batch import ComponentContractError, RolloutBatch
from prpo_lightning.scoring.pipeline import advantage_term_metrics, checked_terms, compute_advantages

A1_OUTCOME = [-0.5, 1.5, -0.5, -0.5]  # PRPO's centred outcome term on A1 (rewards -1, 1, -1, -1)


@pytest.mark.parametrize("aligner, batch_fn", [
    (GRPOAligner(), spro_batch),
    (SPROAligner(beta=0.5), spro_batch),
    (PRPOAligner(), a1_batch),
    (PRPOAligner(prior="triangular", last_token_quirk=True), a1_batch),
    (ProcessOnlyAligner(prior="triangular", last_token_quirk=True), a1_batch),
])
def test_terms_sum_to_the_advantages_and_are_zero_on_padding(aligner, batch_fn):
    batch = batch_fn()
    terms = aligner.advantage_terms(batch)
    total = sum(terms.values())  # (B, T)
    torch.testing.assert_close(total.float(), aligner.align(batch), atol=1e-6, rtol=0)
    for term in terms.values():
        assert torch.all(term[~batch.completion_mask] == 0)


def test_prpo_terms_are_the_location_shift_and_the_z_scores():
    batch = a1_batch()
    terms = PRPOAligner(prior="triangular", last_token_quirk=True).advantage_terms(batch)
    mask = batch.completion_mask
    for i, (length, beta) in enumerate(zip(A1_LENGTHS, A1_OUTCOME)):
        assert torch.all(terms["outcome"][i, :length] == beta)
        torch.testing.assert_close(terms["process"][i, :length].float(),
                                   torch.tensor(A1_CODE[i]) - beta, atol=1e-5, rtol=0)
    assert set(ProcessOnlyAligner().advantage_terms(batch)) == {"process"}
    assert set(GRPOAligner().advantage_terms(batch)) == {"outcome"}
    assert int(mask.sum()) == 87


def test_spro_terms_are_the_grpo_outcome_and_the_msa():
    batch = spro_batch()
    aligner = SPROAligner(beta=0.5, epsilon=0.0)
    terms = aligner.advantage_terms(batch)
    torch.testing.assert_close(terms["outcome"].float(), GRPOAligner(epsilon=0.0).align(batch))
    torch.testing.assert_close(terms["process"], aligner.masked_step_advantage(batch))


def test_spro_implicit_reward_metrics_hand_values():
    # beta = 0.5, delta rows [0.2, -0.1, 0.3, 0.0], [0.1, 0.1, -0.2], [-0.3, 0.4] (9 valid tokens)
    # final CPR = 0.5 * row sums = [0.2, 0.0, 0.05]
    got = SPROAligner(beta=0.5).batch_metrics(spro_batch())
    assert got["implicit_reward/token_mean"] == pytest.approx(0.5 * 0.5 / 9, abs=1e-7)
    assert got["implicit_reward/token_abs_mean"] == pytest.approx(0.5 * 1.7 / 9, abs=1e-7)
    assert got["implicit_reward/cpr_final_mean"] == pytest.approx(0.25 / 3, abs=1e-7)
    assert got["implicit_reward/cpr_final_std"] == pytest.approx(0.1040833, abs=1e-6)  # unbiased std of the three


def test_spro_metrics_are_exactly_zero_when_the_policy_is_the_reference():
    batch = spro_batch()
    batch.ref_logprobs = batch.old_logprobs.clone()
    got = SPROAligner(beta=0.5).batch_metrics(batch)
    assert all(v == 0.0 for v in got.values()), got


def test_term_metrics_hand_values_and_ratio():
    mask = torch.tensor([[True, True, False], [True, False, False]])  # 3 valid tokens
    outcome = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]], dtype=torch.float64)
    process = torch.tensor([[0.5, -0.5, 0.0], [0.2, 0.0, 0.0]], dtype=torch.float64)
    adv = (outcome + process).float()
    got = advantage_term_metrics({"outcome": outcome, "process": process}, mask)
    assert got["advantage/outcome_abs_mean"] == pytest.approx(4.0 / 3)
    assert got["advantage/process_abs_mean"] == pytest.approx(1.2 / 3)
    assert got["advantage/process_to_outcome"] == pytest.approx(0.3)
    # no outcome signal (a constant group): the ratio is left out, not inf
    zero = advantage_term_metrics({"outcome": outcome * 0, "process": process}, mask)
    assert "advantage/process_to_outcome" not in zero and zero["advantage/outcome_abs_mean"] == 0.0
    torch.testing.assert_close(sum_of_terms({"outcome": outcome, "process": process}, mask), adv * mask, atol=0, rtol=0)


def test_terms_of_the_wrong_shape_or_type_are_refused():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ComponentContractError, match="returned an empty dict"):
        checked_terms({}, mask, "Bad")
    with pytest.raises(ComponentContractError, match="returned a NoneType"):
        checked_terms(None, mask, "Bad")
    with pytest.raises(ComponentContractError, match=r"'process' of shape \(2,\)"):
        checked_terms({"process": torch.ones(2)}, mask, "Bad")
    with pytest.raises(ComponentContractError, match="returned a list"):
        checked_terms([torch.ones(2, 3)], mask, "Bad")


def _graded_spro_batch() -> RolloutBatch:
    batch = spro_batch()
    batch.completions = ["ok", "no", "ok"]
    return batch


def test_compute_advantages_logs_the_parts_and_the_aligner_metrics():
    metrics = compute_advantages(_graded_spro_batch(), _ByText(), SPROAligner(beta=0.5, epsilon=0.0), None, None, None)
    batch = _graded_spro_batch()
    terms = SPROAligner(beta=0.5, epsilon=0.0).advantage_terms(batch)
    n = 9
    # outcome term: GRPO with epsilon 0 on rewards [1, 0, 1]: [0.57735, -1.1547, 0.57735] on 4, 3, 2 tokens
    outcome_abs = (4 * 0.5773503 + 3 * 1.1547005 + 2 * 0.5773503) / n
    assert metrics["advantage/outcome_abs_mean"] == pytest.approx(outcome_abs, abs=1e-6)
    assert metrics["advantage/process_abs_mean"] == pytest.approx(float(terms["process"].abs().sum()) / n, abs=1e-7)
    # MSA oracle |values| (test_aligners.test_spro_oracle_masked_step_advantage): sum 0.5666667
    assert metrics["advantage/process_abs_mean"] == pytest.approx(0.5666667 / n, abs=1e-6)
    assert metrics["advantage/process_to_outcome"] == pytest.approx(0.5666667 / (outcome_abs * n), abs=1e-6)
    assert metrics["aligner/implicit_reward/cpr_final_mean"] == pytest.approx(0.25 / 3, abs=1e-7)


class _CountingSPRO(SPROAligner):
    """SPRO that counts its advantage_terms calls."""

    calls = 0

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        type(self).calls += 1
        return super().advantage_terms(batch)


def test_an_aligner_that_only_splits_is_computed_once_per_batch():
    batch = _graded_spro_batch()
    _CountingSPRO.calls = 0
    compute_advantages(batch, _ByText(), _CountingSPRO(beta=0.5), None, None, None)
    assert _CountingSPRO.calls == 1  # align is the base class's sum of the terms: not computed a second time
    torch.testing.assert_close(batch.advantages, SPROAligner(beta=0.5).align(_graded_spro_batch()), atol=0, rtol=0)


def test_an_aligner_must_implement_advantage_terms_and_cannot_override_align():
    class Empty(AdvantageAligner):
        pass

    with pytest.raises(TypeError, match="advantage_terms"):
        Empty()
    with pytest.raises(TypeError, match="overrides align\\(batch\\): implement advantage_terms"):
        class OldStyle(AdvantageAligner):
            def align(self, batch):
                return GRPOAligner().align(batch)


def test_an_aligner_with_one_part_logs_that_part_only():
    batch = make_batch([2, 2], [1.0, 0.0])
    batch.completions = ["ok", "no"]
    metrics = compute_advantages(batch, _ByText(), GRPOAligner(), None, None, None)
    assert "advantage/outcome_abs_mean" in metrics
    assert "advantage/process_abs_mean" not in metrics and "advantage/process_to_outcome" not in metrics


# ---------------------------------------------------------------- SPRO's optional process cap
SPRO_OUTCOME_ABS = 4 * 0.5773503 + 3 * 1.1547005 + 2 * 0.5773503  # Σ|Â^o| over the 9 tokens (ε = 0)
SPRO_PROCESS_ABS = 0.5666667  # Σ|MSA| (β = 0.5), so the uncapped ratio is 0.0818


def test_spro_cap_scales_the_process_term_to_exactly_kappa_times_the_outcome():
    batch = spro_batch()
    free = SPROAligner(beta=0.5, epsilon=0.0).advantage_terms(batch)
    capped = SPROAligner(beta=0.5, epsilon=0.0, max_process_to_outcome=0.05).advantage_terms(batch)
    scale = 0.05 * SPRO_OUTCOME_ABS / SPRO_PROCESS_ABS  # 0.6113
    torch.testing.assert_close(capped["process"], free["process"] * scale, atol=1e-6, rtol=0)
    assert float(capped["process"].abs().sum() / capped["outcome"].abs().sum()) == pytest.approx(0.05, abs=1e-12)
    assert torch.equal(capped["outcome"], free["outcome"])  # the outcome term is never touched
    loose = SPROAligner(beta=0.5, epsilon=0.0, max_process_to_outcome=0.1).advantage_terms(batch)
    assert torch.equal(loose["process"], free["process"])  # under the cap: exactly the paper's SPRO


def test_spro_cap_zero_is_grpo_and_no_outcome_signal_means_no_process_term():
    batch = spro_batch()
    torch.testing.assert_close(SPROAligner(beta=0.5, max_process_to_outcome=0.0).align(batch),
                               GRPOAligner().align(batch), atol=0, rtol=0)
    batch.outcome_rewards = torch.ones(3)  # every reward equal: no outcome signal
    adv = SPROAligner(beta=0.5, max_process_to_outcome=2.0).align(batch)
    assert torch.equal(adv, torch.zeros_like(adv))
    assert float(SPROAligner(beta=0.5).masked_step_advantage(batch).abs().max()) > 0.1  # uncapped: not 0


def test_spro_cap_must_be_none_or_non_negative():
    with pytest.raises(ValueError, match="max_process_to_outcome must be None"):
        SPROAligner(max_process_to_outcome=-0.1)
    with pytest.raises(ValueError, match="max_process_to_outcome must be None"):
        SPROAligner(max_process_to_outcome=float("nan"))


def test_training_curves_record_only_the_metrics_a_step_logged():
    """A step without outcome signal logs no process/outcome ratio: its CSV cell stays empty instead of repeating
    the last value, which ``trainer.callback_metrics`` still holds."""
    from types import SimpleNamespace

    from prpo_lightning.callbacks import TrainingCurves

    ratio = "train/advantage/process_to_outcome"
    curves = TrainingCurves(keys=("train/reward/mean", ratio))
    trainer = SimpleNamespace(global_step=1, callback_metrics={"train/reward/mean": 0.5, ratio: 2.0})
    module = SimpleNamespace(step_metrics={"train/reward/mean": 0.5, ratio: 2.0})
    curves.on_train_batch_end(trainer, module, None, None, 0)
    trainer.global_step = 2
    trainer.callback_metrics["train/reward/mean"] = -1.0  # the ratio stays at 2.0 there: stale
    module.step_metrics = {"train/reward/mean": -1.0}
    curves.on_train_batch_end(trainer, module, None, None, 1)
    assert curves.rows == [{"step": 1.0, "train/reward/mean": 0.5, ratio: 2.0}, {"step": 2.0, "train/reward/mean": -1.0}]
    # a LightningModule without step_metrics: the callback falls back to callback_metrics
    curves.on_train_batch_end(SimpleNamespace(global_step=3, callback_metrics={ratio: 1.0}), object(), None, None, 2)
    assert curves.rows[-1] == {"step": 3.0, ratio: 1.0}
