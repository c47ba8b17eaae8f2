"""Statistics of the replication harness (no scipy: mpmath ships with sympy): Student's t p-values and quantiles,
95% confidence intervals and the paired tests of each method against GRPO."""

from __future__ import annotations

import functools
import math


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t: ``I_{df/(df+t²)}(df/2, 1/2)``."""
    import mpmath

    if df <= 0 or math.isnan(t):
        return float("nan")
    return float(mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True))


@functools.cache
def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    lo, hi = 0.0, 100.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 0.05 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t confidence interval."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, t_quantile_975(n - 1) * sd / math.sqrt(n)


def paired_tests(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean paired difference a−b, paired t-test p and exact sign-flip permutation p (two-sided).

    The t-test p is NaN (``n/a`` in the table) when every seed has the same non-zero difference: t is undefined
    there, and only the sign-flip p applies."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    # equal differences on every seed (sd 0): no difference gives p = 1; a constant non-zero one leaves t undefined
    t_p = (1.0 if mean == 0 else float("nan")) if sd == 0 else t_two_sided_p(mean / (sd / math.sqrt(n)), n - 1)
    extreme = 0
    for mask in range(2**n):
        s = sum(x if (mask >> i) & 1 == 0 else -x for i, x in enumerate(d))
        extreme += abs(s) >= abs(sum(d)) - 1e-12
    return mean, t_p, extreme / 2**n


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p of Welch's unequal-variance t-test of mean(a) = mean(b) (Welch–Satterthwaite degrees of freedom).

    NaN when either sample has fewer than two values, or both have zero variance (t undefined)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)  # squared standard error of each mean
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return float("nan")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t_two_sided_p((ma - mb) / math.sqrt(va + vb), df)
