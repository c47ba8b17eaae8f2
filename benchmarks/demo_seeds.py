"""The offline demo (``configs/demo.yaml``) over several seeds: held-out accuracy before and after RL, and the gain.

One seed ``s`` runs ``prpo-fit fit --config configs/demo.yaml --seed_everything=s --model.seed=s --data.seed=s``
(Lightning's global seed; the module's seed, which seeds rollout sampling per prompt group and step and the
mini-batch shuffle; the training-prompt order). The demo policy ships with the package (one warm start, the same
on every machine), so the "before" accuracy is the same for every seed; RL is what varies. Runs are in this process, one after the
other; the accuracies are read from the config's ``MathEvalCallback`` (its first and last evaluation).

Usage::

    python benchmarks/demo_seeds.py                        # seeds 0 1 2, the demo as configured (~150 s a seed)
    python benchmarks/demo_seeds.py --seeds 0 --max-steps 1 --num-eval 8 -- --model.sampling.num_generations=2

Arguments after ``--`` are passed on to ``prpo-fit``. Writes ``<out>/<name>.json`` (per seed and mean ± sample
std, with the library versions) and ``<out>/<name>.md`` (a Markdown table). ``name`` is ``demo_seeds`` for the
demo as configured and ``demo_seeds_custom`` when anything is overridden, so a trial run never replaces the
published numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SEEDS = (0, 1, 2)
PINNED_PACKAGES = ("torch", "transformers", "tokenizers", "lightning", "trl", "deepspeed", "math-verify",
                   "jsonargparse")


def installed_versions() -> dict[str, str]:
    """Versions of the key packages of the pinned set (``"not installed"`` for an absent optional one)."""
    found = {}
    for pkg in PINNED_PACKAGES:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "not installed"
    return found


def run_seed(seed: int, config: Path, log_root: Path, overrides: list[str]) -> dict[str, Any]:
    """Fit the demo with ``seed`` and return its held-out accuracy before and after RL.

    Raises:
        RuntimeError: the config has no ``MathEvalCallback`` evaluating at the start and at the end of fit.
    """
    from prpo_lightning.callbacks import MathEvalCallback
    from prpo_lightning.cli import cli_main

    args = [
        "fit", "--config", str(config),
        f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.seed={seed}",
        f"--trainer.logger.init_args.save_dir={log_root}", f"--trainer.logger.init_args.name=seed{seed}",
        *overrides,
    ]
    argv, sys.argv = sys.argv, ["prpo-fit"]  # LightningCLI must not see this script's own arguments
    start = time.perf_counter()
    try:
        cli = cli_main(args)
    finally:
        sys.argv = argv
    seconds = time.perf_counter() - start
    evals = [cb for cb in cli.trainer.callbacks if isinstance(cb, MathEvalCallback)]
    steps = int(cli.trainer.global_step)
    if len(evals) != 1 or len(evals[0].history) < 2:
        raise RuntimeError(
            f"demo_seeds: {config} must configure one MathEvalCallback with eval_at_start and eval_at_end true "
            f"(found {len(evals)} callback(s) with {len(evals[0].history) if evals else 0} evaluation(s))."
        )
    history = evals[0].history
    if int(history[0]["step"]) != 0 or int(history[-1]["step"]) != steps:
        raise RuntimeError(
            f"demo_seeds: the first/last evaluation ran at steps {int(history[0]['step'])}/{int(history[-1]['step'])}, "
            f"not 0/{steps}: set eval_at_start and eval_at_end of MathEvalCallback to true."
        )
    before, after = float(history[0]["accuracy"]), float(history[-1]["accuracy"])
    return {
        "seed": seed, "steps": steps, "num_problems": int(history[-1]["num_problems"]),
        "accuracy_before": before, "accuracy_after": after, "gain_points": (after - before) * 100.0,
        "seconds": round(seconds, 1), "log_dir": str(cli.trainer.log_dir),
    }


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (n − 1 in the denominator; None for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean ± sample std over seeds of the accuracies (fractions) and of the gain (percentage points)."""
    keys = ("accuracy_before", "accuracy_after", "gain_points")
    return {key: mean_std([float(r[key]) for r in rows]) for key in keys}


def _pm(stat: dict[str, float | None], scale: float, unit: str) -> str:
    std = "n/a" if stat["std"] is None else f"{stat['std'] * scale:.1f}"
    return f"{stat['mean'] * scale:.1f} ± {std}{unit}"


def markdown_table(result: dict[str, Any]) -> str:
    """The per-seed rows and the mean ± std row as a Markdown table."""
    lines = [
        "| seed | held-out before RL | after RL | gain (points) | RL steps | problems | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["seeds"]:
        lines.append(
            f"| {r['seed']} | {r['accuracy_before'] * 100:.1f}% | {r['accuracy_after'] * 100:.1f}% | "
            f"{r['gain_points']:+.1f} | {r['steps']} | {r['num_problems']} | {r['seconds']:.0f} |"
        )
    s = result["summary"]
    lines.append(
        f"| **mean ± std** | {_pm(s['accuracy_before'], 100, '%')} | {_pm(s['accuracy_after'], 100, '%')} | "
        f"{_pm(s['gain_points'], 1, '')} | | | |"
    )
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    return "\n".join(lines) + f"\n\nstd: sample standard deviation over seeds. Versions: {versions}.\n"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps")
    parser.add_argument("--num-eval", type=int, default=None, help="override data.num_eval (held-out problems)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument("--log-root", type=Path, default=ROOT / "runs" / "demo_seeds", help="Lightning logs")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args, passthrough


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every seed, write ``<out>/<name>.json`` and ``.md``, print the table and return the result."""
    args, passthrough = parse_args(argv)
    overrides = list(passthrough)
    if args.max_steps is not None:
        overrides.append(f"--trainer.max_steps={args.max_steps}")
    if args.num_eval is not None:
        overrides.append(f"--data.num_eval={args.num_eval}")
    as_configured = not overrides and args.config.resolve() == (ROOT / "configs" / "demo.yaml").resolve()
    name = "demo_seeds" if as_configured else "demo_seeds_custom"
    rows = [run_seed(seed, args.config, args.log_root, overrides) for seed in args.seeds]
    result = {
        "config": str(args.config), "overrides": overrides, "seeds": rows, "summary": summarize(rows),
        "versions": installed_versions(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(result)
    (args.out / f"{name}.md").write_text(f"# Demo over seeds {args.seeds}\n\n{table}", encoding="utf-8")
    print(table)
    return result


if __name__ == "__main__":
    main()
