"""Log-probs and entropies of completions under a causal LM, optionally sharing each prompt's KV cache.

Shapes: ``B`` completions, ``U`` distinct prompts, ``P`` padded prompt length (left padding), ``T`` padded
completion length (right padding), ``V`` vocabulary size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prpo_lightning.runtime.compat import cache_kwarg, output_cache
from prpo_lightning.rollout.decoding import entropy_of
from prpo_lightning.training.packing import micro_batches, packed_completion_logits, row_lengths, trim_padding


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
    packed: bool = False,
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
        packed: one padding-free pass over the rows' real tokens
            (:func:`~prpo_lightning.training.packing.packed_completion_logits`, ``optim.packing``); the same values up
            to float rounding, computed only for the completion tokens. Not combined with ``share_prompts``.

    Returns:
        ``(logprobs, entropies)``: ``(B, T)`` float32 (0 on padding) and ``(B, T)`` float32 or None.
    """
    if packed:
        if share_prompts:
            raise ValueError("packed log-probs cannot share prompt prefixes: set model.optim.share_prompt_prefix: "
                             "false with model.optim.packing: true")
        c_mask = completion_mask.bool()  # (B, T)
        flat = packed_completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)  # (N, V)
        logp, ent = _token_stats(flat, completion_ids[c_mask], temperature, with_entropy, entropy_grad)  # (N,) each
        zeros = torch.zeros(c_mask.shape, dtype=logp.dtype, device=logp.device)  # (B, T)
        return zeros.masked_scatter(c_mask, logp), (zeros.masked_scatter(c_mask, ent) if ent is not None else None)
    t = completion_ids.shape[1]
    attn = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)  # (B, P + T)
    logits = shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, attn) if share_prompts else None
    if logits is None:
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=_position_ids(attn), logits_to_keep=t + 1)
        logits = out.logits[:, :-1, :]  # (B, T, V)
    mask = completion_mask.to(torch.float32)  # (B, T)
    logprobs, entropies = _token_stats(logits, completion_ids, temperature, with_entropy, entropy_grad)  # (B, T) each
    return logprobs * mask, (entropies * mask if entropies is not None else None)


def _token_stats(logits: Tensor, ids: Tensor, temperature: float, with_entropy: bool,
                 entropy_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Log-prob of ``ids`` and entropy under ``logits / temperature``, unmasked, for any leading shape ``(...)``.

    Args:
        logits: ``(..., V)`` next-token logits.
        ids: ``(...)`` the tokens whose log-probs are taken.
        temperature: divides the logits.
        with_entropy: also return the entropies.
        entropy_grad: compute the entropies as ``log Z − Σ p·z`` (differentiable) instead of under ``no_grad``.

    Returns:
        ``(logprobs, entropies)``: ``(...)`` float32 and ``(...)`` float32 or None.
    """
    logits = logits.float() / temperature  # (..., V)
    log_z = torch.logsumexp(logits, dim=-1)  # (...)
    token_logits = torch.gather(logits, -1, ids.unsqueeze(-1)).squeeze(-1)  # (...)
    logprobs = token_logits - log_z  # (...)
    entropies = None
    if with_entropy and entropy_grad:  # H = log Z − Σ p·z, differentiable
        probs = torch.softmax(logits, dim=-1)  # (..., V)
        weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(logits)).sum(dim=-1)  # (...)
        entropies = log_z - weighted  # (...)
    elif with_entropy:  # a statistic, never differentiated
        with torch.no_grad():
            entropies = entropy_of(logits.detach(), 1.0)  # (...)
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
    micro_batch_tokens: int | None = None,
    packing: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """No-grad :func:`completion_logprobs` in micro-batches of ``micro_batch_size`` rows (eval mode).

    With ``micro_batch_tokens`` the micro-batches are cut by that token budget instead
    (:func:`~prpo_lightning.training.packing.micro_batches`) and each is trimmed of the columns that are padding in
    all its rows; with ``packing`` every micro-batch is one padding-free pass. Either way the ``(B, T)`` results are
    in the rows' order and equal the row-count passes up to float rounding.
    """
    was_training = model.training
    model.eval()
    if micro_batch_tokens is not None or packing:
        out = _regrouped_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                  micro_batch_size, with_entropy, share_prompts, micro_batch_tokens, packing)
        if was_training:
            model.train()
        return out
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


def _regrouped_logprobs(
    model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
    temperature: float, micro_batch_size: int, with_entropy: bool, share_prompts: bool, micro_batch_tokens: int | None,
    packing: bool,
) -> tuple[Tensor, Tensor | None]:
    """:func:`batched_logprobs` over token-budget and/or packed micro-batches, scattered back to ``(B, T)``."""
    b, t = completion_ids.shape
    logps = torch.zeros(b, t, dtype=torch.float32, device=completion_ids.device)  # (B, T)
    ents = torch.zeros_like(logps) if with_entropy else None  # (B, T)
    lengths = row_lengths(prompt_mask, completion_mask)  # (B,)
    for rows in micro_batches(lengths, micro_batch_size, micro_batch_tokens, packing):
        rows = rows.to(completion_ids.device)
        p_ids, p_mask, c_ids, c_mask = trim_padding(prompt_ids[rows], prompt_mask[rows], completion_ids[rows],
                                                    completion_mask[rows])  # (b, p), (b, p), (b, t'), (b, t')
        lp, ent = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, temperature, with_entropy, share_prompts,
                                      packed=packing)  # (b, t'), (b, t') | None
        logps[rows, : lp.shape[1]] = lp
        if ents is not None:
            ents[rows, : ent.shape[1]] = ent
    return logps, ents
