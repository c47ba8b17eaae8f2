"""Log-probs and entropies of completions under a causal LM, optionally sharing each prompt's KV cache.

Shapes: ``B`` completions, ``U`` distinct prompts, ``P`` padded prompt length (left padding), ``T`` padded
completion length (right padding), ``V`` vocabulary size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prpo_lightning.runtime.compat import cache_kwarg, output_cache
from prpo_lightning.rollout.decoding import entropy_of


def _position_ids(attention_mask: Tensor) -> Tensor:
    """``(B, L)`` positions that start at 0 on the first real token (left padding aware)."""
    pos = attention_mask.long().cumsum(dim=1) - 1  # (B, L)
    return pos.clamp(min=0)


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    share_prompts: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and optionally full-vocabulary entropies) of the completion tokens.

    The distribution at completion position t comes from the logits at sequence position ``P + t − 1``,
    divided by ``temperature`` (as the sampler did). Entropy in nats: ``H = −Σ_v p_v log p_v``
    (:func:`~prpo_lightning.rollout.decoding.entropy_of`, the same definition the samplers record).

    Args:
        model: causal LM (gradients flow if enabled by the caller).
        prompt_ids: ``(B, P)``; prompt_mask: ``(B, P)``.
        completion_ids: ``(B, T)``; completion_mask: ``(B, T)``.
        temperature: logits are divided by it.
        with_entropy: also return entropies.
        share_prompts: run each distinct prompt row once and let its completions attend to the shared KV cache
            (:func:`shared_prompt_logits`): the same log-probs and gradients, without recomputing a prompt for
            each of its G completions.
        entropy_grad: let gradients flow through the entropies (the entropy bonus ``loss.entropy_coef``); they are
            computed as ``log Z − Σ_v p_v z_v`` there, whose gradient is finite (``entr``'s is not at ``p = 0``).

    Returns:
        ``(logprobs, entropies)``: ``(B, T)`` float32 (0 on padding) and ``(B, T)`` float32 or None.
    """
    t = completion_ids.shape[1]
    attn = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)  # (B, P + T)
    logits = shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, attn) if share_prompts else None
    if logits is None:
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=_position_ids(attn), logits_to_keep=t + 1)
        logits = out.logits[:, :-1, :]  # (B, T, V)
    logits = logits.float() / temperature  # (B, T, V)
    log_z = torch.logsumexp(logits, dim=-1)  # (B, T)
    token_logits = torch.gather(logits, 2, completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    mask = completion_mask.to(logits.dtype)  # (B, T)
    logprobs = (token_logits - log_z) * mask  # (B, T)
    entropies = None
    if with_entropy and entropy_grad:  # H = log Z − Σ p·z, differentiable
        probs = torch.softmax(logits, dim=-1)  # (B, T, V)
        weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(logits)).sum(dim=-1)  # (B, T)
        entropies = (log_z - weighted) * mask  # (B, T)
    elif with_entropy:  # a statistic, never differentiated
        with torch.no_grad():
            entropies = entropy_of(logits.detach(), 1.0) * mask  # (B, T)
    return logprobs, entropies


def shared_prompt_logits(
    model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, attention_mask: Tensor
) -> Tensor | None:
    """The ``(B, T, V)`` next-token logits of the completion positions, computing each distinct prompt once.

    The ``U`` distinct ``(ids, mask)`` prompt rows run through the model with a KV cache; its rows are then
    indexed out to the ``B`` completions (``index`` is differentiable, so gradients from every completion reach
    the shared prompt activations and sum there), and the completions run on top of it. The logits equal the
    single ``(B, P + T)`` forward pass up to float rounding.

    Returns:
        the logits, or None when no prompt row repeats (nothing to share).

    Raises:
        RuntimeError: the model returned no KV cache (Hugging Face turns it off under gradient checkpointing).
    """
    b, p = prompt_ids.shape
    rows = torch.cat([prompt_ids, prompt_mask.long()], dim=1)  # (B, 2P)
    unique_rows, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (U, 2P), (B,)
    if unique_rows.shape[0] == b:
        return None
    u_ids, u_mask = unique_rows[:, :p], unique_rows[:, p:]  # (U, P) each
    out = model(input_ids=u_ids, attention_mask=u_mask, position_ids=_position_ids(u_mask), use_cache=True,
                logits_to_keep=1)
    cache = output_cache(out)
    if cache is None:
        raise RuntimeError(
            f"{type(model).__name__} returned no KV cache for the shared prompts (gradient checkpointing turns it "
            "off): set optim.share_prompt_prefix to false."
        )
    cache.batch_select_indices(inverse)  # every layer's K/V: (U, ...) -> (B, ...)
    positions = _position_ids(attention_mask)[:, p:]  # (B, T), as in the unshared pass
    cache_arg = {cache_kwarg(model): cache}  # "cache" (transformers >= 5.24) or "past_key_values"
    tail = model(input_ids=completion_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                 **cache_arg).logits  # (B, T, V)
    first = out.logits[:, -1][inverse]  # (B, V): the distribution of completion token 0
    return torch.cat([first[:, None], tail[:, :-1]], dim=1)  # (B, T, V)


@torch.no_grad()
def batched_logprobs(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float,
    micro_batch_size: int,
    with_entropy: bool,
    share_prompts: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """No-grad :func:`completion_logprobs` in micro-batches of ``micro_batch_size`` rows (eval mode)."""
    was_training = model.training
    model.eval()
    logps, ents = [], []
    for s in range(0, completion_ids.shape[0], micro_batch_size):
        sl = slice(s, s + micro_batch_size)
        lp, ent = completion_logprobs(
            model, prompt_ids[sl], prompt_mask[sl], completion_ids[sl], completion_mask[sl], temperature, with_entropy,
            share_prompts,
        )
        logps.append(lp)
        if ent is not None:
            ents.append(ent)
    if was_training:
        model.train()
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)
