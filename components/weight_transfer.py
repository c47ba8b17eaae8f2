"""How :class:`~components.engine_vllm_server.VLLMServerEngine` moves the policy's weights into vLLM servers.

Two transports, one contract: ``push(stream, version)`` consumes a ``(name, tensor)`` stream that has already been
checked tensor by tensor (:func:`~components.vllm_support.checked_weights`), makes every server hold those weights,
and stamps them with ``version`` on the server (``/update_weight_version``), so that every sample the server
returns carries the version that produced it.

- :class:`DiskTransport` (CPU, and any setup with a folder that trainer and servers share): the stream is written
  as safetensors shards to ``<root>/weights/v<version>/``, renamed into place only when complete, then each server
  reloads it in place (``POST /collective_rpc`` ``reload_weights`` with ``weights_path``; needs
  ``VLLM_SERVER_DEV_MODE=1``). A stream that fails midway leaves no folder and no server touched.
- :class:`NCCLTransport` (GPU): vLLM's native weight-transfer API. The server is launched with
  ``--weight-transfer-config '{"backend": "nccl"}'``; at setup rank 0 of the trainer and each server's workers
  form an NCCL group (``/init_weight_transfer_engine``), and each push broadcasts the tensors while the server
  receives them (``/start_weight_update``, ``/update_weights``, ``/finish_weight_update``), driven by vLLM's own
  ``NCCLTrainerWeightTransferEngine``. Needs vLLM importable in the trainer and CUDA; CI cannot run it, the GPU
  check (``benchmarks/gpu_check``) does when a GPU with vLLM is lent.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from components.vllm_server import ServerClient, ServerError, ServerUnreachableError

#: A safetensors shard is written once this many bytes are buffered (bounded memory for large policies).
SHARD_BYTES = 1 << 30


def set_version(client: ServerClient, version: int) -> None:
    """Stamp the server's weights with ``version`` (``POST /update_weight_version``)."""
    client.post("/update_weight_version", {"new_version": str(int(version))})


def server_version(client: ServerClient) -> str:
    """The weight version the server holds (``GET /weight_info``; ``"default"`` before the first stamp)."""
    return str(client.get("/weight_info")["weight_version"])


class DiskTransport:
    """Safetensors in a shared folder, reloaded in place by each server.

    Args:
        root: a folder that the trainer writes and every server reads (the same path on both sides).
        shard_bytes: bytes per safetensors shard.
    """

    name = "disk"
    server_args: tuple[str, ...] = ()

    def __init__(self, root: str, shard_bytes: int = SHARD_BYTES) -> None:
        self.root = os.path.join(root, "weights")
        self.shard_bytes = int(shard_bytes)
        self.latest: str | None = None  # folder of the newest complete version

    def setup(self, clients: list[ServerClient]) -> None:
        """Nothing to set up: the servers read the folder."""
        os.makedirs(self.root, exist_ok=True)

    def write(self, stream: Iterable[tuple[str, Tensor]], version: int) -> str:
        """Write ``stream`` as shards into ``v<version>`` (via a temporary name, renamed when complete)."""
        from safetensors.torch import save_file

        final = os.path.join(self.root, f"v{int(version)}")
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        try:
            shard: dict[str, Tensor] = {}
            size, index = 0, 0
            for name, tensor in stream:
                shard[name] = tensor.detach().to("cpu", copy=True).contiguous()  # own storage: tied weights differ
                size += tensor.numel() * tensor.element_size()
                if size >= self.shard_bytes:
                    save_file(shard, os.path.join(partial, f"model-{index:05d}.safetensors"))
                    shard, size, index = {}, 0, index + 1
            if shard or index == 0:
                save_file(shard, os.path.join(partial, f"model-{index:05d}.safetensors"))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        return final

    def load(self, client: ServerClient, folder: str, version: int) -> None:
        """Make one server reload ``folder`` in place, drop its prefix cache and stamp ``version``."""
        try:
            client.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": folder}})
        except ServerUnreachableError:
            raise
        except ServerError as err:
            raise ServerError(f"{client.url} could not load the policy's weights from {folder} ({err}). Does it "
                              "serve the policy's architecture (same config: vocabulary, layers, sizes)? Its log "
                              "says which tensor failed.") from err
        client.post("/reset_prefix_cache")
        set_version(client, version)

    def push(self, stream: Iterable[tuple[str, Tensor]], version: int, clients: list[ServerClient]) -> None:
        """Write the version, load it into every server, then delete the older versions."""
        folder = self.write(stream, version)
        for client in clients:
            self.load(client, folder, version)
        previous, self.latest = self.latest, folder
        if previous is not None and previous != folder:
            shutil.rmtree(previous, ignore_errors=True)

    def restore(self, client: ServerClient, version: int) -> None:
        """Give a restarted server the newest complete version (nothing to do before the first push)."""
        if self.latest is not None:
            self.load(client, self.latest, version)
        else:
            set_version(client, version)

    def teardown(self) -> None:
        """Delete the written versions."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.latest = None


class _HTTPSyncClient:
    """vLLM's weight-sync client protocol (four methods) over :class:`ServerClient`."""

    def __init__(self, client: ServerClient) -> None:
        self.client = client

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.client.post("/init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self.client.post("/start_weight_update")

    def update_weights(self, update_info: Any) -> None:
        self.client.post("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.client.post("/finish_weight_update", None if weight_version is None else {"weight_version": weight_version})


class NCCLTransport:
    """vLLM's native NCCL weight transfer, one NCCL group per server (trainer rank 0 + the server's TP workers).

    Args:
        manifest: name → shape of every tensor (the order of the stream).
        dtype: the wire dtype (the policy's).
        tensor_parallel_size: workers per server.
        master_address: this host's address as the servers reach it.
    """

    name = "nccl"
    server_args: tuple[str, ...] = ("--weight-transfer-config", '{"backend": "nccl"}')

    def __init__(self, manifest: dict[str, tuple[int, ...]], dtype: torch.dtype, tensor_parallel_size: int,
                 master_address: str = "127.0.0.1") -> None:
        if not torch.cuda.is_available():
            raise ValueError("model.engine.weight_transfer 'nccl' needs CUDA in the trainer; use 'disk' on CPU")
        try:
            import vllm.distributed.weight_transfer.nccl_engine  # noqa: F401
        except ImportError as err:
            raise ImportError("model.engine.weight_transfer 'nccl' drives vLLM's NCCL weight transfer from the trainer: "
                              "install vLLM in the trainer's environment too, or use weight_transfer: disk") from err
        self.manifest, self.dtype, self.tp = manifest, dtype, int(tensor_parallel_size)
        self.master_address = master_address
        self.engines: list[Any] = []
        self.clients: list[ServerClient] = []
        self._stream: Iterable[tuple[str, Tensor]] | None = None

    def _source(self) -> Any:
        """A vLLM ``WeightSource`` whose metadata is the manifest and whose iteration is the current stream."""
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

        transport = self

        class PolicySource(WeightSource):
            def metadata(self) -> list[ParamMeta]:
                return [ParamMeta(n, transport.dtype, s) for n, s in transport.manifest.items()]

            def __iter__(self) -> Iterator[tuple[str, Tensor]]:
                assert transport._stream is not None, "push() sets the stream"
                for name, tensor in transport._stream:
                    yield name, tensor.to("cuda", transport.dtype)

        return PolicySource()

    def setup(self, clients: list[ServerClient]) -> None:
        """Form one NCCL group per server (rendezvous on a free port of this host)."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        from components.vllm_server import free_port

        self.clients = list(clients)
        for client in clients:
            info = NCCLTrainerInitInfo(master_address=self.master_address, master_port=free_port(),
                                       world_size=1 + self.tp, rank=0)
            self.engines.append(NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=_HTTPSyncClient(client), source=self._source()))

    def push(self, stream: Iterable[tuple[str, Tensor]], version: int, clients: list[ServerClient]) -> None:
        """Broadcast the stream to each server in turn and stamp the version.

        With several servers the (single-pass, checked) stream is held in memory once and sent to each; the NCCL
        broadcast has no time limit of its own (a server that dies mid-transfer leaves the trainer waiting in NCCL
        until its watchdog), so restart such a run from its last checkpoint.
        """
        items = list(stream) if len(clients) > 1 else stream
        for engine, client in zip(self.engines, clients):
            self._stream = items
            engine.send_weights()
            client.post("/reset_prefix_cache")
            set_version(client, version)
        self._stream = None

    def restore(self, client: ServerClient, version: int) -> None:
        raise RuntimeError("VLLMServerEngine: a restarted server cannot rejoin an NCCL weight-transfer group; "
                           "restart the run from its last checkpoint (--ckpt_path last)")

    def teardown(self) -> None:
        """Close the trainer's side and each server's side of the NCCL groups (a server keeps running)."""
        for engine in self.engines:
            engine.shutdown()
        for client in self.clients:
            try:
                client.post("/shutdown_weight_transfer_engine")
            except ServerError:
                pass  # the server is gone: nothing left to close
        self.engines, self.clients = [], []
