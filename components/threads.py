"""CPU thread count of a run: a callback that sets torch's intra-op threads unless ``OMP_NUM_THREADS`` is set.

Why the demo runs on one thread by default: on a 2-core machine that other processes also use, an OpenMP pool of
two threads spins while one of its threads waits for a busy core, and a step then takes many times longer than on
one thread (measured in ``benchmarks/results/demo_threads.md``: ``benchmarks/demo_threads.py``). On idle cores the
tiny demo policy gains little from a second thread. One thread degrades gracefully; set ``OMP_NUM_THREADS`` to
choose otherwise (it always wins over this callback).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class TorchThreads(Callback):
    """Set ``torch.set_num_threads(num_threads)`` at setup, unless the environment sets ``OMP_NUM_THREADS``.

    Args:
        num_threads: torch intra-op threads for the run (>= 1). ``OMP_NUM_THREADS``, when set, wins: torch has
            read it at start-up and this callback leaves the thread count alone.
    """

    def __init__(self, num_threads: int = 1) -> None:
        if int(num_threads) < 1:
            raise ValueError(f"TorchThreads(num_threads={num_threads}): give at least 1 thread")
        self.num_threads = int(num_threads)
        self.applied: int | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            self.applied = None  # the user's choice; torch already follows it
            return
        torch.set_num_threads(self.num_threads)
        self.applied = self.num_threads
