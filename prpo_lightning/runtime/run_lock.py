"""One training run per checkpoint folder, and one log folder per run.

:class:`RunLock` is the lock a ``prpo-fit fit`` run takes on each of its checkpoint folders (rank zero only): a file
``.<folder>.prpo-lock`` next to the folder (so the folder itself stays empty until the first checkpoint), created
with ``O_EXCL``, that records the owner's host, pid, start time, command and SLURM job.
A second live run there stops with a :class:`CheckpointFolderLockedError` naming the owner, before it reads or
writes any checkpoint. A lock whose owner is gone is taken over with a warning that says so:

- same host, and no process with the recorded pid;
- the same SLURM job, restarted (a requeued job: ``SLURM_RESTART_COUNT`` grew);
- no heartbeat for :data:`STALE_AFTER_S` seconds (an owner on another host; the owner touches the file every
  :data:`HEARTBEAT_S` seconds while it runs).

:func:`claim_log_version` gives a CSV/TensorBoard logger without a fixed ``version`` the first free ``version_N``
by creating that folder atomically, so two runs started together never share one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

LOCK_SUFFIX = ".prpo-lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class CheckpointFolderLockedError(RuntimeError):
    """Another live run uses this checkpoint folder."""


def _owner() -> dict[str, Any]:
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(info: dict[str, Any], age_s: float) -> str | None:
    """Why the lock's owner is known to be gone, or None while it may still run."""
    me = _owner()
    if info.get("host") == me["host"] and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
        return f"process {info['pid']} on {info['host']} no longer exists"
    if me["slurm_job_id"] and info.get("slurm_job_id") == me["slurm_job_id"] \
            and int(info.get("slurm_restart", 0)) < me["slurm_restart"]:
        return f"it belongs to an earlier start of this SLURM job {me['slurm_job_id']} (requeued)"
    if age_s > STALE_AFTER_S:
        return f"its owner has not refreshed it for {age_s:.0f} s (> {STALE_AFTER_S:.0f} s)"
    return None


@contextlib.contextmanager
def _folder_mutex(folder: str) -> Iterator[None]:
    """Serialise lock checks of concurrent starts (``flock`` on the folder; skipped where unsupported)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


class RunLock:
    """The lock of one run on ``folder`` (see the module docstring)."""

    def __init__(self, folder: str) -> None:
        self.folder = os.path.abspath(folder)
        self.parent = os.path.dirname(self.folder)
        self.path = os.path.join(self.parent, f".{os.path.basename(self.folder)}{LOCK_SUFFIX}")
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            CheckpointFolderLockedError: another live run holds it (its host, pid, start time and command named).
        """
        os.makedirs(self.parent, exist_ok=True)
        owner = _owner()
        with _folder_mutex(self.parent):
            if os.path.exists(self.path):
                info, age = self._read()
                reason = _stale_reason(info, age)
                if reason is None:
                    raise CheckpointFolderLockedError(
                        f"checkpoint folder {self.folder} is in use by another run (host {info.get('host')}, pid "
                        f"{info.get('pid')}, started {info.get('started')}, command: {info.get('command')}; lock "
                        f"file {self.path}, refreshed {age:.0f} s ago). Two runs in one folder would overwrite each "
                        "other's checkpoints, and --ckpt_path last would load the other run's. Fix: give this run "
                        "its own trainer.logger save_dir/name (or ModelCheckpoint dirpath), or wait for that run to "
                        f"end; if it is no longer running, delete {self.path}."
                    )
                warnings.warn(f"[prpo] taking over the stale lock {self.path} of a run that ended without "
                              f"releasing it: {reason} (was: {info.get('command')}).", stacklevel=2)
                os.remove(self.path)
            self._token = f"{owner['host']}:{owner['pid']}:{time.time_ns()}"
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as fh:
                json.dump({**owner, "token": self._token}, fh)
        self._thread = threading.Thread(target=self._heartbeat, name="prpo-run-lock", daemon=True)
        self._thread.start()

    def _read(self) -> tuple[dict[str, Any], float]:
        try:
            with open(self.path) as fh:
                info = json.load(fh)
            age = time.time() - os.path.getmtime(self.path)
        except (OSError, ValueError):
            return {}, float("inf")  # unreadable or half-written by a killed run: treated as stale
        return (info if isinstance(info, dict) else {}), age

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock file if it is still this run's own."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._token is None:
            return
        with contextlib.suppress(OSError), _folder_mutex(self.parent):
            info, _ = self._read()
            if info.get("token") == self._token:
                os.remove(self.path)
        self._token = None


def claim_log_version(logger: Any) -> None:
    """Give ``logger`` (CSVLogger or TensorBoardLogger without a fixed ``version``) the first free ``version_N``
    by creating that folder with ``os.mkdir``, which fails if another run created it first (then N+1 is tried)."""
    if getattr(logger, "_version", "set") is not None or not hasattr(logger, "root_dir"):
        return
    root = logger.root_dir
    os.makedirs(root, exist_ok=True)
    taken = [int(d.split("_", 1)[1]) for d in os.listdir(root)
             if d.startswith("version_") and d.split("_", 1)[1].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(os.path.join(root, f"version_{version}"))
        except FileExistsError:
            version += 1
            continue
        logger._version = version
        return
