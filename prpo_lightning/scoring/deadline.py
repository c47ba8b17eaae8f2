"""Time limits on user code and bounded parallel calls (issue 27, item 2).

``model.component_timeout_s`` bounds every verifier (reward) and PRM call of a step:
:func:`call_with_deadline` runs the call in a daemon worker thread and the calling thread waits for it in short
slices. Past the limit it raises :class:`~prpo_lightning.scoring.faults.ComponentTimeoutError`, which
:func:`~prpo_lightning.scoring.pipeline.guarded_call` turns into the component's error policy (a PRM: skipped under
``model.on_prm_error: skip``; a verifier or reward function: the run stops, naming it). While it waits in the main
thread, SIGTERM and SIGUSR1 (preemption) still reach their handlers, and in a single-process run the wait ends at
once with :class:`StepAbandoned`: the step's update never happens, so ``prpo-fit`` saves the state before the step
and exits 143, and the resumed run redoes the step. With several ranks the wait goes on to the limit (a rank that
left the step alone would block the others in their next collective); the step then ends on every rank and they
stop together at its end, as for any SIGTERM.

A Python thread cannot be killed: a call that never returns keeps its thread until the process ends. The thread is
a daemon, so it never keeps the process alive, and it holds no lock of the framework; the framework stops waiting
for it and never reads its late result. Calls without a limit (the default) run in the calling thread, as before.

:func:`parallel_map` calls a function on ``count`` items with at most ``workers`` daemon threads, results in item
order (reward functions, :class:`~components.rewards.CallableReward`); :func:`run_coroutines` awaits coroutines
concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from prpo_lightning.scoring.faults import ComponentTimeoutError

T = TypeVar("T")
R = TypeVar("R")
#: Seconds between two checks of a waiting call (the latency of a timeout or a stop signal).
POLL_S = 0.05
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StepAbandoned(SIGTERMException):
    """A stop signal (SIGTERM, SIGUSR1) arrived while the step waited for a component: the step is abandoned before
    its update (a :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException`, so preemption saves and exits)."""


class _Outcome:
    """What a worker thread produced: a value or the exception it raised (``SystemExit`` included)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


def _caller_context() -> Callable[[Callable[[], T]], T]:
    """Capture the calling thread's torch state (grad mode, inference mode, autocast, CUDA device), which is
    thread-local, so a component runs in a worker thread exactly as it would in the caller."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    cuda = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    autocast = [(dev, torch.get_autocast_dtype(dev)) for dev in ("cuda", "cpu") if torch.is_autocast_enabled(dev)]

    def run(call: Callable[[], T]) -> T:
        with contextlib.ExitStack() as stack:
            if cuda is not None:
                torch.cuda.set_device(cuda)
            stack.enter_context(torch.inference_mode(inference))
            stack.enter_context(torch.set_grad_enabled(grad))
            for dev, dtype in autocast:
                stack.enter_context(torch.autocast(dev, dtype=dtype))
            return call()

    return run


@contextlib.contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    """In the main thread: chain a flag in front of the Python handlers of SIGTERM/SIGUSR1 (Lightning's, the
    preemption callback's) for the duration of a wait; the handlers still run. A signal left to its default action
    (terminate) is not touched."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous: dict[int, Any] = {}
    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if not callable(handler):
            continue

        def chained(num: int, frame: Any, _handler: Callable[..., Any] = handler) -> None:
            stop.set()
            _handler(num, frame)

        previous[signum] = handler
        signal.signal(signum, chained)
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def call_with_deadline(call: Callable[[], T], timeout_s: float, what: str, setting: str) -> T:
    """Run ``call`` in a daemon thread and wait at most ``timeout_s`` seconds for it.

    Args:
        call: the component call.
        timeout_s: the limit in seconds.
        what: the call, for the messages (``"PRM MyPRM.score on 16 completions"``).
        setting: the key that sets the limit (``"model.component_timeout_s"``).

    Returns:
        The call's value; an exception it raised (``SystemExit`` included) is re-raised here.

    Raises:
        ComponentTimeoutError: the call did not return within ``timeout_s`` (it is abandoned, see the module doc).
        StepAbandoned: SIGTERM or SIGUSR1 arrived while waiting (in the main thread of a single-process run; with
            several ranks the wait goes on to the limit, so that every rank ends the step and they stop together).
    """
    outcome = _Outcome()
    in_context = _caller_context()

    def work() -> None:
        try:
            outcome.value = in_context(call)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread, which re-raises it
            outcome.error = err
        finally:
            outcome.done.set()

    start = time.monotonic()
    alone = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                 and torch.distributed.get_world_size() > 1)
    worker = threading.Thread(target=work, name=f"prpo-component: {what}"[:60], daemon=True)
    with _stop_signals() as stop:
        worker.start()
        while not outcome.done.wait(POLL_S):
            if stop.is_set() and alone:
                raise StepAbandoned(f"a stop signal arrived while waiting for {what}: the step is abandoned before "
                                    "its update (the call is left running in a daemon thread)")
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise ComponentTimeoutError(
                    f"{what} did not return within {timeout_s:g} s ({setting}={timeout_s:g}); it is abandoned (a "
                    f"Python thread cannot be killed: it runs on in a daemon thread until the process ends). Fix: "
                    f"make the component answer (a stalled server, a sleep, an endless loop), or raise {setting}",
                    what=what, seconds=timeout_s, setting=setting)
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def parallel_map(function: Callable[[int], R], count: int, workers: int) -> list[R]:
    """``[function(0), ..., function(count - 1)]`` computed by at most ``workers`` daemon threads, in item order.

    Every item is computed even when one raises; then the exception of the lowest failing item is raised (the
    same one a sequential loop would raise). With ``workers <= 1`` the items run in order in the calling thread.
    """
    if workers <= 1 or count <= 1:
        return [function(i) for i in range(count)]
    results: list[Any] = [None] * count
    errors: dict[int, BaseException] = {}
    items = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(items, None)
            if i is None:
                return
            try:
                results[i] = function(i)
            except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
                errors[i] = err

    threads = [threading.Thread(target=worker, name=f"prpo-reward-{k}", daemon=True)
               for k in range(min(workers, count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[min(errors)]
    return results


def run_coroutines(factories: Sequence[Callable[[], Awaitable[R]]], limit: int | None) -> list[R | BaseException]:
    """Await ``factory()`` for every factory concurrently (at most ``limit`` at a time; None: all), in a fresh
    event loop (on a helper daemon thread when this thread already runs one). Returns the values in order, an
    exception object in place of a call that raised."""

    async def main() -> list[Any]:
        gate = asyncio.Semaphore(limit or len(factories) or 1)

        async def one(factory: Callable[[], Awaitable[R]]) -> Any:
            async with gate:
                try:
                    return await factory()
                except BaseException as err:  # noqa: BLE001 - reported per row by the caller
                    return err

        return list(await asyncio.gather(*(one(f) for f in factories)))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    return _on_helper_thread(main)


def _on_helper_thread(main: Callable[[], Awaitable[list[Any]]]) -> list[Any]:
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(asyncio.run(main())), name="prpo-reward-loop", daemon=True)
    thread.start()
    thread.join()
    if not box:
        raise RuntimeError("the reward's event loop ended without a result")
    return box[0]


class RewardClock:
    """Times the reward (the verifier's ``verify_batch``) against the rest of the step, and warns **once** when it
    takes longer than everything else since the previous reward call (generation, PRM, update).

    Args:
        min_seconds: rewards faster than this are never reported.
        clock: the time source (seconds).
    """

    def __init__(self, min_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_seconds, self.clock = min_seconds, clock
        self.warned = False
        self._last_end: float | None = None

    @contextlib.contextmanager
    def timing(self, name: str) -> Iterator[None]:
        """Time one reward call of the verifier ``name``."""
        start = self.clock()
        yield
        end = self.clock()
        reward_s, rest_s = end - start, (start - self._last_end) if self._last_end is not None else None
        self._last_end = end
        if self.warned or rest_s is None or reward_s < self.min_seconds or reward_s <= rest_s:
            return
        self.warned = True
        rank_zero_warn(f"[prpo] the reward ({name}) took {reward_s:.1f} s, longer than the rest of the step "
                       f"({rest_s:.1f} s: generation, PRM, update). A reward function is called one row at a time: "
                       "give components.rewards.CallableReward workers: N (rows in N threads) or write it as an "
                       "async def (rows awaited concurrently); model.component_timeout_s bounds a call that hangs. "
                       "(Warned once.)")
