"""The ``served`` section of the GPU check (``benchmarks/gpu_check.py``): ``VLLMServerEngine`` against a vLLM server it
launches (issue 22), with vLLM's native NCCL weight transfer on CUDA (``weight_transfer: auto``) and the shared-folder
transfer elsewhere.

* ``greedy_equals_hf_before_and_after_sync``: greedy completions through the server equal HF ``generate``'s on the
  profile's random Qwen2 (float32), at start and after one optimizer step and a sync;
* ``synced_logp_diff_max``: the sampler-vs-trainer ``logp_diff_max`` of sampled completions after the sync, against
  the float32 default threshold of ``model.rollout_check`` (1e-3);
* ``never_synced_is_caught``: after a second step without a sync, the same metric exceeds the threshold;
* ``sync_s`` / ``sampled_tokens_per_s``: the time of one weight sync and the sampling rate (informational).

Skipped, with the reason, where vLLM is not importable (the lent GPU image has none unless its wheel is brought).
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import torch

from gpu_check_sections import Budget


def served(p: Any, device: torch.device, budget: Budget, skip: type[Exception]) -> dict[str, Any]:
    """Run the section; ``skip`` is the check's Skip exception (raised with the reason when vLLM is missing)."""
    if importlib.util.find_spec("vllm") is None:
        raise skip("vLLM is not installed in this environment: bring its wheel (benchmarks/fetch_gpu_wheels.sh) or "
                   "run the section with .venv-vllm/bin/python benchmarks/gpu_check.py --dry-run --only served")
    from components.engines import HFGenerateEngine, VLLMServerEngine
    from prpo_lightning import SampleRequest
    from prpo_lightning.config import MismatchCheck, SamplingConfig
    from prpo_lightning.demo.policy import build_tokenizer
    from prpo_lightning.rollout.offpolicy import mismatch_metrics
    from prpo_lightning.rollout.sampling import left_pad
    from prpo_lightning.runtime.models import load_causal_lm
    from prpo_lightning.training.logprobs import completion_logprobs

    tok = build_tokenizer()
    shape = dict(p.model)
    if shape["hidden_size"] // shape["num_attention_heads"] < 32:  # vLLM's CPU attention needs a head size >= 32
        shape["num_attention_heads"] = shape["num_key_value_heads"] = max(1, shape["hidden_size"] // 64)
    config = {"model_type": "qwen2", "vocab_size": len(tok), "max_position_embeddings": 512,
              "tie_word_embeddings": True, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
              **shape}
    model = load_causal_lm(config=config, seed=0).to(device).eval()
    sampling = SamplingConfig(max_new_tokens=p.decode_new_tokens, temperature=1.0, max_prompt_length=64)
    prompts = [torch.tensor(tok(f"Q: {i}+{3 * i}=\nA:\n", add_special_tokens=False)["input_ids"])
               for i in range(p.decode_prompts)]
    seeds = list(range(len(prompts)))
    engine = VLLMServerEngine(max_model_len=256, gpu_memory_utilization=0.3 if device.type == "cuda" else None,
                              kv_cache_memory_gib=None if device.type == "cuda" else 0.25,
                              startup_timeout_s=max(30.0, budget.remaining() - 20), request_timeout_s=60)
    hf = HFGenerateEngine()
    checks: dict[str, Any] = {}
    results: dict[str, Any] = {"weight_transfer": "nccl" if device.type == "cuda" else "disk"}

    def logp_diff_max(version: int) -> float:
        out = engine.generate(SampleRequest(prompts, 4, sampling, seeds, policy_version=version))
        ids, mask = left_pad([q.tolist() for q in prompts], tok.pad_token_id, device)
        ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)  # (B, P)
        with torch.no_grad():
            logp, _ = completion_logprobs(model, ids, mask, out.completion_ids.to(device),
                                          out.completion_mask.to(device), 1.0)
        metrics = mismatch_metrics(out.sampler_logprobs.cpu(), logp.float().cpu(), out.completion_mask.cpu())
        return float(metrics["rollout/logp_diff_max"])

    def step() -> None:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        text = torch.tensor([tok("Q: 1+1=\nA:\n2")["input_ids"]], device=device)
        loss = model(input_ids=text, labels=text).loss
        loss.backward()
        opt.step()
        model.eval()

    try:
        t0 = time.perf_counter()
        engine.setup(model, tok)
        results["setup_s"] = time.perf_counter() - t0
        hf.setup(model, tok)
        greedy = [torch.equal(engine.generate(SampleRequest(prompts, 1, sampling, seeds, greedy=True)).completion_ids,
                              hf.generate(SampleRequest(prompts, 1, sampling, seeds, greedy=True)).completion_ids)]
        step()
        t0 = time.perf_counter()
        engine.sync_weights(model, 1)
        results["sync_s"] = time.perf_counter() - t0
        greedy.append(torch.equal(
            engine.generate(SampleRequest(prompts, 1, sampling, seeds, greedy=True, policy_version=1)).completion_ids,
            hf.generate(SampleRequest(prompts, 1, sampling, seeds, greedy=True)).completion_ids))
        checks["greedy_equals_hf_before_and_after_sync"] = {"passed": all(greedy), "each": greedy}
        t0 = time.perf_counter()
        synced = logp_diff_max(1)
        results["sampled_seconds"] = time.perf_counter() - t0
        limit = MismatchCheck().threshold_for(torch.float32)
        checks["synced_logp_diff_max"] = {"passed": synced <= limit, "value": synced, "threshold": limit}
        step()  # no sync: the server still holds version 1
        stale = logp_diff_max(1)
        checks["never_synced_is_caught"] = {"passed": stale > limit, "value": stale, "threshold": limit}
    finally:
        engine.teardown()
    return {"checks": checks, "results": results}
