"""The ``async`` section of the GPU check (``benchmarks/gpu_check.py``): PRPO trained synchronously and with
``model.async_rollout.enabled`` (issue 23) on the profile's policy, same settings, one after the other.

* ``both_runs_finish``: each run exits 0 at its step budget with a finite loss;
* ``staleness_bounded``: every step of the async run trains rows at most ``max_staleness`` (1) versions old, and
  the last steps exactly 1;
* ``median_step_s`` / ``async_over_sync``: median ``train/time/step_s`` of each run after its first step and their
  ratio, with the async run's ``batch_wait_s`` (informational: the default engine samples from the live policy, so
  only scoring overlaps the update there; with vLLM the sampling does).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import gpu_check_train as training
from gpu_check_sections import Budget


def async_rollouts(p: Any, budget: Budget, work: Path, tokenizer_dir: str, accelerator: str) -> dict[str, Any]:
    """Run the section: two ``prpo-fit`` runs of ``train_steps + 2`` steps, sync then async."""
    steps = p.train_steps + 2
    model_cfg = training.policy_config(p.model, p.vocab)
    runs: dict[str, dict[str, Any]] = {}
    for mode in ("sync", "async"):
        run_dir = work / f"async_{mode}"
        cfg = training.run_config(run_dir, tokenizer_dir, model_cfg, "prpo", p.train, accelerator, steps, False)
        cfg["model"]["async_rollout"] = {"enabled": mode == "async", "max_staleness": 1}
        runs[mode] = training.fit(run_dir, cfg, None, budget.remaining() / (2 if mode == "sync" else 1), steps)
    per_step = {mode: run["results"].get("per_step") or [] for mode, run in runs.items()}
    median = {mode: statistics.median([s["train/time/step_s"] for s in rows[1:] if "train/time/step_s" in s] or [0])
              for mode, rows in per_step.items()}
    stale = [s.get("train/rollout/staleness_max") for s in per_step["async"] if "train/rollout/staleness_max" in s]
    # the async run's first loader batch only fills the pipeline (no update, no grad norm): judge its updates
    norms = [s["train/grad_norm"] for s in per_step["async"] if s.get("train/grad_norm") is not None]
    runs["async"]["checks"]["grad_norm_positive"] = {"passed": len(norms) == steps and all(n > 0 for n in norms),
                                                     "value": norms}
    checks = {
        "both_runs_finish": {"passed": all(all(c["passed"] is not False for c in run["checks"].values())
                                           for run in runs.values()),
                             "each": {mode: {k: c["passed"] for k, c in run["checks"].items()}
                                      for mode, run in runs.items()}},
        "staleness_bounded": {"passed": bool(stale) and max(stale) <= 1 and stale[-1] == 1, "value": stale},
    }
    results = {
        "median_step_s": median,
        "async_over_sync": median["async"] / median["sync"] if median["sync"] else None,
        "batch_wait_s": [s.get("train/time/batch_wait_s") for s in per_step["async"]],
        "runs": {mode: run["results"] for mode, run in runs.items()},
    }
    return {"checks": checks, "results": results}
