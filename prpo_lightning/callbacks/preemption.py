"""Preemption: on SIGTERM (what SLURM and Kubernetes send) or SIGUSR1 (SLURM's warning signal), finish the current
step, write a checkpoint that ``--ckpt_path last`` resumes exactly, and let ``prpo-fit`` exit with status 143.

Lightning sets ``trainer.received_sigterm`` on SIGTERM, agrees on it across ranks at the end of the batch and raises
``SIGTERMException`` (a ``SystemExit`` with no code, so the process used to exit 0 and save nothing unless a
checkpoint happened to be due). :class:`PreemptionCheckpoint` makes SIGUSR1 count as SIGTERM and, when that
exception reaches the callbacks, saves ``last.ckpt`` in the checkpoint folder of the run's ``ModelCheckpoint`` (every
rank calls the save, rank 0 writes). The step that was running when the signal came has finished, so the checkpoint
is the state after it, as a scheduled save at that step would be.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: The exit status ``prpo-fit`` returns after a preemption (128 + SIGTERM), so a scheduler sees an unfinished job.
PREEMPTED_EXIT_CODE = 143


class PreemptionCheckpoint(L.Callback):
    """Save ``last.ckpt`` when the run is stopped by SIGTERM or SIGUSR1 (installed by ``prpo-fit``).

    Attributes:
        saved_path: where the preemption checkpoint was written, or None.
    """

    def __init__(self) -> None:
        self.saved_path: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            connector = trainer._signal_connector  # noqa: SLF001 - the flag Lightning's loops read

            def as_sigterm(signum: int, frame: Any) -> None:
                connector.received_sigterm = True

            if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
                signal.signal(signal.SIGUSR1, as_sigterm)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        folder = next((c.dirpath for c in trainer.checkpoint_callbacks
                       if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        if folder is None:
            rank_zero_warn("[prpo] stopped by a signal, but the run has no ModelCheckpoint folder: nothing was saved "
                           "(add a ModelCheckpoint with save_last to make preempted runs resumable)")
            return
        path = os.path.join(folder, "last.ckpt")
        trainer.save_checkpoint(path)
        self.saved_path = path
        if trainer.is_global_zero:
            print(f"[prpo] stopped by a signal after step {trainer.global_step}: saved {path}; resume with "
                  f"--ckpt_path last (exit status {PREEMPTED_EXIT_CODE})", flush=True)
