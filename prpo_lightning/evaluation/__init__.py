"""Task-accuracy evaluation on math benchmarks: greedy pass@1, unbiased pass@k and mean@n, per-subject and per-level
breakdowns, deduplicated across ranks, with JSONL/CSV/PNG outputs."""

from prpo_lightning.evaluation.benchmarks import BENCHMARKS, BenchmarkSpec, load_benchmark, register_benchmark
from prpo_lightning.evaluation.metrics import DedupAccuracy, ProblemOutcomes, mean_accuracy, pass_at_k
from prpo_lightning.evaluation.runner import BenchmarkEvaluator, EvalConfig

__all__ = [
    "BENCHMARKS",
    "BenchmarkEvaluator",
    "BenchmarkSpec",
    "DedupAccuracy",
    "EvalConfig",
    "ProblemOutcomes",
    "load_benchmark",
    "mean_accuracy",
    "pass_at_k",
    "register_benchmark",
]
