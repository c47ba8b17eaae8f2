"""Held-out accuracy of asynchronous against synchronous training, paired by seed, from the ``async`` replication grid.

Run the grid first (``.venv/bin/python benchmarks/replicate.py --grid async --seeds 0 1 2``: GRPO and PRPO over the
exact PRM, 20 steps each, synchronous and with ``model.async_rollout.enabled=true``), then::

    .venv/bin/python benchmarks/async_accuracy.py

It reads ``benchmarks/results/runs/<method>/seed<k>.json``, pairs each async run with the synchronous run of the same
method and seed, and writes the final held-out accuracy of each, the mean paired difference, the paired t-test p and
the exact sign-flip p to ``benchmarks/results/async_accuracy.json`` (the table of ``docs/async.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replicate_stats import paired_tests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("grpo", "prpo_rule_prm")


def final_accuracy(path: Path) -> float:
    """The last held-out accuracy point of a run (``eval/accuracy`` at its final step)."""
    curve = json.loads(path.read_text())["curves"]["eval/accuracy"]
    if not curve:
        raise ValueError(f"{path}: the run has no held-out accuracy (eval/accuracy is empty)")
    return float(curve[-1][1])


def compare(runs: Path, seeds: list[int]) -> dict:
    """Per method: the sync and async accuracies by seed, and the paired statistics async − sync."""
    out = {}
    for method in METHODS:
        sync = [final_accuracy(runs / method / f"seed{s}.json") for s in seeds]
        asyn = [final_accuracy(runs / f"{method}_async" / f"seed{s}.json") for s in seeds]
        diff, t_p, flip_p = paired_tests(asyn, sync)
        out[method] = {"sync": sync, "async": asyn, "mean_sync": sum(sync) / len(sync),
                       "mean_async": sum(asyn) / len(asyn), "async_minus_sync": diff, "paired_t_p": t_p,
                       "sign_flip_p": flip_p}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default=str(ROOT / "benchmarks" / "results" / "runs"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "async_accuracy.json"))
    args = parser.parse_args()
    report = {"command": "python benchmarks/async_accuracy.py " + " ".join(sys.argv[1:]), "seeds": args.seeds,
              "methods": compare(Path(args.runs), args.seeds)}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for method, r in report["methods"].items():
        print(f"{method}: sync {r['mean_sync']:.3f} async {r['mean_async']:.3f} "
              f"(async - sync {r['async_minus_sync']:+.3f}, t p={r['paired_t_p']:.3f}, sign-flip p={r['sign_flip_p']:.3f})")


if __name__ == "__main__":
    main()
