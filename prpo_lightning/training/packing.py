"""Token-budget micro-batches and padding-free (packed) forward passes for long chains of thought.

Two options of ``model.optim`` change how the rows of a log-prob or update pass are grouped and laid out, never what
is computed (log-probs, losses and gradients equal the padded row-count passes up to float rounding):

- ``micro_batch_tokens`` (:func:`micro_batches`): the rows are sorted by length, longest first, and cut greedily into
  micro-batches of at most that many tokens (a row longer than the budget goes alone);
- ``packing`` (:func:`packed_completion_logits`): the real tokens of a micro-batch's rows are concatenated into one
  ``(1, S)`` sequence whose ``position_ids`` restart at 0 on every row. Transformers reads packed position ids (with no
  attention mask and no cache) as independent sequences: a block-diagonal causal mask for ``sdpa``, ``eager`` and
  ``flex_attention`` (``masking_utils.find_packed_sequence_indices``), varlen kernels for the flash-attention
  implementations (which also get the rows' ``cu_seq_lens`` directly). An ``sdpa`` model is switched to
  :data:`SDPA_VARLEN` (:func:`sdpa_varlen_attention`), which runs one causal SDPA call per row instead of the masked
  ``S × S`` attention, and is plain SDPA for every other pass.

Shapes: ``B`` rows, ``P`` padded prompt length (left padding), ``T`` padded completion length (right padding),
``S`` real tokens of a packed micro-batch, ``N`` completion tokens of it, ``V`` vocabulary size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: The attention implementation a packed pass switches an ``sdpa`` model to (:func:`sdpa_varlen_attention`).
SDPA_VARLEN = "prpo_sdpa_varlen"

#: Attention implementations of the pinned transformers that keep packed rows apart (see the module docstring).
PACKING_ATTENTION: tuple[str, ...] = (
    "sdpa", SDPA_VARLEN, "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4",
)


def sdpa_varlen_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' SDPA attention, run row by row on a packed sequence (a varlen kernel in plain PyTorch).

    With the ``cu_seq_lens_q`` that :func:`packed_completion_logits` passes (and no sliding window), each packed row
    ``[cu[i], cu[i+1])`` gets its own causal SDPA call, so the attention costs ``Σ_i L_i²`` instead of the ``S²`` of
    the block-diagonal mask; everything else (generation, padded passes) is transformers' ``sdpa_attention_forward``
    unchanged.

    Args:
        module: the attention layer.
        query: ``(1, H, S, D)``; key, value: ``(1, H_kv, S, D)``.
        attention_mask: the mask transformers built (block-diagonal for a packed pass; unused there).

    Returns:
        ``((1, S, H, D) attention output, None)``, as ``sdpa_attention_forward``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or kwargs.get("sliding_window") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rest = {k: v for k, v in kwargs.items() if k not in ("is_causal", "cu_seq_lens_q", "cu_seq_lens_k")}
    bounds = cu.tolist()
    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, is_causal=True,
                                   **rest)[0] for s, e in zip(bounds[:-1], bounds[1:])]  # (1, L_i, H, D) each
    return torch.cat(outs, dim=1), None  # (1, S, H, D)


def use_varlen_sdpa(model: torch.nn.Module) -> None:
    """Switch an ``sdpa`` model to :data:`SDPA_VARLEN` (registered with transformers on first use); idempotent.

    Only packed passes behave differently (row-by-row attention); the numbers of every other forward are unchanged.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
    AttentionMaskInterface.register(SDPA_VARLEN, sdpa_mask)
    config._attn_implementation = SDPA_VARLEN


def row_lengths(prompt_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """``(B,)`` real tokens of each row: its prompt tokens plus its completion tokens."""
    return prompt_mask.long().sum(dim=1) + completion_mask.long().sum(dim=1)  # (B,)


def micro_batches(lengths: Tensor, rows: int, tokens: int | None = None, packed: bool = False) -> list[Tensor]:
    """Split ``B`` rows into micro-batches: ``rows`` at a time, or by a token budget.

    Without a budget the micro-batches are ``arange(B).split(rows)`` (the row-count passes). With one, the rows are
    sorted by length, longest first (ties in row order), and each micro-batch takes rows while its cost stays within
    ``tokens``: the sum of the rows' lengths when ``packed`` (what a padding-free pass computes), else the number of
    rows times the longest row (the padded ``(b, L)`` input). A row longer than the budget goes alone; ``rows`` does
    not cap a budgeted micro-batch.

    Args:
        lengths: ``(B,)`` real tokens of each row (:func:`row_lengths`).
        rows: rows per micro-batch without a budget (``optim.micro_batch_size``).
        tokens: the budget (``optim.micro_batch_tokens``), or None.
        packed: the passes are padding-free (``optim.packing``).

    Returns:
        ``(b_k,)`` row indices of each micro-batch; together a permutation of ``arange(B)``.
    """
    n = int(lengths.shape[0])
    if tokens is None:
        return list(torch.arange(n).split(rows))
    order = torch.sort(lengths.cpu(), descending=True, stable=True).indices  # (B,)
    sizes = lengths.cpu()[order].tolist()
    pieces: list[list[int]] = []
    current: list[int] = []
    total = longest = 0
    for row, size in zip(order.tolist(), sizes):
        cost = (total + size) if packed else (len(current) + 1) * max(longest, size)
        if current and cost > tokens:
            pieces.append(current)
            current, total, longest = [], 0, 0
        current.append(row)
        total, longest = total + size, max(longest, size)
    if current:
        pieces.append(current)
    return [torch.tensor(p, dtype=torch.long) for p in pieces]


def trim_padding(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                 completion_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Drop the prompt columns that are padding in every row (left) and the completion columns likewise (right).

    Positions count real tokens only, so the log-probs are unchanged (up to float rounding); the completion keeps at
    least one column.

    Returns:
        ``(prompt_ids, prompt_mask, completion_ids, completion_mask)``: ``(b, p)``, ``(b, p)``, ``(b, t)``, ``(b, t)``.
    """
    used = prompt_mask.bool().any(dim=0).nonzero()  # (k, 1) prompt columns with a token
    first = int(used[0]) if used.numel() else prompt_mask.shape[1]
    t = int(completion_mask.long().sum(dim=1).max().clamp(min=1)) if completion_mask.numel() else 1
    return prompt_ids[:, first:], prompt_mask[:, first:], completion_ids[:, :t], completion_mask[:, :t]


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The ``_attn_implementation`` of a Hugging Face model (PEFT-wrapped too), or None when it has no config."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def check_packing_support(model: torch.nn.Module) -> None:
    """Refuse ``optim.packing`` for a model whose attention would let packed rows attend to each other.

    Raises:
        ValueError: naming ``model.optim.packing`` and the attention implementation, with the fix.
    """
    impl = attention_implementation(model)
    if impl not in PACKING_ATTENTION:
        raise ValueError(
            f"model.optim.packing: true needs an attention implementation that keeps packed rows apart "
            f"({', '.join(PACKING_ATTENTION)}); {type(model).__name__} uses {impl!r}, with which the rows of a packed "
            "micro-batch would attend to each other. Load the policy with one of those (e.g. attn_implementation="
            "'sdpa'), or set model.optim.packing: false."
        )


def packed_completion_logits(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                             completion_mask: Tensor) -> Tensor:
    """The next-token logits of every completion token, from one padding-free pass over the rows' real tokens.

    The real tokens of each row (prompt, then completion) are concatenated, row after row, into one ``(1, S)``
    sequence with per-row ``position_ids`` ``0 … len − 1`` (the positions of the padded pass, which counts real tokens
    only); no attention mask and no cache are passed, so transformers keeps the rows apart. Only the ``N`` positions
    that predict a completion token go through the LM head (``logits_to_keep`` as an index tensor).

    Args:
        model: causal LM (gradients flow if enabled by the caller).
        prompt_ids: ``(B, P)``; prompt_mask: ``(B, P)``.
        completion_ids: ``(B, T)``; completion_mask: ``(B, T)``, ones then zeros in every row.

    Returns:
        ``(N, V)`` logits, in the row-major order of ``completion_mask``'s ones.

    Raises:
        ValueError: a completion mask with a gap, or a row with completion tokens but no prompt token.
    """
    p = prompt_ids.shape[1]
    c_mask = completion_mask.bool()  # (B, T)
    if bool((c_mask[:, 1:] & ~c_mask[:, :-1]).any()):
        raise ValueError("packed log-probs need right-padded completions (a completion mask of ones then zeros)")
    if bool((c_mask.any(dim=1) & ~prompt_mask.bool().any(dim=1)).any()):
        raise ValueError("packed log-probs need at least one prompt token in every row with a completion")
    has_completion = c_mask.any(dim=1)  # (B,) rows without completion tokens need no pass (unless none has one)
    rows = has_completion if bool(has_completion.any()) else torch.ones_like(has_completion)
    attn = torch.cat([prompt_mask.bool() & rows[:, None], c_mask], dim=1)  # (B, P + T)
    ids = torch.cat([prompt_ids, completion_ids], dim=1)[attn]  # (S,)
    positions = (attn.long().cumsum(dim=1) - 1)[attn]  # (S,) restart at 0 on every row
    packed_index = attn.flatten().long().cumsum(dim=0).view_as(attn) - 1  # (B, P + T) index in the packed sequence
    keep = packed_index[:, p:][c_mask] - 1  # (N,) the token before each completion token predicts it
    lengths = attn.long().sum(dim=1)  # (B,) tokens of each row in the packed sequence
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(dim=0)]).to(torch.int32)  # (B + 1,) row boundaries
    cu = torch.unique_consecutive(cu)  # rows without tokens left out
    longest = int(lengths.max())
    use_varlen_sdpa(model)
    out = model(input_ids=ids[None], position_ids=positions[None], use_cache=False, logits_to_keep=keep,
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return out.logits[0]  # (N, V)


__all__ = [
    "PACKING_ATTENTION", "SDPA_VARLEN", "attention_implementation", "check_packing_support", "micro_batches",
    "packed_completion_logits", "row_lengths", "sdpa_varlen_attention", "trim_padding", "use_varlen_sdpa",
]
