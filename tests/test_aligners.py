"""Aligners against the hand-computed oracles of ../shared/research (prpo_spec.md §9 O1/A1/A2/A3,
process_methods_spec.md §1.6 SPRO, §2.7 GRPO family, §3.6 PURE, §4.6 PRIME)."""

from __future__ import annotations

import math

import pytest
import torch

from components.aligners import (
    SIGMA0_CODE,
    SIGMA0_UNIFORM,
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
    aligner_names,
    build_aligner,
)
from components.segmenters import EntropySpikeSegmenter
from prpo_lightning.batch import RolloutBatch

torch.set_num_threads(1)
TOL = dict(atol=1e-5, rtol=1e-5)


def make_batch(
    lengths,
    rewards,
    groups=None,
    t=None,
    spans=None,
    scores=None,
    old=None,
    ref=None,
    token_scores=None,
    entropies=None,
):
    b = len(lengths)
    t = t or max([1, *lengths])
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    batch = RolloutBatch(
        prompt_ids=torch.zeros(b, 1, dtype=torch.long),
        prompt_mask=torch.ones(b, 1, dtype=torch.long),
        completion_ids=torch.zeros(b, t, dtype=torch.long),
        completion_mask=mask,
        group_ids=torch.tensor(groups if groups is not None else [0] * b),
        problems=["q"] * b,
        answers=["a"] * b,
        outcome_rewards=torch.tensor(rewards, dtype=torch.float32),
        entropies=entropies,
    )
    if spans is not None:
        batch.segment_spans = spans
        s = max(1, max(len(r) for r in scores))
        batch.step_scores = torch.zeros(b, s)
        batch.step_mask = torch.zeros(b, s, dtype=torch.bool)
        for i, row in enumerate(scores):
            batch.step_scores[i, : len(row)] = torch.tensor(row)
            batch.step_mask[i, : len(row)] = True
    if old is not None:
        batch.old_logprobs = _pad_rows(old, t)
        batch.ref_logprobs = _pad_rows(ref, t)
    if token_scores is not None:
        batch.token_scores = _pad_rows(token_scores, t)
    return batch


def _pad_rows(rows, t):
    out = torch.zeros(len(rows), t)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def assert_rows(adv, expected_rows, lengths):
    """Every row's valid tokens equal the expected list (or a scalar broadcast) and padding is 0."""
    for i, (exp, length) in enumerate(zip(expected_rows, lengths)):
        exp_t = torch.full((length,), float(exp)) if not isinstance(exp, list | tuple) else torch.tensor(exp)
        torch.testing.assert_close(adv[i, :length].float(), exp_t.float(), **TOL)
        assert torch.all(adv[i, length:] == 0)


# --------------------------------------------------------------------------- O1 (prpo_spec.md §9)
# Four groups interleaved in one batch, rows permuted: statistics must follow group ids, not positions.
O1_GROUPS = {
    0: ([-1, 1, -1, -1], [-0.5, 1.5, -0.5, -0.5], [-0.5, 1.5, -0.5, -0.5], [-0.577350, 1.732049, -0.577350, -0.577350],
        [-0.666667, 2.0, -0.666667, -0.666667]),
    1: ([1, 1, -1, -1], [1, 1, -1, -1], [0.866025, 0.866025, -0.866025, -0.866025],
        [0.999999, 0.999999, -0.999999, -0.999999], [1.333333, 1.333333, -1.333333, -1.333333]),
    2: ([1, 1, 1, 1], [0] * 4, [0] * 4, [0] * 4, [0] * 4),
    3: ([1] + [-1] * 7, [1.75] + [-0.25] * 7, [2.474874] + [-0.353553] * 7, None, [2.0] + [-0.285714] * 7),
}


def _o1_batch():
    rows = [(g, j) for g, v in O1_GROUPS.items() for j in range(len(v[0]))]
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(3)).tolist()
    rows = [rows[p] for p in perm]
    lengths = [3 + (k % 4) for k in range(len(rows))]
    batch = make_batch(lengths, [O1_GROUPS[g][0][j] for g, j in rows], groups=[100 + g for g, _ in rows], t=8)
    return batch, rows, lengths


@pytest.mark.parametrize(
    "col,aligner",
    [
        (1, DrGRPOAligner()),  # β (PRPO's centred outcome)
        (2, GRPOAligner(epsilon=0.0, min_std=0.1)),  # GRPO_repo: std floored at 0.1
        (3, GRPOAligner(epsilon=1e-6, unbiased=False)),  # population std + 1e-6
        (4, RLOOAligner()),  # LOO
    ],
)
def test_o1_outcome_advantage_table(col, aligner):
    batch, rows, lengths = _o1_batch()
    adv = aligner.align(batch)
    expected = [O1_GROUPS[g][col][j] if O1_GROUPS[g][col] is not None else None for g, j in rows]
    for i, (exp, length) in enumerate(zip(expected, lengths)):
        if exp is None:
            continue
        torch.testing.assert_close(adv[i, :length], torch.full((length,), float(exp)), atol=2e-6, rtol=2e-6)
        assert torch.all(adv[i, length:] == 0)


# --------------------------------------------------------------------------- §2.7 GRPO family
@pytest.mark.parametrize(
    "aligner,expected",
    [
        (GRPOAligner(epsilon=0.0), [1.5, -0.5, -0.5, -0.5]),
        (GRPOAligner(epsilon=1e-6), [1.499997, -0.499999, -0.499999, -0.499999]),
        (GRPOAligner(epsilon=1e-4), [1.4997, -0.4999, -0.4999, -0.4999]),
        (DrGRPOAligner(), [0.75, -0.25, -0.25, -0.25]),
        (GRPOAligner(std_normalize=False), [0.75, -0.25, -0.25, -0.25]),
        (RLOOAligner(), [1.0, -0.333333, -0.333333, -0.333333]),
        (ReinforcePPBaselineAligner(), [1.620185, -0.540062, -0.540062, -0.540062]),
    ],
)
def test_grpo_family_oracle(aligner, expected):
    lengths = [2, 3, 1, 2]
    adv = aligner.align(make_batch(lengths, [1, 0, 0, 0], t=5))
    assert_rows(adv, expected, lengths)


def test_reinforce_pp_baseline_whitening_uses_two_groups_and_token_weights():
    lengths = [2, 3, 1, 2, 4, 1]
    batch = make_batch(lengths, [1, 0, 0, 0, 1, 0], groups=[0, 0, 0, 0, 1, 1], t=4)
    adv = ReinforcePPBaselineAligner().align(batch)
    a = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, -0.5]).double()
    tok = torch.repeat_interleave(a, torch.tensor(lengths))
    expected = (tok - tok.mean()) / torch.sqrt(tok.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(adv[batch.completion_mask].double(), expected, **TOL)
    unwhitened = ReinforcePPBaselineAligner(whiten=False).align(batch)
    assert_rows(unwhitened, a.tolist(), lengths)


def test_singleton_and_zero_variance_groups_give_zero():
    lengths = [3, 2, 2, 4]
    batch = make_batch(lengths, [1.0, -1.0, -1.0, 0.5], groups=[0, 1, 1, 2], t=4)
    for al in (GRPOAligner(epsilon=0.0), GRPOAligner(), DrGRPOAligner(), RLOOAligner(), PRIMEAligner(whiten=False)):
        batch.old_logprobs = batch.ref_logprobs = torch.zeros(4, 4)
        adv = al.align(batch)
        assert torch.isfinite(adv).all()
        assert torch.all(adv == 0), type(al).__name__


# --------------------------------------------------------------------------- A1 / A2 / A3 (prpo_spec.md §9)
A1_LENGTHS = [40, 12, 30, 5]
A1_SPANS = [[(0, 18), (18, 33), (33, 40)], [(0, 12)], [(0, 27), (27, 30)], [(0, 5)]]
A1_SCORES = [[0.9, 0.6, 0.2], [0.95], [0.7, 0.3], [0.1]]
A1_R = [-1, 1, -1, -1]


def a1_entropies(t=48):
    ent = torch.zeros(4, t)
    ent[0, :40] = 0.1
    for p, v in {3: 2.0, 12: 2.5, 18: 1.2, 25: 3.0, 33: 1.5}.items():
        ent[0, p] = v
    ent[1, :12] = 0.01 * torch.arange(12)
    ent[1, 10] = 2.0
    ent[2, :30] = 0.1
    for p, v in {4: 5.0, 15: 4.0, 22: 3.0, 27: 2.0, 29: 1.0}.items():
        ent[2, p] = v
    ent[3, :5] = 0.1
    return ent


def a1_batch():
    batch = make_batch(A1_LENGTHS, A1_R, t=48, spans=A1_SPANS, scores=A1_SCORES, entropies=a1_entropies())
    assert EntropySpikeSegmenter(mode="reference").segment(batch, None) == A1_SPANS  # spans come from S1/S6 rules
    return batch


def seg_values(pieces):
    out = []
    for n, v in pieces:
        out += [v] * n
    return out


A1_CODE = [
    seg_values([(18, 1.459592), (15, -0.010102), (6, -1.969694), (1, -0.3)]),
    seg_values([(11, 3.704541), (1, 2.45)]),
    seg_values([(27, 0.479796), (2, -1.479796), (1, -0.2)]),
    seg_values([(4, -2.459592), (1, -0.4)]),
]
A1_IDEAL = [
    seg_values([(18, 1.459592), (15, -0.010102), (7, -1.969694)]),
    seg_values([(12, 3.704541)]),
    seg_values([(27, 0.479796), (3, -1.479796)]),
    seg_values([(5, -2.459592)]),
]


def test_prpo_a1_code_column_with_quirk_and_sqrt_1_24():
    batch = a1_batch()
    adv = PRPOAligner(prior="triangular", last_token_quirk=True).align(batch)
    assert_rows(adv, A1_CODE, A1_LENGTHS)
    mask = batch.completion_mask
    assert int(mask.sum()) == 87
    assert float(adv[mask].double().sum()) == pytest.approx(56.759437, abs=1e-4)
    assert float(adv[mask].double().mean()) == pytest.approx(0.652407, abs=1e-6)
    seq_means = (adv.double().sum(1) / mask.sum(1)).tolist()
    assert seq_means == pytest.approx([0.350074, 3.599996, 0.326497, -2.047673], abs=1e-5)
    # explicit sigma0 is the same as prior="triangular"
    torch.testing.assert_close(PRPOAligner(sigma0=SIGMA0_CODE, last_token_quirk=True).align(batch), adv)


def test_prpo_a1_idealised_column_paper_last_token():
    batch = a1_batch()
    adv = PRPOAligner(prior="triangular").align(batch)
    assert_rows(adv, A1_IDEAL, A1_LENGTHS)
    assert float(adv[batch.completion_mask].double().sum()) == pytest.approx(53.004896, abs=1e-4)
    assert float(adv[batch.completion_mask].double().mean()) == pytest.approx(0.609252, abs=1e-6)


def test_prpo_default_is_uniform_prior_center_and_zscore_option():
    batch = a1_batch()
    assert SIGMA0_UNIFORM == pytest.approx(0.288675, abs=1e-6)
    adv = PRPOAligner().align(batch)
    assert float(adv[0, 0]) == pytest.approx((0.9 - 0.5) / math.sqrt(1 / 12) - 0.5, abs=1e-5)  # 0.885641
    assert float(adv[1, 11]) == pytest.approx((0.95 - 0.5) / math.sqrt(1 / 12) + 1.5, abs=1e-5)  # last token: Z+β
    # z-scored outcome: R=[-1,1,-1,-1], unbiased std = 1 -> β/(1+1e-6); group [1,1,-1,-1] -> ±0.866025
    adv_z = PRPOAligner(prior="triangular", outcome_norm="zscore").align(batch)
    torch.testing.assert_close(adv_z, PRPOAligner(prior="triangular").align(batch), atol=1e-5, rtol=1e-5)
    b2 = make_batch([2, 2, 2, 2], [1, 1, -1, -1], t=3, spans=[[(0, 2)]] * 4, scores=[[0.5]] * 4)
    assert_rows(PRPOAligner(outcome_norm="zscore").align(b2), [0.866025, 0.866025, -0.866025, -0.866025], [2] * 4)


def test_prpo_a2_empirical_prior_srpo4():
    batch = a1_batch()
    adv = PRPOAligner(prior="empirical", last_token_quirk=True).align(batch)
    beta = [-0.5, 1.5, -0.5, -0.5]
    z = {(0, 0.9): 0.394282, (0, 0.6): -0.846254, (0, 0.2): -2.500302, (1, 0.95): 2.601038,
         (2, 0.7): -0.432742, (2, 0.3): -2.086790, (3, 0.1): -2.913814}
    # the §9 A2 values already include β (e.g. (0.9 − 0.683735)/0.241831 − 0.5 = 0.394282); last tokens r + β
    expected = [
        seg_values([(18, z[0, 0.9]), (15, z[0, 0.6]), (6, z[0, 0.2])]) + [0.2 + beta[0]],
        seg_values([(11, z[1, 0.95])]) + [0.95 + beta[1]],
        seg_values([(27, z[2, 0.7]), (2, z[2, 0.3])]) + [0.3 + beta[2]],
        seg_values([(4, z[3, 0.1])]) + [0.1 + beta[3]],
    ]
    assert_rows(adv, expected, A1_LENGTHS)


def test_prm_avg_a3_padded_mean_matches_rflux():
    adv = PRMAvgAligner(mean_over="padded", epsilon=0.0).align(a1_batch())
    assert_rows(adv, [-0.253727, 1.458269, -0.397806, -0.806736], A1_LENGTHS)
    # pad_length overrides the batch's T (T=48 here) as in the code's T=2048
    adv48 = PRMAvgAligner(mean_over="padded", pad_length=48, epsilon=0.0).align(a1_batch())
    torch.testing.assert_close(adv48, adv)


def test_prm_avg_default_mean_over_valid_tokens_only():
    adv = PRMAvgAligner(epsilon=0.0).align(a1_batch())
    # valid-token means: 26.6/40, 11.4/12, 19.8/30, 0.5/5 = 0.665, 0.95, 0.66, 0.1
    r_prime = [-1 + 0.665, 1 + 0.95, -1 + 0.66, -1 + 0.1]  # -0.335, 1.95, -0.34, -0.9
    mean = sum(r_prime) / 4  # 0.09375
    std = math.sqrt(sum((x - mean) ** 2 for x in r_prime) / 3)  # 1.265592
    assert std == pytest.approx(1.265592, abs=1e-6)
    assert_rows(adv, [(x - mean) / std for x in r_prime], A1_LENGTHS)
    assert float(adv[0, 0]) == pytest.approx(-0.338774, abs=1e-5)


def test_prpo_plus_prm_avg_a3_srpo3_beta():
    adv = PRPOAligner(prior="triangular", last_token_quirk=True, prm_avg_in_outcome=True, prm_avg_over="padded").align(
        a1_batch()
    )
    beta = [-0.249479, 1.433854, -0.391146, -0.793229]
    z_code = [[v - b for v in row] for row, b in zip(A1_CODE, [-0.5, 1.5, -0.5, -0.5])]
    assert_rows(adv, [[v + beta[i] for v in row] for i, row in enumerate(z_code)], A1_LENGTHS)


def test_process_only_is_prpo_without_outcome():
    batch = a1_batch()
    z_code = [[v - b for v in row] for row, b in zip(A1_CODE, [-0.5, 1.5, -0.5, -0.5])]
    assert_rows(ProcessOnlyAligner(prior="triangular", last_token_quirk=True).align(batch), z_code, A1_LENGTHS)
    z_ideal = [[v - b for v in row] for row, b in zip(A1_IDEAL, [-0.5, 1.5, -0.5, -0.5])]
    assert_rows(ProcessOnlyAligner(prior="triangular").align(batch), z_ideal, A1_LENGTHS)
    batch.outcome_rewards = torch.tensor([5.0, -3.0, 0.0, 1.0])  # ignored
    assert_rows(ProcessOnlyAligner(prior="triangular").align(batch), z_ideal, A1_LENGTHS)


def test_process_aligners_reject_missing_or_unscored_segments():
    batch = a1_batch()
    batch.step_mask[0, 2] = False
    with pytest.raises(ValueError, match="no PRM score"):
        PRPOAligner().align(batch)
    batch = a1_batch()
    batch.step_scores = None
    with pytest.raises(ValueError, match="step scores"):
        PRMAvgAligner().align(batch)


# --------------------------------------------------------------------------- SPRO §1.6
SPRO_DELTA = [[0.2, -0.1, 0.3, 0.0], [0.1, 0.1, -0.2], [-0.3, 0.4]]


def spro_batch(t=6):
    return make_batch([4, 3, 2], [1, 0, 1], t=t, old=SPRO_DELTA, ref=[[0.0] * len(r) for r in SPRO_DELTA])


def test_spro_oracle_masked_step_advantage():
    al = SPROAligner(beta=0.5, epsilon=0.0)
    msa = al.masked_step_advantage(spro_batch())
    assert_rows(msa, [[0.10, -0.0166667, 0.10, 0.0], [0.05, 0.0333333, -0.10], [-0.15, -0.0166667]], [4, 3, 2])
    expected = [
        [0.6773503, 0.5606836, 0.6773503, 0.5773503],
        [-1.1047005, -1.1213672, -1.2547005],
        [0.4273503, 0.5606836],
    ]
    assert_rows(al.align(spro_batch()), expected, [4, 3, 2])
    # ε = 1e-6 outcome term: [0.577349, -1.154699, 0.577349] + MSA
    adv = SPROAligner(beta=0.5, epsilon=1e-6).align(spro_batch())
    assert float(adv[1, 0]) == pytest.approx(-1.154699 + 0.05, abs=1e-6)
    # masked mean of MSA at each position is zero; the one-alive position (t=3) is 0
    m = spro_batch().completion_mask
    assert torch.allclose((msa * m).sum(0), torch.zeros(6, dtype=msa.dtype), atol=1e-6)
    assert float(msa[0, 3]) == 0.0
    assert SPROAligner.needs.reference_logprobs and not SPROAligner.needs.process_scores


def test_spro_equals_grpo_when_policy_equals_reference():
    b = spro_batch()
    b.ref_logprobs = b.old_logprobs.clone()
    torch.testing.assert_close(SPROAligner(beta=0.5).align(b), GRPOAligner().align(b))


# --------------------------------------------------------------------------- PURE §3.6
PURE_SPANS = [[(0, 3), (3, 5), (5, 9)], [(0, 4), (4, 6)], [(0, 2), (2, 4), (4, 7), (7, 8)]]
PURE_SCORES = [[0.9, 0.8, 0.95], [0.9, 0.3], [0.7, 0.6, 0.2, 0.9]]


def pure_batch():
    return make_batch([9, 6, 8], [1, 0, 0], t=10, spans=PURE_SPANS, scores=PURE_SCORES)


def _steps_to_tokens(step_values):
    return [seg_values([(e - s, v) for (s, e), v in zip(spans, vals)]) for spans, vals in zip(PURE_SPANS, step_values)]


def test_pure_oracle_step_baseline():
    adv = PUREAligner(baseline="step", whiten=False).align(pure_batch())
    exp = [[2.160318, 1.894004, 1.212768], [-0.961885, -0.930944], [-1.123321, -1.117430, -1.111588, -0.505908]]
    assert_rows(adv, _steps_to_tokens(exp), [9, 6, 8])


def test_pure_oracle_token_baseline():
    adv = PUREAligner(baseline="token", whiten=False).align(pure_batch())
    exp = [[2.278092, 1.972519, 1.323431], [-0.912613, -0.904204], [-1.225258, -1.193883, -1.162557, -0.515696]]
    assert_rows(adv, _steps_to_tokens(exp), [9, 6, 8])
    # whitening is an affine map of the same values
    w = PUREAligner(baseline="token").align(pure_batch())
    m = pure_batch().completion_mask
    x = adv[m].double()
    torch.testing.assert_close(w[m].double(), (x - x.mean()) / torch.sqrt(x.var() + 1e-8), **TOL)


def test_pure_oracle_strict_min_returns_and_soft_min_limit():
    adv = PUREAligner(credit="strict_min", baseline="none", vr_coef=0.0, whiten=False).align(pure_batch())
    exp = [[0.6, 0.6, 0.9], [-0.4, -0.4], [-0.6, -0.6, -0.6, 0.8]]
    assert_rows(adv, _steps_to_tokens(exp), [9, 6, 8])
    # Σ_k r*_k -> min_k p as T -> 0: the first-step return with no baseline equals the soft-min sum
    soft = PUREAligner(temperature=0.1, baseline="none", vr_coef=0.0, whiten=False).align(pure_batch())
    assert [float(soft[i, 0]) for i in range(3)] == pytest.approx([0.635442, -0.399993, -0.599685], abs=1e-5)
    cold = PUREAligner(temperature=1e-3, baseline="none", vr_coef=0.0, whiten=False).align(pure_batch())
    assert [float(cold[i, 0]) for i in range(3)] == pytest.approx([0.6, -0.4, -0.6], abs=1e-4)


# --------------------------------------------------------------------------- PRIME §4.6
PRIME_R = [[0.10, -0.05, 0.15, 0.00], [0.05, 0.05, -0.10], [-0.15, 0.20]]
PRIME_PAPER = [[0.65, 0.5625, 0.625, 0.4875], [-1.1125, -1.125, -1.1375], [0.5, 0.675]]
PRIME_PAPER_W = [[0.742717, 0.640553, 0.713527, 0.552983], [-1.315160, -1.329755, -1.344350], [0.567578, 0.771906]]
PRIME_CODE = [[0.65, 0.5375, 0.65, 0.4625], [-1.1125, -1.15, -1.1875], [0.5, 0.7625]]
PRIME_CODE_W = [[0.727200, 0.598871, 0.727200, 0.513318], [-1.283294, -1.326070, -1.368847], [0.556094, 0.855529]]


@pytest.mark.parametrize(
    "mode,whiten,expected",
    [("paper", False, PRIME_PAPER), ("paper", True, PRIME_PAPER_W), ("code", False, PRIME_CODE), ("code", True, PRIME_CODE_W)],
)
def test_prime_oracle(mode, whiten, expected):
    # token_scores from a PRM (already β-scaled) ...
    b = make_batch([4, 3, 2], [1, 0, 1], t=5, token_scores=PRIME_R)
    al = PRIMEAligner(reward_source="token_scores", loo_mode=mode, whiten=whiten)
    assert al.needs.process_scores and not al.needs.reference_logprobs
    assert_rows(al.align(b), expected, [4, 3, 2])
    # ... or the self-reference variant from log-probs: β·(old − ref) with β = 0.5 and δ = 2r
    b2 = make_batch([4, 3, 2], [1, 0, 1], t=5, old=[[2 * x for x in r] for r in PRIME_R], ref=[[0.0] * 4] * 3)
    al2 = PRIMEAligner(beta=0.5, loo_mode=mode, whiten=whiten)
    assert al2.needs.reference_logprobs and not al2.needs.process_scores
    assert_rows(al2.align(b2), expected, [4, 3, 2])


# --------------------------------------------------------------------------- registry and flags
def test_registry_builds_every_published_method():
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "prpo", "process_only", "prm_avg", "spro",
            "pure", "prime"} <= set(aligner_names())
    al = build_aligner("prpo", prior="triangular", last_token_quirk=True)
    assert isinstance(al, PRPOAligner) and al.sigma0 == SIGMA0_CODE
    with pytest.raises(KeyError):
        build_aligner("nope")


def test_flags_and_bad_arguments():
    assert PRPOAligner.needs.process_scores and PRMAvgAligner.needs.process_scores and PUREAligner.needs.process_scores
    assert not GRPOAligner.needs.process_scores and not RLOOAligner.needs.reference_logprobs
    for bad in (
        lambda: PRPOAligner(prior="gauss"),  # type: ignore[arg-type]
        lambda: PRPOAligner(outcome_norm="x"),  # type: ignore[arg-type]
        lambda: PRPOAligner(sigma0=0.0),
        lambda: PUREAligner(credit="max"),  # type: ignore[arg-type]
        lambda: PUREAligner(temperature=0.0),
        lambda: PRIMEAligner(loo_mode="x"),  # type: ignore[arg-type]
        lambda: PRMAvgAligner(mean_over="all"),  # type: ignore[arg-type]
        lambda: GRPOAligner(epsilon=-1.0),
    ):
        with pytest.raises(ValueError):
            bad()
    ungraded = make_batch([2], [0.0])
    ungraded.outcome_rewards = None
    with pytest.raises(ValueError, match="outcome_rewards"):
        GRPOAligner().align(ungraded)
    with pytest.raises(ValueError, match="ref_logprobs"):
        SPROAligner().align(make_batch([2], [0.0]))
