"""Small-scale replication on the offline arithmetic task: aligners × seeds with identical budgets.

Does PRPO beat GRPO here, and does process-only reward collapse (Hypothesis 1: shorter, truncated outputs
without an answer)? Every run is ``prpo-fit fit --config configs/demo.yaml`` with the method's components swapped
in and the same budget. Runs are resumable: a run whose ``result.json`` exists is skipped.

Usage::

    .venv/bin/python benchmarks/replicate.py --seeds 0 1 2 3 4 --max-steps 20 --eval-every 5
    .venv/bin/python benchmarks/replicate.py --report-only     # re-aggregate finished runs
    .venv/bin/python benchmarks/replicate.py --grid h1 --seeds 0 1 2 3 4          # Hypothesis 1, biased PRMs
    .venv/bin/python benchmarks/replicate.py --grid spro-sweep --seeds 0 1 2      # SPRO beta x lr
    .venv/bin/python benchmarks/replicate.py --grid implicit-sweep --seeds 0 1 2  # PRPO over ImplicitPRM, beta x lr
    .venv/bin/python benchmarks/replicate.py --grid spro-cap --seeds 0 1 2        # SPRO with its process cap
    .venv/bin/python benchmarks/replicate.py --grid bab --jobs 2   # best against best: 6 methods x 4 lrs, 60 steps
    .venv/bin/python benchmarks/replicate.py --grid learned --jobs 2  # + PRPO, process-only over the learned PRM
    .venv/bin/python benchmarks/replicate.py --grid long --jobs 2     # GRPO and PRPO on 5-8-operation chains

Method grids live in ``benchmarks/replicate_grids.py``; each grid writes its own block of ``docs/replication.md``
and its own plots.

The best-against-best grids (``bab``, ``long``; ``replicate_bab.py``) also evaluate a validation split drawn from
the training distribution (``replicate_splits.py``) on which each method's lr is chosen; their defaults (60 steps,
evaluation every 10, the task variant) come from ``replicate_grids.GRID_SETTINGS``.

Every finished run's ``result.json`` is also copied to ``benchmarks/results/runs/<method>/seed<k>.json`` (small,
committed): a later session resumes a grid from those copies even without the ignored ``runs/`` folder.

Outputs: ``runs/replicate/<method>/seed<k>/`` (logs, ``result.json``), ``docs/replication.md``,
``docs/_static/<tag>_accuracy.png``, ``docs/_static/<tag>_collapse.png`` and ``benchmarks/results/<tag>.json``
(tag ``replication`` for the main grid, else ``replication-<grid>``), plus the grid's extra plot
(``replication-spro-sweep_mechanism.png``, ``replication-implicit-sweep_mechanism.png``,
``replication-h1_summary.png``; ``benchmarks/replicate_plots.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from replicate_bab import report_lines as bab_report_lines  # best against best: lr on validation, AUC
from replicate_compare import chain_length_lines, learned_prm_lines  # issue 28's cross-grid tables
from replicate_grids import GRID_SETTINGS, GRIDS, MAIN_LR, TASK_LABELS, baseline_of  # the method grids
from replicate_splits import VALIDATION_KEY, write_eval_sets  # held-out and validation sets
from replicate_plots import band, by_method_of, extra_plots, save  # plots shared by every grid and grid-specific
from replicate_stats import paired_tests  # the paired tests against GRPO

METHODS: dict[str, list[str]] = {name: args for methods, _ in GRIDS.values() for name, args in methods.items()}
# The replication budget is pinned here (not taken from demo.yaml, which may be retuned): 16 prompts x G=8 per
# step, AdamW at a constant lr of MAIN_LR (1e-4), every method the same unless its grid sets another lr.
BUDGET = ["--data.init_args.batch_size=16", f"--model.optim.lr={MAIN_LR:g}", "--model.optim.schedule=constant"]
CURVE_KEYS = ("eval/accuracy", "train/completion/length_mean", "train/completion/no_boxed_frac",
              "train/completion/truncated_frac", "train/reward/mean", "train/accuracy",
              "train/advantage/outcome_abs_mean", "train/advantage/process_abs_mean",
              "train/advantage/process_to_outcome", "train/aligner/implicit_reward/token_mean",
              "train/aligner/implicit_reward/cpr_final_mean", "train/prm/score_mean", "train/prm/score_std",
              VALIDATION_KEY)
#: Copies of every finished run's ``result.json`` (committed; ``runs/`` is not).
MIRROR = REPO / "benchmarks" / "results" / "runs"


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed{seed}"


def _reuse(path: Path, method: str, overrides: list[str], max_steps: int, eval_sets: dict | None) -> dict:
    """The finished run stored at ``path``, if it was trained with these settings.

    Raises:
        RuntimeError: if it was trained with other settings (a stale run is never reused).
    """
    result = json.loads(path.read_text())
    if (result.get("overrides") != overrides or result.get("max_steps") != max_steps
            or result.get("eval_sets") != eval_sets):
        raise RuntimeError(f"{path} was trained with other settings ({result.get('overrides')}, "
                           f"{result.get('max_steps')} steps, evaluation sets {result.get('eval_sets')}) than {method} "
                           f"has now ({overrides}, {max_steps} steps, {eval_sets}): delete that run (and its copy "
                           "under benchmarks/results/runs) or pass another --out")
    return result


def run_one(out: Path, method: str, seed: int, max_steps: int, eval_every: int, extra: list[str], threads: int = 1,
            eval_sets: dict | None = None, mirror: Path | None = None) -> dict:
    """Train one (method, seed) and write ``result.json`` (and its copy under ``mirror``); skip if either exists.

    ``eval_sets`` (``{"task": ..., "validation": n, "paths": [held-out, validation]}``) evaluates the held-out set
    and the validation split instead of the datamodule's held-out rows; its ``task`` and ``validation`` are stored
    with the run and must match for the run to be reused."""
    rd = run_dir(out, method, seed)
    done = rd / "result.json"
    copy = mirror / method / f"seed{seed}.json" if mirror is not None else None
    overrides = [*BUDGET, *METHODS[method], *extra]
    stored_sets = {k: eval_sets[k] for k in ("task", "validation")} if eval_sets else None
    if done.exists():
        return _reuse(done, method, overrides, max_steps, stored_sets)
    if copy is not None and copy.exists():  # a run of an earlier session, committed
        result = _reuse(copy, method, overrides, max_steps, stored_sets)
        rd.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result))
        return result
    rd.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(REPO / ".venv/bin/prpo-fit"), "fit", "--config", str(REPO / "configs/demo.yaml"),
        *BUDGET,
        *METHODS[method],
        f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.seed={seed}",
        f"--trainer.max_steps={max_steps}",
        f"--trainer.default_root_dir={rd}",
        f"--trainer.logger.init_args.save_dir={rd}", "--trainer.logger.init_args.name=logs",
        "--trainer.logger.init_args.version=0",
        *extra,
    ]
    evaluation = {"every_n_steps": eval_every}
    if eval_sets:  # held-out first: eval/accuracy stays the held-out accuracy
        evaluation["benchmarks"] = [str(p) for p in eval_sets["paths"]]
    callbacks = [
        {"class_path": "prpo_lightning.callbacks.MathEvalCallback", "init_args": evaluation},
        {"class_path": "prpo_lightning.callbacks.TrainingCurves"},
    ]
    cmd.append(f"--trainer.callbacks={json.dumps(callbacks)}")
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    with (rd / "stdout.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed (exit {proc.returncode}); see {rd / 'stdout.log'}")
    curves = read_curves(rd / "logs" / "version_0" / "training_curves.csv")
    result = {"method": method, "seed": seed, "max_steps": max_steps, "overrides": overrides,
              "seconds": time.time() - t0, "curves": curves}
    if stored_sets:
        result["eval_sets"] = stored_sets
    done.write_text(json.dumps(result))
    if copy is not None:
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(json.dumps(result))
    return result


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a TrainingCurves CSV, plus the validation accuracy, which only the
    CSVLogger's ``metrics.csv`` beside it holds (TrainingCurves records the training metrics and eval/accuracy)."""
    out: dict[str, list[tuple[int, float]]] = {k: [] for k in CURVE_KEYS}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            for k in CURVE_KEYS:
                if row.get(k) not in (None, ""):
                    out[k].append((int(row["step"]), float(row[k])))
    logged = path.parent / "metrics.csv"
    if logged.exists() and not out[VALIDATION_KEY]:
        with logged.open() as fh:
            out[VALIDATION_KEY] = sorted({(int(row["step"]), float(row[VALIDATION_KEY])) for row in csv.DictReader(fh)
                                          if row.get(VALIDATION_KEY) not in (None, "")})
    return out


# ---------------------------------------------------------------- report
def aggregate(results: list[dict], threshold: float) -> tuple[dict, list[str]]:
    by_method = by_method_of(results)
    table = {}
    for method, runs in by_method.items():
        baseline = baseline_of(method)
        grpo = {r["seed"]: r for r in by_method.get(baseline, [])}
        finals = [r["curves"]["eval/accuracy"][-1][1] for r in runs]
        starts = [r["curves"]["eval/accuracy"][0][1] for r in runs]
        hits = [next((s for s, v in r["curves"]["eval/accuracy"] if v >= threshold), None) for r in runs]
        row = {
            "seeds": len(runs),
            "start_mean": sum(starts) / len(starts),
            "final_mean": sum(finals) / len(finals),
            "final_std": math.sqrt(sum((f - sum(finals) / len(finals)) ** 2 for f in finals) / max(len(finals) - 1, 1)),
            "steps_to_threshold": [h for h in hits],
            "final_length": sum(r["curves"]["train/completion/length_mean"][-1][1] for r in runs) / len(runs),
            "final_no_boxed": sum(r["curves"]["train/completion/no_boxed_frac"][-1][1] for r in runs) / len(runs),
            "minutes_per_run": sum(r["seconds"] for r in runs) / len(runs) / 60,
        }
        paired = [(r["curves"]["eval/accuracy"][-1][1], grpo[r["seed"]]["curves"]["eval/accuracy"][-1][1])
                  for r in runs if r["seed"] in grpo]
        if method != baseline and len(paired) >= 2:
            mean, t_p, flip_p = paired_tests([a for a, _ in paired], [b for _, b in paired])
            row["vs_grpo"] = (mean, None if math.isnan(t_p) else t_p, flip_p)  # None: JSON null, "n/a" in the table
            row["baseline"] = baseline
        table[method] = row
    return table, sorted(by_method)


def plot(results: list[dict], methods: list[str], static: Path, tag: str = "replication") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    static.mkdir(parents=True, exist_ok=True)
    runs = by_method_of(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        band(ax, runs[m], "eval/accuracy", label=m)
    ax.set(xlabel="optimizer step", ylabel="held-out accuracy (greedy)", title="Held-out accuracy, mean and 95% CI over seeds")
    ax.legend(fontsize=8)
    save(fig, static / f"{tag}_accuracy.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        band(axes[0], runs[m], "train/completion/length_mean", label=m)
        band(axes[1], runs[m], "train/completion/no_boxed_frac", label=m)
    axes[0].set(xlabel="optimizer step", ylabel="tokens", title="Completion length (sampled)")
    axes[1].set(xlabel="optimizer step", ylabel="fraction", title="Completions without \\boxed{} (collapse check)")
    axes[1].legend(fontsize=8)
    save(fig, static / f"{tag}_collapse.png")


def write_report(table: dict, methods: list[str], args: argparse.Namespace, path: Path, tag: str = "replication") -> None:
    cmd = (f".venv/bin/python benchmarks/replicate.py --seeds {' '.join(map(str, args.seeds))} "
           f"--max-steps {args.max_steps} --eval-every {args.eval_every} --threshold {args.threshold} "
           f"--grid {args.grid} --methods {' '.join(args.methods)}"
           + (f" --validation {args.validation}" if args.validation else ""))
    lines = [
        "# Small-scale replication on the offline arithmetic task",
        "",
        f"Regenerate with `{cmd}` (finished runs are skipped; `--report-only` re-aggregates).",
        "",
        (f"Budget per run: {args.max_steps} optimizer steps of `configs/demo.yaml` with `{' '.join(BUDGET)}` (16 "
         f"prompts x G=8 per step, constant lr {MAIN_LR:g} unless the method's name gives another; the same prompts "
         f"per step, G, lengths and warm-started policy for every method); held-out greedy accuracy (200 problems) "
         f"every {args.eval_every} steps. \"Δ vs GRPO\" pairs each seed with GRPO at the method's own lr."),
        "",
        f"![held-out accuracy](_static/{tag}_accuracy.png)",
        "",
        f"![collapse check](_static/{tag}_collapse.png)",
        "",
        f"| method | seeds | acc. before | final acc. mean ± std | steps to {args.threshold:.0%} (per seed) | final length | no-`\\boxed` frac. | Δ vs GRPO | paired t p | sign-flip p | min/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        r = table[m]
        vs = r.get("vs_grpo")
        lines.append(
            f"| {m} | {r['seeds']} | {r['start_mean']:.1%} | {r['final_mean']:.1%} ± {r['final_std']:.1%} | "
            f"{', '.join('—' if h is None else str(h) for h in r['steps_to_threshold'])} | {r['final_length']:.1f} | "
            f"{r['final_no_boxed']:.2f} | "
            + (f"{vs[0] * 100:+.1f} pts | {'n/a' if vs[1] is None else f'{vs[1]:.3f}'} | {vs[2]:.3f}" if vs
               else "— | — | —")
            + f" | {r['minutes_per_run']:.1f} |"
        )
    write_block(path, tag, lines[2:], lines[0])


def write_block(path: Path, tag: str, lines: list[str], title: str = "# Small-scale replication") -> None:
    """Put ``lines`` between ``<!-- BEGIN tag -->`` and ``<!-- END tag -->`` in ``path`` (appended the first time)."""
    begin, end = f"<!-- BEGIN {tag} -->", f"<!-- END {tag} -->"
    block = begin + "\n" + "\n".join(lines) + "\n" + end
    text = path.read_text() if path.exists() else title + "\n\n"
    if begin in text:  # keep hand-written findings outside the generated block
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:  # a grid's first report: append its block
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def finished_runs(out: Path, methods: list[str], seeds: list[int]) -> list[dict]:
    """The finished runs among ``methods`` × ``seeds``: ``out``'s ``result.json``, else the committed copy."""
    results = []
    for m, seed in ((m, seed) for seed in seeds for m in methods):
        done = run_dir(out, m, seed) / "result.json"
        done = done if done.exists() else MIRROR / m / f"seed{seed}.json"
        if done.exists():
            results.append(json.loads(done.read_text()))
    return results


def write_cross_grid_blocks(args: argparse.Namespace, results: list[dict]) -> None:
    """Issue 28's cross-grid tables (``replicate_compare.py``): PRPO's gain by chain length, from the finished
    ``bab`` and ``long`` runs, once both have runs; the learned PRM against the exact one, for the ``learned`` grid."""
    doc = REPO / "docs" / "replication.md"
    horizon = args.max_steps
    if args.grid in ("bab", "long"):
        runs = {g: results if g == args.grid else finished_runs(args.out, list(GRIDS[g][0]), args.seeds)
                for g in ("bab", "long")}
        if all(runs.values()):
            write_block(doc, "replication-chain-length", chain_length_lines(
                {f"{TASK_LABELS[g]}": (runs[g], GRID_SETTINGS[g]["lrs"]) for g in ("bab", "long")}, horizon))
    if args.grid == "learned":
        write_block(doc, "replication-learned-compare", learned_prm_lines(
            results, GRID_SETTINGS["learned"]["lrs"], horizon,
            {"prpo_learned_prm": "prpo_rule_prm", "process_only_learned_prm": "process_only"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=list(GRIDS), default="main",
                    help="method grid: the main table, h1 (biased PRMs), spro-sweep or implicit-sweep (beta x lr), "
                         "spro-cap (SPRO with its process cap)")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="default: the grid's methods")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--max-steps", type=int, default=None, help="default: the grid's (GRID_SETTINGS), else 20")
    ap.add_argument("--eval-every", type=int, default=None, help="default: the grid's, else 5")
    ap.add_argument("--threshold", type=float, default=None,
                    help="accuracy threshold for steps-to-threshold (default: the grid's, else 0.6)")
    ap.add_argument("--validation", type=int, default=None,
                    help="problems of the validation split evaluated with the held-out set (default: the grid's, else 0)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "replicate")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each a separate process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more prpo-fit overrides for every run")
    args = ap.parse_args()
    settings = GRID_SETTINGS.get(args.grid, {})
    for key, default in (("max_steps", 20), ("eval_every", 5), ("threshold", 0.6), ("validation", 0)):
        if getattr(args, key) is None:
            setattr(args, key, settings.get(key, default))
    eval_sets = None
    if args.validation:
        task = settings.get("task", "default")
        paths = write_eval_sets(args.out / "_eval_sets", args.validation, task)
        eval_sets = {"task": task, "validation": args.validation, "paths": paths}
    grid_methods, tag = GRIDS[args.grid]
    args.methods = args.methods or list(grid_methods)
    grid = [(m, seed) for seed in args.seeds for m in args.methods]  # seed-major: partial grids stay balanced
    results = []
    if args.report_only:
        results = finished_runs(args.out, args.methods, args.seeds)
    else:
        def job(item: tuple[str, int]) -> dict | None:
            print(f"[replicate] start {item[0]} seed {item[1]}", flush=True)
            try:
                res = run_one(args.out, item[0], item[1], args.max_steps, args.eval_every, args.extra, args.threads,
                              eval_sets, MIRROR)
            except RuntimeError as err:  # a failed run is reported, the others go on
                print(f"[replicate] FAILED {err}", flush=True)
                return None
            print(f"[replicate] done {item[0]} seed {item[1]} ({res['seconds']:.0f}s)", flush=True)
            return res

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = [r for r in pool.map(job, grid) if r is not None]
    if not results:
        sys.exit("no finished runs")
    table, methods = aggregate(results, args.threshold)
    plot(results, methods, REPO / "docs" / "_static", tag)
    extra_plots(results, REPO / "docs" / "_static", tag)  # SPRO mechanism, Hypothesis-1 summary
    write_report(table, methods, args, REPO / "docs" / "replication.md", tag)
    if args.grid in GRID_SETTINGS:  # best against best: lr chosen on validation, AUC, steps to threshold
        lrs = settings["lrs"]
        best = bab_report_lines(results, lrs, args.max_steps, args.threshold, len(args.methods) * len(args.seeds))
        write_block(REPO / "docs" / "replication.md", f"{tag}-best",
                    [*best, "", f"![each method at its chosen lr](_static/{tag}_best.png)"])
        write_cross_grid_blocks(args, results)
    raw = REPO / "benchmarks" / "results" / f"{tag}.json"
    raw.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
                               "budget": BUDGET, "table": table, "runs": results}, indent=1, default=str))
    print((REPO / "docs" / "replication.md").read_text())


if __name__ == "__main__":
    main()
