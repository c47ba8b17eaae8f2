"""Shared helpers of the benchmark scripts (``vs_trl.py``, ``prpo_overhead.py``, ``scaling.py``): machine facts,
results files, the tiny benchmark model and prompts, phase timers and the worker-subprocess runner."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS_MD = ROOT / "docs" / "benchmarks.md"
sys.path.insert(0, str(ROOT))

TEMPLATE = "Q: {problem}\nA:\n"  # the demo prompt format (prpo_lightning.demo.policy.DEMO_PROMPT_TEMPLATE)


# ------------------------------------------------------------------------------------------- shared helpers
def machine_info() -> dict[str, Any]:
    """CPU, core count, load average and library versions, recorded next to every number."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def write_docs_section(name: str, markdown: str, path: Path = DOCS_MD) -> None:
    """Replace (or append) the section between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def build_model_dir(
    out: Path, hidden: int, layers: int, seed: int = 0, heads: int = 0, kv_heads: int = 0, intermediate: int = 0
) -> Path:
    """Save the demo character tokenizer and a randomly initialised Qwen2 of the given shape to ``out`` (0 for
    ``heads``/``kv_heads``/``intermediate``: hidden / 64 heads, half as many KV heads, 3 × hidden), EOS suppressed."""
    import torch
    from transformers import AutoModelForCausalLM

    from prpo_lightning.demo.policy import build_tokenizer, model_config

    tok = build_tokenizer()
    heads = heads or max(hidden // 64, 2)
    cfg = model_config(
        tok,
        {
            "hidden_size": hidden,
            "intermediate_size": intermediate or hidden * 3,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads or max(heads // 2, 1),
            "max_position_embeddings": 4096,
        },
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    suppress_eos(model, tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def suppress_eos(model: Any, tok: Any) -> None:
    """Make every completion exactly ``max_new_tokens`` long, in every framework.

    A random model samples EOS with probability ≈ 1/V per token, so lengths would differ between runs. The model's
    ``generation_config.suppress_tokens`` is inherited by every ``generate`` call that passes its own
    ``GenerationConfig`` (ours and TRL's), so both do exactly the same amount of work. Completion lengths are
    recorded with the results to check it.
    """
    model.generation_config.suppress_tokens = [int(tok.eos_token_id)]


def prompt_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` arithmetic problems (training split of the demo task) as ``{"id", "problem", "answer"}`` rows."""
    from prpo_lightning.demo.arithmetic import generate_problems

    return [{"id": i, "problem": p["problem"], "answer": p["answer"]} for i, p in enumerate(generate_problems(seed, n))]


def reward_value(completion: str, answer: str) -> float:
    """The one reward both frameworks use: 1 for a correct boxed answer, 0 otherwise."""
    from prpo_lightning.demo.arithmetic import is_correct

    return 1.0 if is_correct(completion, answer) else 0.0


def make_verifier() -> Any:
    from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus

    class BoxedMatchVerifier(OutcomeVerifier):
        """Boxed-answer match with rewards 1/0 (the same function TRL's reward gets)."""

        def verify(self, completion: str, gold: str) -> Verdict:
            r = reward_value(completion, gold)
            return Verdict(VerdictStatus.CORRECT if r > 0 else VerdictStatus.INCORRECT, r)

    return BoxedMatchVerifier()


class PromptData:
    """A minimal Lightning data module over fixed prompt rows (N prompts per step, shuffled with a seed)."""

    def __new__(cls, rows: list[dict[str, Any]], batch_size: int, seed: int = 0) -> Any:
        from prpo_lightning.data import PromptDataModule

        class _Data(PromptDataModule):
            def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
                return list(rows), list(rows[:batch_size])

        return _Data(batch_size=batch_size, eval_batch_size=batch_size, seed=seed)


def step_timer_callback() -> Any:
    """A Lightning callback recording the time of every optimizer-step end and the module's stage timings."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.start: float | None = None
            self.ends: list[float] = []
            self.stages: list[dict[str, float]] = []
            self.rss_before: float | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.rss_before = current_rss_mb()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.start is None:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.ends.append(time.perf_counter())
            m = trainer.callback_metrics
            row = {k.split("/")[-1]: float(m[k]) for k in m if k.startswith("train/time/")}
            if "train/completion/length_mean" in m:
                row["completion_length_mean"] = float(m["train/completion/length_mean"])
            row.update(PHASES)
            PHASES.clear()
            self.stages.append(row)

        def step_times(self) -> list[float]:
            marks = [self.start, *self.ends]
            return [b - a for a, b in zip(marks, marks[1:])]

    return StepTimer()


PHASES: dict[str, float] = {}


def timed(name: str, fn: Any) -> Any:
    def wrapper(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - t

    return wrapper


def instrument_module_phases() -> None:
    """Time generation and the no-grad log-prob pass of a training step (wraps the names the rollout engines and the
    rollout collector imported)."""
    import prpo_lightning.rollout.collector as collector
    import prpo_lightning.rollout.engines as engines

    for module, name, phase in ((engines, "generate_groups", "generate_s"), (engines, "generate_completions", "generate_s"),
                                (collector, "batched_logprobs", "logprob_pass_s")):
        setattr(module, name, timed(phase, getattr(module, name)))


def run_worker(cmd: list[str], label: str) -> dict[str, Any]:
    """Run a benchmark worker process (offline, quiet) with ``--out FILE`` appended; return its JSON result.

    Raises:
        RuntimeError: with the tail of the worker's stderr when it fails.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as fh:
        out = fh.name
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run([*cmd, "--out", out], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{proc.stderr[-5000:]}")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def run_header(cmd: str, load_before: list[float]) -> dict[str, Any]:
    """The provenance fields every benchmark result starts with: command, date, machine and load."""
    return {
        "command": cmd,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def publish(name: str, res: dict[str, Any], markdown: str, to_docs: bool = True) -> None:
    """Write ``benchmarks/results/<name>.json``, print the markdown and (optionally) its docs section."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    print(markdown)
    if to_docs:
        write_docs_section(name, markdown)


def read_phase_times(metrics_csv: Path) -> list[dict[str, float]]:
    """The ``train/time/*`` values of a CSVLogger ``metrics.csv``, one dict per logged step in step order (keys
    without the ``train/time/`` prefix)."""
    import csv

    rows: dict[int, dict[str, float]] = {}
    with open(metrics_csv) as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key.startswith("train/time/") and value not in ("", None):
                    rows.setdefault(step, {})[key.removeprefix("train/time/")] = float(value)
    return [rows[k] for k in sorted(rows)]


def fit_demo(overrides: list[str], workdir: Path, tag: str, prefix: list[str] | None = None,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """``prpo-fit fit`` of ``configs/demo.yaml`` with ``overrides`` in a fresh process (CSV logs under
    ``workdir/tag``, evaluation callbacks off); ``{"wall_s", "steps"}`` with :func:`read_phase_times`' per-step timings.

    Args:
        overrides: extra command-line arguments (engine, mode, ``--trainer.max_steps``).
        workdir: the run's working and log folder.
        tag: the logger's run name.
        prefix: a command put in front of the interpreter (e.g. ``taskset -c 0``).
        env: extra environment variables.

    Raises:
        RuntimeError: the run failed (its output's tail is in the message).
    """
    args = [*(prefix or []), sys.executable, "-m", "prpo_lightning.cli", "fit", "--config",
            str(ROOT / "configs" / "demo.yaml"), *overrides, "--trainer.callbacks=[]",
            f"--trainer.logger.init_args.save_dir={workdir}", f"--trainer.logger.init_args.name={tag}"]
    run_env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=3000, cwd=workdir)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {"wall_s": wall, "steps": read_phase_times(next(workdir.glob(f"{tag}/version_*/metrics.csv")))}
