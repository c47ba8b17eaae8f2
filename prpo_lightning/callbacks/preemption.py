"""Preemption: on SIGTERM (what SLURM and Kubernetes send) or SIGUSR1 (SLURM's warning signal), finish the current
step, write a checkpoint that ``--ckpt_path last`` resumes exactly, and let ``prpo-fit`` exit with status 143.

Lightning sets ``trainer.received_sigterm`` on SIGTERM and raises ``SIGTERMException`` at the end of the batch (a
``SystemExit`` with no code, so the process used to exit 0 and save nothing unless a checkpoint happened to be
due). :class:`PreemptionCheckpoint` makes SIGUSR1 count as SIGTERM and, when that exception reaches the callbacks,
saves ``last.ckpt`` in the checkpoint folder of the run's ``ModelCheckpoint`` (every rank calls the save, rank 0
writes). The step that was running when the signal came has finished, so the checkpoint is the state after it, as a
scheduled save at that step would be.

**Every rank agrees.** Lightning checks the flag on each rank on its own at the end of the batch (and its handler
makes a collective call from inside the signal handler), so with several ranks a signal that reached one rank
between two checks, or only one rank (Lightning's launcher's children, a ``kill`` of one process), left one rank
saving while the others went on to the next step: the run hung. From the start of training the callback's own
handler only records the signal (:func:`preemption_requested`); at the end of every batch the ranks all-reduce it
(:func:`agree_to_stop`) and set Lightning's flag together, so they all stop after the same step. An
evaluation that :class:`~prpo_lightning.callbacks.MathEvalCallback` runs at that point stops early the same way.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from prpo_lightning.runtime.distributed import all_reduce_sum

#: The exit status ``prpo-fit`` returns after a preemption (128 + SIGTERM), so a scheduler sees an unfinished job.
PREEMPTED_EXIT_CODE = 143
_REQUESTED = threading.Event()  # set by the signal handler of this process (no collective call in a handler)


def preemption_requested() -> bool:
    """Whether SIGTERM or SIGUSR1 reached this process since training started under :class:`PreemptionCheckpoint`."""
    return _REQUESTED.is_set()


def agree_to_stop(trainer: L.Trainer) -> bool:
    """All ranks' answer to "did a stop signal reach any rank?" (a collective call: every rank must make it at the
    same point); when yes, Lightning's flag is set on every rank, so all of them stop at the end of this batch."""
    asked = preemption_requested() or bool(trainer.received_sigterm)
    if all_reduce_sum([float(asked)])[0] > 0:
        trainer._signal_connector.received_sigterm = True  # noqa: SLF001 - the flag Lightning's loops read
        return True
    return False


class PreemptionCheckpoint(L.Callback):
    """Save ``last.ckpt`` when the run is stopped by SIGTERM or SIGUSR1 (installed by ``prpo-fit``).

    Attributes:
        saved_path: where the preemption checkpoint was written, or None.
    """

    def __init__(self) -> None:
        self.saved_path: str | None = None
        self._ours: Any = None  # the SIGUSR1 handler installed in setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _REQUESTED.clear()
        if stage == "fit" and hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            connector = trainer._signal_connector  # noqa: SLF001 - the flag Lightning's loops read

            def as_sigterm(signum: int, frame: Any) -> None:
                connector.received_sigterm = True

            if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
                signal.signal(signal.SIGUSR1, as_sigterm)
            self._ours = as_sigterm

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take SIGTERM (and SIGUSR1, unless something else handles it, e.g. SLURM auto-requeue) over from
        Lightning's handlers, which Lightning installs just before training: ours only records the signal."""
        if threading.current_thread() is not threading.main_thread():
            return
        connector, alone = trainer._signal_connector, trainer.world_size == 1  # noqa: SLF001

        def record(signum: int, frame: FrameType | None) -> None:
            _REQUESTED.set()
            if alone:  # one process: nothing to agree on, stop at the end of this batch as Lightning does
                connector.received_sigterm = True

        signal.signal(signal.SIGTERM, record)
        if hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) in (
                signal.SIG_DFL, signal.SIG_IGN, None, getattr(self, "_ours", None)):
            signal.signal(signal.SIGUSR1, record)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        agree_to_stop(trainer)  # every rank, at the end of every batch

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
