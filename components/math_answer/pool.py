"""A small pool of worker processes with a hard per-task wall-clock timeout.

Why not ``concurrent.futures.ProcessPoolExecutor`` or ``signal.alarm``: neither can stop a task that hangs inside
sympy. ``SIGALRM`` only works on the main thread (the root cause of math-verify rewards silently going to zero in
threaded trainers), and an executor cannot kill one stuck worker. Here each worker owns a pipe; a task whose
deadline passes gets its worker killed (``SIGKILL``) and replaced, and the task is reported as timed out.

The pool is lazy (no process exists until the first task), safe to use from any thread, rebuilds itself after a
``fork``, and shuts its workers down on :meth:`TimeoutPool.close`, on garbage collection and at interpreter exit.
Workers are fresh interpreters started with :mod:`subprocess` (``python -c``), talking over two OS pipes with
:class:`multiprocessing.connection.Connection`. Unlike ``multiprocessing``'s ``spawn``/``forkserver`` they do not
re-import the caller's ``__main__`` (so a training script needs no ``if __name__ == "__main__"`` guard and workers do
not import torch), and unlike ``fork`` they never inherit CUDA or thread state.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from typing import Any

__all__ = ["TaskResult", "TimeoutPool"]

log = logging.getLogger(__name__)

_READY = "__ready__"


@dataclass(frozen=True)
class TaskResult:
    """What became of one task.

    Attributes:
        value: the handler's return value (``None`` on timeout or error).
        timed_out: the hard deadline passed and the worker was killed.
        error: ``"ExceptionType: message"`` if the handler raised or the worker died.
        seconds: wall-clock seconds from dispatch to result.
    """

    value: Any = None
    timed_out: bool = False
    error: str | None = None
    seconds: float = 0.0


_SYS_PATH_ENV = "PRPO_VERIFIER_WORKER_SYS_PATH"
_BOOTSTRAP = (
    "import json, os, sys; sys.path[:0] = json.loads(os.environ.pop('" + _SYS_PATH_ENV + "', '[]')); "
    "from components.math_answer.pool import _worker_entry; _worker_entry()"
)


def _resolve(path: str) -> Callable[[Any], Any]:
    module_name, _, attribute = path.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute)


def _worker_entry() -> None:
    """``python -c`` entry point of a worker: ``argv = [read_fd, write_fd, handler, memory_mb, warmup_fd_flag]``."""
    read_fd, write_fd, handler_path, memory_limit_mb = sys.argv[1:5]
    reader = Connection(int(read_fd), writable=False)
    writer = Connection(int(write_fd), readable=False)
    _worker_main(reader, writer, handler_path, int(memory_limit_mb))


def _worker_main(reader: Connection, writer: Connection, handler_path: str, memory_limit_mb: int) -> None:
    """Worker loop: receive a payload, run the handler, send the result; exit on ``None`` or EOF."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    if memory_limit_mb > 0:
        try:
            import resource

            limit = memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):  # pragma: no cover - platform dependent
            pass
    handler = _resolve(handler_path)
    try:
        warmup = reader.recv()
        if warmup is not None:
            handler(warmup)
    except (EOFError, OSError):
        return
    except Exception:  # noqa: BLE001 - warm-up is best effort
        pass
    writer.send(_READY)
    while True:
        try:
            message = reader.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message is None:
            return
        try:
            result = (handler(message), None)
        except MemoryError:
            result = (None, "MemoryError: worker memory limit reached")
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, never swallowed
            result = (None, f"{type(exc).__name__}: {str(exc)[:200]}")
        try:
            writer.send(result)
        except (OSError, ValueError):
            return


class _Worker:
    __slots__ = ("process", "reader", "writer", "ready")

    def __init__(self, process: subprocess.Popen, reader: Connection, writer: Connection) -> None:
        self.process = process
        self.reader = reader
        self.writer = writer
        self.ready = False

    def close_pipes(self) -> None:
        for conn in (self.reader, self.writer):
            try:
                conn.close()
            except OSError:
                pass

    def kill(self) -> None:
        try:
            self.process.kill()
        except OSError:
            pass
        self.close_pipes()
        try:
            self.process.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            pass


def _shutdown(workers: list[_Worker]) -> None:
    for worker in list(workers):
        try:
            worker.writer.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 1.0
    for worker in list(workers):
        try:
            worker.process.wait(timeout=max(0.01, deadline - time.monotonic()))
            worker.close_pipes()
        except (OSError, subprocess.TimeoutExpired):
            worker.kill()
    workers.clear()


class TimeoutPool:
    """Runs ``handler(payload)`` in worker processes, each call bounded by a hard wall-clock timeout.

    Args:
        handler: ``"package.module:function"``, imported in each worker.
        num_workers: number of worker processes.
        memory_limit_mb: address-space limit for each worker (0: no limit).
        startup_timeout: seconds a freshly started worker may take to import and warm up.
        warmup: a payload run once in each new worker before it reports ready (imports, parser warm-up).

    Raises:
        ValueError: if ``num_workers`` is not positive or ``handler`` is not ``"module:function"``.
    """

    def __init__(
        self,
        handler: str,
        num_workers: int = 2,
        memory_limit_mb: int = 2048,
        startup_timeout: float = 120.0,
        warmup: Any = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if ":" not in handler:
            raise ValueError(f"handler must be 'module:function', got {handler!r}")
        self._handler = handler
        self._num_workers = num_workers
        self._memory_limit_mb = int(memory_limit_mb or 0)
        self._startup_timeout = startup_timeout
        self._warmup = warmup
        self._cond = threading.Condition()
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._pid = os.getpid()
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def _spawn(self) -> _Worker:
        task_read, task_write = os.pipe()
        result_read, result_write = os.pipe()
        env = dict(os.environ)
        env[_SYS_PATH_ENV] = json.dumps([p for p in sys.path if p and os.path.isdir(p)])
        args = [str(task_read), str(result_write), self._handler, str(self._memory_limit_mb)]
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, *args],
                pass_fds=(task_read, result_write),
                stdin=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        finally:
            os.close(task_read)
            os.close(result_write)
        worker = _Worker(process, Connection(result_read, writable=False), Connection(task_write, readable=False))
        worker.writer.send(self._warmup)
        self._workers.append(worker)
        return worker

    def _check_process(self) -> None:
        """After a fork the parent's workers belong to the parent: start afresh (caller holds the lock)."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._workers = []
            self._idle = []
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError("TimeoutPool is closed")
        self._check_process()
        while len(self._workers) < self._num_workers:
            self._idle.append(self._spawn())

    def _retire(self, worker: _Worker) -> None:
        """Kills a worker and starts its replacement (caller holds the lock)."""
        worker.kill()
        if worker in self._workers:
            self._workers.remove(worker)
        if not self._closed:
            self._idle.append(self._spawn())
            self._cond.notify_all()

    def run(self, payloads: Sequence[Any], timeout: float) -> list[TaskResult]:
        """Runs every payload, in parallel across the workers.

        Args:
            payloads: the task payloads (picklable).
            timeout: hard wall-clock limit in seconds for each task, counted from the moment a ready worker
                has it.

        Returns:
            One :class:`TaskResult` per payload, in order.
        """
        results: list[TaskResult | None] = [None] * len(payloads)
        queue = deque(range(len(payloads)))
        busy: dict[Any, list] = {}  # conn -> [index, worker, deadline, start]
        while queue or busy:
            with self._cond:
                self._ensure_started()
                while queue and self._idle:
                    worker = self._idle.pop()
                    index = queue.popleft()
                    now = time.monotonic()
                    try:
                        worker.writer.send(payloads[index])
                    except (OSError, ValueError) as exc:
                        results[index] = TaskResult(error=f"could not send task: {exc}")
                        self._retire(worker)
                        continue
                    allowance = timeout if worker.ready else timeout + self._startup_timeout
                    busy[worker.reader] = [index, worker, now + allowance, now]
                if queue and not busy:
                    self._cond.wait(timeout=0.05)  # all workers are serving other threads
                    continue
            self._collect(busy, results, timeout)
        return [r if r is not None else TaskResult(error="lost task") for r in results]

    def _collect(self, busy: dict[Any, list], results: list, timeout: float) -> None:
        now = time.monotonic()
        next_deadline = min(entry[2] for entry in busy.values())
        ready = wait_connections(list(busy), timeout=max(0.0, next_deadline - now))
        now = time.monotonic()
        for conn in ready:
            index, worker, _deadline, start = busy[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError) as exc:
                exitcode = worker.process.poll()
                results[index] = TaskResult(error=f"worker died ({exitcode}): {type(exc).__name__}", seconds=now - start)
                del busy[conn]
                with self._cond:
                    self._retire(worker)
                continue
            if isinstance(message, str) and message == _READY:
                worker.ready = True
                busy[conn][2] = now + timeout
                busy[conn][3] = now
                continue
            value, error = message
            results[index] = TaskResult(value=value, error=error, seconds=now - start)
            del busy[conn]
            with self._cond:
                self._idle.append(worker)
                self._cond.notify_all()
        for conn in [c for c, entry in busy.items() if entry[2] <= now]:
            index, worker, _deadline, start = busy.pop(conn)
            startup = not worker.ready
            results[index] = TaskResult(
                timed_out=not startup,
                error="worker did not start in time" if startup else None,
                seconds=now - start,
            )
            log.warning("verifier task exceeded its %.1fs limit; worker %s killed", timeout, worker.process.pid)
            with self._cond:
                self._retire(worker)

    def close(self) -> None:
        """Stops all workers. The pool cannot be used afterwards."""
        with self._cond:
            self._closed = True
            if os.getpid() == self._pid:
                self._finalizer()
            self._idle.clear()
