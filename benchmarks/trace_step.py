"""Trace which project files one PRPO training step enters, and how often control switches file.

Issue 21's counting, automated so that it can be rerun on any commit: a profiler hook follows every Python call and
return during one training step (the second, so set-up is not counted) and records the innermost project file on
the stack (``prpo_lightning/…`` or ``components/…``; ``components/math_answer/`` counts as one room, Lightning's
and torch's own files are not counted). A *switch* is a change of that file; loop bodies count at every iteration
here (the hand count of ``architecture_review_2026-12.md`` counted them once, so its switch numbers are lower).

The step is the ``configs/prpo.yaml`` path at toy size, on CPU: the default engine (the static-cache decoder),
KL 0.001 (a reference pass), gradient checkpointing, ``SympyMathVerifier``, ``EntropySpikeSegmenter``,
``EquationCheckPRM`` (in place of ``QwenMathPRM``, which needs the 7B PRM's tokenizer) and ``PRPOAligner``; no
DeepSpeed. Run it on two commits to compare them (the script uses only APIs both layouts accept)::

    python benchmarks/trace_step.py                      # writes benchmarks/results/trace_step.json
    python benchmarks/trace_step.py --out /tmp/x.json    # e.g. from a worktree of another commit
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _file_key(filename: str) -> str | None:
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    parts = rel.parts
    if not parts or parts[0] not in ("prpo_lightning", "components"):
        return None
    if parts[:2] == ("components", "math_answer"):
        return "components/math_answer/"
    return str(rel)


class StepTracer:
    """A ``sys.setprofile`` hook that records the sequence of project files control is in."""

    def __init__(self) -> None:
        self.stack: list[str | None] = []
        self.current: str | None = None
        self.visits: list[str] = []

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.stack.append(_file_key(frame.f_code.co_filename))
        elif event == "return" and self.stack:
            self.stack.pop()
        else:
            return
        inner = next((key for key in reversed(self.stack) if key is not None), None)
        if inner is not None and inner != self.current:
            self.visits.append(inner)
        if inner is not None:
            self.current = inner


def traced_step(root: Path) -> list[str]:
    """Train 2 steps of the toy PRPO run and return the files visited during the second training step."""
    import lightning as L
    import torch
    from helpers import build_char_tokenizer, tiny_qwen2_config
    from test_resume import ParityVerifier, ToyPrompts  # noqa: F401  (ToyPrompts: the data)

    from components.aligners import PRPOAligner
    from components.prms import EquationCheckPRM
    from components.segmenters import EntropySpikeSegmenter
    from components.verifiers import SympyMathVerifier
    from prpo_lightning.config import LossConfig, OptimConfig
    from prpo_lightning.module import PRPOModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from prpo_lightning.rollout import SamplingConfig  # one path for both layouts

    torch.manual_seed(0)
    tok = build_char_tokenizer(root / "tok")
    module = PRPOModule(
        verifier=SympyMathVerifier(num_workers=1), aligner=PRPOAligner(),
        segmenter=EntropySpikeSegmenter(k=2, min_gap=2), prm=EquationCheckPRM(),
        policy_config=tiny_qwen2_config(vocab_size=128, hidden=32, layers=2), tokenizer=tok,
        gradient_checkpointing=True,
        sampling=SamplingConfig(num_generations=4, max_new_tokens=12, max_prompt_length=32),
        loss=LossConfig(kl_coef=0.001), optim=OptimConfig(lr=1e-3, micro_batch_size=4),
        prompt_template="{problem}", use_chat_template=False, seed=3,
    )
    tracer = StepTracer()

    class Trace(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 1:
                sys.setprofile(tracer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sys.setprofile(None)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(root), callbacks=[Trace()])
    trainer.fit(module, ToyPrompts(n=6, batch_size=2, seed=1))
    sys.setprofile(None)
    if hasattr(module.verifier, "close"):
        module.verifier.close()
    return tracer.visits


def summarize(visits: list[str]) -> dict[str, Any]:
    files = sorted(set(visits))
    framework = [f for f in files if f.startswith("prpo_lightning/")]
    pairs: dict[str, int] = {}
    for a, b in zip(visits, visits[1:]):
        key = " <-> ".join(sorted((a, b)))
        pairs[key] = pairs.get(key, 0) + 1
    return {
        "files": len(files), "framework_files": len(framework), "component_files": len(files) - len(framework),
        "switches": max(len(visits) - 1, 0), "distinct_transitions": len(pairs),
        "framework": framework, "components": [f for f in files if not f.startswith("prpo_lightning/")],
        "busiest_pairs": dict(sorted(pairs.items(), key=lambda kv: -kv[1])[:8]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trace_step.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        summary = summarize(traced_step(Path(tmp)))
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("busiest_pairs",)}, indent=1))


if __name__ == "__main__":
    main()
