"""CPU thread count of a run: a callback that sets torch's intra-op threads unless ``OMP_NUM_THREADS`` is set.

Why: on a machine that other processes also use, an OpenMP pool with more threads than free cores spins while one
of its threads waits for a core, and every step then takes many times longer (measured on 2 shared cores with a
load average of 8-13: one thread 7.8 s per RL step, two threads 54 s; ``benchmarks/results/demo_threads.md``).
``"auto"`` therefore uses only the cores that are free when the run starts (at least one; measured over half a
second from ``/proc/stat``, else from the load average): all of them on an idle machine, one on a busy one. ``OMP_NUM_THREADS``, when set, always wins.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


def busy_cores_now(window_s: float = 0.5, stat: str = "/proc/stat") -> float | None:
    """Cores other processes keep busy right now: the machine's non-idle CPU time over ``window_s`` seconds (this
    process sleeps meanwhile), in cores; None where ``/proc/stat`` cannot be read.

    Unlike the 1-minute load average it does not remember work that just ended (an install a moment ago), so a run
    started right after ``scripts/install.sh`` on an idle machine still gets every core.
    """

    def totals() -> tuple[int, int] | None:
        try:
            with open(stat, encoding="ascii") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user nice system idle iowait irq softirq steal

    first = totals()
    time.sleep(window_s)
    second = totals()
    if first is None or second is None or second[0] <= first[0]:
        return None
    busy_fraction = 1.0 - (second[1] - first[1]) / (second[0] - first[0])  # of every CPU /proc/stat counts
    return max(0.0, busy_fraction) * (os.cpu_count() or 1)


def free_cores(cores: int | None = None, load: float | None = None) -> int:
    """Cores not busy with other work: ``cores - round(load)``, at least 1.

    Args:
        cores: usable cores (default: this process's CPU affinity, else ``os.cpu_count()``).
        load: cores busy with other work (default: :func:`busy_cores_now`, else the 1-minute load average).
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        load = busy_cores_now()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - int(round(load))))


class TorchThreads(Callback):
    """Set ``torch.set_num_threads`` at setup, unless the environment sets ``OMP_NUM_THREADS``.

    Args:
        num_threads: torch intra-op threads (>= 1), or ``"auto"``: the cores free at the start of the run
            (:func:`free_cores`: all cores of an idle machine, one when other processes keep them busy).
            ``OMP_NUM_THREADS``, when set, wins: torch has read it at start-up and this callback leaves it alone.
    """

    def __init__(self, num_threads: int | str = "auto") -> None:
        if num_threads != "auto" and int(num_threads) < 1:
            raise ValueError(f"TorchThreads(num_threads={num_threads!r}): give 'auto' or at least 1 thread")
        self.num_threads = num_threads if num_threads == "auto" else int(num_threads)
        self.applied: int | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            self.applied = None  # the user's choice; torch already follows it
            return
        self.applied = free_cores() if self.num_threads == "auto" else int(self.num_threads)
        torch.set_num_threads(self.applied)
        if self.num_threads == "auto":
            rank_zero_info(f"[prpo] torch threads: {self.applied} (the cores free now; set OMP_NUM_THREADS to choose)")
