"""The framework's rollout engines on the live policy: Hugging Face ``generate``, the static-cache decoder and
``AutoEngine`` (the default, which picks one of them).

They sample from the trained module itself, so their tokens come from exactly the trainer's distribution and
:meth:`~prpo_lightning.rollout.engine.RolloutEngine.sync_weights` only bumps the version. They wrap
:func:`~prpo_lightning.rollout.sampling.generate_completions` / :func:`~prpo_lightning.rollout.sampling.generate_groups`.
The vLLM engines live in :mod:`components.engines` (which re-exports these three for configs).

Shapes: ``N`` groups, ``G`` completions per group, ``B = N·G``, ``P`` padded prompt length, ``T`` completion length.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prpo_lightning.rollout.decoding import unsupported_reason
from prpo_lightning.rollout.engine import EngineCapabilities, RolloutEngine, RolloutResult, SampleRequest
from prpo_lightning.rollout.sampling import (
    Completions, Sampler, generate_completions, generate_groups, left_pad, pad_token_id,
)
from prpo_lightning.runtime.distributed import all_reduce_max

__all__ = ["AutoEngine", "HFGenerateEngine", "StaticCacheEngine"]


class _PolicyEngine(RolloutEngine):
    """Samples from the live policy with :mod:`prpo_lightning.rollout.sampling`; ``sampler`` is ``hf``, ``static``
    or ``auto``."""

    sampler: Sampler = "auto"
    capabilities = EngineCapabilities(
        entropies=True, sampler_logprobs=False, exact_trainer_distribution=True, supports_sleep=False,
        needs_weight_sync=False,
    )

    def sample(self, request: SampleRequest) -> RolloutResult:
        """Per-group calls seeded from ``request.seeds`` (``batch_seed`` None), else one batched call (split by
        ``sampling.generation_batch_size``) seeded from ``batch_seed``. Under ZeRO-3 lock-step every rank makes
        as many ``generate`` calls as the busiest rank (throw-away calls on a one-token prompt)."""
        prompts, g, sampling = request.prompts, request.num_generations, request.sampling
        if request.batch_seed is None:
            extra = all_reduce_max(len(prompts)) - len(prompts) if self.lockstep else 0
            out = generate_groups(
                self.policy, self.tokenizer, prompts, g, sampling, request.seeds, request.greedy, self.lockstep, extra,
                request.record_entropies, self.sampler,
            )
        else:
            chunk = sampling.generation_batch_size or len(prompts) * g or 1
            n_calls = math.ceil(len(prompts) * g / chunk)
            extra = all_reduce_max(n_calls) - n_calls if self.lockstep else 0
            if extra:  # throw-away calls so that every rank calls generate equally often under ZeRO-3
                generate_groups(self.policy, self.tokenizer, [], g, sampling, [], request.greedy, True, extra,
                                sampler=self.sampler)
            if not prompts:
                return RolloutResult.empty(self.device)
            out = self._batched(request)
        if not prompts:
            return RolloutResult.empty(self.device)
        return RolloutResult(out.ids, out.mask, out.truncated, entropies=out.entropies)

    def _batched(self, request: SampleRequest) -> Completions:
        g = request.num_generations
        ids, mask = left_pad([p.tolist() for p in request.prompts], pad_token_id(self.tokenizer), self.device)  # (N, P)
        ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)  # (B, P) each
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(request.batch_seed)
            return generate_completions(
                self.policy, self.tokenizer, ids, mask, request.sampling, greedy=request.greedy,
                synced_gpus=self.lockstep, record_entropies=request.record_entropies, sampler=self.sampler,
            )


class HFGenerateEngine(_PolicyEngine):
    """Hugging Face ``generate`` on the live policy: any causal LM, ZeRO-3 lock-step (``synced_gpus``), entropies
    recorded by a logits processor."""

    sampler = "hf"


class StaticCacheEngine(_PolicyEngine):
    """:class:`~prpo_lightning.rollout.decoding.StaticCacheDecoder` on the live policy: a preallocated-KV loop for
    Qwen2/Qwen3/Llama/Mistral, token-identical to :class:`HFGenerateEngine` for the same seed.

    Raises:
        ValueError: at :meth:`setup`, when the model is not supported or ranks must run in lock-step (ZeRO-3).
    """

    sampler = "static"

    def setup(self, policy: torch.nn.Module, tokenizer: Any, device: torch.device | None = None,
              lockstep: bool = False) -> None:
        reason = "ranks generate in lock-step (ZeRO-3)" if lockstep else unsupported_reason(policy)
        if reason is not None:
            raise ValueError(
                f"StaticCacheEngine cannot run {type(policy).__name__}: {reason}. Use "
                "components.engines.HFGenerateEngine or components.engines.AutoEngine."
            )
        super().setup(policy, tokenizer, device, lockstep)


class AutoEngine(_PolicyEngine):
    """The default engine: :class:`StaticCacheEngine`'s decoder when the model is supported and ranks need not run
    in lock-step, else Hugging Face ``generate`` (the choice and the reason are announced once per model)."""

    sampler = "auto"
