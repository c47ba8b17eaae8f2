"""The demo's speed with 1 and 2 torch/OpenMP threads, on idle cores and on cores kept busy by other processes.

Each cell runs ``prpo-fit fit --config configs/demo.yaml`` for ``--steps`` RL steps in a fresh process with
``OMP_NUM_THREADS=k`` (k = 1, 2), and reads the per-step phase times (``train/time/*_s`` of ``metrics.csv``; their
sum is the RL step time). "Loaded" adds ``--busy`` busy-loop processes (plain Python loops, each ending by itself
after ``--busy-seconds``; stopped by their process id after the cell), which on 2 cores gives a load average of
about 3-4. The machine's 1-minute load average is recorded before and after every cell, since other users of a
shared machine add to it.

Usage::

    python benchmarks/demo_threads.py                   # 10 steps per cell, 4 busy loops, both loads
    python benchmarks/demo_threads.py --steps 5 --loads loaded

Writes ``benchmarks/results/demo_threads.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import RESULTS, machine_info  # noqa: E402

PHASES = ("train/time/rollout_s", "train/time/scoring_s", "train/time/update_s", "train/time/weight_sync_s")
BUSY_LOOP = "import time, sys\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def step_seconds(metrics_csv: Path) -> list[float]:
    """Per-step RL time: the sum of the phase times of every row of ``metrics.csv`` that has them."""
    out = []
    with metrics_csv.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if all(row.get(p) not in (None, "") for p in PHASES):
                out.append(sum(float(row[p]) for p in PHASES))
    return out


def run_cell(threads: int, busy: int, steps: int, busy_seconds: float, log_root: Path) -> dict[str, Any]:
    """One demo run of ``steps`` steps with ``threads`` threads next to ``busy`` busy loops."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(busy_seconds)]) for _ in range(busy)]
    try:
        if busy:
            time.sleep(5)  # let the load build up
        load_before = os.getloadavg()[0]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        name = f"t{threads}_b{busy}"
        cmd = [str(Path(sys.executable).parent / "prpo-fit"), "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
               f"--trainer.max_steps={steps}", f"--trainer.logger.init_args.save_dir={log_root}",
               f"--trainer.logger.init_args.name={name}"]
        start, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=str(ROOT))
        wall = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        if proc.returncode != 0:
            raise RuntimeError(f"demo run failed ({name}):\n{proc.stderr[-3000:]}")
        load_after = os.getloadavg()[0]
    finally:
        for p in loops:
            p.kill()
            p.wait()
    versions = sorted((log_root / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    per_step = step_seconds(versions[-1] / "metrics.csv")
    acc = re.search(r"before RL ([0-9.]+)% -> after RL ([0-9.]+)%", proc.stdout + proc.stderr)
    return {
        "threads": threads, "busy_loops": busy, "steps": len(per_step), "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "step_s_median": round(statistics.median(per_step), 3),
        "steps_per_s": round(1 / statistics.median(per_step), 3), "step_s_max": round(max(per_step), 3),
        "load1_before": round(load_before, 2), "load1_after": round(load_after, 2),
        "accuracy_before": float(acc.group(1)) if acc else None,
        "accuracy_after": float(acc.group(2)) if acc else None,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = ["| load added | OMP threads | RL steps | RL step (median s) | steps/s | slowest step (s) | whole run (s) | "
             "load avg 1 min before → after | held-out before → after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["cells"]:
        load = "no busy loop added" if not r["busy_loops"] else f"+{r['busy_loops']} busy loops"
        lines.append(f"| {load} | {r['threads']} | {r['steps']} | {r['step_s_median']:.2f} | {r['steps_per_s']:.2f} | "
                     f"{r['step_s_max']:.2f} | {r['wall_s']:.0f} | "
                     f"{r['load1_before']:.1f} → {r['load1_after']:.1f} | "
                     f"{r['accuracy_before']}% → {r['accuracy_after']}% |")
    m = result["machine"]
    return ("\n".join(lines) + "\n\nEach cell: RL steps of the demo (32 prompts × 8 rollouts; the step count is in "
            f"the json), evaluations at the start and the end included in the whole-run time. CPU: {m.get('cpu')}, "
            f"{m['cpu_count']} cores, torch {m['torch']}.\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--loads", nargs="+", choices=["idle", "loaded"], default=["idle", "loaded"])
    ap.add_argument("--busy", type=int, default=4, help="busy-loop processes for the loaded cells")
    ap.add_argument("--busy-seconds", type=float, default=900.0, help="each busy loop ends by itself after this")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true",
                    help="keep the cells of an existing results file for the conditions not run now")
    args = ap.parse_args(argv)
    cells = []
    with tempfile.TemporaryDirectory(prefix="demo_threads_") as tmp:
        for load in args.loads:
            for threads in args.threads:
                busy = args.busy if load == "loaded" else 0
                cell = run_cell(threads, busy, args.steps, args.busy_seconds, Path(tmp))
                print(json.dumps(cell), flush=True)
                cells.append(cell)
    old_file = args.out / "demo_threads.json"
    if args.keep and old_file.exists():
        ran = {(c["threads"], c["busy_loops"]) for c in cells}
        kept = [c for c in json.loads(old_file.read_text(encoding="utf-8"))["cells"]
                if (c["threads"], c["busy_loops"]) not in ran]
        cells = sorted(kept + cells, key=lambda c: (c["busy_loops"], c["threads"]))
    result = {"cells": cells, "machine": machine_info()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_threads.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "demo_threads.md").write_text("# Demo speed: threads and load\n\n" + markdown(result), encoding="utf-8")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
