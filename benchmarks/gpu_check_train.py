"""Training sections of the GPU check (``benchmarks/gpu_check.py``): ``prpo-fit fit`` runs in subprocesses.

Each run is ``python -m prpo_lightning.cli fit --config <run.yaml> [--config configs/deepspeed/zeroN.yaml ...]``
with a random Qwen2 policy built from ``model.policy_config`` (no hub), the demo's character tokenizer saved to a
local directory, the offline arithmetic task and the bundled verifier, segmenter, PRM and aligners. The
:class:`RunRecorder` callback (named by ``class_path`` in the run's YAML) writes the step count, the per-step
loss/reward and the peak accelerator memory to ``record.json`` after every step, so a run that dies late still
reports what it reached. The export of a checkpoint runs ``python -m prpo_lightning.export`` and is checked by
reading the written safetensors back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DEEPSPEED_CONFIGS = {2: ROOT / "configs" / "deepspeed" / "zero2.yaml", 3: ROOT / "configs" / "deepspeed" / "zero3.yaml"}
TAIL_CHARS = 3000  # of a failed run's output, kept in the JSON
RECORDED_METRICS = ("train/loss", "train/reward/mean", "train/accuracy", "train/grad_norm", "train/time/rollout_s",
                    "train/time/update_s", "train/completion/mean_length", "train/time/step_s",
                    "train/time/batch_wait_s", "train/rollout/staleness_max")


class LengthParityVerifier(OutcomeVerifier):
    """Reward 1 when the completion has an even number of characters, else 0.

    A random policy answers every arithmetic problem wrongly, so with the math verifier every reward, advantage
    and gradient of the check's runs would be 0 and the update would go untested; parity gives mixed rewards.
    (``SympyMathVerifier`` is exercised by the environment section.)
    """

    def verify(self, completion: str, gold: str) -> Verdict:
        ok = len(completion) % 2 == 0
        return Verdict(VerdictStatus.CORRECT if ok else VerdictStatus.INCORRECT, 1.0 if ok else 0.0)


class RunRecorder(L.Callback):
    """Write ``{"global_step", "steps": [{metric: value}], "peak_memory_gib", ...}`` to ``path`` after every step.

    Args:
        path: the JSON file to (over)write.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.steps: list[dict[str, float]] = []
        self.t_start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.t_start = time.perf_counter()
        self._write(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in RECORDED_METRICS}
        self.steps.append({"global_step": int(trainer.global_step), **metrics})
        self._write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._write(trainer, pl_module)

    def _write(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        device = pl_module.device
        record: dict[str, Any] = {
            "global_step": int(trainer.global_step),
            "train_seconds": time.perf_counter() - self.t_start,
            "steps": self.steps,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "device": str(device),
            # ZeRO-3 leaves each parameter a 0-element shard and keeps its full size in ``ds_numel``
            "policy_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in pl_module.policy.parameters())
            if pl_module.policy else None,
            "policy_dtype": str(next(pl_module.policy.parameters()).dtype) if pl_module.policy else None,
        }
        if device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        self.path.write_text(json.dumps(record, indent=1))


def policy_config(shape: dict[str, Any], vocab_size: int, layers: int | None = None) -> dict[str, Any]:
    """The ``model.policy_config`` of a random Qwen2 of ``shape`` (demo tokenizer ids: PAD 0, EOS 1, no BOS)."""
    cfg = {"model_type": "qwen2", "vocab_size": vocab_size, "tie_word_embeddings": True, "pad_token_id": 0,
           "eos_token_id": 1, "bos_token_id": None, **shape}
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def run_config(
    run_dir: Path,
    tokenizer_dir: str,
    model_config: dict[str, Any],
    method: str,
    train: dict[str, Any],
    accelerator: str,
    max_steps: int,
    checkpoint: bool,
) -> dict[str, Any]:
    """The ``prpo-fit fit`` config of one run.

    Args:
        run_dir: logs, ``record.json`` and (with ``checkpoint``) ``ckpt/last.ckpt`` go here.
        tokenizer_dir: local tokenizer directory.
        model_config: ``model.policy_config``.
        method: ``grpo`` (outcome only, no KL, shared prompt prefixes) or ``prpo`` (EntropySpikeSegmenter,
            rule-based EquationCheckPRM, k3 KL 0.001 with a reference model, gradient checkpointing: the paper's
            switches).
        train: ``prompts``, ``group``, ``new_tokens``, ``micro_batch`` of the profile.
        accelerator: ``gpu`` or ``cpu``.
        max_steps: optimizer steps to reach.
        checkpoint: save ``last.ckpt`` when ``max_steps`` is reached.

    Raises:
        ValueError: for an unknown ``method``.
    """
    if method not in ("grpo", "prpo"):
        raise ValueError(f"gpu_check: unknown training method {method!r}; use 'grpo' or 'prpo'")
    callbacks: list[dict[str, Any]] = [
        {"class_path": "gpu_check_train.RunRecorder", "init_args": {"path": str(run_dir / "record.json")}}
    ]
    if checkpoint:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(run_dir / "ckpt"), "save_last": True,
                                        "every_n_train_steps": max_steps}})
    model: dict[str, Any] = {
        "policy_config": model_config,
        "tokenizer": tokenizer_dir,
        "dtype": "bfloat16",
        "prompt_template": "Q: {problem}\nA:\n",
        "use_chat_template": False,
        "verifier": {"class_path": "gpu_check_train.LengthParityVerifier"},
        "aligner": {"class_path": f"components.aligners.{'PRPOAligner' if method == 'prpo' else 'GRPOAligner'}"},
        "sampling": {"num_generations": train["group"], "max_new_tokens": train["new_tokens"],
                     "max_prompt_length": 256, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "loss": {"kl_coef": 0.001 if method == "prpo" else 0.0, "kl_estimator": "k3"},
        "optim": {"lr": 1e-6, "schedule": "constant", "grad_clip": 1.0, "micro_batch_size": train["micro_batch"]},
        "gradient_checkpointing": method == "prpo",
    }
    if method == "prpo":
        model["segmenter"] = {"class_path": "components.segmenters.EntropySpikeSegmenter",
                              "init_args": {"k": 5, "min_gap": max(train["new_tokens"] // 16, 1)}}
        model["prm"] = {"class_path": "components.prms.EquationCheckPRM"}
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": accelerator, "devices": 1, "precision": "bf16-true", "max_steps": max_steps,
            "log_every_n_steps": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "enable_model_summary": False, "enable_progress_bar": False, "enable_checkpointing": checkpoint,
            "default_root_dir": str(run_dir),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "logs"}},
            "callbacks": callbacks,
        },
        "model": model,
        "data": {"class_path": "prpo_lightning.data.ArithmeticDataModule",
                 "init_args": {"num_train": train["prompts"] * (max_steps + 1), "num_eval": 4,
                               "batch_size": train["prompts"], "eval_batch_size": 4}},
    }


def subprocess_env() -> dict[str, str]:
    """The environment of a child run: the repo root and ``benchmarks/`` in front of the inherited PYTHONPATH."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    parts = [str(ROOT), str(BENCH)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run_command(args: list[str], log_path: Path, timeout_s: float) -> tuple[int | None, float, str]:
    """Run ``python args...`` with its output in ``log_path``; ``(exit code or None on timeout, seconds, tail)``."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=subprocess_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the run and the verifier workers it started
            proc.wait()
            code = None
    seconds = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    return code, seconds, text[-TAIL_CHARS:]


def fit(
    run_dir: Path,
    config: dict[str, Any],
    zero_stage: int | None,
    timeout_s: float,
    expected_steps: int,
    ckpt_path: Path | None = None,
) -> dict[str, Any]:
    """One ``prpo-fit fit`` run; returns its results and checks (exit 0, ``expected_steps`` reached, finite loss).

    Args:
        run_dir: the run's directory (created).
        config: from :func:`run_config`.
        zero_stage: 2 or 3 to add the DeepSpeed overlay (``--trainer.devices 1``), None for Lightning's default.
        timeout_s: the run is killed after this many seconds.
        expected_steps: ``trainer.global_step`` the run must reach.
        ckpt_path: resume from this checkpoint.
    """
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    args = ["-m", "prpo_lightning.cli", "fit", "--config", str(cfg_path)]
    if zero_stage is not None:
        args += ["--config", str(DEEPSPEED_CONFIGS[zero_stage]), "--trainer.devices", "1"]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    code, seconds, tail = run_command(args, run_dir / "output.log", timeout_s)
    record_path = run_dir / "record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    last = record.get("steps", [{}])[-1] if record.get("steps") else {}
    engine_lines = [ln for ln in (run_dir / "output.log").read_text(errors="replace").splitlines()
                    if "AutoEngine: sampling" in ln]
    results = {
        "command": "python " + " ".join(args),
        "exit_code": code, "timed_out": code is None, "seconds": round(seconds, 2),
        "steps_reached": record.get("global_step"), "expected_steps": expected_steps,
        "final_loss": last.get("train/loss"), "final_reward": last.get("train/reward/mean"),
        "peak_memory_gib": record.get("peak_memory_gib"), "peak_reserved_gib": record.get("peak_reserved_gib"),
        "train_seconds": record.get("train_seconds"), "per_step": record.get("steps"),
        "strategy": record.get("strategy"), "precision": record.get("precision"),
        "policy_parameters": record.get("policy_parameters"), "policy_dtype": record.get("policy_dtype"),
        "engine_lines": engine_lines[:4],
    }
    loss, norms = results["final_loss"], [s.get("train/grad_norm") for s in record.get("steps", [])]
    checks = {
        "exit_code_0": {"passed": code == 0, "value": code},
        "steps_reached": {"passed": results["steps_reached"] == expected_steps, "value": results["steps_reached"],
                          "expected": expected_steps},
        "loss_finite": {"passed": loss is not None and loss == loss and abs(loss) != float("inf"), "value": loss},
        # DeepSpeed keeps gradients in its own buffers (p.grad is None), so the module's grad_norm reads 0 there
        "grad_norm_positive": {"passed": None if zero_stage is not None else bool(norms) and all(
            n is not None and n > 0 for n in norms), "value": norms},
    }
    if code != 0:
        results["output_tail"] = tail
    return {"results": results, "checks": checks}


def export(ckpt: Path, out_dir: Path, timeout_s: float, expected_parameters: int | None) -> dict[str, Any]:
    """``python -m prpo_lightning.export ckpt out_dir``, then read the safetensors back and check them.

    Checks: exit code 0; ``config.json`` and tokenizer files written; every tensor finite; the parameter count
    equals the trained policy's (tied ``lm_head`` stored once).
    """
    from safetensors import safe_open

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    args = ["-m", "prpo_lightning.export", str(ckpt), str(out_dir)]
    code, seconds, tail = run_command(args, out_dir.parent / "export_output.log", timeout_s)
    files = sorted(out_dir.glob("*.safetensors")) if out_dir.exists() else []
    n_params, finite, dtypes = 0, True, set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                n_params += t.numel()
                finite = finite and bool(torch.isfinite(t.float()).all())
                dtypes.add(str(t.dtype))
    results = {"command": "python " + " ".join(args), "exit_code": code, "seconds": round(seconds, 2),
               "files": sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else [],
               "parameters": n_params, "dtypes": sorted(dtypes)}
    checks = {
        "exit_code_0": {"passed": code == 0, "value": code},
        "config_and_tokenizer_written": {"passed": (out_dir / "config.json").exists()
                                         and (out_dir / "tokenizer_config.json").exists()},
        "weights_finite": {"passed": bool(files) and finite},
        "parameter_count": {"passed": expected_parameters is not None and n_params == expected_parameters,
                            "value": n_params, "expected": expected_parameters},
    }
    if code != 0:
        results["output_tail"] = tail
    return {"results": results, "checks": checks}
