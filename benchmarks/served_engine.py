"""Step time of the demo config with vLLM in the training process (``VLLMEngine``) against vLLM servers
(``VLLMServerEngine``), in one run, on this machine.

Each engine trains ``configs/demo.yaml`` (the shipped demo policy, 32 prompts × 8 samples, up to 64 tokens) for
``--steps`` steps through ``prpo-fit`` in a fresh process (evaluation callbacks off, CSV metrics); the engines
alternate for ``--rounds`` rounds (A B A B: a change of the machine's load hits both), the first ``--warmup`` steps of
each run are dropped and the medians over all rounds of the module's phase timings are reported
(``train/time/step_s`` start to start, rollout, scoring, update, weight sync). The server's start-up time is reported
apart (it is paid once per run). Runs in the vLLM environment::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/served_engine.py

writes ``benchmarks/results/served_engine.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import fit_demo  # noqa: E402

PHASES = ("step_s", "rollout_s", "generate_s", "old_logprobs_s", "scoring_s", "update_s", "weight_sync_s")
ENGINES = {
    "colocated": ["--model.engine=components.engines.VLLMEngine", "--model.engine.init_args.kv_cache_memory_gib=0.5",
                  "--model.engine.init_args.max_model_len=256"],
    "served": ["--model.engine=components.engines.VLLMServerEngine",
               "--model.engine.init_args.kv_cache_memory_gib=0.5", "--model.engine.init_args.max_model_len=256"],
}


def run_engine(name: str, steps: int, workdir: Path, tag: str) -> dict:
    """Train ``steps`` steps with one engine; return the per-step phase timings and the wall time."""
    return fit_demo([*ENGINES[name], f"--trainer.max_steps={steps}"], workdir, tag)


def summarise(runs: list[dict], warmup: int) -> dict:
    """Median of each phase over the steps after ``warmup`` of every round (``step_s`` is logged one row late)."""
    kept = [s for run in runs for s in run["steps"][warmup:]]
    return {phase: statistics.median([s[phase] for s in kept if phase in s])
            for phase in PHASES if any(phase in s for s in kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "served_engine.json"))
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in ENGINES}
    with tempfile.TemporaryDirectory(prefix="served_engine_") as tmp:
        for r in range(args.rounds):
            for name in ENGINES:
                runs[name].append(run_engine(name, args.steps, Path(tmp), f"{name}_{r}"))
                print(f"round {r} {name}: {runs[name][-1]['wall_s']:.0f}s", flush=True)
    summary = {name: summarise(rounds, args.warmup) for name, rounds in runs.items()}
    ratio = summary["served"]["step_s"] / summary["colocated"]["step_s"]
    report = {
        "command": "VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/served_engine.py "
                   + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "median_s": summary,
        "served_over_colocated_step": ratio,
        "wall_s": {name: [run["wall_s"] for run in rounds] for name, rounds in runs.items()}, "per_step": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name, phases in summary.items():
        print(name, {k: round(v, 3) for k, v in phases.items()})
    print(f"served / colocated step time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
