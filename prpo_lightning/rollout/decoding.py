"""A lean static-KV-cache decoder for Llama-family causal LMs (Qwen2, Qwen3, Llama, Mistral).

Hugging Face ``generate`` spends much of a rollout outside the matrix products: a dynamic cache that grows by
concatenation, mask construction and a dozen module calls per layer and token. For the decoder-only
architectures RL post-training uses most, :class:`StaticCacheDecoder` runs the same computation as a plain loop
over the model's own parameters (read at every call, so it always samples from the current policy; on the CPU
each call multiplies by a contiguous transposed copy, which makes the small decode GEMMs ~25% faster):

* the KV cache is allocated once for ``P + T`` positions;
* identical prompt rows (the G copies of a prompt group) are prefilled once and their cache rows shared;
* decode attention is one grouped matrix product per layer, without repeating K/V heads;
* rows that produced EOS leave the cache (once a quarter of it has finished), so later steps compute only the rows
  still running;
* sampling repeats Hugging Face's steps exactly (suppressed tokens, temperature, top-k, top-p, ``multinomial``)
  on every row, finished ones included, so with equal logits the same RNG state draws the same tokens.

Shapes: ``B`` rows, ``U`` unique prompts, ``P`` padded prompt length, ``S = P + T`` cache length, ``D`` hidden
size, ``H``/``K`` query/KV heads, ``R = H / K`` queries per KV head, ``E`` head size, ``V`` vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
_NORM_CLASSES = ("Qwen2RMSNorm", "Qwen3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# generation-config fields that make HF ``generate`` add a logits processor this decoder does not implement,
# with the value that leaves it off
_UNSUPPORTED_GENERATION_FIELDS = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "renormalize_logits": False, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "typical_p": 1.0,
    "min_p": None, "exponential_decay_length_penalty": None, "watermarking_config": None, "num_beams": 1,
}


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def unsupported_reason(model: Any) -> str | None:
    """Why :class:`StaticCacheDecoder` cannot run ``model`` exactly, or None when it can.

    The decoder reads the parameters of plain ``torch.nn.Linear``/``Embedding`` modules, so anything that changes
    a module's forward (LoRA/PEFT wrappers, quantized linears, DeepSpeed ZeRO-3 or accelerate hooks) or a logits
    processor it does not implement would be silently ignored; such models are refused instead.
    """
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not 'silu'"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or type(getattr(model, "lm_head", None)) is not torch.nn.Linear:
        return f"{type(model).__name__} is not a plain <Arch>ForCausalLM (wrapped or quantized model)"
    if type(base.embed_tokens) is not torch.nn.Embedding or type(base.norm).__name__ not in _NORM_CLASSES:
        return "the embedding or final norm is not a plain module"
    rope_type = getattr(base.rotary_emb, "rope_type", "default")
    if rope_type not in _STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} changes with the sequence length"
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(lin) is not torch.nn.Linear for lin in linears):
            return "a projection is not a plain torch.nn.Linear (LoRA, quantization or another wrapper)"
        norms = [layer.input_layernorm, layer.post_attention_layernorm] + [
            getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)
        ]
        if any(type(n).__name__ not in _NORM_CLASSES for n in norms):
            return "a norm is not a plain RMSNorm"
    if _has_hooks(model) or torch.nn.modules.module._global_forward_hooks:
        return "forward hooks are registered (DeepSpeed ZeRO-3, accelerate offloading or user hooks)"
    gen = getattr(model, "generation_config", None)
    for field, off in _UNSUPPORTED_GENERATION_FIELDS.items():
        value = getattr(gen, field, off)
        if value is not None and value != off:
            return f"model.generation_config.{field} = {value!r} needs a logits processor this decoder lacks"
    return None


def _rms_norm(x: Tensor, norm: torch.nn.Module) -> Tensor:
    """Hugging Face's RMSNorm (normalise in float32, cast back, scale) with one fused kernel."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``(..., L, E)`` with ``cos``/``sin`` broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def sample_next(
    logits: Tensor, greedy: bool, temperature: float, top_p: float, top_k: int, suppress: Tensor | None
) -> Tensor:
    """One sampling step, in Hugging Face ``generate``'s order (suppression, temperature, top-k, top-p).

    Args:
        logits: ``(B, V)`` float32 next-token logits.
        greedy: argmax instead of sampling.
        temperature: divides the logits (1.0: off).
        top_p: nucleus threshold (1.0: off).
        top_k: keep the k largest logits (0: off).
        suppress: ``(n,)`` token ids that are never produced, or None.

    Returns:
        ``(B,)`` long token ids.
    """
    scores = logits
    if suppress is not None:
        scores = scores.index_fill(1, suppress, float("-inf"))  # (B, V)
    if greedy:
        return scores.argmax(dim=-1)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)  # (B, V)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = F.softmax(scores, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def entropy_of(logits: Tensor, temperature: float) -> Tensor:
    """``(...)`` entropy in nats of ``softmax(logits / temperature)`` for ``(..., V)`` float32 logits (``-inf``
    logits, e.g. suppressed tokens, have probability 0 and contribute 0)."""
    probs = torch.softmax(logits / temperature, dim=-1)  # (..., V)
    return torch.special.entr(probs).sum(dim=-1)  # (...): Σ −p log p, with 0 log 0 = 0


class StaticCacheDecoder:
    """Sample from a Llama-family causal LM with a preallocated KV cache (see the module docstring).

    Args:
        model: a Qwen2/Qwen3/Llama/Mistral ``...ForCausalLM`` with plain modules.

    Raises:
        ValueError: the model is not supported (the message names the reason; use ``model.engine: components.engines.HFGenerateEngine``).
    """

    def __init__(self, model: Any) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(
                f"StaticCacheDecoder cannot run {type(model).__name__}: {reason}. Use model.engine: components.engines.HFGenerateEngine "
                "(Hugging Face generate) or 'auto' (picks 'hf' for such models)."
            )
        self.model = model
        self.base = model.model
        cfg = model.config
        attn = self.base.layers[0].self_attn
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        layer_types = getattr(cfg, "layer_types", None)  # Qwen2/Qwen3: per layer; Mistral: the config's window
        windowed = layer_types is None or "sliding_attention" in layer_types
        self.sliding_window = getattr(cfg, "sliding_window", None) if windowed else None

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
        greedy: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        record_entropies: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Sample up to ``max_new_tokens`` tokens per row; stops early once every row has produced EOS.

        Args:
            prompt_ids: ``(B, P)`` left-padded prompt ids.
            prompt_mask: ``(B, P)`` prompt attention mask.
            max_new_tokens: T, the completion budget.
            eos_id: end-of-sequence id (a row that produced it is finished).
            pad_id: id written after a row's EOS.
            greedy: argmax decoding.
            temperature: sampling temperature (also the entropies' temperature).
            top_p: nucleus threshold.
            top_k: top-k (0: off).
            record_entropies: also return the entropies of the model's distributions ``softmax(logits / T)``.

        Returns:
            ``(tokens, entropies)``: ``(B, T_out)`` long ids (``T_out <= T``; PAD after EOS) and ``(B, T_out)``
            float32 entropies or None (meaningless after a row's EOS: mask them).

        Raises:
            ValueError: the prompt plus budget exceed the sliding-attention window.
        """
        b, p = prompt_ids.shape
        s = p + max_new_tokens
        if self.sliding_window is not None and s > self.sliding_window:
            raise ValueError(
                f"prompt + completion ({s} tokens) exceed the model's sliding window ({self.sliding_window}); "
                "StaticCacheDecoder only computes full attention: use model.engine: components.engines.HFGenerateEngine."
            )
        self._packed = self._pack_weights(prompt_ids.device)
        try:
            return self._generate(prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, greedy, temperature, top_p,
                                  top_k, record_entropies)
        finally:
            self._packed = {}

    def _pack_weights(self, device: torch.device) -> dict[int, tuple[Tensor, Tensor | None]]:
        """``(in, out)`` weights and the bias of every projection, keyed by module id. On the CPU the transposed
        weights are copied once per call (a contiguous ``(in, out)`` operand makes the small decode GEMMs ~25%
        faster there); on accelerators they are views."""
        linears = [self.model.lm_head]
        for layer in self.base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        copy = device.type == "cpu"
        return {id(lin): (lin.weight.t().contiguous() if copy else lin.weight.t(), lin.bias) for lin in linears}

    def _lin(self, x: Tensor, linear: torch.nn.Module) -> Tensor:
        """``linear(x)`` for ``(..., in)`` inputs with the packed weight."""
        w_t, bias = self._packed[id(linear)]
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        out = torch.addmm(bias, flat, w_t) if bias is not None else torch.mm(flat, w_t)  # (N, out)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int, eos_id: int, pad_id: int, greedy: bool,
        temperature: float, top_p: float, top_k: int, record_entropies: bool,
    ) -> tuple[Tensor, Tensor | None]:
        b, p = prompt_ids.shape
        dev = prompt_ids.device
        valid = torch.zeros(b, p + max_new_tokens, dtype=torch.bool, device=dev)  # (B, S) keys that may be attended
        valid[:, :p] = prompt_mask.bool()
        n_real = prompt_mask.long().sum(dim=1)  # (B,) real prompt tokens = position of the first new token
        positions = torch.arange(p + max_new_tokens, device=dev)[None, :]  # (1, S)
        cos, sin = self.base.rotary_emb(self.base.embed_tokens.weight[:1][None], positions)  # (1, S, E) each
        cos, sin = cos[0], sin[0]  # (S, E)
        caches = self._prefill(prompt_ids, prompt_mask, cos, sin, p + max_new_tokens)
        logits = caches.pop()  # (B, V) next-token logits after the prompt
        suppress_ids = getattr(self.model.generation_config, "suppress_tokens", None)
        suppress = torch.tensor(suppress_ids, dtype=torch.long, device=dev) if suppress_ids else None
        finished = torch.zeros(b, dtype=torch.bool, device=dev)  # (B,)
        rows = torch.arange(b, device=dev)  # (A,) the batch rows the cache still holds
        tokens, entropies = [], []
        for t in range(max_new_tokens):
            if record_entropies:
                entropies.append(entropy_of(logits, temperature))  # (B,)
            # every row is sampled, finished ones too, so the RNG advances exactly as in HF generate
            nxt = sample_next(logits, greedy, temperature, top_p, top_k, suppress)  # (B,)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)  # (B,)
            tokens.append(nxt)
            finished = finished | (nxt == eos_id)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            done = finished[rows]  # (A,)
            if int(done.sum()) * 4 >= rows.numel():  # a quarter of the cached rows finished: drop them
                rows, caches = rows[~done], [c[~done] for c in caches]
            valid[:, p + t] = True
            full = rows.numel() == b  # nothing dropped yet: skip the gathers
            tok, first_pos, keys = (nxt, n_real, valid) if full else (nxt[rows], n_real[rows], valid[rows])  # (A, ...)
            pos = first_pos + t  # (A,) position of the token just sampled
            step_logits = self._decode_step(tok, cos[pos], sin[pos], caches, keys[:, : p + t + 1], p + t)  # (A, V)
            logits = step_logits if full else logits.index_copy(0, rows, step_logits)  # (B, V); dropped rows stale
        out = torch.stack(tokens, dim=1)  # (B, T_out)
        return out, (torch.stack(entropies, dim=1) if record_entropies else None)

    def _qkv(self, attn: torch.nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections of ``(N, L, D)`` hidden states: ``q (N, H, L, E)``, ``k``/``v (N, K, L, E)``, rotated."""
        n, length, _ = h.shape
        q = self._lin(h, attn.q_proj).view(n, length, self.num_heads, self.head_dim)
        k = self._lin(h, attn.k_proj).view(n, length, self.num_kv_heads, self.head_dim)
        v = self._lin(h, attn.v_proj).view(n, length, self.num_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
            q, k = _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _mlp(self, mlp: torch.nn.Module, h: Tensor) -> Tensor:
        gate = self._lin(h, mlp.gate_proj)
        up = self._lin(h, mlp.up_proj)
        return self._lin(F.silu(gate) * up, mlp.down_proj)

    def _prefill(self, ids: Tensor, mask: Tensor, cos: Tensor, sin: Tensor, s: int) -> list[Tensor]:
        """Run the unique prompt rows once and copy their K/V into every row's cache.

        Returns:
            one ``(B, K, S, E)`` key and value cache per layer, followed by the ``(B, V)`` last-position logits.
        """
        b, p = ids.shape
        uniq, inverse = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)  # (U, 2P), (B,)
        u_ids, u_mask = uniq[:, :p], uniq[:, p:].bool()  # (U, P) each
        u_pos = (u_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (U, P)
        c, sn = cos[u_pos][:, None], sin[u_pos][:, None]  # (U, 1, P, E)
        causal = torch.ones(p, p, dtype=torch.bool, device=ids.device).tril()  # (P, P)
        eye = torch.eye(p, dtype=torch.bool, device=ids.device)  # (P, P): pad queries attend to themselves
        attn_mask = ((causal[None] & u_mask[:, None, :]) | eye[None])[:, None]  # (U, 1, P, P)
        x = F.embedding(u_ids, self.base.embed_tokens.weight)  # (U, P, D)
        caches: list[Tensor] = []
        for layer in self.base.layers:
            attn = layer.self_attn
            q, k, v = self._qkv(attn, _rms_norm(x, layer.input_layernorm), c, sn)  # (U, H|K, P, E)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scaling, enable_gqa=True)
            x = x + self._lin(o.transpose(1, 2).reshape(x.shape[0], p, -1), attn.o_proj)
            x = x + self._mlp(layer.mlp, _rms_norm(x, layer.post_attention_layernorm))
            k_cache = k.new_empty(b, self.num_kv_heads, s, self.head_dim)  # (B, K, S, E)
            v_cache = v.new_empty(b, self.num_kv_heads, s, self.head_dim)  # (B, K, S, E)
            k_cache[:, :, :p] = k[inverse]
            v_cache[:, :, :p] = v[inverse]
            caches += [k_cache, v_cache]
        last = _rms_norm(x[:, -1], self.base.norm)  # (U, D)
        logits = self._lin(last, self.model.lm_head).float()  # (U, V)
        return caches + [logits[inverse]]

    def _decode_step(
        self, token: Tensor, cos: Tensor, sin: Tensor, caches: list[Tensor], valid: Tensor, slot: int
    ) -> Tensor:
        """Append ``token`` ``(B,)`` at cache slot ``slot`` and return the ``(B, V)`` float32 next-token logits.

        ``cos``/``sin`` are ``(B, E)`` at each row's position; ``valid`` is ``(B, slot + 1)``.
        """
        b = token.shape[0]
        r = self.num_heads // self.num_kv_heads
        c, sn = cos[:, None, None], sin[:, None, None]  # (B, 1, 1, E)
        key_ok = valid[:, None, None, :]  # (B, 1, 1, slot + 1)
        x = F.embedding(token[:, None], self.base.embed_tokens.weight)  # (B, 1, D)
        for i, layer in enumerate(self.base.layers):
            attn = layer.self_attn
            k_cache, v_cache = caches[2 * i], caches[2 * i + 1]
            q, k, v = self._qkv(attn, _rms_norm(x, layer.input_layernorm), c, sn)  # (B, H|K, 1, E)
            k_cache[:, :, slot : slot + 1] = k
            v_cache[:, :, slot : slot + 1] = v
            qg = q.view(b, self.num_kv_heads, r, self.head_dim)  # (B, K, R, E): head h uses KV head h // R
            scores = torch.matmul(qg, k_cache[:, :, : slot + 1].transpose(-1, -2)) * self.scaling  # (B, K, R, S')
            scores = torch.where(key_ok, scores.float(), float("-inf"))  # (B, K, R, S')
            o = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v_cache[:, :, : slot + 1])  # (B, K, R, E)
            x = x + self._lin(o.reshape(b, 1, -1), attn.o_proj)  # (B, 1, D)
            x = x + self._mlp(layer.mlp, _rms_norm(x, layer.post_attention_layernorm))
        last = _rms_norm(x[:, 0], self.base.norm)  # (B, D)
        return self._lin(last, self.model.lm_head).float()  # (B, V)
