"""Degenerate groups give exactly their documented value, through the public aligner API (issue 12 item 5).

A group whose rewards (or step scores) are all equal must give exactly 0 (``== 0``, not ``allclose``), for every
ε, every prior and every input dtype. The values are ones that are not exact in binary (0.1, 0.7, 1/3, ...):
their group mean ``Σv/n`` rounds, so a "std == 0" test on a float std misfires (it gave ±0.8 here).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
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
from prpo_lightning.batch import RolloutBatch

torch.set_num_threads(1)

INEXACT = [0.1, 0.7, 1 / 3, 2 / 3, 0.3, 0.2, 0.9, 1.1, -0.7, 5 / 7, 1e-3]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
EPSILONS = [0.0, 1e-8, 1e-6, 1e-4]
PRIORS = ["uniform", "triangular", "empirical"]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Outcome-only settings whose documented value for an equal-reward group is 0 (REINFORCE++ only unwhitened:
#: its batch whitening shifts every row by the batch token mean).
ZERO_FOR_EQUAL_REWARDS = [
    *(
        GRPOAligner(std_normalize=True, epsilon=eps, unbiased=unbiased, min_std=min_std)
        for eps, unbiased, min_std in itertools.product(EPSILONS, (True, False), (0.0, 0.1))
    ),
    GRPOAligner(std_normalize=False, epsilon=0.0),
    DrGRPOAligner(),
    RLOOAligner(),
    ReinforcePPBaselineAligner(whiten=False),
    *(PRMAvgAligner(mean_over=over, epsilon=eps) for over in ("valid", "padded") for eps in EPSILONS),
    *(SPROAligner(beta=0.5, epsilon=eps) for eps in EPSILONS),
]


def build_batch(rows: list[dict], dtype: torch.dtype, t: int) -> RolloutBatch:
    """A scored batch from per-row dicts (gid, reward, length, spans, scores, old, ref, token); floats in ``dtype``."""
    b = len(rows)
    s = max([1, *(len(r["scores"]) for r in rows)])
    step_scores = torch.zeros(b, s, dtype=torch.float64)
    step_mask = torch.zeros(b, s, dtype=torch.bool)
    old, ref, token = (torch.zeros(b, t, dtype=torch.float64) for _ in range(3))
    for i, r in enumerate(rows):
        step_scores[i, : len(r["scores"])] = torch.tensor(r["scores"], dtype=torch.float64)
        step_mask[i, : len(r["scores"])] = True
        for dest, key in ((old, "old"), (ref, "ref"), (token, "token")):
            dest[i, : r["length"]] = torch.tensor(r[key], dtype=torch.float64)
    return RolloutBatch(
        prompt_ids=torch.zeros(b, 1, dtype=torch.long),
        prompt_mask=torch.ones(b, 1, dtype=torch.long),
        completion_ids=torch.zeros(b, t, dtype=torch.long),
        completion_mask=torch.arange(t)[None, :] < torch.tensor([r["length"] for r in rows])[:, None],
        group_ids=torch.tensor([r["gid"] for r in rows]),
        problems=["q"] * b,
        answers=["a"] * b,
        outcome_rewards=torch.tensor([r["reward"] for r in rows], dtype=torch.float64).to(dtype),
        segment_spans=[r["spans"] for r in rows],
        step_scores=step_scores.to(dtype),
        step_mask=step_mask,
        old_logprobs=old.to(dtype),
        ref_logprobs=ref.to(dtype),
        token_scores=token.to(dtype),
    )


values = st.sampled_from(INEXACT) | st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False)


@st.composite
def identical_groups(draw) -> tuple[list[dict], int]:
    """1–4 groups of 1–16 **identical** completions (same reward, length, steps, scores and log-probs), the rows
    of all groups interleaved in a random order; returns the rows and the padded length."""
    sizes = draw(st.lists(st.integers(1, 16), min_size=1, max_size=4))
    gids = draw(st.lists(st.integers(0, 10**6), min_size=len(sizes), max_size=len(sizes), unique=True))
    rows = []
    for gid, size in zip(gids, sizes):
        length = draw(st.integers(1, 6))
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, length - 1)), max_size=2)))) if length > 1 else []
        bounds = [0, *cuts, length]
        spans = list(zip(bounds[:-1], bounds[1:]))
        token_floats = st.lists(values, min_size=length, max_size=length)
        row = dict(
            gid=gid, reward=draw(values), length=length, spans=spans,
            scores=draw(st.lists(st.sampled_from(INEXACT[:6]), min_size=len(spans), max_size=len(spans))),
            old=draw(token_floats), ref=draw(token_floats), token=draw(token_floats),
        )
        rows += [dict(row) for _ in range(size)]
    order = draw(st.permutations(range(len(rows))))
    return [rows[k] for k in order], max(r["length"] for r in rows) + draw(st.integers(0, 2))


def _row_example(value: float, size: int) -> tuple[list[dict], int]:
    row = dict(gid=5, reward=value, length=3, spans=[(0, 1), (1, 3)], scores=[value, 0.3],
               old=[value, -0.7, 0.2], ref=[0.1, 0.1, -1 / 3], token=[value] * 3)
    return [dict(row) for _ in range(size)], 4


@SETTINGS
@given(case=identical_groups(), dtype=st.sampled_from(DTYPES))
@example(case=_row_example(0.1, 3), dtype=torch.float64)
@example(case=_row_example(0.7, 6), dtype=torch.float32)
def test_equal_rewards_give_exactly_zero_for_every_epsilon_and_dtype(case, dtype):
    rows, t = case
    batch = build_batch(rows, dtype, t)
    for aligner in ZERO_FOR_EQUAL_REWARDS:
        adv = aligner.align(batch)
        assert bool((adv == 0).all()), f"{type(aligner).__name__}{vars(aligner)} {dtype}: {adv[adv != 0][:4]}"


@SETTINGS
@given(case=identical_groups(), dtype=st.sampled_from(DTYPES))
@example(case=_row_example(0.1, 3), dtype=torch.float64)
def test_prpo_outcome_shift_is_exactly_zero_for_identical_completions(case, dtype):
    """β = 0 exactly, so PRPO equals its process-only term bit for bit, for every prior, norm, ε and srpo3."""
    rows, t = case
    batch = build_batch(rows, dtype, t)
    for prior, quirk in itertools.product(PRIORS, (False, True)):
        process = ProcessOnlyAligner(prior=prior, last_token_quirk=quirk).align(batch)
        for norm, eps, with_prm_avg in itertools.product(("center", "zscore"), EPSILONS, (False, True)):
            prpo = PRPOAligner(prior=prior, last_token_quirk=quirk, outcome_norm=norm, outcome_epsilon=eps,
                               prm_avg_in_outcome=with_prm_avg)
            assert torch.equal(prpo.align(batch), process), f"{vars(prpo)} {dtype}"


@SETTINGS
@given(
    value=values, sizes=st.lists(st.integers(1, 8), min_size=1, max_size=3), data=st.data(),
    dtype=st.sampled_from(DTYPES),
)
@example(value=0.1, sizes=[3], data=None, dtype=torch.float64)
def test_empirical_prior_of_a_group_with_equal_step_scores_is_exactly_zero(value, sizes, data, dtype):
    """Rows of different lengths and segmentations whose every step score is ``value``: Z ≡ 0 (and A ≡ 0 with
    equal rewards), for every outcome ε; groups interleaved with a group of varied scores."""
    rows, gid = [], 0
    for gid, size in enumerate(sizes):
        for k in range(size):
            length = 1 + (k * 5 + gid) % 6
            spans = [(0, length)] if length < 3 else [(0, 1), (1, length)]
            rows.append(dict(gid=gid, reward=0.7, length=length, spans=spans, scores=[value] * len(spans),
                             old=[0.0] * length, ref=[0.0] * length, token=[0.0] * length))
    rows.append(dict(gid=gid + 1, reward=1.0, length=2, spans=[(0, 2)], scores=[0.9], old=[0.0] * 2,
                     ref=[0.0] * 2, token=[0.0] * 2))
    rows.append(dict(gid=gid + 1, reward=0.0, length=2, spans=[(0, 1), (1, 2)], scores=[0.2, 0.4],
                     old=[0.0] * 2, ref=[0.0] * 2, token=[0.0] * 2))
    order = data.draw(st.permutations(range(len(rows)))) if data is not None else list(range(len(rows)))[::-1]
    batch = build_batch([rows[k] for k in order], dtype, 8)
    equal = batch.group_ids <= gid  # (B,) rows of the equal-score groups
    assert bool((ProcessOnlyAligner(prior="empirical").align(batch)[equal] == 0).all())
    for norm, eps in itertools.product(("center", "zscore"), EPSILONS):
        adv = PRPOAligner(prior="empirical", outcome_norm=norm, outcome_epsilon=eps).align(batch)
        assert bool((adv[equal] == 0).all()), f"{norm} {eps} {dtype}"
        assert bool((adv[~equal] != 0).any())  # the varied group still gets a signal


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [0.1, 0.7, 1 / 3])
def test_whitened_aligners_give_exactly_zero_when_every_token_holds_the_same_advantage(dtype, value):
    """REINFORCE++, PURE and PRIME whiten over the batch; a batch with one advantage everywhere gives 0."""
    rows = [dict(gid=g, reward=value, length=3, spans=[(0, 3)], scores=[value], old=[0.0] * 3, ref=[0.0] * 3,
                 token=[value] * 3) for g in (4, 9) for _ in range(3)]
    batch = build_batch(rows, dtype, 5)
    aligners = [ReinforcePPBaselineAligner(), PUREAligner(credit="sum", baseline="none"),
                PUREAligner(credit="sum", baseline="step"), PRIMEAligner(reward_source="token_scores")]
    for aligner in aligners:
        adv = aligner.align(batch)
        assert bool((adv == 0).all()), f"{type(aligner).__name__}{vars(aligner)} {dtype}: {adv[0]}"


@SETTINGS
@given(case=identical_groups(), dtype=st.sampled_from(DTYPES))
@example(case=_row_example(0.1, 3), dtype=torch.float64)
def test_outcome_terms_of_pure_and_prime_are_exactly_zero_for_equal_rewards(case, dtype):
    """PURE's verifiable-reward term and PRIME's outcome RLOO term add exactly 0 to an equal-reward group."""
    rows, t = case
    batch = build_batch(rows, dtype, t)
    for whiten in (False, True):
        torch.testing.assert_close(PUREAligner(vr_coef=1.0, whiten=whiten).align(batch),
                                   PUREAligner(vr_coef=0.0, whiten=whiten).align(batch), rtol=0, atol=0)
        for mode in ("paper", "code"):
            with_outcome = PRIMEAligner(loo_mode=mode, outcome_coef=1.0, whiten=whiten).align(batch)
            assert torch.equal(with_outcome, PRIMEAligner(loo_mode=mode, outcome_coef=0.0, whiten=whiten).align(batch))
    # PRIME paper mode, identical rows of one constant token reward: the LOO baseline is r̄ exactly → 0; a
    # singleton's baseline is 0, so it keeps its reward-to-go Σ_{s≥t} r
    const = build_batch([dict(r, token=[r["reward"]] * r["length"]) for r in rows], dtype, t)
    adv = PRIMEAligner(reward_source="token_scores", whiten=False).align(const)  # (B, T)
    shared = torch.tensor([sum(q["gid"] == r["gid"] for q in rows) > 1 for r in rows])  # (B,)
    assert bool((adv[shared] == 0).all())
    to_go = torch.flip(torch.cumsum(torch.flip(const.token_scores.double(), (1,)), 1), (1,)) * const.completion_mask
    assert torch.equal(adv[~shared], to_go[~shared].float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_singletons_and_empty_completions_give_their_documented_values_exactly(dtype):
    rows = [dict(gid=g, reward=v, length=n, spans=[(0, n)] if n else [], scores=[v] if n else [],
                 old=[v] * n, ref=[0.1] * n, token=[v] * n)
            for g, (v, n) in enumerate([(0.1, 3), (0.7, 2), (1 / 3, 0), (2 / 3, 4)])]
    rows.append(dict(rows[0], length=0, spans=[], scores=[], old=[], ref=[], token=[]))  # empty, in group 0
    batch = build_batch(rows, dtype, 5)
    empty = batch.completion_mask.sum(dim=1) == 0  # (B,)
    singles = ~empty & (batch.group_ids != 0)  # (B,) alone in their group
    for aligner in [*ZERO_FOR_EQUAL_REWARDS, ReinforcePPBaselineAligner(), PUREAligner(), PRIMEAligner(),
                    *(PRPOAligner(prior=p) for p in PRIORS), *(ProcessOnlyAligner(prior=p) for p in PRIORS)]:
        adv = aligner.align(batch)
        assert bool((adv[empty] == 0).all()), type(aligner).__name__
        if aligner in ZERO_FOR_EQUAL_REWARDS:
            assert bool((adv[singles] == 0).all()), f"{type(aligner).__name__}{vars(aligner)}"
    for prior in PRIORS:  # a singleton's β is 0: PRPO is its process term exactly
        assert torch.equal(PRPOAligner(prior=prior, outcome_epsilon=0.0, outcome_norm="zscore").align(batch)[singles],
                           ProcessOnlyAligner(prior=prior).align(batch)[singles])
