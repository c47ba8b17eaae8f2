"""Benchmark 3: scaling of generation throughput with batch size and of step time with completion length.

* **Generation throughput.** :func:`prpo_lightning.rollout.sampling.generate_completions` with each sampler
  (``sampling.engine``: ``hf`` = HF ``generate`` with its dynamic KV cache, ``static`` = the
  :class:`~prpo_lightning.rollout.decoding.StaticCacheDecoder`; sampling at temperature 1) on the benchmark's random Qwen2
  for batch sizes 1 … 64 of distinct prompts; tokens/s = generated tokens / wall time, median of ``--repeats``
  calls after one warm-up call.
* **Step time against completion length.** A full GRPO training step of :class:`~prpo_lightning.module.PRPOModule`
  (generation, scoring, PPO update; on-policy GRPO needs no separate log-prob pass) for ``max_new_tokens`` 128 → 1024; EOS is suppressed through the
  model's ``generation_config``, so every completion has exactly that many tokens. Each length runs in a fresh process; the module's
  ``train/time/*`` split is recorded too.

Both are plotted to ``docs/_static/bench_scaling.png``. On a GPU machine pass ``--device cuda`` and a realistic
width, e.g. ``--hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864`` (the Qwen2.5-0.5B shape).

* **Per rollout engine** (``--engines``): tokens/s against batch size of ``HFGenerateEngine``,
  ``StaticCacheEngine`` and ``VLLMEngine`` through the ``RolloutEngine`` API; the vLLM worker runs in
  ``--vllm-python`` (default ``.venv-vllm/bin/python``). Writes ``benchmarks/results/scaling_engines.json``.

Run::

    python benchmarks/scaling.py --engines --batch-sizes 1,4,16,64 --repeats 1   # per-engine tokens/s
    python benchmarks/scaling.py    # writes benchmarks/results/scaling.json, docs/_static/bench_scaling.png, docs/benchmarks.md
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
    PromptData,
    build_model_dir,
    make_verifier,
    median,
    peak_rss_mb,
    prompt_rows,
    publish,
    run_header,
    run_worker,
    step_timer_callback,
)

PLOT = ROOT / "docs" / "_static" / "bench_scaling.png"


# ------------------------------------------------------------------------------------------- workers
def gen_throughput(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prpo_lightning.config import SamplingConfig
    from prpo_lightning.rollout.sampling import generate_completions, tokenize_prompts

    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
    rows = prompt_rows(max(args.batch_sizes))
    out = []
    for b, engine in [(b, e) for b in args.batch_sizes for e in ("hf", "static")]:
        sampling = SamplingConfig(num_generations=1, temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=args.gen_tokens)
        ids, mask = tokenize_prompts(tok, [TEMPLATE.format(problem=r["problem"]) for r in rows[:b]], device)
        times = []
        for rep in range(args.repeats + 1):
            torch.manual_seed(rep)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            comp, cmask = generate_completions(model, tok, ids, mask, sampling, sampler=engine)[:2]
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep > 0:  # the first call is a warm-up
                times.append(time.perf_counter() - t)
        n_tok = int(cmask.sum())
        sec = median(times)
        out.append({"batch_size": b, "engine": engine, "tokens": n_tok, "seconds": sec, "tokens_per_s": n_tok / sec})
        print(f"[scaling] generate B={b} ({engine}): {n_tok / sec:.0f} tok/s", flush=True)
    return {"generation": out, "ragged": ragged_generation(args, model, tok, device)}


def ragged_generation(args: argparse.Namespace, model: Any, tok: Any, device: Any) -> list[dict[str, Any]]:
    """Both samplers on completions of varying length: EOS allowed (the random model emits it with probability
    ≈ 1/V per token), ``--ragged-prompts`` prompts × G = 8, ``--ragged-tokens`` budget, the same seed for both, so
    their completions must be identical (checked)."""
    import torch

    from prpo_lightning.config import SamplingConfig
    from prpo_lightning.rollout.sampling import generate_completions, tokenize_prompts

    model.generation_config.suppress_tokens = None
    rows = prompt_rows(args.ragged_prompts)
    ids, mask = tokenize_prompts(tok, [TEMPLATE.format(problem=r["problem"]) for r in rows], device)
    ids, mask = ids.repeat_interleave(8, 0), mask.repeat_interleave(8, 0)
    out, completions = [], {}
    for engine in ("hf", "static"):
        sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.ragged_tokens)
        times = []
        for rep in range(args.repeats + 1):
            torch.manual_seed(rep)
            t = time.perf_counter()
            comp, cmask = generate_completions(model, tok, ids, mask, sampling, sampler=engine)[:2]
            if rep > 0:
                times.append(time.perf_counter() - t)
        completions[engine] = comp
        lengths = cmask.sum(dim=1).float()
        n_tok, sec = int(cmask.sum()), median(times)
        out.append({"engine": engine, "rows": int(ids.shape[0]), "budget": args.ragged_tokens, "tokens": n_tok,
                    "seconds": sec, "tokens_per_s": n_tok / sec, "length_mean": float(lengths.mean()),
                    "length_min": int(lengths.min()), "length_max": int(lengths.max())})
        print(f"[scaling] ragged ({engine}): {sec:.2f} s, {n_tok / sec:.0f} tok/s", flush=True)
    hf_c, st_c = completions["hf"], completions["static"]
    same = hf_c.shape == st_c.shape and bool((hf_c == st_c).all())
    for row in out:
        row["identical_completions"] = same
    return out


def step_time(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L

    from components.aligners import GRPOAligner
    from prpo_lightning.config import LossConfig, OptimConfig
    from prpo_lightning.module import PRPOModule
    from prpo_lightning.config import SamplingConfig

    b = args.prompts * args.G
    module = PRPOModule(
        verifier=make_verifier(), aligner=GRPOAligner(), policy=args.model_dir, tokenizer=args.model_dir,
        dtype=args.dtype,
        sampling=SamplingConfig(num_generations=args.G, temperature=1.0, top_p=1.0, top_k=0,
                                max_new_tokens=args.length, max_prompt_length=512),
        loss=LossConfig(dual_clip=None, aggregation="token-mean"),
        optim=OptimConfig(lr=1e-6, weight_decay=0.0, grad_clip=1.0, micro_batch_size=args.micro_batch or b),
        prompt_template=TEMPLATE, use_chat_template=False, seed=0,
    )
    timer = step_timer_callback()
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
    )
    trainer.fit(module, datamodule=PromptData(prompt_rows(64), batch_size=args.prompts))
    return {"length": args.length, "step_times_s": timer.step_times(), "stage_times_s": timer.stages,
            "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------------------- driver
def engine_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s against batch size of one rollout engine (``--engine``) through the ``RolloutEngine`` API."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.engines import HFGenerateEngine, StaticCacheEngine, VLLMEngine
    from prpo_lightning.config import SamplingConfig

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    if args.engine == "vllm":  # vLLM does not read generation_config.suppress_tokens (the EOS suppression)
        cache_gib = 0.5 if args.device == "cpu" else None  # on GPU: gpu_memory_utilization sizes the cache
        engine: Any = VLLMEngine(kv_cache_memory_gib=cache_gib, gpu_memory_utilization=0.5, max_model_len=512,
                                 max_num_seqs=max(args.batch_sizes), ignore_eos=True)
    else:
        engine = HFGenerateEngine() if args.engine == "hf" else StaticCacheEngine()
    t = time.perf_counter()
    engine.setup(model, tok)
    setup_s = time.perf_counter() - t
    prompts = [torch.tensor(ids) for ids in tok(
        [TEMPLATE.format(problem=r["problem"]) for r in prompt_rows(max(args.batch_sizes))])["input_ids"]]
    sampling = SamplingConfig(num_generations=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.gen_tokens)
    out = []
    for b in args.batch_sizes:
        times = []
        for rep in range(args.repeats + 1):  # the first call is a warm-up
            t = time.perf_counter()
            result = engine.generate(SampleRequest(prompts[:b], 1, sampling, list(range(b)), batch_seed=rep))
            if rep > 0:
                times.append(time.perf_counter() - t)
        # vLLM with ignore_eos generates max_new_tokens per row, though a sampled EOS ends the row's mask
        n_tok = b * args.gen_tokens if args.engine == "vllm" else int(result.completion_mask.sum())
        sec = median(times)
        out.append({"batch_size": b, "engine": args.engine, "tokens": n_tok, "seconds": sec,
                    "tokens_per_s": n_tok / sec})
        print(f"[scaling] engine {args.engine} B={b}: {n_tok / sec:.0f} tok/s", flush=True)
    engine.teardown()
    return {"engine": args.engine, "setup_s": setup_s, "generation": out}


def engines_main(args: argparse.Namespace, cmd: str, load_before: list[float]) -> None:
    """Tokens/s against batch size for the three engines (hf and static in this interpreter, vLLM in
    ``--vllm-python``); writes ``benchmarks/results/scaling_engines.json``."""
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        model_dir = build_model_dir(Path(tmp) / "model", args.hidden, args.layers, heads=args.heads,
                                    kv_heads=args.kv_heads, intermediate=args.intermediate)
        runs = {name: spawn(args, model_dir, ["--worker", "engine", "--engine", name],
                            python=args.vllm_python if name == "vllm" else None) for name in ("hf", "static", "vllm")}
    res = {**run_header(cmd, load_before), "settings": {k: getattr(args, k) for k in (
        "device", "dtype", "threads", "hidden", "layers", "gen_tokens", "repeats", "batch_sizes")}, "engines": runs}
    sizes = args.batch_sizes
    lines = ["| engine | setup (s) | " + " | ".join(f"B={b}" for b in sizes) + " |",
             "|---|---:|" + "---:|" * len(sizes)]
    for name, r in runs.items():
        tps = {g["batch_size"]: g["tokens_per_s"] for g in r["generation"]}
        lines.append(f"| {name} | {r['setup_s']:.1f} | " + " | ".join(f"{tps[b]:.0f}" for b in sizes) + " |")
    publish("scaling_engines", res, "\n".join(lines), to_docs=False)


def spawn(args: argparse.Namespace, model_dir: Path, extra: list[str], python: str | None = None) -> dict[str, Any]:
    cmd = [python or sys.executable, __file__, "--model-dir", str(model_dir), "--threads", str(args.threads),
           "--device", args.device, "--dtype", args.dtype, "--prompts", str(args.prompts), "--G", str(args.G),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--gen-tokens", str(args.gen_tokens),
           "--repeats", str(args.repeats), "--batch-sizes", ",".join(map(str, args.batch_sizes)),
           "--ragged-prompts", str(args.ragged_prompts), "--ragged-tokens", str(args.ragged_tokens),
           "--micro-batch", str(args.micro_batch), *extra]
    return run_worker(cmd, f"worker {extra}")


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_g, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    gen = [g for g in res["generation"] if g.get("engine", "hf") == "static"]
    for engine, label in (("hf", "HF generate (engine: hf)"), ("static", "StaticCacheDecoder (engine: static)")):
        pts = [g for g in res["generation"] if g.get("engine", "hf") == engine]
        ax_g.plot([g["batch_size"] for g in pts], [g["tokens_per_s"] for g in pts], "o-", label=label)
    ax_g.legend(fontsize=8)
    ax_g.set_xscale("log", base=2)
    ax_g.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_g.set(xlabel="batch size (sequences per generate call)", ylabel="generated tokens / s",
             title=f"Generation throughput ({res['settings']['gen_tokens']} new tokens)")
    ax_g.set_xticks([g["batch_size"] for g in gen], [str(g["batch_size"]) for g in gen])
    ax_g.grid(alpha=0.3)
    steps = res["steps"]
    xs = [s["length"] for s in steps]
    bottom = [0.0] * len(xs)
    for key, label in (("rollout_s", "rollout (generation, + log-prob pass if needed)"), ("scoring_s", "scoring"),
                       ("update_s", "PPO update")):
        vals = [s["median_stage_s"].get(key, 0.0) for s in steps]
        ax_s.bar([str(x) for x in xs], vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_s.plot([str(x) for x in xs], [s["median_step_s"] for s in steps], "ko-", label="whole step (median)")
    ax_s.set(xlabel="completion length (tokens)", ylabel="seconds per optimizer step",
             title=f"GRPO step time, {res['settings']['prompts'] * res['settings']['G']} completions per step")
    ax_s.legend(fontsize=8)
    ax_s.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{res['settings']['device']} — random Qwen2, hidden {res['settings']['hidden']}, "
                 f"{res['settings']['layers']} layers ({res['settings']['n_params'] / 1e6:.1f}M params)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ragged_lines(ragged: list[dict[str, Any]]) -> list[str]:
    if not ragged:
        return []
    hf, st = (next(r for r in ragged if r["engine"] == e) for e in ("hf", "static"))
    return [
        "",
        f"**Completions of varying length** ({hf['rows']} rows = {hf['rows'] // 8} prompts × G = 8, budget "
        f"{hf['budget']} tokens, EOS allowed: lengths {hf['length_min']}–{hf['length_max']}, mean "
        f"{hf['length_mean']:.0f}; same seed for both samplers, completions identical: "
        f"{'yes' if hf['identical_completions'] else 'NO'}). HF `generate` computes every row until the longest "
        "finishes; the static-cache decoder drops finished rows from its cache:",
        "",
        "| sampler | seconds | tokens / s |",
        "|---|---:|---:|",
        f"| `hf` (HF `generate`) | {hf['seconds']:.2f} | {hf['tokens_per_s']:.0f} |",
        f"| `static` (StaticCacheDecoder) | {st['seconds']:.2f} | {st['tokens_per_s']:.0f} |",
        f"| static / hf speed | {hf['seconds'] / st['seconds']:.2f}× | |",
    ]


def render_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    sizes = sorted({g["batch_size"] for g in res["generation"]})
    tps = {e: {g["batch_size"]: g["tokens_per_s"] for g in res["generation"] if g["engine"] == e}
           for e in ("hf", "static")}
    lines = [
        "## 3. Scaling",
        "",
        f"Command: `{res['command']}`  ",
        f"Measured {res['date']} on {res['machine'].get('cpu', '?')} ({res['machine']['cpu_count']} cores, "
        f"{s['threads']} torch thread per process, device `{s['device']}`); load average before / after: "
        f"{res['load_before']} / {res['load_after']}.",
        "",
        f"Model: random Qwen2, hidden {s['hidden']}, {s['layers']} layers, {s['n_params'] / 1e6:.2f}M parameters, "
        f"{s['dtype']}, character tokenizer.",
        "",
        f"**Generation throughput** ({s['gen_tokens']} new tokens per sequence, distinct prompts, sampling, KV "
        f"cache; median of {s['repeats']} calls after a warm-up), per sampler (`sampling.engine`):",
        "",
        "| batch size | " + " | ".join(str(b) for b in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
        "| tokens / s, `hf` (HF `generate`) | " + " | ".join(f"{tps['hf'][b]:.0f}" for b in sizes) + " |",
        "| tokens / s, `static` (StaticCacheDecoder) | " + " | ".join(f"{tps['static'][b]:.0f}" for b in sizes) + " |",
        "| static / hf | " + " | ".join(f"{tps['static'][b] / tps['hf'][b]:.2f}×" for b in sizes) + " |",
        *ragged_lines(res.get("ragged", [])),
        "",
        f"**Step time against completion length** (GRPO, {s['prompts']} prompts × G = {s['G']}, one optimizer step "
        f"per rollout, {s['warmup']} warm-up step dropped, median of {s['steps']} steps, fresh process per length):",
        "",
        "| completion tokens | s / step | rollout | scoring | update | peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for st in res["steps"]:
        m = st["median_stage_s"]
        lines.append(f"| {st['length']} | {st['median_step_s']:.2f} | {m.get('rollout_s', 0):.2f} | "
                     f"{m.get('scoring_s', 0):.3f} | {m.get('update_s', 0):.2f} | {st['peak_rss_mb']:.0f} |")
    first, last = res["steps"][0], res["steps"][-1]
    growth = last["median_step_s"] / first["median_step_s"]
    lines += [
        "",
        f"From {first['length']} to {last['length']} tokens ({last['length'] / first['length']:.0f}× longer) the "
        f"step takes {growth:.1f}× longer.",
        "",
        "![Generation throughput and step time](_static/bench_scaling.png)",
    ]
    if res.get("gpu_note"):
        lines += ["", res["gpu_note"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["gen", "step", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=["hf", "static", "vllm"], help=argparse.SUPPRESS)
    p.add_argument("--engines", action="store_true", help="only tokens/s against batch size per rollout engine")
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                   help="interpreter of the environment with vLLM (for --engines)")
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=0)
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--intermediate", type=int, default=0)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ragged-prompts", type=int, default=4)
    p.add_argument("--ragged-tokens", type=int, default=512)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256, 512, 1024])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=0, help="0: the whole rollout batch")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        workers = {"gen": gen_throughput, "step": step_time, "engine": engine_throughput}
        res = workers[args.worker](args)
        Path(args.out).write_text(json.dumps(res), encoding="utf-8")
        return

    cmd = "python benchmarks/scaling.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    load_before = [round(x, 2) for x in os.getloadavg()]
    if args.engines:
        engines_main(args, cmd, load_before)
        return
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        model_dir = build_model_dir(Path(tmp) / "model", args.hidden, args.layers, heads=args.heads,
                                    kv_heads=args.kv_heads, intermediate=args.intermediate)
        from transformers import AutoModelForCausalLM

        n_params = sum(q.numel() for q in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        print("[scaling] generation throughput ...", flush=True)
        gen_result = spawn(args, model_dir, ["--worker", "gen"])
        gen, ragged = gen_result["generation"], gen_result["ragged"]
        steps = []
        for length in args.lengths:
            print(f"[scaling] step time at {length} tokens ...", flush=True)
            r = spawn(args, model_dir, ["--worker", "step", "--length", str(length)])
            meas = r["step_times_s"][args.warmup:]
            stages = r["stage_times_s"][args.warmup:]
            steps.append({
                "length": length, "median_step_s": median(meas), "step_times_s": r["step_times_s"],
                "median_stage_s": {k: median([s[k] for s in stages if k in s]) for k in (stages[0] if stages else {})},
                "peak_rss_mb": r["peak_rss_mb"],
            })
            print(f"[scaling]   {median(meas):.2f} s/step", flush=True)
    res: dict[str, Any] = {
        **run_header(cmd, load_before),
        "settings": {**{k: getattr(args, k) for k in ("device", "dtype", "threads", "hidden", "layers", "gen_tokens",
                                                      "repeats", "prompts", "G", "steps", "warmup")},
                     "n_params": n_params},
        "generation": gen,
        "ragged": ragged,
        "steps": steps,
    }
    if args.device == "cpu":
        res["gpu_note"] = ("GPU: no GPU was available to this run, so there are no GPU numbers here. On a GPU machine "
                           "run `python benchmarks/scaling.py --device cuda --dtype bfloat16 --hidden 896 --layers 24 "
                           "--heads 14 --kv-heads 2 --intermediate 4864` (the Qwen2.5-0.5B shape).")
    tag = "" if args.device == "cpu" else "_gpu"
    plot(res, PLOT if not tag else PLOT.with_name("bench_scaling_gpu.png"))
    publish(f"scaling{tag}", res, render_markdown(res), to_docs=not args.no_docs and not tag)


if __name__ == "__main__":
    main()
