"""Crash-safe checkpoint writing.

:class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the target's directory, flushes it to
disk (``fsync``), and only then renames it over the target with :func:`os.replace`, which is atomic on POSIX
file systems; finally the directory entry is synced. A process killed at any moment therefore leaves either
the previous checkpoint or the new one at ``path``, never a truncated file (a stray ``*.tmp-<pid>`` file may
remain; it is ignored and removed by the next save of the same path once process ``<pid>`` has ended: a save
never deletes the temporary file of another live run).

**Integrity.** ``torch.save`` writes a zip archive with a CRC-32 checksum of every record (the pickled structure and
each tensor's bytes). :func:`verify_checkpoint` checks them all, and the archive's structure, before a checkpoint
is loaded: ``AtomicCheckpointIO.load_checkpoint`` (so ``--ckpt_path``), ``prpo-fit``'s ``--ckpt_path`` before any
model is built, and ``prpo-export``. A damaged file (zeroed or random bytes, truncation) is refused with a
:class:`CheckpointDamagedError` naming it and the next-newest intact checkpoint of its folder. The checksums travel
inside the file, so copies, ``save_last`` links and moved files stay verifiable, and no crash can leave a
checkpoint and a separate checksum file out of step. Verifying reads the whole file once more.

``prpo-fit`` installs it by default (``trainer.plugins``). It applies to single-file checkpoints (single
device, DDP). DeepSpeed writes sharded checkpoint *directories* through its own engine; there, keep more than
one checkpoint (``save_top_k: -1`` or ``every_n_train_steps``) so that an interrupted save never leaves you
without a complete one.
"""

from __future__ import annotations

import glob
import os
import zipfile
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


def _pid_alive(pid_text: str) -> bool:
    """Whether the process with this pid (as text) runs on this machine; False for a non-number."""
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # our own earlier, interrupted save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class CheckpointDamagedError(ValueError):
    """A checkpoint file whose content does not match its checksums (or is not a checkpoint at all)."""


def _damage(path: str) -> str | None:
    """Why the checkpoint file ``path`` is damaged, or None when every record matches its CRC-32."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                return "it is not a torch checkpoint archive (no zip header): truncated, overwritten or another format"
        with zipfile.ZipFile(path) as archive:
            if not any(n.endswith("data.pkl") for n in archive.namelist()):
                return "it is a zip archive but not a torch checkpoint (no data.pkl)"
            bad = archive.testzip()
    except OSError as err:
        return f"it cannot be read ({type(err).__name__}: {err})"
    except Exception as err:  # noqa: BLE001  (zipfile raises BadZipFile, UnicodeDecodeError, struct.error, ...)
        return f"its archive structure is damaged ({type(err).__name__}: {err})"
    if bad is not None:
        return f"record {bad!r} does not match its CRC-32 checksum (the file was changed after it was written)"
    return None


#: (path, size, mtime_ns, inode) of files verified intact by this process: a file is verified once per version.
_VERIFIED: set[tuple[str, int, int, int]] = set()


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check a local single-file checkpoint against the CRC-32 checksums stored in it (see the module docstring).

    Directories (DeepSpeed's sharded checkpoints) and remote paths are not checked.

    Raises:
        CheckpointDamagedError: naming ``path``, what is wrong and the next-newest intact checkpoint in its folder.
    """
    path = str(path)
    if "://" in path or not os.path.isfile(path):
        return
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _VERIFIED:
        return
    why = _damage(path)
    if why is None:
        _VERIFIED.add(key)
        return
    good = next_intact_checkpoint(path)
    hint = (f"The next-newest intact checkpoint in that folder is {good}: resume with --ckpt_path {good}."
            if good else "No other intact checkpoint is in that folder.")
    raise CheckpointDamagedError(f"checkpoint {path} is damaged: {why}. Refusing to load it. {hint}")


def next_intact_checkpoint(bad: str | os.PathLike) -> str | None:
    """The newest ``*.ckpt`` file in ``bad``'s folder (by modification time) that passes :func:`verify_checkpoint`,
    other than ``bad`` and links to it; None if there is none."""
    bad_real = os.path.realpath(bad)
    folder = os.path.dirname(str(bad)) or "."  # relative stays relative in the message
    candidates = []
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        if name.endswith(".ckpt") and os.path.isfile(p) and os.path.realpath(p) != bad_real:
            candidates.append((os.path.getmtime(p), p))
    for _, p in sorted(candidates, reverse=True):
        if _damage(p) is None:
            return p
    return None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partially written ``path`` behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(glob.escape(str(path)) + ".tmp-*"):  # left by an earlier killed save
        if _pid_alive(stale.rsplit(".tmp-", 1)[1]):
            continue  # another live process is writing it (two runs in one folder): never delete its file
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

    def load_checkpoint(self, path: Any, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, after :func:`verify_checkpoint` (a damaged file is refused by name)."""
        verify_checkpoint(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


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
