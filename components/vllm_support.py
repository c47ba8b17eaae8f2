"""Process-level helpers of :class:`~components.engine_vllm.VLLMEngine` (importable without vLLM): the model
folders of killed runs, and a vLLM warning that repeats at every weight sync."""

from __future__ import annotations

import os
import tempfile
from typing import Any

_TMP_PREFIX = "prpo_vllm_"


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
