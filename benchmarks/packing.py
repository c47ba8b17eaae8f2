"""Benchmark: the update pass over long-tailed chains of thought, padded vs token-budget vs packed (issue 24).

One rollout of ``--rows`` completions whose lengths are lognormal (median ``--median`` tokens, the longest set to
``--max-len``, the budget of a truncated chain) after prompts of 48–80 tokens, on a small randomly initialised
Qwen2-architecture policy (float32, SDPA attention). Each configuration runs the framework's update pass
(:meth:`PolicyUpdater.accumulate`: forward, loss and backward of every micro-batch, token-mean PPO-clip loss,
on-policy) over the same rows in a fresh worker process, rounds alternating between configurations:

* ``padded``: ``micro_batch_size`` rows per micro-batch, each padded to its longest row (the default);
* ``budget``: ``optim.micro_batch_tokens`` micro-batches (rows sorted by length, padded);
* ``packed``: ``optim.packing`` with the same row-count micro-batches as ``padded``;
* ``budget_packed``: both.

Time is the wall time of the pass (median over rounds); memory is the worker's peak resident set size
(``ru_maxrss``) minus its resident set size just before the pass (the model, optimizer-free, and the rows are
loaded by then), i.e. the pass's own peak. One torch thread per worker.

    python benchmarks/packing.py                 # ~4 minutes on 2 CPU cores
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

from bench_common import current_rss_mb, median, peak_rss_mb, publish, run_header, run_worker  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "padded": {},
    "budget": {"micro_batch_tokens": "budget"},
    "packed": {"packing": True, "share_prompt_prefix": False},
    "budget_packed": {"micro_batch_tokens": "budget", "packing": True, "share_prompt_prefix": False},
}
MODEL = {"model_type": "qwen2", "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 352,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
         "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}


def lengths(rows: int, med: int, max_len: int, sigma: float, seed: int) -> list[int]:
    """Lognormal completion lengths (median ``med``), clipped to ``[1, max_len]``; the longest is ``max_len``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    draw = torch.exp(torch.log(torch.tensor(float(med))) + sigma * torch.randn(rows, generator=g))
    out = draw.round().clamp(1, max_len).long()
    out[int(out.argmax())] = max_len
    return out.tolist()


def rollout(args: argparse.Namespace) -> Any:
    """The benchmark's rows: G = 8 completions per prompt, in sampling order (not sorted)."""
    import torch

    from prpo_lightning.batch import RolloutBatch

    c_len = torch.tensor(lengths(args.rows, args.median, args.max_len, args.sigma, args.seed))  # (B,)
    g = torch.Generator().manual_seed(args.seed + 1)
    p_len = torch.randint(48, 81, (args.rows // 8,), generator=g).repeat_interleave(8)  # (B,)
    b, p, t = args.rows, int(p_len.max()), args.max_len
    p_mask = torch.arange(p)[None] >= p - p_len[:, None]  # (B, P) left padding
    c_mask = torch.arange(t)[None] < c_len[:, None]  # (B, T) right padding
    p_ids = torch.randint(2, MODEL["vocab_size"], (b, p), generator=g) * p_mask  # (B, P)
    c_ids = torch.randint(2, MODEL["vocab_size"], (b, t), generator=g) * c_mask  # (B, T)
    batch = RolloutBatch(p_ids, p_mask.long(), c_ids, c_mask, torch.arange(b) // 8, ["q"] * b, ["a"] * b)
    batch.advantages = torch.randn(b, t, generator=g) * c_mask  # (B, T)
    return batch


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration's update pass in this process: seconds and peak memory above the pre-pass RSS."""
    import torch

    torch.set_num_threads(1)
    from prpo_lightning.config import LossConfig, OptimConfig
    from prpo_lightning.rollout.engine import EngineCapabilities
    from prpo_lightning.runtime.models import load_causal_lm
    from prpo_lightning.training.plan import RunNeeds, plan_passes
    from prpo_lightning.training.updater import PolicyUpdater

    opts = {k: (args.budget if v == "budget" else v) for k, v in CONFIGS[args.config].items()}
    optim = OptimConfig(micro_batch_size=args.micro_batch, **opts)
    loss = LossConfig()
    caps = EngineCapabilities(entropies=True, exact_trainer_distribution=True, needs_weight_sync=False)
    plan = plan_passes(RunNeeds(), caps, loss, optim)
    policy = load_causal_lm(None, dict(MODEL), seed=0).float().train()
    batch = rollout(args)
    updater = PolicyUpdater(policy, loss, optim, plan, 1.0, args.max_len, 0, 0, backward=lambda x: x.backward(),
                            clip_gradients=lambda *a, **k: None, on_optimizer_step=lambda: None)
    idx = torch.arange(batch.size)
    rss_before = current_rss_mb()
    t0 = time.perf_counter()
    stats = updater.accumulate(batch, idx, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    grad_sq = sum(float(p.grad.double().square().sum()) for p in policy.parameters() if p.grad is not None)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before,
            "pass_peak_mb": peak_rss_mb() - rss_before, "loss": stats["loss"], "grad_norm": grad_sq ** 0.5,
            "parameters": sum(p.numel() for p in policy.parameters())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32, help="completions (a multiple of 8: G = 8 per prompt)")
    p.add_argument("--median", type=int, default=300, help="median completion length, tokens")
    p.add_argument("--max-len", type=int, default=2048, help="the longest completion (max_new_tokens), tokens")
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of the completion lengths")
    p.add_argument("--micro-batch", type=int, default=8, help="optim.micro_batch_size of padded and packed")
    p.add_argument("--budget", type=int, default=4096, help="optim.micro_batch_tokens of the budget configurations")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running every configuration once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args)))
        return
    load_before = [round(x, 2) for x in os.getloadavg()]
    shared = ["--rows", args.rows, "--median", args.median, "--max-len", args.max_len, "--sigma", args.sigma,
              "--micro-batch", args.micro_batch, "--budget", args.budget, "--seed", args.seed]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.configs}
    for r in range(args.rounds):
        for name in args.configs:
            cmd = [sys.executable, __file__, "--worker", "--config", name, *map(str, shared)]
            runs[name].append(run_worker(cmd, name))
            print(f"round {r}: {name} {runs[name][-1]['seconds']:.1f} s, pass peak "
                  f"{runs[name][-1]['pass_peak_mb']:.0f} MiB", flush=True)
    argv_text = " ".join(map(str, argv if argv is not None else sys.argv[1:]))
    _publish(args, runs, load_before, f"python benchmarks/packing.py {argv_text}".strip())


def _publish(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], load_before: list[float],
             cmd: str) -> None:
    lens = lengths(args.rows, args.median, args.max_len, args.sigma, args.seed)
    res = {**run_header(cmd, load_before),
           "setup": {"model": MODEL, "rows": args.rows, "completion_lengths": lens, "median": args.median,
                     "max_len": args.max_len, "sigma": args.sigma, "micro_batch_size": args.micro_batch,
                     "micro_batch_tokens": args.budget, "rounds": args.rounds, "prompt_lengths": "48-80, G = 8"},
           "runs": runs}
    base = runs["padded"]
    t0, m0 = median([r["seconds"] for r in base]), median([r["pass_peak_mb"] for r in base])
    rows = ["| configuration | update pass (s, median) | range (s) | pass peak memory (MiB) | peak RSS (MiB) | "
            "time vs padded | memory vs padded | loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        t, m = median([r["seconds"] for r in rs]), median([r["pass_peak_mb"] for r in rs])
        rows.append(f"| {name} | {t:.2f} | {min(r['seconds'] for r in rs):.2f}–{max(r['seconds'] for r in rs):.2f} "
                    f"| {m:.0f} | {median([r['peak_rss_mb'] for r in rs]):.0f} | {t / t0:.2f}× | {m / m0:.2f}× | "
                    f"{rs[0]['loss']:.6f} |")
    sorted_lens = sorted(lens)
    md = "\n".join([
        "## Packing and token-budget micro-batches (issue 24)", "",
        f"Command: `{cmd}`  ",
        f"Measured {res['date']} on {res['machine'].get('cpu', '?')} ({res['machine']['cpu_count']} cores, torch "
        f"{res['machine']['torch']}, 1 torch thread per worker); load average before / after: {res['load_before']} / "
        f"{res['load_after']}.", "",
        f"Setup: the update pass (`PolicyUpdater.accumulate`: forward, token-mean PPO-clip loss and backward of every "
        f"micro-batch) over {args.rows} completions (G = 8 per prompt, prompts of 48–80 tokens) with lognormal "
        f"lengths (median {args.median}, σ = {args.sigma}, clipped at {args.max_len}; this draw: median "
        f"{(sorted_lens[(len(lens) - 1) // 2] + sorted_lens[len(lens) // 2]) / 2:.0f}, mean {sum(lens) / len(lens):.0f}, "
        f"longest {max(lens)} tokens), on a random Qwen2-architecture policy (hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_hidden_layers']} layers, vocabulary {MODEL['vocab_size']}, float32, SDPA). `padded` and "
        f"`packed`: {args.micro_batch} rows per micro-batch in sampling order; `budget` and `budget_packed`: "
        f"`optim.micro_batch_tokens: {args.budget}`. Each configuration runs in a fresh process, {args.rounds} "
        "rounds alternating; the pass peak is the peak RSS minus the RSS just before the pass. The loss column shows "
        "that every configuration computes the same loss (gradients equal to 1e-5: `tests/test_packing.py`). "
        "Packed passes on SDPA run one attention call per row (`prpo_sdpa_varlen`), so no configuration computes "
        "attention between rows or over padding except `padded` and, within its sorted micro-batches, `budget`.", "",
        *rows, "",
        f"Target (packed ≤ 0.6× padded time and ≤ 0.6× padded peak memory): "
        f"{_verdict(runs, 'packed')}; with the token budget: {_verdict(runs, 'budget_packed')}.",
    ])
    publish("packing", res, md)


def _verdict(runs: dict[str, list[dict[str, Any]]], name: str) -> str:
    if name not in runs:
        return "not run"
    t = median([r["seconds"] for r in runs[name]]) / median([r["seconds"] for r in runs["padded"]])
    m = median([r["pass_peak_mb"] for r in runs[name]]) / median([r["pass_peak_mb"] for r in runs["padded"]])
    ok = t <= 0.6 and m <= 0.6
    return f"**{'met' if ok else 'not met'}** (time {t:.2f}×, memory {m:.2f}×)"


if __name__ == "__main__":
    main()
