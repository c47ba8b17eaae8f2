"""Which rollout engine is fastest at which model size: the static-cache decoder against vLLM on this CPU.

Two policies: the shipped demo policy (``prpo-demo/arith-qwen2-tiny``, 0.8M parameters) and a random Qwen2 of 44M
parameters (hidden 512, 13 layers, 8 heads × 64, MLP 1536, the demo's 128-token vocabulary). Each engine generates
``--prompts`` completions of exactly ``--new-tokens`` tokens (EOS never sampled: the EOS id is one the models never
emit), sampled at temperature 1, through the ``RolloutEngine`` API; tokens/s is the median of ``--repeats`` calls after
one warm-up. Every (threads, size) runs in a fresh process (vLLM binds its threads once). Run in the vLLM
environment::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/engine_by_size.py

writes ``benchmarks/results/engine_by_size.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "demo": None,  # the shipped policy
    "44M": {"model_type": "qwen2", "vocab_size": 129, "hidden_size": 512, "intermediate_size": 1536,
            "num_hidden_layers": 13, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64,
            "max_position_embeddings": 512, "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1},
}


def measure(size: str, threads: int, prompts: int, new_tokens: int, repeats: int) -> dict:
    """In this process: tokens/s of the static decoder and of vLLM for one model size."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(threads)
    from components.engines import StaticCacheEngine, VLLMEngine
    from prpo_lightning import SampleRequest
    from prpo_lightning.config import SamplingConfig
    from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("prpo-demo/arith-qwen2-tiny")
    config = SIZES[size]
    model = (load_causal_lm("prpo-demo/arith-qwen2-tiny", seed=0) if config is None
             else load_causal_lm(config=config, seed=0)).eval()
    params = sum(p.numel() for p in model.parameters())
    never = SimpleNamespace(eos_token_id=int(model.config.vocab_size) - 1 if config else 127,
                            pad_token_id=tok.pad_token_id)  # an id the prompts never contain and EOS never hits
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, max_prompt_length=64)
    rows = [torch.tensor(tok(f"Q: {i}+{i * 7}=\nA:\n", add_special_tokens=False)["input_ids"]) for i in range(prompts)]
    out: dict = {"size": size, "parameters": params, "threads": threads, "engines": {}}
    for name, engine in (("static", StaticCacheEngine()),
                         ("vllm", VLLMEngine(kv_cache_memory_gib=1.0, max_model_len=256, ignore_eos=True))):
        engine.setup(model, never)
        engine.generate(SampleRequest(rows[:2], 1, sampling, [0, 1], batch_seed=0))  # warm-up
        rates = []
        for r in range(repeats):
            t0 = time.perf_counter()
            result = engine.generate(SampleRequest(rows, 1, sampling, list(range(r, r + prompts)),
                                                   batch_seed=r))  # one batched call (vLLM seeds per request)
            rates.append(int(result.completion_mask.sum()) / (time.perf_counter() - t0))
        engine.teardown()
        out["engines"][name] = {"tokens_per_s": statistics.median(rates), "all": rates}
    out["vllm_over_static"] = out["engines"]["vllm"]["tokens_per_s"] / out["engines"]["static"]["tokens_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--sizes", default="demo,44M")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "THREADS"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_by_size.json"))
    args = parser.parse_args()
    if args.worker:
        size, threads = args.worker
        print("RESULT " + json.dumps(measure(size, int(threads), args.prompts, args.new_tokens, args.repeats)))
        return
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for size in args.sizes.split(","):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            proc = subprocess.run([sys.executable, __file__, "--worker", size, str(threads), "--prompts",
                                   str(args.prompts), "--new-tokens", str(args.new_tokens), "--repeats",
                                   str(args.repeats)], env=env, capture_output=True, text=True, timeout=1800)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{size} with {threads} threads failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(line[len("RESULT "):]))
            r = results[-1]
            print(f"{size:5s} ({r['parameters'] / 1e6:.1f}M) {threads} thread(s): static "
                  f"{r['engines']['static']['tokens_per_s']:.0f} tok/s, vLLM {r['engines']['vllm']['tokens_per_s']:.0f}"
                  f" tok/s, vLLM/static {r['vllm_over_static']:.2f}x", flush=True)
    report = {"command": "VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/engine_by_size.py "
                         + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": os.getloadavg(), "prompts": args.prompts,
              "new_tokens": args.new_tokens, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
