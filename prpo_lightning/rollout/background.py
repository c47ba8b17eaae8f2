"""The background thread of the asynchronous rollouts: one daemon thread running jobs in submission order."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

from prpo_lightning.scoring.deadline import _caller_context

T = TypeVar("T")
#: Seconds :meth:`BackgroundWorker.close` waits for a running job before giving up on the (daemon) thread.
CLOSE_TIMEOUT_S = 120.0


class BackgroundWorker:
    """One daemon thread that runs jobs in submission order, each in the submitting thread's torch state."""

    def __init__(self, name: str = "prpo-async-rollouts") -> None:
        self.name = name
        self.jobs: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self.thread: threading.Thread | None = None

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Queue ``job``; its result (or exception) arrives in the returned future."""
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()
        future: Future[T] = Future()
        in_context = _caller_context()
        self.jobs.put((lambda: in_context(job), future))
        return future

    def _run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as err:  # noqa: BLE001 - handed to the training thread, which re-raises it
                future.set_exception(err)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Cancel the queued jobs, let the running one finish (at most ``timeout_s``) and end the thread.

        Returns:
            True when no thread is left running.
        """
        while True:
            try:
                item = self.jobs.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].cancel()
        if self.thread is None:
            return True
        self.jobs.put(None)
        self.thread.join(timeout_s)
        alive = self.thread.is_alive()
        self.thread = None if not alive else self.thread
        return not alive


def done_future(value: T) -> Future[T]:
    """A future that already holds ``value``."""
    future: Future[T] = Future()
    future.set_result(value)
    return future


def wait_done(future: Future[Any]) -> None:
    """Block until ``future`` is done, whatever its outcome (a cancelled job: nothing runs)."""
    try:
        future.exception()
    except BaseException:  # noqa: BLE001
        pass
