"""Evaluation metrics: the deduplicating accuracy over simulated DistributedSampler splits equals the single-process
value exactly, and the unbiased pass@k estimator matches hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DistributedSampler

from prpo_lightning.evaluation.metrics import (
    DedupAccuracy,
    ProblemOutcomes,
    default_ks,
    mean_accuracy,
    mean_pass_at_k,
    pass_at_k,
)

N_PROBLEMS = 500


def _outcomes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    correct = torch.rand(N_PROBLEMS, generator=gen) < 0.37  # (500,) bool
    samples = torch.randint(0, 9, (N_PROBLEMS,), generator=gen)  # (500,) correct of 8 samples
    return correct, samples


def _fake_gather(world_states: list[dict[str, torch.Tensor]], order: list[str]):
    """A ``dist_sync_fn`` that returns every rank's state, as ``gather_all_tensors`` would."""
    calls = {"i": 0}

    def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        attr = order[calls["i"] % len(order)]
        calls["i"] += 1
        return [ws[attr] for ws in world_states]

    gather.calls = calls  # type: ignore[attr-defined]
    return gather


def _simulate(metric_cls, world: int, batch_size: int, values: torch.Tensor, num_samples: int | None):
    """Shard 500 problems like Lightning's DistributedSampler (padding by repetition), update one metric per rank in
    batches, then sync each rank's metric with torchmetrics' own ``cat`` reduction and compute on every rank."""
    ranks = []
    for rank in range(world):
        idx = list(DistributedSampler(range(N_PROBLEMS), num_replicas=world, rank=rank, shuffle=False))
        m = metric_cls()
        for s in range(0, len(idx), batch_size):
            ids = torch.tensor(idx[s : s + batch_size])
            n = None if num_samples is None else torch.full_like(ids, num_samples)
            m.update(ids, values[ids], n)
        ranks.append(m)
    order = list(ranks[0]._reductions)
    world_states = [{a: torch.cat(getattr(m, a)) for a in order} for m in ranks]
    results = []
    for m in ranks:
        m.dist_sync_fn = _fake_gather(world_states, order)
        m.distributed_available_fn = lambda: True
        results.append(m.compute())
        assert m.dist_sync_fn.calls["i"] == len(order)  # the states really went through the cat reduction
    return results, sum(len(ws[order[0]]) for ws in world_states)


@pytest.mark.parametrize("world", [3, 7])
def test_dedup_accuracy_on_padded_ranks_equals_single_process(world):
    correct, _ = _outcomes()
    single = DedupAccuracy()
    single.update(torch.arange(N_PROBLEMS), correct)
    expected = single.compute()
    results, total_rows = _simulate(DedupAccuracy, world, 16, correct, None)
    assert total_rows > N_PROBLEMS  # the sampler really padded (501 rows on 3 ranks, 504 on 7)
    for value in results:
        assert value.dtype == torch.float64
        assert value.item() == expected.item() == correct.sum().item() / N_PROBLEMS


def test_naive_mean_over_padded_ranks_would_differ():
    """The failure the metric prevents: plain correct/total over the padded rows is not the benchmark score."""
    correct, _ = _outcomes()
    idx = [i for r in range(7) for i in DistributedSampler(range(N_PROBLEMS), num_replicas=7, rank=r, shuffle=False)]
    assert len(idx) == 504
    naive = correct[torch.tensor(idx)].float().mean().item()
    assert naive != correct.float().mean().item()


@pytest.mark.parametrize("world", [3, 7])
def test_problem_outcomes_pass_at_k_on_padded_ranks_equals_single_process(world):
    _, samples = _outcomes(1)
    single = ProblemOutcomes()
    single.update(torch.arange(N_PROBLEMS), samples, torch.full((N_PROBLEMS,), 8))
    expected = single.compute()
    results, _ = _simulate(ProblemOutcomes, world, 10, samples, 8)
    for counts in results:
        assert counts == expected
        for k in (1, 2, 4, 8):
            assert mean_pass_at_k(counts.values(), k) == mean_pass_at_k(expected.values(), k)
        assert mean_accuracy(counts.values()) == mean_accuracy(expected.values())


def test_dedup_keeps_the_first_occurrence():
    m = DedupAccuracy()
    m.update(torch.tensor([3, 4]), torch.tensor([True, False]))
    m.update(torch.tensor([3]), torch.tensor([False]))  # a repeated (padded) row
    assert m.compute().item() == 0.5


def test_problem_outcomes_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_correct"):
        ProblemOutcomes().update([0], [3], [2])
    with pytest.raises(ValueError, match="ids"):
        ProblemOutcomes().update([0, 1], [1], [1])


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-12)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2), abs=1e-12)  # 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    assert pass_at_k(5, 2, 4) == 1.0  # n - c = 3 < k: every draw of 4 contains a correct sample
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5), abs=1e-12)  # 11/12
    assert pass_at_k(8, 1, 8) == 1.0  # n == k: the paper's "any sample correct"
    # stable for large n where the binomials overflow floats
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, abs=1e-12)


def test_pass_at_k_matches_binomial_formula_everywhere():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 0)


def test_mean_at_k_and_default_ks():
    assert mean_accuracy([(4, 1), (4, 3)]) == 0.5
    assert math.isnan(mean_accuracy([]))
    assert mean_pass_at_k([(5, 2), (5, 0)], 2) == pytest.approx(0.35)
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(32) == [1, 2, 4, 8, 16, 32]
    assert default_ks(12) == [1, 2, 4, 8, 12]
