"""``VLLMServerEngine``: rollouts from vLLM OpenAI-compatible servers outside the training process.

The engine launches its servers (``launch: true``, the default: one per entry of ``devices``, each a child process
``python -m vllm.entrypoints.openai.api_server`` on the policy written to a folder, stopped at teardown and on every
exit path) or connects to running ones (``urls``). Every training rank sends its own requests; rank 0 launches the
servers and syncs their weights, and the URLs are shared with the other ranks.

One request per group: ``POST /inference/v1/generate`` (vLLM's token-in/token-out endpoint) with the prompt's token
ids and native sampling parameters ``n = G``, ``seed`` = the group's seed (vLLM seeds child ``i`` with ``seed + i``),
``logprobs: 0`` (the sampled token's log-prob, ``processed_logprobs``: temperature/top-k/top-p applied). Groups are
spread over the servers round-robin and sent concurrently; a group's samples depend only on its prompt, its seed and
the weights, so one server or four give the same samples.

Weights: after every optimizer step rank 0 streams the policy (checked tensor by tensor: every tensor the server holds
must arrive, with its shape) through the transport (:mod:`components.weight_transfer`: safetensors in a shared
folder reloaded in place on CPU, vLLM's NCCL weight transfer on GPU) and stamps the version on each server. Every
completion comes back stamped with the server's weight version (``weight_versions``); a server that answers with
another version than the trainer's is refused (:class:`~prpo_lightning.rollout.engine.StaleWeightsError`).

Faults: a URL that does not answer at setup is refused before any model work, naming it and the launch command.
A request that finds no server is retried ``max_retries`` times; a launched server that died is restarted and given
the current weights first; then :class:`ServerUnavailableError`. Every request has a time limit.

Shapes: ``N`` groups, ``G`` completions per group, ``B = N·G``, ``T`` completion length.
"""

from __future__ import annotations

import copy
import os
import shlex
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor

from components.engine_vllm import policy_weights
from components.vllm_server import (
    ServerClient, ServerError, ServerProcess, ServerUnreachableError, check_reachable, read_generate_answer,
)
from components.vllm_ranks import DeadServer, ServerUnavailableError, run_on_rank0, send_all, wait_healthy
from components.vllm_support import checked_weights, cpu_prefill_settings, remove_stale_model_dirs, tmp_prefix, weight_manifest
from components.weight_transfer import DiskTransport, NCCLTransport, server_version, set_version
from prpo_lightning.rollout.engine import (
    EngineCapabilities, EngineRecoveryNeeded, RolloutEngine, RolloutResult, SampleRequest, StaleWeightsError,
    pack_sampled,
)
from prpo_lightning.rollout.sampling import pad_token_id
from prpo_lightning.training.lora import base_model


class VLLMServerEngine(RolloutEngine):
    """Rollouts from one or more vLLM servers (launched by the engine, or running ones given by URL).

    Args:
        launch: start the servers (True) or connect to ``urls`` (False; set automatically when ``urls`` is given).
        urls: running servers (``http://host:port``), started with ``VLLM_SERVER_DEV_MODE=1`` and the arguments of
            :meth:`server_args`; all ranks share them.
        devices: launched servers, one per entry: the ``CUDA_VISIBLE_DEVICES`` of each (e.g. ``["4,5", "6,7"]`` for
            two servers of ``tensor_parallel_size: 2``); None: ``num_servers`` servers with the inherited devices.
        num_servers: launched servers when ``devices`` is None (data-parallel serving: groups are spread over them).
        tensor_parallel_size: GPUs per server (``--tensor-parallel-size``).
        gpu_memory_utilization: ``--gpu-memory-utilization`` (on vLLM's CPU backend a fraction of host RAM); None:
            0.9 with CUDA, else 0.05 (the CPU default of 0.92 is refused by vLLM).
        kv_cache_memory_gib: size the KV cache in GiB instead (``--kv-cache-memory-bytes``).
        max_model_len: longest prompt + completion (default: the policy's context window).
        max_num_seqs: most sequences a server schedules at once.
        enforce_eager: no CUDA graphs (default: True without CUDA).
        server_args: further arguments for launched servers.
        env: further environment variables of launched servers (e.g. ``VLLM_CPU_OMP_THREADS_BIND``).
        python: the interpreter with vLLM used to launch servers (default: this one).
        host: the address launched servers listen on (and the NCCL rendezvous address).
        workdir: folder for the policy and the weight versions; it must be the same path for trainer and servers
            (default: a temporary folder, removed at teardown).
        weight_transfer: ``disk`` (safetensors reloaded in place; CPU and shared folders), ``nccl`` (vLLM's native
            transfer; GPU) or ``auto`` (``nccl`` with CUDA, else ``disk``).
        startup_timeout_s: time limit for a launched server to answer ``/health``.
        request_timeout_s: time limit of one request.
        max_retries: extra attempts of a request that found no server.
        max_concurrent_requests: requests in flight per rank.
        ignore_eos: never stop at EOS (benchmarks); a sampled EOS still ends the completion's mask.
    """

    def __init__(
        self, launch: bool = True, urls: list[str] | None = None, devices: list[str] | None = None,
        num_servers: int = 1, tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
        kv_cache_memory_gib: float | None = None, max_model_len: int | None = None, max_num_seqs: int = 256,
        enforce_eager: bool | None = None, server_args: list[str] | None = None, env: dict[str, str] | None = None,
        python: str | None = None,
        host: str = "127.0.0.1", workdir: str | None = None,
        weight_transfer: Literal["auto", "disk", "nccl"] = "auto", startup_timeout_s: float = 600.0,
        request_timeout_s: float = 600.0, max_retries: int = 2, max_concurrent_requests: int = 64,
        ignore_eos: bool = False,
    ) -> None:
        super().__init__()
        checks = [
            ("num_servers", num_servers >= 1, ">= 1"), ("tensor_parallel_size", tensor_parallel_size >= 1, ">= 1"),
            ("weight_transfer", weight_transfer in ("auto", "disk", "nccl"), "one of auto, disk, nccl"),
            ("max_retries", max_retries >= 0, ">= 0"), ("max_concurrent_requests", max_concurrent_requests >= 1, ">= 1"),
            ("request_timeout_s", request_timeout_s > 0, "> 0"), ("startup_timeout_s", startup_timeout_s > 0, "> 0"),
            ("gpu_memory_utilization", gpu_memory_utilization is None or 0 < gpu_memory_utilization <= 1, "in (0, 1]"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"model.engine.{key} must be {rule}; got {locals()[key]!r}")
        if not launch and not urls:
            raise ValueError("model.engine: give model.engine.urls (running servers) or set launch: true")
        for entry in devices or []:
            if len(str(entry).split(",")) != tensor_parallel_size:
                raise ValueError(f"model.engine.devices entry {entry!r} names {len(str(entry).split(','))} GPU(s) but "
                                 f"tensor_parallel_size is {tensor_parallel_size}: give each server that many")
        if launch and not urls and not devices and torch.cuda.is_available():
            raise ValueError("model.engine.devices is required to launch servers on a GPU machine: the servers need "
                             "GPUs of their own (e.g. devices: [\"6\"] with trainer.devices: [0, 1, 2, 3, 4, 5]); "
                             "or connect to running servers with model.engine.urls")
        self.launch = bool(launch) and not urls
        self.urls = [u.rstrip("/") for u in (urls or [])]
        self.devices = list(devices) if devices else None
        self.num_servers = len(self.devices) if self.devices else int(num_servers)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.gpu_memory_utilization, self.kv_cache_memory_gib = gpu_memory_utilization, kv_cache_memory_gib
        self.max_model_len, self.max_num_seqs, self.enforce_eager = max_model_len, int(max_num_seqs), enforce_eager
        self.extra_args, self.extra_env = list(server_args or []), dict(env or {})
        self.python, self.host, self.workdir = python, host, workdir
        self.weight_transfer = weight_transfer
        self.startup_timeout_s, self.request_timeout_s = float(startup_timeout_s), float(request_timeout_s)
        self.max_retries, self.max_concurrent_requests = int(max_retries), int(max_concurrent_requests)
        self.ignore_eos = ignore_eos
        self.servers: list[ServerProcess] = []
        self.clients: list[ServerClient] = []
        self.transport: DiskTransport | NCCLTransport | None = None
        self._manifest: dict[str, tuple[int, ...]] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._rank, self._world = 0, 1
        self._dtype_hint = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # for messages before setup

    @property
    def capabilities(self) -> EngineCapabilities:  # type: ignore[override]
        return EngineCapabilities(entropies=False, sampler_logprobs=True, exact_trainer_distribution=False,
                                  supports_sleep=False, needs_weight_sync=True)

    def check_sampling(self, sampling: Any) -> None:
        """Checks made when the module is built, before any model loads: an explicit ``max_model_len`` must hold the
        longest prompt plus the completion budget, and every URL given must answer ``/health``.

        Raises:
            ValueError: ``max_model_len < max_prompt_length + max_new_tokens``.
            ServerError: a URL does not answer (naming it and the command that starts such a server).
        """
        need = int(sampling.max_prompt_length) + int(sampling.max_new_tokens)
        if self.max_model_len is not None and int(self.max_model_len) < need:
            raise ValueError(f"model.engine.max_model_len {self.max_model_len} is smaller than "
                             f"model.sampling.max_prompt_length + max_new_tokens = {need}: raise it or leave it unset")
        for url in self.urls:
            check_reachable(url, "VLLMServerEngine (model.engine.urls)", self.launch_hint(self._dtype_hint))

    # ------------------------------------------------------------------ server arguments
    def server_args(self, dtype: torch.dtype) -> list[str]:
        """The arguments every server needs (launched ones get them; started-by-hand ones must have them)."""
        on_cuda = torch.cuda.is_available()
        util = self.gpu_memory_utilization or (0.9 if on_cuda else 0.05)
        args = ["--dtype", str(dtype).removeprefix("torch."), "--skip-tokenizer-init", "--enable-scale-out",
                "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm", "--seed", "0",
                "--gpu-memory-utilization", str(util), "--max-num-seqs", str(self.max_num_seqs),
                "--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.kv_cache_memory_gib is not None:
            args += ["--kv-cache-memory-bytes", str(int(self.kv_cache_memory_gib * (1 << 30)))]
        if (not on_cuda) if self.enforce_eager is None else self.enforce_eager:
            args.append("--enforce-eager")
        if not on_cuda and self.policy is not None:  # see cpu_prefill_settings: a split seeded prefill crashes
            prefill = cpu_prefill_settings(self.max_model_len, self.policy.config)
            args += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(prefill["max_num_batched_tokens"])]
        nccl = self.weight_transfer == "nccl" or (self.weight_transfer == "auto" and on_cuda)
        if nccl:
            args += list(NCCLTransport.server_args)
        return args + self.extra_args

    def launch_hint(self, dtype: torch.dtype = torch.float32) -> str:
        """A command that starts a server this engine can use (quoted in errors)."""
        args = " ".join(shlex.quote(a) for a in self.server_args(dtype))
        return (f"VLLM_SERVER_DEV_MODE=1 {self.python or sys.executable} -m vllm.entrypoints.openai.api_server "
                f"--model <policy folder> --port <port> {args}")

    # ------------------------------------------------------------------ lifecycle
    def setup(self, policy: torch.nn.Module, tokenizer: Any, device: torch.device | None = None,
              lockstep: bool = False) -> None:
        """Connect to (or launch) the servers and give them the policy's current weights at version 0.

        Raises:
            ServerError: a URL does not answer (naming it and the launch command), or a launched server did not
                come up (with its log tail).
        """
        super().setup(policy, tokenizer, device, lockstep)
        if self.clients:
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._rank = torch.distributed.get_rank() if distributed else 0
        self._world = torch.distributed.get_world_size() if distributed else 1
        dtype = next(policy.parameters()).dtype
        self._manifest = weight_manifest(policy)
        for url in self.urls:  # fail fast, before any weights are written
            check_reachable(url, "VLLMServerEngine", self.launch_hint(dtype))
        if self._world > 1 and self.launch and self.host in ("127.0.0.1", "localhost"):
            hosts: list[Any] = [None] * self._world
            torch.distributed.all_gather_object(hosts, socket.gethostname())
            if len(set(hosts)) > 1:
                raise ValueError(f"model.engine.host is {self.host!r} but the ranks run on {len(set(hosts))} machines: "
                                 "servers launched by rank 0 must listen on an address the other machines reach "
                                 "(model.engine.host: rank 0's private IP), or connect with model.engine.urls")

        def start(stream: Iterator[tuple[str, Tensor]]) -> list[str]:
            self._make_transport(dtype)
            try:
                urls = self._launch(policy, dtype, stream) if self.launch else list(self.urls)
                self.clients = [self._client(u) for u in urls]
                assert self.transport is not None
                self.transport.setup(self.clients)
                if not self.launch:
                    self.transport.push(checked_weights(stream, self._manifest, "VLLMServerEngine"),
                                        self.weight_version, self.clients)
                for client in self.clients:
                    set_version(client, self.weight_version)
            except BaseException:
                self.teardown()  # no half-built engine, no server left behind
                raise
            return urls

        urls = self._on_rank0(policy, start)
        self.clients = [self._client(u) for u in urls]

    def _on_rank0(self, policy: torch.nn.Module | None, work: Any) -> Any:
        """:func:`~components.vllm_ranks.run_on_rank0` with this engine's rank and world size."""
        return run_on_rank0(policy, work, self._rank, self._world, "VLLMServerEngine")

    def _client(self, url: str) -> ServerClient:
        return ServerClient(url, timeout_s=self.request_timeout_s, retries=self.max_retries)

    def _make_transport(self, dtype: torch.dtype) -> None:
        remove_stale_model_dirs()
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=tmp_prefix())
        root = self.workdir or self._tmp.name  # type: ignore[union-attr]
        kind = self.weight_transfer
        if kind == "auto":
            kind = "nccl" if torch.cuda.is_available() else "disk"
        self.transport = (NCCLTransport(self._manifest, dtype, self.tensor_parallel_size, self.host)
                          if kind == "nccl" else DiskTransport(root))

    def _launch(self, policy: torch.nn.Module, dtype: torch.dtype, stream: Iterator[tuple[str, Tensor]]) -> list[str]:
        """Write the policy (config + weights: the only full stream at start), start every server, wait for all."""
        root = self.workdir or self._tmp.name  # type: ignore[union-attr]
        model_dir = os.path.join(root, "policy")
        os.makedirs(model_dir, exist_ok=True)
        config = copy.deepcopy(policy.config)
        if not getattr(config, "architectures", None):
            config.architectures = [type(base_model(policy)).__name__]
        config.save_pretrained(model_dir)
        DiskTransport(root).write(checked_weights(stream, self._manifest, "VLLMServerEngine"), 0)
        weights = os.path.join(root, "weights", "v0")
        for name in os.listdir(weights):
            os.replace(os.path.join(weights, name), os.path.join(model_dir, name))
        os.rmdir(weights)
        env = {**self.extra_env, "VLLM_SERVER_DEV_MODE": "1"}
        for i in range(self.num_servers):
            extra = {"CUDA_VISIBLE_DEVICES": self.devices[i]} if self.devices else {}
            log = os.path.join(self.workdir, f"server-{i}.log") if self.workdir else None
            server = ServerProcess(model_dir, self.server_args(dtype), python=self.python, host=self.host,
                                   env={**env, **extra}, startup_timeout_s=self.startup_timeout_s, log_path=log,
                                   name=f"VLLMServerEngine server {i}")
            self.servers.append(server.start())
        for server in self.servers:
            server.wait_healthy()  # on failure the caller tears everything down
        return [s.url for s in self.servers]

    def teardown(self) -> None:
        """Stop launched servers and delete the weight folders (connected servers are left running)."""
        for server in self.servers:
            server.stop()
        self.servers, self.clients = [], []
        if self.transport is not None:
            try:
                self.transport.teardown()
            finally:
                self.transport = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ------------------------------------------------------------------ weights
    def set_weight_version(self, version: int) -> None:
        """Stamp ``version`` on every server (rank 0) for the weights they hold since :meth:`setup`."""

        def stamp(_: Any) -> None:
            for slot in range(len(self.clients)):
                self._on_server(slot, lambda client: set_version(client, version))

        self._on_rank0(None, stamp)
        super().set_weight_version(version)

    def sync_weights(self, policy: torch.nn.Module, version: int | None = None) -> None:
        """Rank 0 streams the policy to every server and stamps the new version; all ranks then agree on it.

        Under ZeRO-3 every rank iterates the stream (the shards are gathered collectively); only rank 0 sends.

        Raises:
            IncompleteWeightsError: the stream lacked a tensor or had an unknown or mis-shaped one (with the disk
                transport nothing is loaded; with NCCL the servers may hold part of it); the version does not
                advance.
            ServerError: on the other ranks, naming rank 0's error.
        """
        new = self.weight_version + 1 if version is None else int(version)
        assert self.transport is not None or self._rank != 0

        def push(stream: Iterator[tuple[str, Tensor]]) -> None:
            for slot in range(len(self.clients)):  # a dead launched server comes back before the push
                self._on_server(slot, server_version)
            self.transport.push(checked_weights(stream, self._manifest, "VLLMServerEngine"), new, self.clients)

        self._on_rank0(policy, push)
        super().sync_weights(policy, new)

    # ------------------------------------------------------------------ sampling
    def _on_server(self, slot: int, call: Any, restart: bool = True) -> Any:
        """``call(client)`` on server ``slot``.

        When no server answers: a launched one that died is restarted (rank 0, main thread only: ``restart``) with
        the current weights and called again; on the other ranks the call waits up to ``startup_timeout_s`` for
        rank 0's restart.

        Raises:
            DeadServer: the server died and ``restart`` is False (the caller restarts it on the main thread).
            ServerUnavailableError: the server stayed unreachable.
            ServerError: the server answered with an error (for a launched one, with the exceptions of its log).
        """
        try:
            return call(self.clients[slot])
        except ServerUnreachableError as err:
            if self.launch and self._rank == 0 and self.servers:
                self.servers[slot].settle(3.0)  # a server killed mid-request may take a moment to exit
            if self.launch and self._rank == 0 and self.servers and not self.servers[slot].alive:
                if not restart:
                    raise DeadServer(slot) from err
                self._restart(slot)
                return call(self.clients[slot])
            if self.launch and self._rank != 0 and wait_healthy(self.clients[slot].url, self.startup_timeout_s):
                return call(self.clients[slot])
            raise ServerUnavailableError(
                f"VLLMServerEngine: server {self.clients[slot].url} did not answer ({err}); check it is running "
                "(model.engine.urls) or raise model.engine.request_timeout_s / max_retries") from err
        except ServerError as err:
            if self.servers and self._rank == 0:  # a launched server: its log says why
                server = self.servers[slot]
                raise ServerError(f"{err}\nErrors in {server.log_path}:\n{server.log_errors()}\nLast lines:\n"
                                  f"{server.log_tail(10)}") from err
            raise

    def _restart(self, slot: int) -> None:
        """Start a dead launched server again (main thread) and give it the current weights before it serves.

        Raises:
            EngineRecoveryNeeded: called from another thread (asynchronous rollouts sample in the background);
                :meth:`recover` restarts it on the main thread.
        """
        if threading.current_thread() is not threading.main_thread():
            raise EngineRecoveryNeeded(f"VLLMServerEngine: the launched server {self.clients[slot].url} died during a "
                                       "background request; it is restarted on the main thread")
        server = self.servers[slot]
        server.stop()
        if server.log_path and os.path.exists(server.log_path):  # keep the dead server's log for the post-mortem
            os.replace(server.log_path, server.log_path + ".died")
        server.process = None
        try:
            server.start().wait_healthy()
            assert self.transport is not None
            self.transport.restore(self.clients[slot], self.weight_version)
        except (ServerError, RuntimeError) as err:
            raise ServerUnavailableError(f"VLLMServerEngine: server {slot} died and could not be restarted: {err}") \
                from err

    def recover(self) -> None:
        """Restart every launched server that died (rank 0, main thread), each given the current weights."""
        if self.launch and self._rank == 0:
            for slot, server in enumerate(self.servers):
                if not server.alive:
                    self._restart(slot)

    def _check_versions(self) -> None:
        """Refuse to sample when a server holds another weight version than the engine."""
        want = str(self.weight_version)
        for slot, client in enumerate(self.clients):
            held = self._on_server(slot, server_version)
            if held != want:
                raise StaleWeightsError(f"VLLMServerEngine: server {client.url} holds weight version {held}, the "
                                        f"engine is at {want}: a weight sync did not reach it")

    def _slot(self, group: int) -> int:
        """The server of group ``group``: round-robin, starting at this rank's offset (ranks spread the load)."""
        return (group + self._rank) % len(self.clients)

    def _send_all(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every group's request, concurrently (:func:`~components.vllm_ranks.send_all`)."""
        return send_all(bodies, self._slot, self._on_server, self._restart, self.max_concurrent_requests)

    def sample(self, request: SampleRequest) -> RolloutResult:
        """One request per group, spread over the servers, sent concurrently; rows in group order."""
        prompts, g, sampling = request.prompts, request.num_generations, request.sampling
        if not prompts:
            return RolloutResult.empty(self.device)
        self._check_versions()
        eos_id, pad_id = self.tokenizer.eos_token_id, pad_token_id(self.tokenizer)
        greedy = request.greedy
        params = {
            "n": g, "temperature": 0.0 if greedy else sampling.temperature, "top_p": 1.0 if greedy else sampling.top_p,
            "top_k": 0 if greedy else sampling.top_k, "max_tokens": sampling.max_new_tokens, "logprobs": 0,
            "stop_token_ids": [] if self.ignore_eos else [eos_id], "ignore_eos": self.ignore_eos,
            "detokenize": False,
        }
        bodies = [{"token_ids": [int(t) for t in p.tolist()], "sampling_params": {**params, "seed": int(seed)}}
                  for p, seed in zip(prompts, request.seeds)]
        answers = self._send_all(bodies)
        rows: list[list[int]] = []
        logprobs: list[list[float]] = []
        vocab = int(getattr(self.policy.config, "vocab_size", 0) or 0) or None
        for j, answer in enumerate(answers):
            url = self.clients[self._slot(j)].url
            try:
                group = read_generate_answer(answer, g, str(self.weight_version), vocab, sampling.max_new_tokens)
            except StaleWeightsError as err:
                raise StaleWeightsError(f"VLLMServerEngine: {url}, group {j}: {err}") from err
            except ValueError as err:
                raise ServerError(f"VLLMServerEngine: {url} answered group {j} with {err}") from err
            for tokens, row_logprobs in group:
                rows.append(tokens)
                logprobs.append(row_logprobs)
        return pack_sampled(rows, logprobs, eos_id, pad_id, sampling.max_new_tokens, self.device)
