"""Preemption (issue 27, item 1): SIGTERM or SIGUSR1 in the middle of a run saves ``last.ckpt`` after the current
step, ``prpo-fit`` exits 143, and the same command with ``--ckpt_path last`` continues from that step. Before, SIGTERM
finished the step, saved nothing unless a checkpoint was due, and exited 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from test_resume import cli_fit_args, tokenizer_dir

REPO = Path(__file__).resolve().parents[1]


class SignalOnce(L.Callback):
    """Sends ``signum`` to this process at the end of step ``at_step`` the first time (``flag`` marks it); writes the
    step every training start sees to ``starts`` and the step every training end sees to ``ends``."""

    def __init__(self, at_step: int, flag: str, starts: str, signum: int = int(signal.SIGTERM)) -> None:
        self.at_step, self.flag, self.starts, self.signum = at_step, Path(flag), Path(starts), signum

    def on_train_start(self, trainer, pl_module) -> None:
        with self.starts.open("a") as fh:
            fh.write(f"start {trainer.global_step}\n")

    def on_train_end(self, trainer, pl_module) -> None:
        with self.starts.open("a") as fh:
            fh.write(f"end {trainer.global_step}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step and not self.flag.exists():
            self.flag.write_text("signalled")
            os.kill(os.getpid(), self.signum)


def _prpo_fit(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from prpo_lightning.cli import main; sys.argv[0] = 'prpo-fit'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_last_and_exits_143_and_the_requeue_resumes(tmp_path, signum):
    tok = tokenizer_dir(tmp_path)
    every_10 = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.every_n_train_steps=10", "--trainer.callbacks.save_last=true"]
    killer = ["--trainer.callbacks+=test_preemption.SignalOnce", "--trainer.callbacks.at_step=2",
              f"--trainer.callbacks.flag={tmp_path / 'signalled'}", f"--trainer.callbacks.starts={tmp_path / 'log'}",
              f"--trainer.callbacks.signum={int(signum)}"]
    command = cli_fit_args(tmp_path, tok, 5, *every_10, *killer, "--ckpt_path=last")[1:]
    first = _prpo_fit(["fit", *command])
    assert first.returncode == 143, (first.stdout + first.stderr)[-4000:]
    assert "stopped by a signal after step 2" in first.stdout
    last = tmp_path / "runs" / "toy" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2  # no checkpoint was due before step 10
    second = _prpo_fit(["fit", *command])
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert (tmp_path / "log").read_text().split("\n")[:-1] == ["start 0", "start 2", "end 5"]  # resumed at step 2
