"""The equations a policy writes on the held-out problems, before and after RL, for the best-against-best grids.

For each method at each lr, this reads the greedy held-out completions that the runs' evaluation saved at step 0
and at step 60 (``runs/replicate/<grid>_<method>_lr<lr>/seed<k>/logs/version_0/eval/fit-step0000NN/
completions.jsonl``) and reports, averaged over seeds: held-out accuracy, equations written per completion, the
share of them that are true (``EquationCheckPRM``'s own checker) and the share of each operator. A policy that
games a PRM writes what the PRM scores high rather than what is true (the ``learned`` grid); a policy that learns
longer chains writes more equations (the ``long`` grid).

Usage::

    .venv/bin/python benchmarks/completion_equations.py --grid learned   # results/completion_equations-learned.json
    .venv/bin/python benchmarks/completion_equations.py --grid long      # results/completion_equations-long.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]
from components.equation_check import check_equation, find_equations  # noqa: E402
from replicate_grids import BAB_LRS, GRID_SETTINGS, LEARNED_METHODS, LONG_METHODS  # noqa: E402

#: grid → (run-name prefix, methods).
GRIDS = {"learned": ("bab", LEARNED_METHODS), "long": ("long", LONG_METHODS)}
OPERATORS = {"add": "+", "sub": "−", "mul": "×", "div": "÷"}
#: The evaluations compared: the start and the grids' last step.
STEPS = (0, GRID_SETTINGS["bab"]["max_steps"])


def equation_stats(completions: list[str]) -> dict[str, float]:
    """Over all equations stated in ``completions``: how many there are per completion, the share that are true,
    and the share of each operator (an equation's operators counted on its left side)."""
    n_eq, n_true, ops = 0, 0, dict.fromkeys(OPERATORS, 0)
    for text in completions:
        for eq in find_equations(text):
            verdict = check_equation(eq)
            if verdict is None:
                continue
            n_eq += 1
            n_true += bool(verdict)
            for tok in eq.sides[0]:
                if tok.kind in ops:
                    ops[tok.kind] += 1
    n_ops = sum(ops.values())
    return {"equations_per_completion": n_eq / max(len(completions), 1), "true_frac": n_true / n_eq if n_eq else 0.0,
            **{f"op_{k}": (v / n_ops if n_ops else 0.0) for k, v in ops.items()}}


def run_stats(run_dir: Path, step: int) -> dict[str, float] | None:
    """Accuracy and :func:`equation_stats` of one run's held-out completions at ``step`` (None if not saved)."""
    path = run_dir / "logs" / "version_0" / "eval" / f"fit-step{step:06d}" / "completions.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["benchmark"] == "arith_heldout"]
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), **equation_stats([r["completion"] for r in rows])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=list(GRIDS), default="learned")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "replicate", help="replicate.py's --out folder")
    args = ap.parse_args()
    root, (prefix, methods) = args.runs, GRIDS[args.grid]
    out: dict[str, dict] = {}
    for method in methods:
        for lr in BAB_LRS:
            per_step = {}
            for step in STEPS:
                seeds = [s for k in range(5) if (s := run_stats(root / f"{prefix}_{method}_lr{lr:g}" / f"seed{k}", step))]
                if seeds:
                    per_step[step] = {key: sum(s[key] for s in seeds) / len(seeds) for key in seeds[0]} | {
                        "seeds": len(seeds)}
            if per_step:
                out[f"{method}_lr{lr:g}"] = per_step
    if not out:
        sys.exit(f"no evaluation outputs under {root}: run `benchmarks/replicate.py --grid {args.grid}` first")
    dest = REPO / "benchmarks" / "results" / f"completion_equations-{args.grid}.json"
    dest.write_text(json.dumps(out, indent=1))
    print("| run | seeds | accuracy | equations per completion | true equations | " + " | ".join(
        f"{sym} share" for sym in OPERATORS.values()) + " |")
    print("|---|---|---|---|---|" + "---|" * len(OPERATORS))
    for name, per_step in out.items():
        a, b = per_step.get(STEPS[0]), per_step.get(STEPS[-1])
        if a is None or b is None:
            continue
        cells = [f"{a[k]:.1%} → {b[k]:.1%}" for k in ("accuracy",)]
        cells.append(f"{a['equations_per_completion']:.2f} → {b['equations_per_completion']:.2f}")
        cells += [f"{a[k]:.1%} → {b[k]:.1%}" for k in ("true_frac", *(f"op_{o}" for o in OPERATORS))]
        print(f"| {name} | {b['seeds']} | " + " | ".join(cells) + " |")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
