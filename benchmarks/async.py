"""Step time of synchronous against asynchronous rollouts (``model.async_rollout``) on the demo config, per engine, in
one run on this machine.

For each engine (``served``: ``VLLMServerEngine`` launching its own server; ``served_split``: the same with the
trainer pinned to CPU 0 and the server's engine to CPU 1, as if inference had a device of its own; ``colocated``:
``VLLMEngine`` in the training process; ``static``: the default ``AutoEngine`` on the live policy) the demo config
(``configs/demo.yaml``: the shipped policy, 32 prompts × 8 samples, up to 64 tokens) trains ``--steps`` optimizer steps
through ``prpo-fit`` in a fresh process, once synchronously and once with ``model.async_rollout.enabled=true``
(evaluation callbacks off, CSV metrics). The first ``--warmup`` steps of each run are dropped and the medians of the
module's phase timings are reported: ``train/time/step_s`` (start to start, so overlap shows), the background's own
``rollout_s`` and ``scoring_s``, ``update_s``, ``weight_sync_s`` and, async only, ``batch_wait_s`` (the step waiting
for its batch). Runs in the vLLM environment::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/async.py

writes ``benchmarks/results/async.json`` (the numbers ``docs/async.md`` quotes).
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

PHASES = ("step_s", "rollout_s", "generate_s", "old_logprobs_s", "scoring_s", "update_s", "weight_sync_s",
          "batch_wait_s")
SERVED = ["--model.engine=components.engines.VLLMServerEngine", "--model.engine.init_args.kv_cache_memory_gib=0.5",
          "--model.engine.init_args.max_model_len=256"]
#: ``served_split``: the trainer on CPU 0 (``taskset``, one torch thread) and the whole server on CPU 1 (launched
#: through a ``taskset -c 1`` wrapper given as the engine's ``python``), as if inference had a device of its own; the
#: other engines share both CPUs.
SPLIT = {"prefix": ["taskset", "-c", "0"], "env": {"OMP_NUM_THREADS": "1"}}
ENGINES = {
    "served": SERVED,
    "served_split": [*SERVED, '--model.engine.init_args.env={"VLLM_CPU_OMP_THREADS_BIND": "1"}'],  # + python
    "colocated": ["--model.engine=components.engines.VLLMEngine", "--model.engine.init_args.kv_cache_memory_gib=0.5",
                  "--model.engine.init_args.max_model_len=256"],
    "static": [],
}
MODES = {"sync": [], "async": ["--model.async_rollout.enabled=true"]}


def run(engine: str, mode: str, steps: int, workdir: Path) -> dict:
    """Train ``steps`` optimizer steps; return the per-step phase timings and the wall time."""
    split = SPLIT if engine == "served_split" else {"prefix": [], "env": {}}
    extra = [f"--model.engine.init_args.python={pinned_python(workdir, 1)}"] if engine == "served_split" else []
    return fit_demo([*ENGINES[engine], *extra, *MODES[mode], f"--trainer.max_steps={steps}"], workdir,
                    f"{engine}_{mode}", split["prefix"], split["env"])


def pinned_python(workdir: Path, cpu: int) -> str:
    """A wrapper that runs this interpreter on one CPU (``taskset -c cpu``): the served engine's ``python``."""
    path = workdir / f"python_cpu{cpu}.sh"
    path.write_text(f'#!/bin/sh\nexec taskset -c {cpu} {sys.executable} "$@"\n')
    path.chmod(0o755)
    return str(path)


def medians(result: dict, warmup: int) -> dict[str, float]:
    kept = result["steps"][warmup:]
    return {p: statistics.median([s[p] for s in kept if p in s]) for p in PHASES if any(p in s for s in kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "async.json"))
    args = parser.parse_args()
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="async_bench_") as tmp:
        for engine in args.engines:
            for mode in MODES:
                results.setdefault(engine, {})[mode] = run(engine, mode, args.steps, Path(tmp))
                print(f"{engine} {mode}: {results[engine][mode]['wall_s']:.0f}s", flush=True)
    summary = {e: {m: medians(r, args.warmup) for m, r in modes.items()} for e, modes in results.items()}
    ratios = {e: s["async"]["step_s"] / s["sync"]["step_s"] for e, s in summary.items()}
    report = {
        "command": "VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/async.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
        "steps": args.steps, "warmup": args.warmup, "median_s": summary, "async_over_sync_step": ratios,
        "wall_s": {e: {m: r["wall_s"] for m, r in modes.items()} for e, modes in results.items()},
        "per_step": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    for engine, modes in summary.items():
        for mode, phases in modes.items():
            print(engine, mode, {k: round(v, 3) for k, v in phases.items()})
        print(f"{engine}: async / sync step time {ratios[engine]:.2f}x")


if __name__ == "__main__":
    main()
