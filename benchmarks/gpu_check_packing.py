"""The ``packing`` section of the GPU check (``benchmarks/gpu_check.py``): padding-free packed passes and token-budget
micro-batches (issue 24, ``optim.packing`` / ``optim.micro_batch_tokens``) on the GPU's attention kernels.

* ``fp32_packed_vs_padded_sdpa``: log-probs, entropies and every gradient of the packed pass (SDPA row by row,
  ``prpo_sdpa_varlen``) against the padded pass (SDPA with its mask), float32, within the profile's ``logprob_tol``;
* ``flash_attention_2_packed``: with CUDA and ``flash_attn`` installed, the packed pass on flash-attention's varlen
  kernel: no row sees another (a changed token of row 0 leaves every other row's log-probs bit-identical), and its
  bf16 log-probs against the padded SDPA pass (informational). Skipped, with the reason, without them;
* ``update_pass``: time and peak memory of the update pass (:meth:`PolicyUpdater.accumulate`, bf16 on the GPU) over
  long-tailed completion lengths, padded vs token budget vs packed vs both (informational).
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import torch
from torch import Tensor

from gpu_check_sections import EOS, PAD, Budget, peak_memory_gib, reset_peak, sync

CONFIGS: dict[str, dict[str, Any]] = {
    "padded": {},
    "budget": {"micro_batch_tokens": "budget"},
    "packed": {"packing": True, "share_prompt_prefix": False},
    "budget_packed": {"micro_batch_tokens": "budget", "packing": True, "share_prompt_prefix": False},
}


def _model(p: Any, device: torch.device, dtype: torch.dtype, attn: str) -> Any:
    """A random Qwen2 of the profile's shape on ``device`` with the attention implementation ``attn`` (train mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", vocab_size=p.vocab, tie_word_embeddings=False, pad_token_id=PAD,
                               eos_token_id=EOS, bos_token_id=None, **p.model)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.train()


def _rows(p: Any, n: int, max_len: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` rows: prompts of ``prompt_len/2 … prompt_len`` tokens (left-padded), lognormal completion lengths with
    median ``max_len / 7`` clipped to ``[1, max_len]``, the longest ``max_len`` (right-padded)."""
    g = torch.Generator().manual_seed(5)
    c_len = torch.exp(torch.log(torch.tensor(max_len / 7.0)) + 0.8 * torch.randn(n, generator=g))
    c_len = c_len.round().clamp(1, max_len).long()
    c_len[int(c_len.argmax())] = max_len
    p_len = torch.randint(p.prompt_len // 2, p.prompt_len + 1, (n,), generator=g)
    p_mask = torch.arange(p.prompt_len)[None] >= p.prompt_len - p_len[:, None]  # (n, P)
    c_mask = torch.arange(max_len)[None] < c_len[:, None]  # (n, T)
    p_ids = torch.randint(2, p.vocab, (n, p.prompt_len), generator=g) * p_mask
    c_ids = torch.randint(2, p.vocab, (n, max_len), generator=g) * c_mask
    return p_ids.to(device), p_mask.long().to(device), c_ids.to(device), c_mask.long().to(device)


def _pass(model: Any, rows: tuple[Tensor, ...], packed: bool, grads: bool = True) -> tuple[Tensor, Tensor, list]:
    from prpo_lightning.training.logprobs import completion_logprobs

    p_ids, p_mask, c_ids, c_mask = rows
    weights = torch.linspace(-1, 1, c_ids.numel(), device=c_ids.device).view_as(c_ids)  # (B, T) fixed "advantages"
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        logp, ent = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, 0.7, with_entropy=True, packed=packed)
    out = []
    if grads:
        (logp * weights).sum().backward()
        out = [x.grad.detach().clone() for x in model.parameters()]
        model.zero_grad(set_to_none=True)
    return logp.detach(), ent.detach(), out


def _packed_vs_padded(model: Any, rows: tuple[Tensor, ...], tol: float) -> dict[str, Any]:
    logp, ent, grads = _pass(model, rows, packed=False)
    k_logp, k_ent, k_grads = _pass(model, rows, packed=True)
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(grads, k_grads))
    grad_scale = max(float(a.abs().max()) for a in grads)
    out = {"rows": rows[2].shape[0], "tokens": int(rows[1].sum() + rows[3].sum()),
           "logprob_max_abs_diff": float((logp - k_logp).abs().max()),
           "entropy_max_abs_diff": float((ent - k_ent).abs().max()), "grad_max_abs_diff": grad_diff,
           "grad_rel_diff": grad_diff / max(grad_scale, 1e-30), "tolerance": tol}
    out["passed"] = (out["logprob_max_abs_diff"] <= tol and out["entropy_max_abs_diff"] <= tol
                     and out["grad_rel_diff"] <= tol and grad_scale > 0)
    return out


def _flash(p: Any, device: torch.device, rows: tuple[Tensor, ...]) -> dict[str, Any]:
    """The packed pass on flash-attention 2's varlen kernel (bf16), or the reason it cannot run here."""
    if device.type != "cuda":
        return {"passed": None, "skipped": "flash-attention needs a CUDA GPU (the dry run has none)"}
    if importlib.util.find_spec("flash_attn") is None:
        return {"passed": None, "skipped": "flash_attn is not installed: only SDPA was checked"}
    from prpo_lightning.training.packing import check_packing_support

    model = _model(p, device, torch.bfloat16, "flash_attention_2")
    check_packing_support(model)
    logp, _, _ = _pass(model, rows, packed=True, grads=False)
    changed = rows[2].clone()
    changed[0, 0] = (changed[0, 0] + 1) % p.vocab
    logp2, _, _ = _pass(model, (rows[0], rows[1], changed, rows[3]), packed=True, grads=False)
    sdpa = _model(p, device, torch.bfloat16, "sdpa")
    padded, _, _ = _pass(sdpa, rows, packed=False, grads=False)
    mask = rows[3].bool()
    return {"passed": bool(torch.equal(logp[1:], logp2[1:])) and not torch.equal(logp[0], logp2[0]),
            "other_rows_bit_identical": bool(torch.equal(logp[1:], logp2[1:])),
            "bf16_vs_padded_sdpa_mean_abs_diff": float((logp - padded)[mask].abs().mean()),
            "bf16_vs_padded_sdpa_max_abs_diff": float((logp - padded)[mask].abs().max())}


def _update(p: Any, device: torch.device, dtype: torch.dtype, name: str, rows: tuple[Tensor, ...]) -> dict[str, Any]:
    """One update pass (:meth:`PolicyUpdater.accumulate`) of configuration ``name``: seconds and peak memory."""
    from prpo_lightning.batch import RolloutBatch
    from prpo_lightning.config import LossConfig, OptimConfig
    from prpo_lightning.rollout.engine import EngineCapabilities
    from prpo_lightning.training.plan import RunNeeds, plan_passes
    from prpo_lightning.training.updater import PolicyUpdater

    opts = {k: (p.packing_budget if v == "budget" else v) for k, v in CONFIGS[name].items()}
    optim, loss = OptimConfig(micro_batch_size=p.packing_micro_batch, **opts), LossConfig()
    caps = EngineCapabilities(entropies=True, exact_trainer_distribution=True, needs_weight_sync=False)
    model = _model(p, device, dtype, "sdpa")
    p_ids, p_mask, c_ids, c_mask = (x.cpu() for x in rows)
    b = c_ids.shape[0]
    batch = RolloutBatch(p_ids, p_mask, c_ids, c_mask, torch.arange(b), ["q"] * b, ["a"] * b)
    batch.advantages = torch.linspace(-1, 1, c_ids.numel()).view_as(c_ids) * c_mask  # (B, T)
    updater = PolicyUpdater(model, loss, optim, plan_passes(RunNeeds(), caps, loss, optim), 1.0, c_ids.shape[1], 0,
                            PAD, backward=lambda x: x.backward(), clip_gradients=lambda *a, **k: None,
                            on_optimizer_step=lambda: None)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    stats = updater.accumulate(batch, torch.arange(b), device)
    sync(device)
    out = {"config": name, "seconds": round(time.perf_counter() - t0, 3),
           "peak_memory_gib": round(peak_memory_gib(device), 3), "loss": stats["loss"]}
    del model, updater
    return out


def packing(p: Any, device: torch.device, budget: Budget) -> dict[str, Any]:
    """The section: packed-vs-padded identity (SDPA fp32, flash-attention varlen), then the update pass's time and
    peak memory per configuration (bf16 on the GPU, fp32 in the dry run)."""
    checks: dict[str, Any] = {}
    model = _model(p, device, torch.float32, "sdpa")
    checks["fp32_packed_vs_padded_sdpa"] = _packed_vs_padded(
        model, _rows(p, p.packing_check_rows, p.packing_check_len, device), p.logprob_tol)
    del model
    flash_rows = _rows(p, p.packing_check_rows, p.packing_check_len, device)
    checks["flash_attention_2_packed"] = _flash(p, device, flash_rows)
    dtype = torch.float32 if p.dry_run else torch.bfloat16
    rows = _rows(p, p.packing_rows, p.packing_max_len, device)
    update: list[dict[str, Any]] = []
    for name in CONFIGS:
        if budget.remaining() < p.throughput_min_s:
            update.append({"config": name, "skipped": "section budget spent"})
            continue
        update.append(_update(p, device, dtype, name, rows))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    checks["update_pass_measured"] = {"passed": all("seconds" in u for u in update)}
    measured = {u["config"]: u for u in update if "seconds" in u}
    if "padded" in measured:
        for name, u in measured.items():
            u["time_vs_padded"] = round(u["seconds"] / measured["padded"]["seconds"], 3)
            u["memory_vs_padded"] = round(u["peak_memory_gib"] / max(measured["padded"]["peak_memory_gib"], 1e-9), 3)
    results = {"update_pass": update, "rows": p.packing_rows, "max_len": p.packing_max_len,
               "completion_tokens": int(rows[3].sum()), "padded_micro_batch_rows": p.packing_micro_batch,
               "micro_batch_tokens": p.packing_budget, "dtype": str(dtype).removeprefix("torch."),
               "memory": "peak allocated GPU memory of the pass" if device.type == "cuda" else
                         "the process's peak RSS so far (CPU dry run: not comparable between configurations)"}
    return {"results": results, "checks": checks}
