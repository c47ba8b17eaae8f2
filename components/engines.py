"""Rollout engines: Hugging Face ``generate``, the static-cache decoder, ``auto`` (today's default) and vLLM.

The first three sample from the live policy module, so their tokens come from exactly the trainer's distribution
and :meth:`~prpo_lightning.engine.RolloutEngine.sync_weights` only bumps the version. They wrap
:func:`~prpo_lightning.rollout.generate_completions` / :func:`~prpo_lightning.rollout.generate_groups`, so they
are token-identical to the samplers that ``sampling.engine`` selected before engines existed. The vLLM engine
lives in :mod:`components.engine_vllm` and is re-exported here.

Shapes: ``N`` groups, ``G`` completions per group, ``B = N·G``, ``P`` padded prompt length, ``T`` completion length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from components.engine_vllm import VLLMEngine
from prpo_lightning.decoding import unsupported_reason
from prpo_lightning.distributed import all_reduce_max
from prpo_lightning.engine import EngineCapabilities, RolloutEngine, RolloutResult
from prpo_lightning.rollout import (
    Completions, SamplingConfig, generate_completions, generate_groups, left_pad, pad_token_id,
)

__all__ = ["AutoEngine", "HFGenerateEngine", "StaticCacheEngine", "VLLMEngine"]


class _PolicyEngine(RolloutEngine):
    """Samples from the live policy with :mod:`prpo_lightning.rollout`; ``sampler`` is the ``sampling.engine``
    value it forces ("hf", "static" or "auto")."""

    sampler = "auto"
    capabilities = EngineCapabilities(
        entropies=True, sampler_logprobs=False, exact_trainer_distribution=True, supports_sleep=False,
        needs_weight_sync=False,
    )

    def _sampling(self, sampling: SamplingConfig) -> SamplingConfig:
        return sampling if sampling.engine == self.sampler else dataclasses.replace(sampling, engine=self.sampler)

    def sample(
        self,
        prompts: list[Tensor],
        num_generations: int,
        sampling: SamplingConfig,
        seeds: list[int],
        greedy: bool,
        record_entropies: bool,
        batch_seed: int | None,
    ) -> RolloutResult:
        """Per-group calls seeded from ``seeds`` (``batch_seed`` None), else one batched call (split by
        ``sampling.generation_batch_size``) seeded from ``batch_seed``. Under ZeRO-3 lock-step every rank makes
        as many ``generate`` calls as the busiest rank (throw-away calls on a one-token prompt)."""
        sampling = self._sampling(sampling)
        g = num_generations
        if batch_seed is None:
            extra = all_reduce_max(len(prompts)) - len(prompts) if self.lockstep else 0
            out = generate_groups(
                self.policy, self.tokenizer, prompts, g, sampling, seeds, greedy, self.lockstep, extra, record_entropies
            )
        else:
            chunk = sampling.generation_batch_size or len(prompts) * g or 1
            n_calls = math.ceil(len(prompts) * g / chunk)
            extra = all_reduce_max(n_calls) - n_calls if self.lockstep else 0
            if extra:  # throw-away calls so that every rank calls generate equally often under ZeRO-3
                generate_groups(self.policy, self.tokenizer, [], g, sampling, [], greedy, True, extra)
            if not prompts:
                return RolloutResult.empty(self.device)
            out = self._batched(prompts, g, sampling, greedy, batch_seed, record_entropies)
        if not prompts:
            return RolloutResult.empty(self.device)
        return RolloutResult(out.ids, out.mask, out.truncated, entropies=out.entropies)

    def _batched(
        self, prompts: list[Tensor], g: int, sampling: SamplingConfig, greedy: bool, batch_seed: int,
        record_entropies: bool,
    ) -> Completions:
        ids, mask = left_pad([p.tolist() for p in prompts], pad_token_id(self.tokenizer), self.device)  # (N, P) each
        ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)  # (B, P) each
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(batch_seed)
            return generate_completions(
                self.policy, self.tokenizer, ids, mask, sampling, greedy=greedy, synced_gpus=self.lockstep,
                record_entropies=record_entropies,
            )


class HFGenerateEngine(_PolicyEngine):
    """Hugging Face ``generate`` on the live policy: any causal LM, ZeRO-3 lock-step (``synced_gpus``), entropies
    recorded by a logits processor."""

    sampler = "hf"


class StaticCacheEngine(_PolicyEngine):
    """:class:`~prpo_lightning.decoding.StaticCacheDecoder` on the live policy: a preallocated-KV loop for
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
    """The default: the sampler that ``sampling.engine`` names (kept for existing configs). With ``auto`` (its
    default), :class:`StaticCacheEngine`'s decoder when the model is supported and ranks need not run in lock-step,
    else Hugging Face ``generate`` (the choice and the reason are announced once per model); ``hf`` and ``static``
    force one of them."""

    sampler = "auto"

    def _sampling(self, sampling: SamplingConfig) -> SamplingConfig:
        return sampling
