"""Abstract rollout engine: samples the G completions of every prompt group for the module.

An engine owns *how* completions are drawn (Hugging Face ``generate``, the static-cache decoder, vLLM, a remote
server, …); the module owns *what* is drawn (which prompts, which seeds, which step). The contract:

- :meth:`RolloutEngine.setup` once, before the first rollout, with the policy and tokenizer;
- :meth:`RolloutEngine.generate` with one :class:`SampleRequest` per rollout **on every rank**, even with an empty prompt list, because an
  engine that needs ranks in lock-step (DeepSpeed ZeRO-3) makes up the other ranks' extra calls inside it;
- :meth:`RolloutEngine.sync_weights` after every optimizer step and after a checkpoint is loaded (on every rank:
  it may gather ZeRO-3 shards collectively). Each call bumps :attr:`RolloutEngine.weight_version`, and
  :meth:`~RolloutEngine.generate` refuses to sample when the module's policy version differs from it;
- :meth:`RolloutEngine.teardown` at the end of the run.

Shapes: ``N`` prompt groups, ``G`` completions per group, ``B = N·G`` rows, ``T`` completion length.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.config import SamplingConfig


class StaleWeightsError(RuntimeError):
    """The engine's weights are older than the policy's (a :meth:`RolloutEngine.sync_weights` call was missed)."""


class EngineRecoveryNeeded(RuntimeError):
    """Raised by an engine sampling on a background thread for a failure only the main thread can repair (a
    launched inference server died: servers are started from the main thread). The asynchronous pipeline calls
    :meth:`RolloutEngine.recover` on the main thread and samples that batch again, once."""


@dataclass(frozen=True)
class EngineCapabilities:
    """What a rollout engine provides; the module decides from it which extra passes it needs.

    Attributes:
        entropies: ``generate(record_entropies=True)`` returns full-vocabulary entropies. Otherwise the module
            computes them in a trainer forward pass when a component (e.g. an entropy-spike segmenter) needs them.
        sampler_logprobs: results carry ``sampler_logprobs``, the sampler's log-prob of every sampled token
            (needed for the off-policy self-check and importance-sampling correction).
        exact_trainer_distribution: tokens are drawn from exactly the trainer's distribution (same weights and
            same kernels), so ``log π_old = log π_θ.detach()`` holds for an on-policy update and no correction or
            extra no-grad pass is needed.
        supports_sleep: :meth:`RolloutEngine.sleep` frees the engine's memory during the update.
        needs_weight_sync: :meth:`RolloutEngine.sync_weights` copies weights (False: the engine reads the live
            policy and only bumps its version).
    """

    entropies: bool = False
    sampler_logprobs: bool = False
    exact_trainer_distribution: bool = False
    supports_sleep: bool = False
    needs_weight_sync: bool = True


@dataclass(frozen=True)
class SampleRequest:
    """One rollout request: the prompts of a batch and how to sample them.

    Attributes:
        prompts: one ``(P_j,)`` unpadded long tensor of prompt ids per group.
        num_generations: G, completions per group.
        sampling: temperature, top-p/top-k, ``max_new_tokens``, ``generation_batch_size``.
        seeds: one sampling seed per group, e.g. ``group_seed(seed, step, prompt_id)``.
        greedy: greedy decoding (evaluation).
        record_entropies: also return full-vocabulary entropies (needs ``capabilities.entropies``).
        batch_seed: when given, engines whose random stream is shared by a batch draw the whole batch in one seeded
            stream (``sampling.seed_per_group: false``); None: each group is drawn from its own seed. Engines that
            seed every request separately (vLLM) always use ``seeds``.
        policy_version: the trainer's count of weight updates; when given, it must equal the engine's
            :attr:`RolloutEngine.weight_version`.
    """

    prompts: list[Tensor]
    num_generations: int
    sampling: SamplingConfig
    seeds: list[int]
    greedy: bool = False
    record_entropies: bool = False
    batch_seed: int | None = None
    policy_version: int | None = None

    @property
    def size(self) -> int:
        """Rows the result must have: ``len(prompts) · num_generations``."""
        return len(self.prompts) * self.num_generations


@dataclass
class RolloutResult:
    """The completions of one :meth:`RolloutEngine.generate` call; rows ``j·G … j·G + G − 1`` belong to group j.

    Attributes:
        completion_ids: ``(B, T)`` long token ids, PAD after the first EOS.
        completion_mask: ``(B, T)`` bool, True up to and including the first EOS.
        truncated: ``(B,)`` bool, True when a row has no EOS and used the whole budget (``max_new_tokens``).
        sampler_logprobs: ``(B, T)`` float32 log-probs of the sampled tokens under the sampler's (processed:
            temperature, top-k, top-p applied) distribution, 0 on padding; None when the engine lacks them.
        entropies: ``(B, T)`` float32 full-vocabulary entropies of ``softmax(logits / temperature)``, 0 on
            padding; None unless requested and supported.
        weight_version: the engine's :attr:`~RolloutEngine.weight_version` that produced these samples.
    """

    completion_ids: Tensor
    completion_mask: Tensor
    truncated: Tensor
    sampler_logprobs: Tensor | None = None
    entropies: Tensor | None = None
    weight_version: int = 0

    def __post_init__(self) -> None:
        b, t = self.completion_ids.shape
        if self.completion_mask.shape != (b, t) or self.truncated.shape != (b,):
            raise ValueError(
                f"RolloutResult: completion_mask {tuple(self.completion_mask.shape)} and truncated "
                f"{tuple(self.truncated.shape)} must be ({b}, {t}) and ({b},) like completion_ids"
            )
        for name in ("sampler_logprobs", "entropies"):
            value = getattr(self, name)
            if value is not None and value.shape != (b, t):
                raise ValueError(f"RolloutResult: {name} {tuple(value.shape)} must be ({b}, {t}) like completion_ids")

    @property
    def size(self) -> int:
        """Number of rows ``B``."""
        return int(self.completion_ids.shape[0])

    @classmethod
    def empty(cls, device: torch.device | str = "cpu", weight_version: int = 0) -> RolloutResult:
        """A result with no rows (a rank whose prompts were all skipped)."""
        ids = torch.zeros(0, 1, dtype=torch.long, device=device)  # (0, 1)
        return cls(ids, ids.bool(), torch.zeros(0, dtype=torch.bool, device=device), weight_version=weight_version)


class RolloutEngine(ABC):
    """Samples completions for prompt groups (see the module docstring for the call protocol).

    Subclasses set :attr:`capabilities` and implement :meth:`sample` (one :class:`SampleRequest` in, one
    :class:`RolloutResult` out); they extend :meth:`setup`, :meth:`sync_weights` (calling ``super()``) and
    :meth:`teardown` as needed.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        sample = vars(cls).get("sample")
        if sample is not None and len(inspect.signature(sample).parameters) != 2:
            raise TypeError(f"engine {cls.__name__}.sample takes {list(inspect.signature(sample).parameters)[1:]}: "
                            "it takes one request now, def sample(self, request: prpo_lightning.SampleRequest) -> "
                            "RolloutResult, with request.prompts, .num_generations, .sampling, .seeds, .greedy, "
                            ".record_entropies and .batch_seed")

    #: What this engine provides (overridden by subclasses).
    capabilities: EngineCapabilities = EngineCapabilities()

    def __init__(self) -> None:
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.device: torch.device = torch.device("cpu")
        self.lockstep = False
        self.weight_version = 0

    def setup(self, policy: torch.nn.Module, tokenizer: Any, device: torch.device | None = None,
              lockstep: bool = False) -> None:
        """Bind the engine to the policy and load its current weights. Called once, after the strategy has placed
        the policy; the module then counts the engine as holding its current weight version (no sync follows).

        Args:
            policy: the trained Hugging Face causal LM (under ZeRO-3 its parameters are partitioned).
            tokenizer: its tokenizer (EOS and PAD ids are read from it).
            device: where results are returned (default: the policy's device).
            lockstep: ranks must make equal numbers of policy forward calls (DeepSpeed ZeRO-3 with several
                ranks); engines that run the policy itself keep them in step inside :meth:`generate`.
        """
        self.policy, self.tokenizer, self.lockstep = policy, tokenizer, lockstep
        self.device = device if device is not None else next(policy.parameters()).device

    def check_sampling(self, sampling: Any) -> None:
        """Refuse sampling settings (a :class:`~prpo_lightning.config.SamplingConfig`) that this engine cannot
        serve, before anything starts (the module calls it when it is built). Default: accept.

        Raises:
            ValueError: naming the engine setting and the sampling settings it conflicts with.
        """

    def sync_weights(self, policy: torch.nn.Module, version: int | None = None) -> None:
        """Make the engine sample from ``policy``'s current weights. Call after every optimizer step and after
        loading a checkpoint, on every rank.

        Args:
            policy: the trained policy.
            version: the policy's weight version after this step (default: the engine's version + 1).
        """
        self.weight_version = self.weight_version + 1 if version is None else int(version)

    def set_weight_version(self, version: int) -> None:
        """Record that the weights the engine holds are the policy's version ``version`` without copying anything
        (called right after :meth:`setup`, which loaded the policy's current weights). Engines that stamp versions
        elsewhere (a server) extend it."""
        self.weight_version = int(version)

    def sleep(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's memory before the update (only when ``capabilities.supports_sleep``)."""

    def wake_up(self) -> None:  # noqa: B027 - optional hook
        """Re-acquire memory before a rollout (the inverse of :meth:`sleep`)."""

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources at the end of the run."""

    def recover(self) -> None:  # noqa: B027 - optional hook
        """Repair, on the main thread, what an :class:`EngineRecoveryNeeded` raised in the background reported."""

    def generate(self, request: SampleRequest) -> RolloutResult:
        """Sample ``request.num_generations`` completions of every prompt (call on every rank, even with no prompts).

        Returns:
            The completions, rows ``j·G … j·G + G − 1`` for group j, stamped with the engine's weight version.

        Raises:
            StaleWeightsError: ``request.policy_version`` differs from the engine's weight version.
            ValueError: ``seeds`` does not have one entry per group, or entropies are requested from an engine
                that cannot record them.
            RuntimeError: :meth:`setup` was not called, or :meth:`sample` returned the wrong number of rows.
        """
        name = type(self).__name__
        if self.policy is None:
            raise RuntimeError(f"{name}.generate called before setup(policy, tokenizer)")
        if request.policy_version is not None and int(request.policy_version) != self.weight_version:
            raise StaleWeightsError(
                f"{name} holds weight version {self.weight_version} but the policy is at version "
                f"{request.policy_version}: call engine.sync_weights(policy) after every optimizer step and checkpoint load"
            )
        if len(request.seeds) != len(request.prompts):
            raise ValueError(f"{name}.generate: {len(request.prompts)} prompts but {len(request.seeds)} seeds")
        if request.record_entropies and not self.capabilities.entropies:
            raise ValueError(f"{name} cannot record entropies (capabilities.entropies is False): compute them in the "
                             "trainer's forward pass instead")
        result = self.sample(request)
        result.weight_version = self.weight_version
        if result.size != request.size:
            raise RuntimeError(f"{name}.sample returned {result.size} rows for {len(request.prompts)} prompts x "
                               f"{request.num_generations} generations")
        return result

    @abstractmethod
    def sample(self, request: SampleRequest) -> RolloutResult:
        """Draw the completions (called by :meth:`generate` after its checks; same request and result)."""


def pack_completions(
    rows: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """Pack ragged sampled token lists with the completion conventions (for engines that return lists).

    Each row is cut after its first EOS; the mask covers the kept tokens (EOS included); PAD fills the rest; a row
    is truncated when it has no EOS and used the whole budget.

    Args:
        rows: ``B`` lists of sampled token ids.
        eos_id: end-of-sequence id.
        pad_id: padding id.
        max_new_tokens: the completion budget.
        device: where the tensors are created.

    Returns:
        ``(completion_ids, completion_mask, truncated)`` of shapes ``(B, T)``, ``(B, T)``, ``(B,)`` with
        ``T = max(1, longest kept row)``.
    """
    kept = [r[: r.index(eos_id) + 1] if eos_id in r else list(r) for r in rows]
    t = max([1] + [len(r) for r in kept])
    ids = torch.full((len(kept), t), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(kept), t), dtype=torch.bool)  # (B, T)
    for i, r in enumerate(kept):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    truncated = torch.tensor(
        [(not r or r[-1] != eos_id) and len(r) >= max_new_tokens for r in kept], dtype=torch.bool
    )  # (B,)
    return ids.to(device), mask.to(device), truncated.to(device)


def pack_sampled(
    rows: list[list[int]], logprobs: list[list[float]], eos_id: int, pad_id: int, max_new_tokens: int,
    device: torch.device | str = "cpu",
) -> RolloutResult:
    """:func:`pack_completions` plus the sampler's log-prob of every kept token (engines that return both as lists).

    Args:
        rows: ``B`` lists of sampled token ids.
        logprobs: ``B`` lists of the sampler's log-probs of those tokens (at least as long as each kept row).
        eos_id / pad_id / max_new_tokens / device: as for :func:`pack_completions`.

    Returns:
        The result with ``sampler_logprobs`` ``(B, T)`` float32, 0 after each kept row.
    """
    ids, mask, truncated = pack_completions(rows, eos_id, pad_id, max_new_tokens, device)
    sampler_logprobs = torch.zeros(ids.shape, dtype=torch.float32)  # (B, T)
    for i, row in enumerate(logprobs):
        n = int(mask[i].sum())
        sampler_logprobs[i, :n] = torch.tensor(row[:n], dtype=torch.float32)
    return RolloutResult(ids, mask, truncated, sampler_logprobs=sampler_logprobs.to(device))
