"""How :class:`~components.engine_vllm_server.VLLMServerEngine` stays safe across ranks and threads.

- :func:`run_on_rank0`: rank 0 does the servers' work (launch, weight push, version stamps) while the other ranks
  join the ZeRO-3 gathers of the same weight stream; rank 0's result, or its error, reaches every rank, so no rank is
  left waiting in an unmatched collective.
- :func:`send_all`: the requests of a rollout, sent concurrently from worker threads; a launched server found dead is
  restarted on the calling (main) thread after the pool, never from a worker thread (the kernel's parent-death signal
  follows the thread that started a child, so a server started by a worker thread would die with it), and its
  requests are sent again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from components.engine_vllm import policy_weights
from components.vllm_server import ServerClient, ServerError


class ServerUnavailableError(RuntimeError):
    """A vLLM server stayed unreachable after the retries (and, for a launched one, a restart)."""


class DeadServer(Exception):
    """A launched server died during a request sent from a worker thread (restarted by the main thread)."""

    def __init__(self, slot: int) -> None:
        super().__init__(slot)
        self.slot = slot


def wait_healthy(url: str, timeout_s: float) -> bool:
    """Poll ``url/health`` until it answers (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    probe = ServerClient(url, timeout_s=5.0, retries=0)
    while time.monotonic() < deadline:
        try:
            probe.get("/health")
            return True
        except ServerError:
            time.sleep(1.0)
    return False


def run_on_rank0(policy: torch.nn.Module | None, work: Callable[[Any], Any], rank: int, world: int,
                 owner: str) -> Any:
    """Run ``work(stream)`` on rank 0 only, with the policy's weight stream (None: no stream), and return its result
    on every rank.

    Under ZeRO-3 the other ranks iterate the same stream (its gathers are collectives), and rank 0 drains it when
    ``work`` fails midway. Rank 0's error is broadcast: the other ranks raise a :class:`ServerError` naming it, rank 0
    re-raises the original.
    """
    zero3 = policy is not None and any(hasattr(p, "ds_id") for p in policy.parameters())
    result, error = None, None
    if rank == 0:
        stream = policy_weights(policy) if policy is not None else iter(())
        try:
            result = work(stream)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = err
            if zero3:
                try:
                    for _ in stream:
                        pass
                except Exception:  # noqa: BLE001 - the first error is the one reported
                    pass
    elif zero3:
        for _ in policy_weights(policy):  # join rank 0's gathers
            pass
    if world > 1:
        box = [None if error is None else f"{type(error).__name__}: {error}", result]
        torch.distributed.broadcast_object_list(box, src=0)
        if rank != 0 and box[0] is not None:
            raise ServerError(f"{owner}: rank 0 failed: {box[0]}")
        result = box[1]
    if error is not None:
        raise error
    return result


def send_all(bodies: list[dict[str, Any]], slot_of: Callable[[int], int], on_server: Callable[..., Any],
             restart: Callable[[int], None], max_concurrent: int) -> list[Any]:
    """Send ``bodies`` (one generate request each) concurrently and return the answers in order.

    Args:
        bodies: the requests.
        slot_of: the server of request ``i``.
        on_server: ``on_server(slot, call, restart=False)`` runs ``call(client)``; it raises :class:`DeadServer` for
            a launched server that died.
        restart: restarts a dead server (called here, on the calling thread).
        max_concurrent: requests in flight.

    Raises:
        ServerUnavailableError: a restarted server died again.
    """
    def send(job: tuple[int, dict[str, Any]]) -> Any:
        index, body = job
        try:
            return on_server(slot_of(index), lambda c: c.post("/inference/v1/generate", body), restart=False)
        except DeadServer as dead:
            return dead

    jobs = list(enumerate(bodies))
    workers = min(max_concurrent, len(jobs))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vllm-server-request") as pool:
        answers = list(pool.map(send, jobs))
    dead = sorted({a.slot for a in answers if isinstance(a, DeadServer)})
    if not dead:
        return answers
    for slot in dead:
        restart(slot)
    again = [job for job, answer in zip(jobs, answers) if isinstance(answer, DeadServer)]
    with ThreadPoolExecutor(max_workers=min(workers, len(again)), thread_name_prefix="vllm-server-retry") as pool:
        for (index, _), answer in zip(again, pool.map(send, again)):
            if isinstance(answer, DeadServer):
                raise ServerUnavailableError(f"server {answer.slot} died again right after its restart")
            answers[index] = answer
    return answers
