"""In-process sections of the GPU check (``benchmarks/gpu_check.py``): environment and bf16 peak, decoder and
log-prob identity, generation throughput and update-pass MFU.

Every section function takes the profile (shapes), the device and a :class:`Budget`, and returns
``{"results": {...}, "checks": {name: {"passed": bool | None, ...}}}``; ``passed: None`` marks an informational
entry that does not decide the section's status. Models are random Qwen2s built on the device from a config (no
hub), with the demo tokenizer's ids (PAD 0, EOS 1).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import resource
import subprocess
import time
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

PAD, EOS = 0, 1
VERSIONED = ("torch", "transformers", "lightning", "torchmetrics", "deepspeed", "jsonargparse", "docstring_parser",
             "typeshed_client", "latex2sympy2_extended", "antlr4-python3-runtime", "pydantic", "pydantic_core",
             "typing_extensions", "sympy", "numpy", "safetensors", "tokenizers", "accelerate", "peft", "vllm")
IMPORTED = ("jsonargparse", "latex2sympy2_extended", "deepspeed")
BF16_TIE_TOL = 2.0**-4  # 8 bf16 ulps (8 mantissa bits) of a logit in [1, 2): measured HF-vs-HF ties reach 6


class Budget:
    """A section's time budget: ``remaining()`` seconds of ``seconds``, counted from creation."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def remaining(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory since the last :func:`reset_peak` (CPU: the process's peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_model(shape: dict[str, Any], vocab: int, device: torch.device, dtype: torch.dtype, boost_eos: bool) -> Any:
    """A random Qwen2 of ``shape`` built directly on ``device`` (seed 0), in eval mode.

    Args:
        boost_eos: raise the EOS logit a little so that some sampled rows stop early (as ``tests/test_decoding.py``
            does), which exercises rows leaving the decoder's cache. Otherwise EOS is suppressed, so every row
            runs the full length (throughput).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", vocab_size=vocab, tie_word_embeddings=False, pad_token_id=PAD,
                               eos_token_id=EOS, bos_token_id=None, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    if boost_eos:
        with torch.no_grad():
            head = model.lm_head.weight  # (V, D)
            head[EOS] += 0.5 * head.abs().mean() * torch.sign(head[2])
    else:
        model.generation_config.suppress_tokens = [EOS]
    return model


def prompts(
    n_prompts: int, group: int, vocab: int, min_len: int, max_len: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``n_prompts`` random prompts of lengths spread over ``[min_len, max_len]``, each repeated ``group`` times,
    left-padded: ``(n_prompts * group, max_len)`` ids and mask."""
    from prpo_lightning.rollout.sampling import left_pad

    gen = torch.Generator().manual_seed(7)
    lengths = torch.linspace(min_len, max_len, n_prompts).round().long().tolist()
    rows = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]
    ids, mask = left_pad(rows, PAD, device)  # (N, P)
    return ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)  # (N·G, P)


def matmul_peak_tflops(device: torch.device, n: int, dtype: torch.dtype = torch.bfloat16, reps: int = 10) -> float:
    """Measured dense ``n × n × n`` matmul rate in TFLOP/s (``2 n³`` FLOPs each; mean of ``reps`` after 3 warm-ups)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# ------------------------------------------------------------------------------------------------ environment
VERIFIER_PAIRS = (("so \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),
                  ("\\boxed{(x+1)^2}", "x^2+2x+1", True), ("\\boxed{3}", "4", False))


def _math_verifier() -> dict[str, Any]:
    """``SympyMathVerifier`` on pairs that need its symbolic path (latex2sympy2 + antlr in a worker process)."""
    from components.verifiers import SympyMathVerifier

    with SympyMathVerifier(num_workers=1) as verifier:
        verdicts = verifier.verify_batch([c for c, _, _ in VERIFIER_PAIRS], [g for _, g, _ in VERIFIER_PAIRS])
        stats = verifier.stats()
    got = [v.is_correct for v in verdicts]
    return {"passed": got == [ok for _, _, ok in VERIFIER_PAIRS] and stats["symbolic"] >= 2, "value": got,
            "stats": stats}


def environment(p: Any, device: torch.device, budget: Budget) -> dict[str, Any]:
    """Versions (and where each package was imported from), the accelerator, and the measured bf16 peak."""
    versions: dict[str, Any] = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    origins = {}
    for name in ("torch", "transformers", "lightning", "jsonargparse", "deepspeed", "pydantic", "typing_extensions"):
        spec = importlib.util.find_spec(name)
        origins[name] = spec.origin if spec else None
    imports: dict[str, Any] = {}
    for name in IMPORTED:
        t0 = time.perf_counter()
        try:
            importlib.import_module(name)
            imports[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as err:  # recorded: the DeepSpeed sections will fail the same way
            imports[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
    results: dict[str, Any] = {
        "python": platform.python_version(), "versions": versions, "origins": origins, "imports": imports,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        results.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                       gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15)
            results["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            results["nvidia_smi"] = f"unavailable: {err}"
    results["bf16_peak_tflops"] = round(matmul_peak_tflops(device, p.peak_n), 2)
    results["bf16_peak_formula"] = f"2·n³ FLOP per {p.peak_n}×{p.peak_n}×{p.peak_n} bf16 matmul, mean of 10"
    checks = {
        "expected_device": {"passed": (device.type == "cuda") == (not p.dry_run), "value": str(device)},
        "project_imports": {"passed": imports["jsonargparse"]["ok"] and imports["latex2sympy2_extended"]["ok"]},
        "deepspeed_imports": {"passed": imports["deepspeed"]["ok"] if not p.dry_run else None},
        "math_verifier_symbolic": _math_verifier(),
        "bf16_peak_positive": {"passed": results["bf16_peak_tflops"] > 0, "value": results["bf16_peak_tflops"]},
    }
    return {"results": results, "checks": checks}


# ------------------------------------------------------------------------------------------------ decoder
def _compare(hf: Tensor, static: Tensor) -> dict[str, Any]:
    """Token identity of two ``(B, T)`` outputs: identical, rows identical, each differing row's first position."""
    t = min(hf.shape[1], static.shape[1])
    differs = hf[:, :t] != static[:, :t]  # (B, t)
    if hf.shape[1] != static.shape[1]:  # one engine stopped earlier: the rows that ran longer differ there
        longer = hf if hf.shape[1] > static.shape[1] else static
        differs = torch.cat([differs, longer[:, t:] != PAD], dim=1)  # (B, max T)
    bad_rows = differs.any(dim=1).nonzero().flatten().tolist()
    first = [[r, int(differs[r].float().argmax())] for r in bad_rows]  # [row, position] per differing row
    return {"passed": not bad_rows, "rows_identical": hf.shape[0] - len(bad_rows), "rows": hf.shape[0],
            "hf_shape": list(hf.shape), "static_shape": list(static.shape),
            "first_mismatch_row_pos": min(first, key=lambda rp: rp[1]) if first else None, "mismatches": first[:32],
            "rows_with_eos": int((hf == EOS).any(dim=1).sum())}


def _hf_generate(model: Any, ids: Tensor, mask: Tensor, seed: int, new_tokens: int, **kw: Any) -> Tensor:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=EOS, pad_token_id=PAD, **kw)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1]:]


def _static_generate(model: Any, ids: Tensor, mask: Tensor, seed: int, new_tokens: int, **kw: Any) -> Tensor:
    from prpo_lightning.rollout.decoding import StaticCacheDecoder

    torch.manual_seed(seed)
    return StaticCacheDecoder(model).generate(ids, mask, new_tokens, EOS, PAD, **kw)[0]


def _greedy_margin(model: Any, ids: Tensor, mask: Tensor, tokens: Tensor, row: int, pos: int) -> dict[str, float]:
    """Top-1 minus top-2 logit where greedy decoding first diverged (HF's tokens before it): a gap at the level of
    the dtype's rounding means a near-tie that either kernel may break either way."""
    seq = torch.cat([ids[row : row + 1], tokens[row : row + 1, :pos]], dim=1)  # (1, P + pos)
    attn = torch.cat([mask[row : row + 1], torch.ones(1, pos, dtype=mask.dtype, device=mask.device)], dim=1)
    position_ids = (attn.long().cumsum(dim=1) - 1).clamp(min=0)  # (1, P + pos)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=attn, position_ids=position_ids).logits[0, -1].float()  # (V,)
    top = logits.topk(2).values
    return {"top1_logit": float(top[0]), "top1_minus_top2": float(top[0] - top[1])}


def _identity(model: Any, ids: Tensor, mask: Tensor, new_tokens: int, seed: int, greedy: bool,
              knobs: dict[str, Any], tie_tol: float | None = None) -> tuple[dict[str, Any], Tensor]:
    """HF ``generate`` and ``StaticCacheDecoder`` from the same RNG state: token identity, timings, and for greedy
    decoding the top-1/top-2 logit gap where each differing row first diverged. With ``tie_tol`` (bf16) the check
    also passes when every divergence is a near-tie, ``gap <= tie_tol * max(1, |top-1 logit|)``: the two engines'
    kernels round differently and may break such a tie either way; exact identity is then not a property of the
    decoder but of the rounding."""
    device = ids.device
    sync(device)
    t0 = time.perf_counter()
    hf_kw = dict(do_sample=False) if greedy else dict(do_sample=True, **knobs)
    hf = _hf_generate(model, ids, mask, seed, new_tokens, **hf_kw)
    sync(device)
    t1 = time.perf_counter()
    static = _static_generate(model, ids, mask, seed, new_tokens, greedy=greedy, **({} if greedy else knobs))
    sync(device)
    check = _compare(hf, static)
    if greedy and check["mismatches"]:
        gaps = [_greedy_margin(model, ids, mask, hf, row, pos) for row, pos in check["mismatches"]]
        check["divergence_gaps"] = gaps
        if tie_tol is not None:
            check["tie_tol"] = tie_tol
            check["passed"] = all(g["top1_minus_top2"] <= tie_tol * max(1.0, abs(g["top1_logit"])) for g in gaps)
    check.update(hf_seconds=round(t1 - t0, 3), static_seconds=round(time.perf_counter() - t1, 3), knobs=knobs)
    return check, static


def _hf_rounding_reference(model: Any, ids: Tensor, mask: Tensor, new_tokens: int) -> dict[str, Any]:
    """HF ``generate`` against itself in bf16: all rows in one call vs. the rows in calls of 4. Other batch shapes
    select other GEMM kernels, so this measures how far bf16 rounding alone moves greedy decoding; the static
    decoder's bf16 output passes when it has no more divergent rows than HF against itself and every divergence is
    a tie within ``BF16_TIE_TOL``. Informational itself (``passed`` None)."""
    whole = _hf_generate(model, ids, mask, 0, new_tokens, do_sample=False)
    pieces = [_hf_generate(model, ids[i:i + 4], mask[i:i + 4], 0, new_tokens, do_sample=False)
              for i in range(0, ids.shape[0], 4)]
    width = max(x.shape[1] for x in pieces)
    chunked = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]), value=PAD) for x in pieces])
    check = _compare(whole, chunked)
    if check["mismatches"]:
        check["divergence_gaps"] = [_greedy_margin(model, ids, mask, whole, r, q) for r, q in check["mismatches"]]
    check["passed"] = None
    return check


def _logprob_pass(model: Any, ids: Tensor, mask: Tensor, comp: Tensor, cmask: Tensor, share: bool) -> tuple:
    from prpo_lightning.training.logprobs import completion_logprobs

    weights = torch.linspace(-1, 1, comp.numel(), device=comp.device).view_as(comp)  # (B, T) fixed "advantages"
    model.zero_grad(set_to_none=True)
    logp, ent = completion_logprobs(model, ids, mask, comp, cmask, 0.7, with_entropy=True, share_prompts=share)
    (logp * weights * cmask).sum().backward()
    grads = [prm.grad.detach().clone() for prm in model.parameters()]
    model.zero_grad(set_to_none=True)
    return logp.detach(), ent, grads


def _shared_vs_plain(model: Any, ids: Tensor, mask: Tensor, comp: Tensor, tol: float | None) -> dict[str, Any]:
    """Max abs differences of log-probs, entropies and gradients between ``share_prompts`` True and False."""
    is_eos = comp == EOS  # (B, T)
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(comp[:, 0], comp.shape[1]))
    cmask = torch.arange(comp.shape[1], device=comp.device)[None] <= first[:, None]  # (B, T) up to EOS
    comp = torch.where(cmask, comp, torch.full_like(comp, PAD))
    logp, ent, grads = _logprob_pass(model, ids, mask, comp, cmask, share=False)
    s_logp, s_ent, s_grads = _logprob_pass(model, ids, mask, comp, cmask, share=True)
    grad_diff = max(float((g - s).abs().max()) for g, s in zip(grads, s_grads))
    grad_scale = max(float(g.abs().max()) for g in grads)
    out = {"logprob_max_abs_diff": float((logp - s_logp).abs().max()),
           "entropy_max_abs_diff": float((ent - s_ent).abs().max()),
           "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale,
           "grad_rel_diff": grad_diff / max(grad_scale, 1e-30), "tolerance": tol}
    out["passed"] = None if tol is None else (
        out["logprob_max_abs_diff"] <= tol and out["entropy_max_abs_diff"] <= tol and out["grad_rel_diff"] <= tol
        and grad_scale > 0)
    return out


def decoder(p: Any, device: torch.device, budget: Budget) -> dict[str, Any]:
    """``StaticCacheDecoder`` against HF ``generate`` (fp32 greedy and sampled: identical tokens; bf16 greedy:
    identical up to near-ties) and the shared-prefix log-prob pass against the plain pass (fp32 within
    ``p.logprob_tol``; bf16 informational)."""
    model = build_model(p.model, p.vocab, device, torch.float32, boost_eos=True)
    ids, mask = prompts(p.decode_prompts, p.decode_group, p.vocab, 8, p.prompt_len, device)
    t = p.decode_new_tokens
    checks: dict[str, Any] = {}
    checks["fp32_greedy_identical"], _ = _identity(model, ids, mask, t, 0, True, {})
    sampled = None
    for name, knobs in (("fp32_sampled_identical", dict(temperature=1.0, top_p=1.0, top_k=0)),
                        ("fp32_sampled_top_p_top_k_identical", dict(temperature=0.7, top_p=0.9, top_k=20))):
        checks[name], out = _identity(model, ids, mask, t, 11, False, knobs)
        sampled = out if sampled is None else sampled
    checks["fp32_shared_prefix_logprobs"] = _shared_vs_plain(model, ids, mask, sampled, p.logprob_tol)
    model.to(torch.bfloat16)
    reference = checks["bf16_hf_vs_hf_reference"] = _hf_rounding_reference(model, ids, mask, t)
    check, _ = _identity(model, ids, mask, t, 0, True, {}, BF16_TIE_TOL)
    if check["mismatches"]:  # judged against HF's own bf16 rounding: no more divergent rows, no wider ties
        check["hf_vs_hf_rows_identical"] = reference["rows_identical"]
        check["passed"] = check["rows_identical"] >= reference["rows_identical"] and all(
            g["top1_minus_top2"] <= BF16_TIE_TOL * max(1.0, abs(g["top1_logit"])) for g in check["divergence_gaps"])
    checks["bf16_greedy_identical_up_to_ties"] = check
    checks["bf16_shared_prefix_logprobs"] = _shared_vs_plain(model, ids, mask, sampled, None)
    results = {"rows": ids.shape[0], "prompt_len": ids.shape[1], "new_tokens": t,
               "parameters": sum(x.numel() for x in model.parameters()), "peak_memory_gib": peak_memory_gib(device)}
    return {"results": results, "checks": checks}


# ------------------------------------------------------------------------------------------------ throughput
def _generation_rate(
    model: Any, engine: str, batch: int, new_tokens: int, p: Any, device: torch.device
) -> dict[str, Any]:
    """Tokens/s of one ``generate_completions`` call with ``engine`` on ``batch`` rows (G-row prompt groups)."""
    from prpo_lightning.config import SamplingConfig
    from prpo_lightning.rollout.sampling import generate_completions

    tok = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)
    group = min(p.train_group, batch)
    ids, mask = prompts(batch // group, group, p.vocab, p.prompt_len // 2, p.prompt_len, device)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    cmask = generate_completions(model, tok, ids, mask, sampling, sampler=engine).mask
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = int(cmask.sum())
    return {"batch": ids.shape[0], "new_tokens": new_tokens, "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "peak_memory_gib": round(peak_memory_gib(device), 2)}


def _update_pass(model: Any, p: Any, device: torch.device, share: bool, peak_tflops: float) -> dict[str, Any]:
    """Time fwd+bwd of one micro-batch through the framework's update forward (``completion_logprobs``)."""
    from prpo_lightning.training.logprobs import completion_logprobs

    rows, group = p.mfu_rows, p.train_group
    ids, mask = prompts(rows // group, group, p.vocab, p.mfu_prompt_len, p.mfu_prompt_len, device)  # (rows, P)
    gen = torch.Generator().manual_seed(3)
    comp = torch.randint(2, p.vocab, (rows, p.mfu_completion_len), generator=gen).to(device)  # (rows, T)
    cmask = torch.ones_like(comp, dtype=torch.bool)
    model.train()
    times = []
    reset_peak(device)
    for i in range(2 + p.mfu_reps):
        model.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        logp, _ = completion_logprobs(model, ids, mask, comp, cmask, 1.0, share_prompts=share)
        logp.sum().backward()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    model.eval()
    n_params = sum(x.numel() for x in model.parameters())
    tokens = rows * (ids.shape[1] + comp.shape[1])
    seconds = sorted(times)[len(times) // 2]
    flops = 6 * n_params * tokens
    return {"share_prompts": share, "rows": rows, "group": group, "tokens": tokens, "parameters": n_params,
            "seconds_median": seconds, "tflops_per_s": flops / seconds / 1e12,
            "mfu": flops / seconds / 1e12 / peak_tflops if peak_tflops > 0 else None,
            "peak_memory_gib": round(peak_memory_gib(device), 2)}


def throughput(p: Any, device: torch.device, budget: Budget, peak_tflops: float | None) -> dict[str, Any]:
    """Generation tokens/s against batch size for each available engine, update-pass MFU, peak memory (bf16)."""
    if peak_tflops is None:
        peak_tflops = matmul_peak_tflops(device, p.peak_n)
    model = build_model(p.model, p.vocab, device, torch.bfloat16, boost_eos=False)
    engines = {"hf": "available", "static": "available",
               "vllm": "available" if importlib.util.find_spec("vllm") else "not installed: not measured"}
    generation: list[dict[str, Any]] = []
    for engine in ("hf", "static"):
        _generation_rate(model, engine, min(p.throughput_batches), 4, p, device)  # warm-up
        for batch in p.throughput_batches:
            if budget.remaining() < p.throughput_min_s:
                generation.append({"engine": engine, "batch": batch, "skipped": "section budget spent"})
                continue
            rate = _generation_rate(model, engine, batch, p.throughput_new_tokens, p, device)
            generation.append({"engine": engine, **rate})
    update = []
    for share in (False, True):
        if budget.remaining() < p.throughput_min_s:
            update.append({"share_prompts": share, "skipped": "section budget spent"})
            continue
        update.append(_update_pass(model, p, device, share, peak_tflops))
    results = {"engines": engines, "generation": generation, "update_pass": update, "bf16_peak_tflops": peak_tflops,
               "mfu_formula": "MFU = 6·N·tokens / t / peak; N = policy parameters (embeddings included), tokens = "
                              "rows × (prompt + completion) of the micro-batch, t = median fwd+bwd seconds, peak = the "
                              "measured bf16 matmul rate; attention-score FLOPs are not counted. With shared prompts "
                              "the same 6·N·tokens is credited (the work it replaces), so its MFU is 'effective'."}
    ran = [g for g in generation if "tokens_per_s" in g]
    checks = {"generation_measured": {"passed": len(ran) == 2 * len(p.throughput_batches),
                                      "value": len(ran), "expected": 2 * len(p.throughput_batches)},
              "update_pass_measured": {"passed": all("mfu" in u for u in update)}}
    return {"results": results, "checks": checks}
