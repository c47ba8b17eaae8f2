"""Golden recording of the first training steps: sampled tokens, advantages, losses and final weights.

Recorded before the architecture redesign (issue 21) and checked after it by ``tests/test_golden_step.py``: a
refactor of the step's wiring must change no number. Each scenario trains a tiny random Qwen2 for a few steps and
records, per step, the sampled completion ids and the aligner's advantage parts (through a recording subclass of
a bundled aligner: the recording goes through the public component API only), the step's logged metrics
(``module.step_metrics``) and the final weights.

Scenarios: GRPO and PRPO, each on-policy and off-policy (2 PPO epochs × 2 mini-batches, KL to a reference), PRPO
with dynamic sampling, and GRPO with DDP on 2 gloo ranks (run as ``python tests/golden_run.py --ddp-worker``).

Run ``python tests/golden_run.py --write`` to (re)write ``tests/data/golden_steps.json`` — only on a commit whose
numbers are known to be right.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from test_resume import ParityVerifier, ToyPrompts, make_trainer, tokenizer_dir  # noqa: E402

from components.aligners import GRPOAligner, PRPOAligner  # noqa: E402
from components.segmenters import EntropySpikeSegmenter  # noqa: E402
from prpo_lightning import ProcessRewardModel, ProcessScores  # noqa: E402
from prpo_lightning.module import PRPOModule  # noqa: E402

GOLDEN = HERE / "data" / "golden_steps.json"
STEPS = 3


class DigitSharePRM(ProcessRewardModel):
    """A deterministic rule PRM: a step's score is the share of its characters that are digits."""

    def score(self, batch: Any, tokenizer: Any) -> ProcessScores:
        from prpo_lightning.scoring.prm import pad_step_scores

        rows = []
        for ids, spans in zip(batch.completion_ids.tolist(), batch.segment_spans):
            scores = []
            for start, end in spans:
                text = tokenizer.decode(ids[start:end], skip_special_tokens=True)
                scores.append(sum(c.isdigit() for c in text) / max(len(text), 1))
            rows.append(scores)
        return pad_step_scores(rows)


def _recording(base: type) -> type:
    class Recording(base):  # type: ignore[misc, valid-type]
        """Records every batch's completion ids and advantage parts."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.records: list[dict[str, Any]] = []

        def advantage_terms(self, batch: Any) -> dict[str, torch.Tensor] | None:
            terms = super().advantage_terms(batch)
            self.records.append({
                "group_ids": batch.group_ids.tolist(),
                "completion_ids": batch.completion_ids.tolist(),
                "completion_mask": batch.completion_mask.int().tolist(),
                "terms": {k: v.double().tolist() for k, v in sorted((terms or {}).items())},
            })
            return terms

    Recording.__name__ = f"Recording{base.__name__}"
    return Recording


class MetricsRecorder:
    """A Lightning callback recording ``module.step_metrics`` after every training batch."""

    def __init__(self) -> None:
        import lightning as L

        class _CB(L.Callback):
            def __init__(inner) -> None:
                inner.rows: list[dict[str, float]] = []

            def on_train_batch_end(inner, trainer, pl_module, outputs, batch, batch_idx) -> None:
                metrics = getattr(pl_module, "step_metrics", {})
                keep = {k: v for k, v in metrics.items() if not k.startswith(("train/time/", "train/perf/"))}
                inner.rows.append({"step": trainer.global_step, **keep})

        self.callback = _CB()


def _sampling(**kw: Any) -> Any:
    from prpo_lightning.config import SamplingConfig  # moved by the redesign: imported through the old path

    return SamplingConfig(**kw)


def _configs() -> Any:
    from prpo_lightning.config import LossConfig, OptimConfig

    return LossConfig, OptimConfig


def scenario_module(name: str, tok: str) -> PRPOModule:
    """The module of one scenario (tiny random Qwen2, ParityVerifier rewards)."""
    from helpers import tiny_qwen2_config

    LossConfig, OptimConfig = _configs()
    prpo = name.startswith("prpo")
    off = "off" in name
    aligner = _recording(PRPOAligner if prpo else GRPOAligner)()
    sampling = dict(num_generations=4, max_new_tokens=12, max_prompt_length=32)
    if name == "prpo_dynamic":
        sampling["dynamic_sampling"] = {"enabled": True, "max_rounds": 2, "criterion": "outcome"}
    if name == "grpo_ddp":
        sampling["seed_per_group"] = True
    optim = dict(lr=1e-2, warmup_steps=1, schedule="linear", total_steps=12, micro_batch_size=4)
    if off:
        optim.update(ppo_epochs=2, mini_batch_size=4)
    kw: dict[str, Any] = dict(
        verifier=ParityVerifier(),
        aligner=aligner,
        policy_config=tiny_qwen2_config(vocab_size=128, hidden=32, layers=2),
        tokenizer=tok,
        sampling=_sampling(**sampling),
        loss=LossConfig(kl_coef=0.01 if off else 0.0),
        optim=OptimConfig(**optim),
        prompt_template="{problem}",
        use_chat_template=False,
        seed=3,
    )
    if prpo:
        kw.update(segmenter=EntropySpikeSegmenter(k=2, min_gap=2), prm=DigitSharePRM())
    return PRPOModule(**kw)


SCENARIOS = ("grpo_on", "grpo_off", "prpo_on", "prpo_off", "prpo_dynamic")


def _weights_digest(module: PRPOModule) -> str:
    h = hashlib.sha256()
    for key, value in sorted(module.policy.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_scenario(name: str, root: Path, tok: str, devices: int = 1) -> dict[str, Any]:
    """Train one scenario for :data:`STEPS` steps and return its record."""
    torch.manual_seed(0)
    module = scenario_module(name, tok)
    recorder = MetricsRecorder()
    n = 8 if name == "prpo_dynamic" else 6
    data = ToyPrompts(n=n, batch_size=2 if devices == 1 else 1, seed=1)
    kw: dict[str, Any] = {"strategy": "ddp", "devices": devices} if devices > 1 else {}
    max_steps = STEPS * 4 if "off" in name else STEPS  # off-policy: 2 epochs x 2 mini-batches per rollout
    trainer = make_trainer(root, max_steps, callbacks=[recorder.callback], **kw)
    trainer.fit(module, data)
    return {
        "batches": module.aligner.records,
        "metrics": recorder.callback.rows,
        "weights_sha256": _weights_digest(module),
        "weights_sum": float(sum(float(v.double().sum()) for v in module.policy.state_dict().values())),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ddp(root: Path, tok: str, timeout: int = 400) -> dict[str, Any]:
    """Run ``grpo_ddp`` on 2 gloo ranks in a subprocess and return both ranks' records."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--ddp-worker", str(root), tok],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError("DDP golden run failed:\n" + proc.stdout[-3000:] + proc.stderr[-6000:])
    return {f"rank{r}": json.loads((root / f"ddp_rank{r}.json").read_text()) for r in (0, 1)}


def machine() -> dict[str, str]:
    """What the exactness of the recording depends on: the CPU, its vector ISA and the torch build."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "isa": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def record_all(root: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    tok = tokenizer_dir(root)
    out: dict[str, Any] = {"machine": machine(), "scenarios": {}}
    for name in SCENARIOS:
        out["scenarios"][name] = run_scenario(name, root / name, tok)
    out["scenarios"]["grpo_ddp"] = run_ddp(root / "ddp", tok)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN}")
    parser.add_argument("--ddp-worker", nargs=2, metavar=("ROOT", "TOK"))
    args = parser.parse_args()
    if args.ddp_worker:
        torch.set_num_threads(1)
        root, tok = Path(args.ddp_worker[0]), args.ddp_worker[1]
        root.mkdir(parents=True, exist_ok=True)
        rec = run_scenario("grpo_ddp", root, tok, devices=2)
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        (root / f"ddp_rank{rank}.json").write_text(json.dumps(rec))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rec = record_all(Path(tmp))
    if args.write:
        GOLDEN.write_text(json.dumps(rec, indent=None, separators=(",", ":")) + "\n")
        print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
    else:
        print(json.dumps({k: v["weights_sha256"] for k, v in rec["scenarios"].items() if "weights_sha256" in v}))


if __name__ == "__main__":
    main()
