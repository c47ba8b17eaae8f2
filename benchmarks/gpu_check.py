"""The prepared GPU check: run every GPU path of the framework once, in a few minutes, on one GPU.

Entry point ``bash benchmarks/gpu_check.sh`` (installs the wheels brought in ``.whl/`` first); the sections:

* ``environment``: versions and where they were imported from, the GPU, a measured bf16 matmul peak;
* ``decoder``: ``StaticCacheDecoder`` against HF ``generate`` (fp32 greedy and sampled with a fixed seed, bf16
  greedy: token identity) and the shared-prefix log-prob pass against the plain pass (log-probs, gradients);
* ``throughput``: generation tokens/s against batch size per engine, update-pass MFU, peak memory (bf16);
* ``train_grpo``/``train_prpo``: ``prpo-fit fit`` for 2 steps in bf16 on a random Qwen2.5-1.5B-shaped policy;
* ``train_zero2``/``train_zero3``: the same with the DeepSpeed overlays on one GPU (checkpointed);
  ``train_zero3_prpo``: PRPO (KL reference model, gradient checkpointing) under ZeRO-3;
* ``resume``/``export``: one more step from the ZeRO-3 checkpoint with ``--ckpt_path``, then ``prpo-export`` of
  it; ``resume_zero2``/``export_zero2``: the same for the ZeRO-2 checkpoint, as time allows;
* ``packing`` (``gpu_check_packing.py``): packed vs padded log-probs and gradients on SDPA, the packed pass on
  flash-attention 2's varlen kernel (skipped with the reason without CUDA or ``flash_attn``), and the update pass's
  time and peak memory padded vs token budget vs packed over long-tailed lengths (``--only packing`` runs it alone).
* ``served`` (``gpu_check_served.py``): ``VLLMServerEngine`` with a launched vLLM server (NCCL weight transfer on CUDA):
  greedy equality with HF ``generate`` before and after a sync, the synced and never-synced ``logp_diff_max``; skipped
  with the reason where vLLM is not importable;
* ``async`` (``gpu_check_async.py``): PRPO trained synchronously and with asynchronous rollouts: both finish, the
  async run's staleness stays at most 1, and the median step times and their ratio.

Each section has its own time budget and is guarded: a failure is recorded with its traceback and the next
section runs. After every section the results are written to ``gpu_check.json`` and ``gpu_check.md`` in ``$OUT``
(when set) or ``--out``. ``--dry-run`` runs everything on the CPU with tiny shapes (hidden 64, 2 layers);
DeepSpeed sections are skipped there with the reason (Lightning's DeepSpeedStrategy refuses the CPU), and
resume/export use the GRPO run's Lightning checkpoint instead.

    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import gpu_check_packing  # noqa: E402
import gpu_check_served  # noqa: E402
import gpu_check_async  # noqa: E402
import gpu_check_report  # noqa: E402
import gpu_check_sections as sections  # noqa: E402
import gpu_check_train as training  # noqa: E402

QWEN25_15B_SHAPE = {  # Qwen2.5(-Math)-1.5B without its vocabulary (the test tokenizer's is used: no hub)
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
    "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
}
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6}
CPU_DEEPSPEED = ("DeepSpeed needs a CUDA GPU: Lightning's DeepSpeedStrategy refuses the CPU accelerator, so the "
                 "dry run skips it (the GPU run does not)")


@dataclass
class Profile:
    """Shapes, sizes and time budgets of one run of the check (``gpu`` or the CPU ``dry-run``)."""

    dry_run: bool
    model: dict[str, Any]
    peak_n: int
    decode_prompts: int
    decode_group: int
    decode_new_tokens: int
    prompt_len: int
    logprob_tol: float
    throughput_batches: tuple[int, ...]
    throughput_new_tokens: int
    throughput_min_s: float
    mfu_rows: int
    mfu_prompt_len: int
    mfu_completion_len: int
    mfu_reps: int
    train_group: int
    train: dict[str, int]
    train_steps: int
    ds_layers: int
    deadline_s: float
    budgets: dict[str, float]
    min_start_s: float
    vocab: int = 128
    zero3_new_tokens: int = 24
    packing_check_rows: int = 6
    packing_check_len: int = 24
    packing_rows: int = 8
    packing_max_len: int = 64
    packing_micro_batch: int = 4
    packing_budget: int = 128
    notes: list[str] = field(default_factory=list)


def gpu_profile() -> Profile:
    """The H200 run: Qwen2.5-1.5B shape, 8 prompts × G=4, 128 new tokens; about 5 minutes of compute."""
    return Profile(
        dry_run=False, model=QWEN25_15B_SHAPE, peak_n=8192, decode_prompts=8, decode_group=4, decode_new_tokens=64,
        prompt_len=48, logprob_tol=1e-3, throughput_batches=(8, 32, 128), throughput_new_tokens=128,
        throughput_min_s=8.0, mfu_rows=16, mfu_prompt_len=64, mfu_completion_len=448, mfu_reps=5, train_group=4,
        train={"prompts": 8, "group": 4, "new_tokens": 128, "micro_batch": 16}, train_steps=2, ds_layers=8,
        deadline_s=480.0, min_start_s=20.0,
        budgets={"environment": 40, "decoder": 80, "throughput": 60, "train_grpo": 60, "train_prpo": 70,
                 "train_zero2": 70, "train_zero3": 70, "resume": 60, "export": 45, "resume_zero2": 50,
                 "export_zero2": 40, "train_zero3_prpo": 70, "packing": 45, "served": 90, "async": 90},
        packing_check_rows=8, packing_check_len=512, packing_rows=16, packing_max_len=2048, packing_micro_batch=4,
        packing_budget=8192,
        notes=["DeepSpeed runs use the 1.5B width with 8 of its 28 layers, so that their checkpoints (bf16 weights "
               "+ fp32 master weights and Adam moments) stay small enough to write, reload and collate in seconds"],
    )


def dry_run_profile() -> Profile:
    """The CPU dry run: hidden 64, 2 layers, everything tiny."""
    return Profile(
        dry_run=True, model=TINY_SHAPE, peak_n=256, decode_prompts=3, decode_group=3, decode_new_tokens=24,
        prompt_len=14, logprob_tol=1e-4, throughput_batches=(2, 4), throughput_new_tokens=16, throughput_min_s=1.0,
        mfu_rows=4, mfu_prompt_len=16, mfu_completion_len=16, mfu_reps=2, train_group=4,
        train={"prompts": 4, "group": 4, "new_tokens": 16, "micro_batch": 8}, train_steps=2, ds_layers=2,
        deadline_s=780.0, min_start_s=5.0,
        budgets={"environment": 60, "decoder": 60, "throughput": 60, "train_grpo": 120, "train_prpo": 120,
                 "train_zero2": 60, "train_zero3": 60, "resume": 120, "export": 90, "resume_zero2": 60,
                 "export_zero2": 60, "train_zero3_prpo": 60, "packing": 60, "served": 240,
                 "async": 180},
    )


class Skip(Exception):
    """A section that cannot run here; the message is the recorded reason."""


class Check:
    """Runs the sections under a global deadline, records them and rewrites the JSON/Markdown after each."""

    def __init__(self, profile: Profile, out_dir: Path, work_dir: Path) -> None:
        self.p, self.out_dir, self.work = profile, out_dir, work_dir
        self.t0 = time.perf_counter()
        self.device = torch.device("cpu" if profile.dry_run else "cuda")
        self.state: dict[str, Any] = {}
        self.report: dict[str, Any] = {
            "schema": 1, "dry_run": profile.dry_run, "device": str(self.device),
            "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "profile": asdict(profile),
            "sections": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, fn: Callable[[sections.Budget], dict[str, Any]]) -> None:
        """Run one section within ``min(its budget, the time left)``; record status, seconds, results, checks."""
        budget_s = float(self.p.budgets[name])
        left = self.p.deadline_s - self.elapsed()
        entry: dict[str, Any] = {"status": "skipped", "budget_s": budget_s, "seconds": 0.0}
        print(f"[gpu_check] {self.elapsed():6.1f}s  {name}: start (budget {budget_s:.0f}s, {left:.0f}s left)",
              flush=True)
        t0 = time.perf_counter()
        try:
            if left < self.p.min_start_s:
                raise Skip(f"global deadline: {left:.0f}s left of {self.p.deadline_s:.0f}s")
            out = fn(sections.Budget(min(budget_s, left)))
            entry.update(out)
            informative = [c.get("passed") for c in out.get("checks", {}).values() if c.get("passed") is not None]
            entry["status"] = "passed" if all(informative) else "failed"
        except Skip as reason:
            entry["skip_reason"] = str(reason)
        except Exception:  # guarded: recorded with its traceback, the next section still runs
            entry["status"] = "failed"
            entry["error"] = traceback.format_exc()[-4000:]
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.report["sections"][name] = entry
        failed = [k for k, c in entry.get("checks", {}).items() if c.get("passed") is False]
        detail = entry.get("skip_reason") or (entry.get("error", "").strip().splitlines() or [""])[-1] or ""
        print(f"[gpu_check] {self.elapsed():6.1f}s  {name}: {entry['status']} in {entry['seconds']:.1f}s"
              f"{' failed checks ' + ', '.join(failed) if failed else ''}{'  ' + detail if detail else ''}",
              flush=True)
        self.free()
        self.write()

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def write(self) -> None:
        self.report["wall_s"] = round(self.elapsed(), 1)
        statuses = [s["status"] for s in self.report["sections"].values()]
        self.report["summary"] = {k: statuses.count(k) for k in ("passed", "failed", "skipped")}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "gpu_check.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out_dir / "gpu_check.md").write_text(gpu_check_report.markdown(self.report))

    # -------------------------------------------------------------------------------------- training sections
    def train(self, budget: sections.Budget, method: str, zero_stage: int | None) -> dict[str, Any]:
        """``prpo-fit fit`` for ``train_steps`` steps; checkpointed when a later section resumes from it."""
        if zero_stage is not None and self.p.dry_run:
            raise Skip(CPU_DEEPSPEED)
        layers = self.p.ds_layers if zero_stage is not None else None
        name = method if zero_stage is None else f"zero{zero_stage}" + ("_prpo" if method == "prpo" else "")
        checkpoint = zero_stage is not None or (self.p.dry_run and method == "grpo")
        run_dir = self.work / f"train_{name}"
        model_cfg = training.policy_config(self.p.model, self.p.vocab, layers)
        cfg = training.run_config(run_dir, self.tokenizer_dir(), model_cfg, method, self.train_settings(zero_stage),
                                  "cpu" if self.p.dry_run else "gpu", self.p.train_steps, checkpoint)
        out = training.fit(run_dir, cfg, zero_stage, budget.remaining(), self.p.train_steps)
        if checkpoint and out["results"]["exit_code"] == 0:
            self.state[f"ckpt_{name}"] = (run_dir / "ckpt" / "last.ckpt", model_cfg, method, zero_stage,
                                          out["results"]["policy_parameters"])
        out["results"]["layers"] = model_cfg["num_hidden_layers"]
        return out

    def train_settings(self, zero_stage: int | None) -> dict[str, Any]:
        """The profile's rollout sizes; under ZeRO-3 completions are shorter: every decode step there gathers each
        layer's weights through DeepSpeed's hooks (HF ``generate`` with ``synced_gpus``), which took over a minute
        for 128 tokens on one H200 (2026-11-29)."""
        if zero_stage == 3 and not self.p.dry_run:
            return dict(self.p.train, new_tokens=self.p.zero3_new_tokens)
        return self.p.train

    def resume(self, budget: sections.Budget, source: str) -> dict[str, Any]:
        """One more step from ``source``'s checkpoint with ``--ckpt_path``."""
        ckpt, model_cfg, method, zero_stage, _ = self.checkpoint_of(source)
        run_dir = self.work / f"resume_{source}"
        cfg = training.run_config(run_dir, self.tokenizer_dir(), model_cfg, method, self.train_settings(zero_stage),
                                  "cpu" if self.p.dry_run else "gpu", self.p.train_steps + 1, False)
        out = training.fit(run_dir, cfg, zero_stage, budget.remaining(), self.p.train_steps + 1, ckpt_path=ckpt)
        out["results"]["resumed_from"] = str(ckpt)
        return out

    def export(self, budget: sections.Budget, source: str) -> dict[str, Any]:
        """``prpo-export`` of ``source``'s checkpoint, read back and checked."""
        ckpt, _, _, _, n_params = self.checkpoint_of(source)
        out = training.export(ckpt, self.work / f"export_{source}" / "hf", budget.remaining(), n_params)
        out["results"]["exported_from"] = str(ckpt)
        return out

    def checkpoint_of(self, source: str) -> tuple:
        key = f"ckpt_{source}"
        if key not in self.state:
            if self.p.dry_run and source.startswith("zero"):
                raise Skip(CPU_DEEPSPEED)
            raise Skip(f"no checkpoint: the train_{source} section did not finish with one")
        return self.state[key]

    def tokenizer_dir(self) -> str:
        """The demo's character tokenizer saved once under the work directory (``model.tokenizer``)."""
        path = self.work / "tokenizer"
        if not (path / "tokenizer_config.json").exists():
            from prpo_lightning.demo.policy import build_tokenizer

            build_tokenizer().save_pretrained(path)
        return str(path)

    # -------------------------------------------------------------------------------------- all sections
    def run_all(self, only: set[str] | None) -> dict[str, Any]:
        source = "grpo" if self.p.dry_run else "zero3"  # the dry run has no DeepSpeed checkpoint
        plan: list[tuple[str, Callable[[sections.Budget], dict[str, Any]]]] = [
            ("environment", lambda b: sections.environment(self.p, self.device, b)),
            ("decoder", lambda b: sections.decoder(self.p, self.device, b)),
            ("throughput", lambda b: sections.throughput(self.p, self.device, b, self.peak())),
            ("train_grpo", lambda b: self.train(b, "grpo", None)),
            ("train_prpo", lambda b: self.train(b, "prpo", None)),
            ("train_zero2", lambda b: self.train(b, "grpo", 2)),
            ("train_zero3", lambda b: self.train(b, "grpo", 3)),
            ("resume", lambda b: self.resume(b, source)),
            ("export", lambda b: self.export(b, source)),
            ("resume_zero2", lambda b: self.resume(b, "zero2")),
            ("export_zero2", lambda b: self.export(b, "zero2")),
            ("train_zero3_prpo", lambda b: self.train(b, "prpo", 3)),  # KL reference built from gathered shards
            ("packing", lambda b: gpu_check_packing.packing(self.p, self.device, b)),
            ("served", lambda b: gpu_check_served.served(self.p, self.device, b, Skip)),
            ("async", lambda b: gpu_check_async.async_rollouts(self.p, b, self.work, self.tokenizer_dir(),
                                                              "cpu" if self.p.dry_run else "gpu")),
        ]
        for name, fn in plan:
            if only is None or name in only:
                self.run(name, fn)
        print(f"[gpu_check] done in {self.elapsed():.1f}s: {self.report['summary']} -> {self.out_dir}", flush=True)
        return self.report

    def peak(self) -> float | None:
        env = self.report["sections"].get("environment", {})
        return env.get("results", {}).get("bf16_peak_tflops")


def main(argv: list[str] | None = None) -> int:
    """Run the check; exit status 0 when no section failed (skipped sections are not failures)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks that the script runs")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else runs/gpu_check)")
    parser.add_argument("--work", default=None, help="scratch folder for runs and checkpoints (default: a temp dir)")
    parser.add_argument("--deadline-s", type=float, default=None, help="global deadline in seconds")
    parser.add_argument("--only", default=None, help="comma-separated section names to run")
    args = parser.parse_args(argv)
    profile = dry_run_profile() if args.dry_run else gpu_profile()
    if args.deadline_s is not None:
        profile.deadline_s = args.deadline_s
    if not profile.dry_run and not torch.cuda.is_available():
        print("[gpu_check] no CUDA device: run on a GPU, or pass --dry-run for the CPU check", file=sys.stderr)
        return 2
    out_dir = Path(args.out or os.environ.get("OUT") or "runs/gpu_check")
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_work_{os.getpid()}"
    work = Path(args.work) if args.work else scratch
    work.mkdir(parents=True, exist_ok=True)
    # a hung section (a collective that never returns, a stuck kernel) still leaves the JSON written so far and
    # every thread's stack on stderr, instead of being killed silently from outside
    faulthandler.dump_traceback_later(profile.deadline_s + 15, exit=True)
    check = Check(profile, out_dir, work)
    only = set(args.only.split(",")) if args.only else None
    report = check.run_all(only)
    faulthandler.cancel_dump_traceback_later()
    if not args.work:  # checkpoints and exports of the runs: gigabytes on the GPU
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if report["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
