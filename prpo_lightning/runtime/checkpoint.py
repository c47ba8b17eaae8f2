"""Crash-safe checkpoint writing.

:class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the target's directory, flushes it to
disk (``fsync``), and only then renames it over the target with :func:`os.replace`, which is atomic on POSIX
file systems; finally the directory entry is synced. A process killed at any moment therefore leaves either
the previous checkpoint or the new one at ``path``, never a truncated file (a stray ``*.tmp-<pid>`` file may
remain; it is ignored and cleaned up by the next save of the same path).

``prpo-fit`` installs it by default (``trainer.plugins``). It applies to single-file checkpoints (single
device, DDP). DeepSpeed writes sharded checkpoint *directories* through its own engine; there, keep more than
one checkpoint (``save_top_k: -1`` or ``every_n_train_steps``) so that an interrupted save never leaves you
without a complete one.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partially written ``path`` behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(glob.escape(str(path)) + ".tmp-*"):  # left by an earlier killed save
        try:
            os.remove(stale)
        except OSError:
            pass
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` with atomic, fsynced local writes.

    Remote paths (``s3://`` …) fall back to Lightning's own transactional writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or "file" not in fs.protocol:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


#: Where each config class lived before the layout of issue 21: checkpoints written then name these paths.
_EARLIER_CONFIG_PATHS = {
    "SamplingConfig": "prpo_lightning.rollout", "DynamicSamplingConfig": "prpo_lightning.dynamic_sampling",
    "MismatchCheck": "prpo_lightning.offpolicy", "RolloutCorrectionConfig": "prpo_lightning.offpolicy",
    "RefSyncConfig": "prpo_lightning.refsync", "LoRAConfig": "prpo_lightning.lora",
    "OverlongConfig": "prpo_lightning.shaping", "RewardShapingConfig": "prpo_lightning.shaping",
}


def register_safe_globals() -> None:
    """Allow the project's config dataclasses (stored in checkpoint hyper-parameters) under ``torch.load``'s
    default ``weights_only=True``, so ``--ckpt_path`` resumes without unpickling arbitrary code; checkpoints that
    name a config's earlier module path load too."""
    from prpo_lightning.config import CONFIGS

    earlier = [(cls, f"{_EARLIER_CONFIG_PATHS[cls.__name__]}.{cls.__name__}") for cls in CONFIGS
               if cls.__name__ in _EARLIER_CONFIG_PATHS]
    torch.serialization.add_safe_globals([*CONFIGS, *earlier])


def collect_rng_states() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, numpy, python) as tensors and plain types (``weights_only``-loadable)."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states` (the CUDA states are skipped without CUDA)."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


register_safe_globals()
