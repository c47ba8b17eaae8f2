"""Group statistics are keyed by prompt id and invariant to batch order; each row keeps its own answer."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prpo_lightning.batch import RolloutBatch, check_spans_tile, spans_to_segment_ids
from prpo_lightning.scoring.grouping import (
    group_constant,
    group_loo_mean,
    group_mean,
    group_moments,
    group_position_mean,
    group_std,
    group_zscore,
    masked_row_mean,
    zero_variance_fraction,
)
from prpo_lightning.scoring.pipeline import grade
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus


def test_group_stats_o1_oracle():
    """prpo_spec O1 row 1 (R = [−1, +1, −1, −1]) and the G=8 row, mixed in one batch by prompt id."""
    r = torch.tensor([-1.0, 1.0, -1.0, -1.0, 1.0] + [-1.0] * 7, dtype=torch.float64)
    gid = torch.tensor([7, 7, 7, 7] + [3] * 8)
    beta = r - group_mean(r, gid)
    assert beta[:4].tolist() == pytest.approx([-0.5, 1.5, -0.5, -0.5])
    assert beta[4:].tolist() == pytest.approx([1.75] + [-0.25] * 7)
    grpo = beta / group_std(r, gid)
    assert grpo[4] == pytest.approx(2.474874, abs=1e-6)
    loo = r - group_loo_mean(r, gid)
    assert loo[:4].tolist() == pytest.approx([-0.666667, 2.0, -0.666667, -0.666667], abs=1e-6)


def test_group_stats_are_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(24, generator=g, dtype=torch.float64)
    gid = torch.arange(6).repeat_interleave(4)
    perm = torch.randperm(24, generator=g)
    for fn in (group_mean, group_std, group_loo_mean):
        assert torch.allclose(fn(r, gid)[perm], fn(r[perm], gid[perm]))


def test_groups_are_not_batch_positions():
    """Interleaved rows (the authors' tiling layout) still form groups by id."""
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert group_mean(r, torch.tensor([0, 1, 0, 1])).tolist() == [0.5, 0.0, 0.5, 0.0]


def test_singleton_and_zero_variance():
    r = torch.tensor([1.0, 1.0, 1.0, 5.0])
    gid = torch.tensor([0, 0, 0, 1])
    assert group_std(r, gid).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert group_loo_mean(r, gid)[3] == 0.0
    assert zero_variance_fraction(r, gid) == 1.0
    assert zero_variance_fraction(torch.tensor([1.0, 0.0]), torch.tensor([0, 0])) == 0.0


INEXACT = [0.1, 0.7, 1 / 3, 2 / 3, 0.3, 0.2, 0.9, 1.1, -0.7, 5 / 7]


@settings(max_examples=60, deadline=None)
@given(
    value=st.sampled_from(INEXACT) | st.floats(-1e3, 1e3, allow_nan=False),
    sizes=st.lists(st.integers(1, 16), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 10**6),
)
def test_equal_valued_groups_have_exact_statistics_in_every_dtype(value, sizes, dtype, seed):
    """Groups of one repeated value, interleaved with a varied group: mean = value, centred = std = z = 0 exactly."""
    gen = torch.Generator().manual_seed(seed)
    equal = torch.tensor([value] * sum(sizes), dtype=torch.float64).to(dtype)  # (n,)
    varied = torch.tensor([0.1, 0.7, 0.7], dtype=dtype)
    values = torch.cat([equal, varied])  # (B,)
    gid = torch.cat([torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes)) * 3 + 1, torch.full((3,), 99)])
    perm = torch.randperm(values.numel(), generator=gen)
    values, gid = values[perm], gid[perm]
    rows = gid != 99  # (B,)
    assert bool((group_mean(values, gid)[rows] == values[rows]).all())
    assert bool(((values - group_mean(values, gid))[rows] == 0).all())
    for unbiased in (True, False):
        assert bool((group_std(values, gid, unbiased=unbiased)[rows] == 0).all())
        assert bool((group_std(values, gid, unbiased=unbiased)[~rows] > 0).all())
        for eps, min_std in ((0.0, 0.0), (1e-6, 0.0), (0.0, 0.1), (1e-4, 0.1)):
            z = group_zscore(values, gid, eps, unbiased, min_std)  # (B,)
            assert bool((z[rows] == 0).all()) and bool((z[~rows] != 0).all())
    singles = rows & (torch.bincount(gid)[gid] == 1)  # (B,)
    loo = group_loo_mean(values, gid)  # (B,)
    assert bool((loo[rows & ~singles] == values[rows & ~singles]).all()) and bool((loo[singles] == 0).all())
    assert group_constant(values, gid).tolist() == rows.tolist()
    assert zero_variance_fraction(values, gid) == len(sizes) / (len(sizes) + 1)


def test_zero_variance_is_exact_equality_not_a_tolerance():
    r = torch.tensor([0.1, 0.1 + 1e-13, 0.1, 0.1, 0.1], dtype=torch.float64)
    gid = torch.tensor([0, 0, 1, 1, 1])
    assert zero_variance_fraction(r, gid) == 0.5
    assert group_constant(r, gid).tolist() == [False, False, True, True, True]
    assert group_zscore(r, gid, epsilon=0.0).tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0, 0, 0])


def test_group_moments_pool_masked_tokens_hand_computed():
    """Group 5 pools {0.2, 0.4, 0.9}: mean 0.5, unbiased var ((−0.3)² + (−0.1)² + 0.4²)/2 = 0.13; group 2
    pools {0.1, 0.1, 0.1} (padding ignored): mean 0.1 and std 0 exactly; group 8 pools nothing."""
    values = torch.tensor([[0.2, 0.4, 7.0], [0.1, 0.1, 0.1], [0.9, -3.0, 5.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    gid = torch.tensor([5, 2, 5, 8])
    m = group_moments(values, gid, mask)
    assert m.count.tolist() == [3, 3, 3, 0]
    assert m.mean.tolist() == pytest.approx([0.5, 0.1, 0.5, 0.0]) and m.mean[1] == 0.1
    assert m.std.tolist() == pytest.approx([math.sqrt(0.13), 0.0, math.sqrt(0.13), 0.0]) and m.std[1] == 0
    assert m.constant.tolist() == [False, True, False, True]
    population = group_moments(values, gid, mask, unbiased=False).std
    assert population[0].item() == pytest.approx(math.sqrt(0.26 / 3))
    assert masked_row_mean(values, mask).tolist() == pytest.approx([0.3, 0.1, 0.9, 0.0])
    assert masked_row_mean(values, mask)[1] == 0.1


def test_group_position_mean_over_alive_rows_hand_computed():
    """Rows 0 and 2 share group 4: at t=0 both alive (mean 0.25), at t=1 only row 0 (0.3), at t=2 none (0).
    Row 1 (group 6) alone: its own value, exactly."""
    values = torch.tensor([[0.1, 0.3, 9.0], [1 / 3, 1 / 3, 0.0], [0.4, 5.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    out = group_position_mean(values, mask, torch.tensor([4, 6, 4]))
    expected = torch.tensor([[0.25, 0.3, 0.0], [1 / 3, 1 / 3, 0.0], [0.25, 0.3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    assert bool((out[1, :2] == values[1, :2]).all())
    same = torch.tensor([[0.1, 0.7], [0.1, 0.7], [0.1, 0.0]], dtype=torch.float64)
    exact = group_position_mean(same, torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.bool), torch.zeros(3))
    assert exact.tolist() == [[0.1, 0.7], [0.1, 0.7], [0.1, 0.7]]


class _ExactVerifier(OutcomeVerifier):
    def verify(self, completion: str, gold: str) -> Verdict:
        ok = completion.strip().endswith(f"\\boxed{{{gold}}}")
        return Verdict(VerdictStatus.CORRECT if ok else VerdictStatus.INCORRECT, 1.0 if ok else -1.0)


def _batch(order: list[int]) -> RolloutBatch:
    answers = ["3", "3", "8", "8"]
    completions = ["\\boxed{3}", "\\boxed{8}", "\\boxed{8}", "\\boxed{3}"]
    z = torch.zeros(4, 2, dtype=torch.long)
    b = RolloutBatch(
        prompt_ids=z, prompt_mask=z, completion_ids=z, completion_mask=torch.ones(4, 2),
        group_ids=torch.tensor([0, 0, 1, 1]), problems=["a", "a", "b", "b"], answers=answers, completions=completions,
    )
    return b.select(torch.tensor(order))


def test_each_row_is_graded_against_its_own_answer_in_any_order():
    base = _batch([0, 1, 2, 3])
    grade(base, _ExactVerifier())
    assert base.outcome_rewards.tolist() == [1.0, -1.0, 1.0, -1.0]
    order = [3, 1, 0, 2]
    shuffled = _batch(order)
    grade(shuffled, _ExactVerifier())
    assert shuffled.outcome_rewards.tolist() == base.outcome_rewards[order].tolist()


def test_spans_tile_check_and_segment_ids():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    ids = spans_to_segment_ids([[(0, 2), (2, 3)], [(0, 1)], []], mask)
    assert ids.tolist() == [[0, 0, 1, -1], [0, -1, -1, -1], [-1, -1, -1, -1]]
    for bad, length in (([(0, 2)], 3), ([(0, 2), (1, 3)], 3), ([(0, 0), (0, 3)], 3), ([(0, 1)], 0)):
        with pytest.raises(ValueError, match="tile|empty"):
            check_spans_tile(bad, length)
