"""Generation tokens/s of the three rollout engines (HF generate, static cache, vLLM) on a tiny Qwen2.

Run with the vLLM environment (it also has prpo-lightning):

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv-vllm/bin/python benchmarks/engine_throughput.py

The engines are given as EOS one extra vocabulary id that the character tokenizer never uses, so a random-weight
row stops early now and then (at the same rate for every engine, in expectation); tokens/s counts the tokens
actually generated (completion masks). Writes ``benchmarks/results/engine_throughput.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from types import SimpleNamespace
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from components.engines import HFGenerateEngine, StaticCacheEngine, VLLMEngine  # noqa: E402
from helpers import build_char_tokenizer  # noqa: E402
from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer  # noqa: E402
from prpo_lightning.config import SamplingConfig  # noqa: E402

GROUPS = (4, 16, 32)  # prompt groups per call; G = 8 completions each
G, NEW_TOKENS = 8, 64


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # 2+ threads thrash on a shared 2-core box
    tok = load_tokenizer(build_char_tokenizer(Path(tempfile.mkdtemp()) / "tok"))
    config = {
        "model_type": "qwen2", "vocab_size": len(tok) + 1, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64,
        "max_position_embeddings": 256, "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1,
    }
    model = load_causal_lm(config=config, seed=0).eval()
    rare_eos = SimpleNamespace(eos_token_id=len(tok), pad_token_id=tok.pad_token_id)  # an id the prompts never contain
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0)
    prompts = [torch.tensor(tok(f"Q: {i}+{i * 7}=")["input_ids"]) for i in range(max(GROUPS))]
    results: dict = {"model": "Qwen2 hidden 128, 2 layers, 2 heads x 64, fp32", "G": G, "new_tokens": NEW_TOKENS,
                     "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                     "engines": {}}
    engines = {"hf": HFGenerateEngine(), "static": StaticCacheEngine(),
               "vllm": VLLMEngine(kv_cache_memory_gib=1.0, max_model_len=256, max_num_seqs=256)}
    for name, engine in engines.items():
        t0 = time.perf_counter()
        engine.setup(model, rare_eos)
        results["engines"][name] = {"setup_s": round(time.perf_counter() - t0, 2)}
        engine.generate(SampleRequest(prompts[:1], 2, sampling, [0]))  # warm-up
        for n in GROUPS:
            t0 = time.perf_counter()
            out = engine.generate(SampleRequest(prompts[:n], G, sampling, list(range(n)), batch_seed=0))  # batched (the default mode)
            seconds = time.perf_counter() - t0
            tokens = int(out.completion_mask.sum())
            results["engines"][name][f"batch_{n * G}"] = {"tokens": tokens, "seconds": round(seconds, 3),
                                                           "tokens_per_s": round(tokens / seconds)}
            print(f"{name:6s} batch {n * G:4d}: {tokens / seconds:8.0f} tokens/s ({tokens} tokens, {seconds:.2f} s)")
        engine.teardown()
    out_path = ROOT / "benchmarks" / "results" / "engine_throughput.json"
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
