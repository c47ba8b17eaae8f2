"""Helpers of the vLLM engines (importable without vLLM): the complete-weight-stream check, the model folders of
killed runs, and a vLLM warning that repeats at every weight sync."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

_TMP_PREFIX = "prpo_vllm_"


class IncompleteWeightsError(RuntimeError):
    """A weight sync streamed a tensor the engine does not hold, a tensor of the wrong shape, the same tensor twice,
    or ended without every tensor the engine holds. The engine's weight version does not advance."""


def weight_manifest(policy: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a sync of ``policy`` must stream (what the engine was loaded with).

    The names are those of :func:`~components.engine_vllm.policy_weights`: checkpoint names under every alias
    (``named_parameters(remove_duplicate=False)``: a tied ``lm_head.weight`` is listed), base-model names for a PEFT
    policy (adapters merged in, so ``lora_`` tensors are not streamed), and the full shape of ZeRO-3 shards
    (``ds_shape``). Reads no tensor data: nothing is gathered.
    """
    from prpo_lightning.training.lora import PEFT_PREFIX, is_lora

    peft = is_lora(policy)
    manifest: dict[str, tuple[int, ...]] = {}
    for name, param in policy.named_parameters(remove_duplicate=False):
        if peft:
            if ".lora_" in name:
                continue
            name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        manifest[name] = tuple(int(n) for n in getattr(param, "ds_shape", param.shape))
    return manifest


def checked_weights(stream: Iterable[tuple[str, Tensor]], manifest: dict[str, tuple[int, ...]],
                    owner: str) -> Iterator[tuple[str, Tensor]]:
    """Pass ``stream`` through, refusing it as soon as it is wrong (decided per tensor, before it is used) and at
    its end when a tensor never arrived.

    Args:
        stream: ``(name, tensor)`` pairs in checkpoint format.
        manifest: every tensor the engine holds (:func:`weight_manifest` of the policy it was built from).
        owner: the engine's name for messages.

    Raises:
        IncompleteWeightsError: an unknown name, a wrong shape, a repeated name, or (when the stream ends)
            missing names, each listed.
    """
    seen: set[str] = set()
    for name, tensor in stream:
        want = manifest.get(name)
        if want is None:
            raise IncompleteWeightsError(
                f"{owner}: the weight stream has {name!r}, which the engine does not hold (it holds "
                f"{len(manifest)} tensors, e.g. {sorted(manifest)[:3]}): the policy's names do not match the engine's"
            )
        if tuple(tensor.shape) != want:
            raise IncompleteWeightsError(
                f"{owner}: the weight stream has {name!r} of shape {tuple(tensor.shape)}, the engine holds {want}"
            )
        if name in seen:
            raise IncompleteWeightsError(f"{owner}: the weight stream has {name!r} twice")
        seen.add(name)
        yield name, tensor
    missing = sorted(set(manifest) - seen)
    if missing:
        raise IncompleteWeightsError(
            f"{owner}: the weight stream ended without {len(missing)} of the {len(manifest)} tensors the engine "
            f"holds ({', '.join(missing[:4])}{', …' if len(missing) > 4 else ''}); the sync is refused and the "
            "engine's weight version does not advance, so sampling from it raises StaleWeightsError"
        )


def cpu_prefill_settings(max_model_len: int | None, config: Any) -> dict[str, Any]:
    """vLLM settings that keep every prompt's prefill in one piece on the CPU backend.

    vLLM 0.32's CPU backend crashes (``RuntimeError: CPU Generator does not use offset``) when the prefill of a
    seeded request is split over two scheduler steps (chunked prefill), which happens as soon as a rollout's prompt
    tokens pass ``max_num_batched_tokens`` (4096): e.g. 32 prompts × 8 samples × 25 tokens. Chunked prefill is off
    and the token budget holds the longest sequence (vLLM's rule for that mode), at least 4096.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = int(max_model_len or getattr(text, "max_position_embeddings", 0) or 4096)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(length, 4096)}


def tmp_prefix() -> str:
    """This process's prefix for its vLLM model folder: ``prpo_vllm_<host>_<pid>_``."""
    import socket

    return f"{_TMP_PREFIX}{socket.gethostname()}_{os.getpid()}_"


class _RotaryWarningOnce:
    """Logging filter: vLLM's ``RotaryEmbedding: Failed to load weights`` passes the first time only.

    The rotary layer has no weights, only a cos/sin cache that vLLM computes from the config and puts back after
    every in-place reload, so the warning repeats at every sync without meaning anything. The same warning for
    any other layer (a real failure) is always shown.
    """

    def __init__(self) -> None:
        self.seen = False

    def filter(self, record: Any) -> bool:
        if record.getMessage() != "RotaryEmbedding: Failed to load weights":
            return True
        shown, self.seen = not self.seen, True
        return shown


@contextlib.contextmanager
def quiet_vllm(level: str = "ERROR") -> Iterator[None]:
    """While an in-process vLLM engine is built: vLLM's loggers at ``level``, unless the user set
    ``VLLM_LOGGING_LEVEL``.

    vLLM configures its loggers from that variable when an engine starts; it is set for the construction only and
    removed afterwards, so child processes (a launched server) keep their full logs. Loggers configured before (vLLM
    already imported) are set directly.
    """
    import logging
    import sys
    import warnings

    if os.environ.get("VLLM_LOGGING_LEVEL"):
        yield  # the user's level wins
        return
    warnings.filterwarnings("ignore", message=r"`torch.distributed.reduce_op` is deprecated", category=FutureWarning)

    def set_loggers() -> None:
        if "vllm" in sys.modules:
            logger = logging.getLogger("vllm")
            logger.setLevel(level)
            for handler in logger.handlers:
                handler.setLevel(level)

    os.environ["VLLM_LOGGING_LEVEL"] = level
    set_loggers()
    try:
        yield
    finally:
        os.environ.pop("VLLM_LOGGING_LEVEL", None)
        set_loggers()


def quiet_rotary_reload_warning() -> None:
    """Install :class:`_RotaryWarningOnce` on vLLM's layer-wise reload logger (once per process)."""
    import logging

    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryWarningOnce) for f in log.filters):
        log.addFilter(_RotaryWarningOnce())


def remove_stale_model_dirs(tmp_root: str | None = None) -> list[str]:
    """Delete the vLLM model folders (``prpo_vllm_<host>_<pid>_*`` in the temp folder) that killed runs on this
    host left behind: those whose process no longer exists. Folders of live processes, of other hosts and of
    this process are kept. Returns the folders removed."""
    import shutil
    import socket

    root = tmp_root or tempfile.gettempdir()
    mine = f"{_TMP_PREFIX}{socket.gethostname()}_"
    removed = []
    for name in os.listdir(root):
        pid_text = name[len(mine):].split("_", 1)[0] if name.startswith(mine) else ""
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(os.path.join(root, name))
    return removed
