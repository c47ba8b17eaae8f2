"""Hypothesis properties of every aligner: invariance to padding and to batch permutation, finite output for
degenerate groups (all correct, all wrong, singletons, empty completions), PRPO = outcome advantage at the
prior mean, SPRO = GRPO when policy = reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.aligners import (
    DrGRPOAligner,
    GRPOAligner,
    PRIMEAligner,
    PRMAvgAligner,
    PRPOAligner,
    ProcessOnlyAligner,
    PUREAligner,
    ReinforcePPBaselineAligner,
    RLOOAligner,
    SPROAligner,
)
from components.segmenters import cuts_to_spans
from prpo_lightning.batch import RolloutBatch

torch.set_num_threads(1)

ALIGNERS = [
    GRPOAligner(),
    GRPOAligner(epsilon=0.0),
    GRPOAligner(std_normalize=False),
    DrGRPOAligner(),
    RLOOAligner(),
    ReinforcePPBaselineAligner(),
    PRPOAligner(),
    PRPOAligner(prior="triangular", last_token_quirk=True),
    PRPOAligner(outcome_norm="zscore", prm_avg_in_outcome=True),
    PRPOAligner(prior="empirical"),
    ProcessOnlyAligner(),
    PRMAvgAligner(),
    PRMAvgAligner(mean_over="padded", pad_length=64, epsilon=0.0),
    SPROAligner(beta=0.5),
    PUREAligner(),
    PUREAligner(baseline="step", whiten=False),
    PUREAligner(credit="strict_min", baseline="step"),
    PUREAligner(credit="sum", baseline="none"),
    PRIMEAligner(),
    PRIMEAligner(loo_mode="code", whiten=False),
    PRIMEAligner(reward_source="token_scores"),
]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw, reward_kind: str = "any"):
    """A random scored batch: 1–3 groups of 1–4 rows, lengths 0–8 (empty completions included)."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    b = sum(sizes)
    groups = [g * 7 + 3 for g, n in enumerate(sizes) for _ in range(n)]
    lengths = draw(st.lists(st.integers(0, 8), min_size=b, max_size=b))
    t = max([1, *lengths]) + draw(st.integers(0, 2))
    if reward_kind == "any":
        rewards = draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0, 0.25]), min_size=b, max_size=b))
    else:
        rewards = [reward_kind] * b
    floats = st.floats(-3.0, 0.0, allow_nan=False, width=32)
    old = torch.tensor(draw(st.lists(floats, min_size=b * t, max_size=b * t))).view(b, t)
    ref = torch.tensor(draw(st.lists(floats, min_size=b * t, max_size=b * t))).view(b, t)
    spans, scores = [], []
    for length in lengths:
        cuts = draw(st.lists(st.integers(1, max(1, length - 1)), max_size=3)) if length > 1 else []
        row = cuts_to_spans(cuts, length)
        spans.append(row)
        scores.append(draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=len(row), max_size=len(row))))
    return make_batch(lengths, rewards, groups, t, spans, scores, old, ref)


def make_batch(lengths, rewards, groups, t, spans, scores, old, ref):
    b = len(lengths)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    s = max([1, *(len(r) for r in spans)])
    step_scores = torch.zeros(b, s)
    step_mask = torch.zeros(b, s, dtype=torch.bool)
    for i, row in enumerate(scores):
        step_scores[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        step_mask[i, : len(row)] = True
    return RolloutBatch(
        prompt_ids=torch.zeros(b, 1, dtype=torch.long),
        prompt_mask=torch.ones(b, 1, dtype=torch.long),
        completion_ids=torch.zeros(b, t, dtype=torch.long),
        completion_mask=mask,
        group_ids=torch.tensor(groups),
        problems=["q"] * b,
        answers=["a"] * b,
        outcome_rewards=torch.tensor(rewards, dtype=torch.float32),
        old_logprobs=old,
        ref_logprobs=ref,
        segment_spans=spans,
        step_scores=step_scores,
        step_mask=step_mask,
        token_scores=0.05 * (old - ref),
    )


def pad_more(batch: RolloutBatch, extra: int, garbage: float) -> RolloutBatch:
    """Append ``extra`` padding columns holding garbage in every per-token float field."""
    b, t = batch.completion_mask.shape

    def grow(x, fill):
        return torch.cat([x, torch.full((b, extra), fill, dtype=x.dtype)], dim=1)

    return make_batch(
        batch.lengths.tolist(), batch.outcome_rewards.tolist(), batch.group_ids.tolist(), t + extra,
        batch.segment_spans, [batch.step_scores[i, : len(r)].tolist() for i, r in enumerate(batch.segment_spans)],
        grow(torch.where(batch.completion_mask, batch.old_logprobs, garbage), garbage),
        grow(torch.where(batch.completion_mask, batch.ref_logprobs, -garbage), -garbage),
    )


def check_basic(adv: torch.Tensor, batch: RolloutBatch, name: str) -> None:
    assert adv.shape == batch.completion_mask.shape and adv.dtype == torch.float32, name
    assert torch.isfinite(adv).all(), name
    assert torch.all(adv[~batch.completion_mask] == 0), name


@SETTINGS
@given(batch=batches(), extra=st.integers(1, 4), garbage=st.sampled_from([-50.0, 7.0]))
def test_property_finite_zero_padding_and_padding_invariance(batch, extra, garbage):
    padded = pad_more(batch, extra, garbage)
    t = batch.completion_mask.shape[1]
    for al in ALIGNERS:
        name = f"{type(al).__name__}{vars(al)}"
        adv = al.align(batch)
        check_basic(adv, batch, name)
        assert torch.all(adv[batch.lengths == 0] == 0), name  # empty completions → zero advantages
        adv_p = al.align(padded)
        check_basic(adv_p, padded, name)
        if isinstance(al, PRMAvgAligner) and al.mean_over == "padded" and al.pad_length is None:
            continue  # by design the code's padded mean depends on T
        torch.testing.assert_close(adv_p[:, :t], adv, atol=1e-5, rtol=1e-5, msg=name)


@SETTINGS
@given(batch=batches(), seed=st.integers(0, 1000))
def test_property_batch_permutation_invariance(batch, seed):
    perm = torch.randperm(batch.size, generator=torch.Generator().manual_seed(seed))
    shuffled = batch.select(perm)
    for al in ALIGNERS:
        torch.testing.assert_close(al.align(shuffled), al.align(batch)[perm], atol=1e-5, rtol=1e-5,
                                   msg=f"{type(al).__name__}")


@SETTINGS
@given(batch=batches(reward_kind=1.0), kind=st.sampled_from([1.0, -1.0, 0.0]))
def test_property_degenerate_groups_all_correct_or_all_wrong(batch, kind):
    batch.outcome_rewards = torch.full((batch.size,), kind)
    for al in ALIGNERS:
        check_basic(al.align(batch), batch, type(al).__name__)
    for al in (GRPOAligner(), GRPOAligner(epsilon=0.0), DrGRPOAligner(), RLOOAligner(), ReinforcePPBaselineAligner()):
        assert torch.all(al.align(batch) == 0)


@SETTINGS
@given(batch=batches())
def test_property_singletons_get_zero_outcome_advantage(batch):
    batch.group_ids = torch.arange(batch.size) * 5  # every row alone
    for al in ALIGNERS:
        check_basic(al.align(batch), batch, type(al).__name__)
    for al in (GRPOAligner(), GRPOAligner(epsilon=0.0), DrGRPOAligner(), RLOOAligner(), PRMAvgAligner()):
        assert torch.all(al.align(batch) == 0)
    # SPRO: MSA ≡ 0 and the outcome term is 0 for a singleton
    assert torch.all(SPROAligner().align(batch).abs() < 1e-6)


@SETTINGS
@given(batch=batches())
def test_property_prpo_equals_outcome_advantage_at_prior_mean(batch):
    batch.step_scores = torch.where(batch.step_mask, torch.full_like(batch.step_scores, 0.5), 0.0)
    for prior in ("uniform", "triangular"):
        torch.testing.assert_close(PRPOAligner(prior=prior).align(batch), DrGRPOAligner().align(batch))
        torch.testing.assert_close(
            PRPOAligner(prior=prior, outcome_norm="zscore").align(batch), GRPOAligner().align(batch)
        )
        assert torch.all(ProcessOnlyAligner(prior=prior).align(batch) == 0)


@SETTINGS
@given(batch=batches(), beta=st.floats(0.01, 2.0))
def test_property_spro_equals_grpo_when_policy_is_reference(batch, beta):
    batch.ref_logprobs = batch.old_logprobs.clone()
    torch.testing.assert_close(SPROAligner(beta=beta).align(batch), GRPOAligner().align(batch))
    # and its MSA sums to zero over each group's alive responses at every position
    batch.ref_logprobs = torch.zeros_like(batch.old_logprobs)
    msa = SPROAligner(beta=beta).masked_step_advantage(batch)
    for g in batch.group_ids.unique():
        rows = batch.group_ids == g
        assert torch.allclose(msa[rows].sum(0), torch.zeros(1, dtype=msa.dtype), atol=1e-9)
