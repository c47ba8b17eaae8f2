"""Sampling completions with HF ``generate`` or :class:`~prpo_lightning.rollout.decoding.StaticCacheDecoder`.

Log-probs of sampled completions are in :mod:`prpo_lightning.training.logprobs`.

Shapes: ``B`` completions, ``P`` padded prompt length (left padding), ``T`` padded completion length
(right padding), ``V`` vocabulary size.
"""

from __future__ import annotations

import weakref

from typing import Any, Literal, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from prpo_lightning.config import SamplingConfig
from prpo_lightning.rollout.decoding import StaticCacheDecoder, entropy_of, unsupported_reason

Sampler = Literal["auto", "hf", "static"]


_ENGINE_LOGGED: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()


def resolve_sampler(model: torch.nn.Module, sampler: Sampler, synced_gpus: bool) -> str:
    """The sampler ``generate_completions`` uses: ``"static"`` or ``"hf"``.

    ``hf``: Hugging Face ``generate``. ``static``: :class:`~prpo_lightning.rollout.decoding.StaticCacheDecoder`
    (raises for a model it cannot run). ``auto``: ``static`` when the model is supported and ranks need not run in
    lock-step, else ``hf``; the choice, and the reason for a fallback, are announced once per model.

    Raises:
        ValueError: ``sampler`` is ``static`` and the model is not supported, or ranks must run in lock-step.
    """
    if sampler == "hf":
        return "hf"
    reason = "ranks generate in lock-step (synced_gpus, ZeRO-3)" if synced_gpus else unsupported_reason(model)
    if sampler == "static":
        if reason is not None:
            raise ValueError(f"the static-cache sampler (components.engines.StaticCacheEngine) cannot run here: "
                             f"{reason}. Use model.engine: components.engines.HFGenerateEngine or AutoEngine.")
        return "static"
    choice = "static" if reason is None else "hf"
    said = _ENGINE_LOGGED.setdefault(model, set())  # weakly keyed: a new model at a freed model's address is new
    if choice not in said:
        said.add(choice)
        why = "" if reason is None else f" ({reason})"
        rank_zero_info(f"[prpo] AutoEngine: sampling {type(model).__name__} with {choice!r}{why}")
    return choice


def tokenize_prompts(tokenizer: Any, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Tokenize prompts (no special tokens added) with **left** padding.

    Returns:
        ``(ids, mask)``, each ``(N, P)``.
    """
    return left_pad(tokenizer(texts, add_special_tokens=False)["input_ids"], pad_token_id(tokenizer), device)


def left_pad(token_ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-pad already tokenized prompts.

    Returns:
        ``(ids, mask)``, each ``(N, P)`` with ``P`` the longest prompt.
    """
    p = max((len(t) for t in token_ids), default=0)
    ids = torch.full((len(token_ids), p), pad_id, dtype=torch.long)  # (N, P)
    mask = torch.zeros((len(token_ids), p), dtype=torch.long)  # (N, P)
    for i, t in enumerate(token_ids):
        if t:
            ids[i, p - len(t) :] = torch.tensor(t, dtype=torch.long)
            mask[i, p - len(t) :] = 1
    return ids.to(device), mask.to(device)


def pad_token_id(tokenizer: Any) -> int:
    """The id used to pad prompts and completions: the tokenizer's pad token, else its EOS token.

    Raises:
        ValueError: if the tokenizer has neither (set ``tokenizer.pad_token``).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token: set one")
    return int(pad)


class EntropyRecorder:
    """A ``generate`` logits processor that records the full-vocabulary entropy of every row at every step.

    Hugging Face applies custom logits processors before its temperature/top-k/top-p warpers, so ``scores``
    are the model's raw next-token logits: the recorded value is ``H(softmax(logits / T))`` in nats, the same
    quantity :func:`~prpo_lightning.training.logprobs.completion_logprobs` computes with a separate forward pass, obtained
    here for free.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.steps: list[Tensor] = []

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.steps.append(entropy_of(scores.detach().float(), self.temperature))  # (b,)
        return scores

    def entropies(self) -> Tensor:
        """``(b, T_b)`` entropies of the recorded steps."""
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(0, 0)


class Completions(NamedTuple):
    """What :func:`generate_completions` and :func:`generate_groups` return: ``ids`` ``(B, T)`` long completion
    ids with PAD after EOS; ``mask`` ``(B, T)`` bool, True up to and including the first EOS; ``truncated``
    ``(B,)`` bool, True when no EOS came within ``max_new_tokens``; ``entropies`` ``(B, T)`` float32 entropies of
    the sampling distributions (0 on padding) when ``record_entropies`` was set, else None."""

    ids: Tensor  # (B, T)
    mask: Tensor  # (B, T)
    truncated: Tensor  # (B,)
    entropies: Tensor | None = None  # (B, T) | None


def generate_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampling: SamplingConfig,
    greedy: bool = False,
    synced_gpus: bool = False,
    record_entropies: bool = False,
    sampler: Sampler = "auto",
) -> Completions:
    """Sample one completion per prompt row (repeat rows beforehand for G rollouts).

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer (EOS and PAD ids are read from it).
        prompt_ids: ``(B, P)`` left-padded prompt ids.
        prompt_mask: ``(B, P)`` prompt attention mask.
        sampling: sampling settings.
        greedy: decode greedily instead of sampling (evaluation).
        synced_gpus: keep all ranks in lock-step (needed under DeepSpeed ZeRO-3).
        record_entropies: also return the ``(B, T)`` entropies of the sampling distributions
            (:class:`EntropyRecorder`, or the static decoder's own), recorded while sampling.
        sampler: ``auto``, ``hf`` or ``static`` (:func:`resolve_sampler`).

    Returns:
        :class:`Completions` (ids, mask, truncated, entropies).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    eos_id = tokenizer.eos_token_id
    pad_id = pad_token_id(tokenizer)
    engine = resolve_sampler(model, sampler, synced_gpus)
    gen_cfg = GenerationConfig(
        do_sample=not greedy,
        temperature=sampling.temperature if not greedy else None,
        top_p=sampling.top_p if not greedy else None,
        top_k=sampling.top_k if not greedy else None,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    was_training = model.training
    model.eval()
    chunk = sampling.generation_batch_size or prompt_ids.shape[0]
    decoder = StaticCacheDecoder(model) if engine == "static" else None
    pieces, piece_entropies = [], []
    for start in range(0, prompt_ids.shape[0], chunk):
        ids = prompt_ids[start : start + chunk]  # (b, P)
        mask = prompt_mask[start : start + chunk]  # (b, P)
        if decoder is not None:
            out, ent = decoder.generate(
                ids, mask, sampling.max_new_tokens, eos_id, pad_id, greedy=greedy,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                record_entropies=record_entropies,
            )  # (b, T_b), (b, T_b) | None
            pieces.append(out)
            piece_entropies.append(ent)
            continue
        recorder = EntropyRecorder(sampling.temperature) if record_entropies else None
        out = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=gen_cfg, synced_gpus=synced_gpus,
            logits_processor=LogitsProcessorList([recorder]) if recorder is not None else None,
        )  # (b, P + T_b)
        pieces.append(out[:, ids.shape[1] :])  # (b, T_b)
        piece_entropies.append(recorder.entropies() if recorder is not None else None)
    if was_training:
        model.train()
    t = max(p.shape[1] for p in pieces)
    completion = torch.full((prompt_ids.shape[0], max(t, 1)), pad_id, dtype=torch.long, device=prompt_ids.device)
    row = 0
    for p in pieces:
        completion[row : row + p.shape[0], : p.shape[1]] = p
        row += p.shape[0]
    is_eos = completion == eos_id  # (B, T)
    has_eos = is_eos.any(dim=1)  # (B,)
    first_eos = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, t, dtype=torch.long))
    positions = torch.arange(completion.shape[1], device=completion.device)[None, :]  # (1, T)
    mask = positions <= first_eos[:, None]  # (B, T): up to and including EOS
    if t == 0:
        mask = torch.zeros_like(completion, dtype=torch.bool)
    completion = torch.where(mask, completion, torch.full_like(completion, pad_id))
    lengths = mask.sum(dim=1)  # (B,)
    truncated = ~has_eos & (lengths >= sampling.max_new_tokens)
    if not record_entropies:
        return Completions(completion, mask, truncated)
    ent = torch.zeros(completion.shape, dtype=torch.float32, device=completion.device)  # (B, T)
    row = 0
    for p, e in zip(pieces, piece_entropies):
        e = e.to(ent.device)  # (b, T_b)
        ent[row : row + p.shape[0], : min(e.shape[1], p.shape[1])] = e[:, : p.shape[1]]
        row += p.shape[0]
    return Completions(completion, mask, truncated, ent * mask)


def generate_groups(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[Tensor],
    num_generations: int,
    sampling: SamplingConfig,
    seeds: list[int] | None = None,
    greedy: bool = False,
    synced_gpus: bool = False,
    lockstep_calls: int = 0,
    record_entropies: bool = False,
    sampler: Sampler = "auto",
) -> Completions:
    """Sample the G completions of each prompt group in its own ``generate`` call(s), seeded per group.

    The RNG of group ``j`` is reset to ``seeds[j]`` (inside :func:`torch.random.fork_rng`, so the caller's RNG
    streams are untouched) and the group's prompt is generated without padding. A group's completions then
    depend only on the weights, its prompt and its seed, not on the other prompts of the batch, on the rank
    that drew it or on the number of ranks.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        prompts: one ``(P_j,)`` unpadded prompt-id tensor per group.
        num_generations: G, completions per prompt.
        sampling: sampling settings (``generation_batch_size`` splits a group into several calls).
        seeds: one seed per group (None: the current RNG state is used).
        greedy: greedy decoding.
        synced_gpus: keep ranks in lock-step inside ``generate`` (DeepSpeed ZeRO-3).
        record_entropies: also return the ``(N·G, T)`` entropies of the sampling distributions (see
            :func:`generate_completions`).
        lockstep_calls: extra throw-away ``generate`` calls on a one-token prompt, so that every rank makes the
            same number of calls under ZeRO-3 (ranks that skipped prompts make up the difference).
        sampler: ``auto``, ``hf`` or ``static`` (:func:`resolve_sampler`).

    Returns:
        :class:`Completions` of ``N·G`` rows; rows ``j·G … j·G + G − 1`` belong to group ``j``.
    """
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    outs: list[Completions] = []
    for j, prompt in enumerate(prompts):
        ids = prompt.to(device)[None, :].repeat(num_generations, 1)  # (G, P_j)
        with torch.random.fork_rng(devices=devices):
            if seeds is not None:
                torch.manual_seed(seeds[j])
            outs.append(generate_completions(
                model, tokenizer, ids, torch.ones_like(ids), sampling, greedy, synced_gpus, record_entropies, sampler
            ))
    dummy = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    for _ in range(lockstep_calls):
        generate_completions(model, tokenizer, dummy, torch.ones_like(dummy), sampling, greedy, synced_gpus,
                             sampler=sampler)
    if not outs:
        empty = torch.zeros(0, 1, dtype=torch.long, device=device)
        no_ent = torch.zeros(0, 1, dtype=torch.float32, device=device) if record_entropies else None
        return Completions(empty, empty.bool(), torch.zeros(0, dtype=torch.bool, device=device), no_ent)
    t = max(c.ids.shape[1] for c in outs)
    comp = torch.cat([torch.nn.functional.pad(c.ids, (0, t - c.ids.shape[1]), value=pad_id) for c in outs])  # (B, T)
    mask = torch.cat([torch.nn.functional.pad(c.mask, (0, t - c.mask.shape[1]), value=False) for c in outs])  # (B, T)
    truncated = torch.cat([c.truncated for c in outs])  # (B,)
    if not record_entropies:
        return Completions(comp, mask, truncated)
    ent = torch.cat([torch.nn.functional.pad(c.entropies, (0, t - c.entropies.shape[1])) for c in outs])  # (B, T)
    return Completions(comp, mask, truncated, ent)
