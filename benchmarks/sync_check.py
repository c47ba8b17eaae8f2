"""How far a synced vLLM engine is from the trainer, and how far the faults a sync can have move it, per dtype.

Sets the default thresholds of ``model.rollout_check`` (:data:`prpo_lightning.config.DEFAULT_MISMATCH_THRESHOLDS`):
a threshold must sit above the noise of a correct sync and below every fault. On the shipped demo policy and the
demo task's prompts (64 groups × 8 samples, temperature 1, up to 64 tokens), for each dtype:

- ``synced``: the engine holds the trainer's weights (the noise: other kernels, other numerics);
- ``never_synced``: after ``--steps`` AdamW steps of the trainer at each ``--lrs`` (next-token loss on the
  engine's own samples), the engine still holds the old weights;
- ``partial``: after those steps, a sync that streams every tensor except the two last decoder layers (what the
  complete-stream check now refuses; measured here by bypassing it).

For each case ``logp_diff_max`` / ``logp_diff_mean`` over the sampled tokens (``mismatch_metrics``). Runs in the
vLLM environment::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/sync_check.py

writes ``benchmarks/results/sync_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from components.engine_vllm import VLLMEngine, policy_weights  # noqa: E402
from prpo_lightning import SampleRequest  # noqa: E402
from prpo_lightning.config import DEFAULT_MISMATCH_THRESHOLDS, SamplingConfig  # noqa: E402
from prpo_lightning.data import ArithmeticDataModule  # noqa: E402
from prpo_lightning.rollout.offpolicy import mismatch_metrics  # noqa: E402
from prpo_lightning.rollout.sampling import left_pad  # noqa: E402
from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer  # noqa: E402
from prpo_lightning.training.logprobs import completion_logprobs  # noqa: E402

SAMPLING = SamplingConfig(max_new_tokens=64, temperature=1.0)


def trainer_logprobs(model, tok, prompts, g, result):
    ids, mask = left_pad([p.tolist() for p in prompts], tok.pad_token_id, torch.device("cpu"))
    ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)  # (B, P)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, ids, mask, result.completion_ids, result.completion_mask, 1.0)
    return logp.float() * result.completion_mask  # (B, T)


def measure(engine, model, tok, prompts, g, seed) -> dict[str, float]:
    result = engine.generate(SampleRequest(prompts, g, SAMPLING, [seed + i for i in range(len(prompts))]))
    m = mismatch_metrics(result.sampler_logprobs, trainer_logprobs(model, tok, prompts, g, result),
                         result.completion_mask)
    return {"logp_diff_max": m["rollout/logp_diff_max"], "logp_diff_mean": m["rollout/logp_diff_mean"],
            "tokens": int(result.completion_mask.sum())}


def train(model, tok, prompts, result_ids, lr, steps) -> None:
    """``steps`` AdamW steps of next-token loss on prompt + sampled completion."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rows = [torch.cat([p, c[c != tok.pad_token_id]]) for p, c in zip(prompts, result_ids)]
    ids, mask = left_pad([r.tolist() for r in rows], tok.pad_token_id, torch.device("cpu"))
    for _ in range(steps):
        labels = ids.masked_fill(~mask.bool(), -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def run(dtype_name: str, lrs: list[float], steps: int, groups: int, g: int) -> dict:
    dtype = getattr(torch, dtype_name)
    tok = load_tokenizer("prpo-demo/arith-qwen2-tiny")
    dm = ArithmeticDataModule(num_train=groups, num_eval=8, seed=0)
    dm.setup("fit")
    texts = [f"Q: {dm.train_rows[i]['problem']}\nA:\n" for i in range(groups)]
    prompts = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    out: dict = {"dtype": dtype_name, "default_threshold": DEFAULT_MISMATCH_THRESHOLDS.get(dtype_name)}
    cases: list[dict] = []
    for lr in lrs:
        model = load_causal_lm("prpo-demo/arith-qwen2-tiny", seed=0).to(dtype).eval()
        engine = VLLMEngine(kv_cache_memory_gib=0.5, max_model_len=256)
        engine.setup(model, tok)
        synced = [measure(engine, model, tok, prompts, g, 1000 * k) for k in range(3)]
        cases.append({"case": "synced", "lr": lr, "max_over_batches": max(s["logp_diff_max"] for s in synced),
                      "mean": sum(s["logp_diff_mean"] for s in synced) / len(synced), "batches": synced})
        sample = engine.generate(SampleRequest(prompts, 1, SAMPLING, list(range(len(prompts)))))
        train(model, tok, prompts, sample.completion_ids, lr, steps)
        stale = measure(engine, model, tok, prompts, g, 7)
        cases.append({"case": "never_synced", "lr": lr, "steps": steps, **stale})
        last = sorted({n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if ".layers." in n},
                      key=int)[-2:]
        partial = ((n, t) for n, t in policy_weights(model) if not any(f".layers.{k}." in n for k in last))
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": partial, "is_checkpoint_format": True})
        engine.llm.reset_prefix_cache()
        cases.append({"case": "partial", "lr": lr, "steps": steps, "missing_layers": last,
                      **measure(engine, model, tok, prompts, g, 7)})
        engine.teardown()
        print(json.dumps(cases[-3:])[:600], flush=True)
    out["cases"] = cases
    noise = max(c["max_over_batches"] for c in cases if c["case"] == "synced")
    fault = min(c["logp_diff_max"] for c in cases if c["case"] != "synced")
    out["noise_max"], out["smallest_fault"] = noise, fault
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--lrs", default="1e-5,1e-4,3e-4")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sync_check.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.time()
    results = [run(d, [float(x) for x in args.lrs.split(",")], args.steps, args.groups, args.generations)
               for d in args.dtypes.split(",")]
    report = {"command": "VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/sync_check.py "
                         + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "seconds": round(time.time() - start, 1), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for r in results:
        print(f"{r['dtype']}: synced noise max {r['noise_max']:.3g}, smallest fault {r['smallest_fault']:.3g}, "
              f"default threshold {r['default_threshold']}")


if __name__ == "__main__":
    main()
