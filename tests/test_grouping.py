"""Group statistics are keyed by prompt id and invariant to batch order; each row keeps its own answer."""

import pytest
import torch

from prpo_lightning.batch import RolloutBatch, check_spans_tile, spans_to_segment_ids
from prpo_lightning.grouping import group_loo_mean, group_mean, group_std, zero_variance_fraction
from prpo_lightning.scoring import grade
from prpo_lightning.verifier import OutcomeVerifier, Verdict, VerdictStatus


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
