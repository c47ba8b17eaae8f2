"""Evaluation metrics: a problem-deduplicating accuracy ``Metric`` and the unbiased pass@k estimator.

Lightning wraps evaluation loaders in a ``DistributedSampler`` that pads an uneven split by repeating
problems (500 MATH500 problems on 3 ranks become 501 rows), so a plain ``correct / total`` metric
double-counts. :class:`ProblemOutcomes` stores ``(problem_id, num_correct, num_samples)`` triples with
``dist_reduce_fx="cat"`` and keeps one triple per problem id at :meth:`~ProblemOutcomes.compute`, so the
result on 3 or 7 ranks equals the result on one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator of Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``.

    Computed in the numerically stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``.

    Args:
        n: samples drawn for the problem.
        c: correct samples among them.
        k: the k of pass@k (``1 <= k <= n``).

    Returns:
        The probability that at least one of k samples drawn without replacement from the n is correct.

    Raises:
        ValueError: if ``k`` is outside ``[1, n]`` or ``c`` outside ``[0, n]``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Average :func:`pass_at_k` over problems given as ``(n, c)`` pairs (``nan`` when there are none)."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    return math.fsum(values) / len(values) if values else float("nan")


def mean_accuracy(counts: Iterable[tuple[int, int]]) -> float:
    """mean@n: the per-sample accuracy ``c / n`` averaged over problems (``nan`` when there are none)."""
    values = [c / n for n, c in counts if n > 0]
    return math.fsum(values) / len(values) if values else float("nan")


def default_ks(n: int) -> list[int]:
    """The k values reported for n samples: powers of two below n, and n itself (``[1, 2, 4, 8]`` for 8)."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n] if n >= 1 else []


class ProblemOutcomes(Metric):
    """Per-problem ``(num_correct, num_samples)`` counts, deduplicated by problem id across batches and ranks.

    States are concatenated across processes (``dist_reduce_fx="cat"``). At :meth:`compute` time the first
    triple seen for each problem id (in rank order) is kept and later ones are dropped, so rows repeated by a
    ``DistributedSampler`` or by a re-run batch never count twice. Problem ids must be the same on every
    rank (a dataset row index, not a position in the shard).

    Example:
        >>> m = ProblemOutcomes()
        >>> m.update(torch.tensor([0, 1, 1]), torch.tensor([2, 0, 0]), torch.tensor([4, 4, 4]))
        >>> m.compute()
        {0: (4, 2), 1: (4, 0)}
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("problem_ids", default=[], dist_reduce_fx="cat")
        self.add_state("num_correct", default=[], dist_reduce_fx="cat")
        self.add_state("num_samples", default=[], dist_reduce_fx="cat")

    def update(self, problem_ids: Tensor | Sequence[int], num_correct: Tensor | Sequence[int], num_samples: Tensor | Sequence[int] | None = None) -> None:
        """Add one triple per problem.

        Args:
            problem_ids: ``(N,)`` integer problem ids, stable across ranks.
            num_correct: ``(N,)`` correct samples per problem (for greedy pass@1: 0 or 1, a bool tensor works).
            num_samples: ``(N,)`` samples per problem (default: 1 each).

        Raises:
            ValueError: if the three inputs differ in length or a count is out of range.
        """
        ids = torch.as_tensor(problem_ids, dtype=torch.long, device=self.device).reshape(-1)  # (N,)
        correct = torch.as_tensor(num_correct, device=self.device).reshape(-1).long()  # (N,)
        samples = (
            torch.ones_like(ids) if num_samples is None
            else torch.as_tensor(num_samples, device=self.device).reshape(-1).long()
        )  # (N,)
        if not ids.numel() == correct.numel() == samples.numel():
            raise ValueError(f"got {ids.numel()} ids, {correct.numel()} correct counts and {samples.numel()} sample counts")
        if bool((correct < 0).any() or (correct > samples).any()):
            raise ValueError("num_correct must lie in [0, num_samples] for every problem")
        self.problem_ids.append(ids)
        self.num_correct.append(correct)
        self.num_samples.append(samples)

    def _states(self) -> tuple[Tensor, Tensor, Tensor]:
        def cat(state: Tensor | list[Tensor]) -> Tensor:
            if isinstance(state, list):
                return torch.cat(state) if state else torch.zeros(0, dtype=torch.long)
            return state

        return cat(self.problem_ids).long(), cat(self.num_correct).long(), cat(self.num_samples).long()

    def compute(self) -> dict[int, tuple[int, int]]:
        """Return ``{problem_id: (num_samples, num_correct)}``, one entry per distinct problem id."""
        ids, correct, samples = (t.tolist() for t in self._states())
        out: dict[int, tuple[int, int]] = {}
        for pid, c, n in zip(ids, correct, samples):
            if pid not in out:
                out[pid] = (n, c)
        return out


class DedupAccuracy(ProblemOutcomes):
    """Accuracy over distinct problems: ``sum_p c_p / n_p`` divided by the number of distinct problem ids.

    With one greedy sample per problem this is pass@1; with n samples it is mean@n. The value is a float64
    tensor computed from integer counts, so it is identical on any number of ranks.

    Example:
        >>> acc = DedupAccuracy()
        >>> acc.update(torch.tensor([0, 1, 2, 0]), torch.tensor([True, False, True, True]))
        >>> float(acc.compute())
        0.6666666666666666
    """

    def compute(self) -> Tensor:  # type: ignore[override]
        counts = super().compute()
        if not counts:
            return torch.tensor(float("nan"), dtype=torch.float64)
        if all(n == 1 for n, _ in counts.values()):  # exact integer ratio
            return torch.tensor(sum(c for _, c in counts.values()) / len(counts), dtype=torch.float64)
        return torch.tensor(mean_accuracy(counts.values()), dtype=torch.float64)
