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
from helpers import prpo_fit
import torch
from test_resume import ParityVerifier, cli_fit_args, tokenizer_dir

REPO = Path(__file__).resolve().parents[1]


class SignalOnce(L.Callback):
    """Sends ``signum`` to this process at the end of step ``at_step`` the first time (``flag`` marks it); writes the
    step every training start sees to ``starts`` and the step every training end sees to ``ends``. With ``rank``,
    only that rank sends it (to itself)."""

    def __init__(self, at_step: int, flag: str, starts: str, signum: int = int(signal.SIGTERM),
                 rank: int | None = None) -> None:
        self.at_step, self.flag, self.starts, self.signum = at_step, Path(flag), Path(starts), signum
        self.rank = rank

    def on_train_start(self, trainer, pl_module) -> None:
        with self.starts.open("a") as fh:
            fh.write(f"start {trainer.global_step}\n")

    def on_train_end(self, trainer, pl_module) -> None:
        with self.starts.open("a") as fh:
            fh.write(f"end {trainer.global_step}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step == self.at_step and not self.flag.exists():
            self.flag.write_text("signalled")
            os.kill(os.getpid(), self.signum)




@pytest.mark.slow
@pytest.mark.parametrize("signum,asynchronous", [(signal.SIGTERM, False), (signal.SIGUSR1, False),
                                                 (signal.SIGTERM, True)])
def test_a_signal_saves_last_and_exits_143_and_the_requeue_resumes(tmp_path, signum, asynchronous):
    """With asynchronous rollouts the checkpoint also holds the batch in flight, and the background thread does not
    keep the process from exiting."""
    tok = tokenizer_dir(tmp_path)
    every_10 = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.every_n_train_steps=10", "--trainer.callbacks.save_last=true"]
    killer = ["--trainer.callbacks+=test_preemption.SignalOnce", "--trainer.callbacks.at_step=2",
              f"--trainer.callbacks.flag={tmp_path / 'signalled'}", f"--trainer.callbacks.starts={tmp_path / 'log'}",
              f"--trainer.callbacks.signum={int(signum)}"]
    mode = ["--model.async_rollout.enabled=true"] if asynchronous else []
    command = cli_fit_args(tmp_path, tok, 5, *every_10, *killer, *mode, "--ckpt_path=last")[1:]
    first = prpo_fit(["fit", *command])
    assert first.returncode == 143, (first.stdout + first.stderr)[-4000:]
    assert "stopped by a signal after step 2" in first.stdout
    last = tmp_path / "runs" / "toy" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 2  # no checkpoint was due before step 10
    in_flight = [v for k, v in saved["callbacks"].items() if k.startswith("AsyncRolloutsHooks")]
    assert [len(v["pending"]) for v in in_flight] == ([1] if asynchronous else [])
    second = prpo_fit(["fit", *command])
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert (tmp_path / "log").read_text().split("\n")[:-1] == ["start 0", "start 2", "end 5"]  # resumed at step 2


class SignalInEvaluation(ParityVerifier):
    """Parity rewards; the first time it grades one completion alone (an evaluation batch of 1 prompt, greedy) and
    ``flag`` does not exist, it sends SIGTERM to its own process: the signal arrives while evaluation runs."""

    def __init__(self, flag: str) -> None:
        self.flag = Path(flag)

    def verify_batch(self, completions, golds, rows=None):
        if len(completions) == 1 and not self.flag.exists():
            self.flag.write_text("signalled")
            os.kill(os.getpid(), signal.SIGTERM)
        return super().verify_batch(completions, golds, rows)


@pytest.mark.slow
def test_sigterm_during_evaluation_saves_exits_143_and_the_resume_redoes_the_evaluation_exactly(tmp_path):
    """SIGTERM arrives in the first of 2 evaluation batches at step 2: the evaluation stops after that batch, last.ckpt
    holds step 2 without that evaluation, exit 143; the requeued command evaluates step 2 first and ends with the
    weights and evaluation history of a run that was never interrupted."""
    tok = tokenizer_dir(tmp_path)

    def command(root: Path) -> list[str]:
        return cli_fit_args(root, tok, 4, "--model.verifier=test_preemption.SignalInEvaluation",
                            f"--model.verifier.flag={root / 'signalled'}",
                            "--trainer.callbacks+=prpo_lightning.callbacks.MathEvalCallback",
                            "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.eval_at_start=false",
                            "--trainer.callbacks.batch_size=1", "--trainer.callbacks.write_outputs=false",
                            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                            "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_last=true",
                            "--ckpt_path=last")[1:]

    first = prpo_fit(["fit", *command(tmp_path)])
    assert first.returncode == 143, (first.stdout + first.stderr)[-4000:]
    out = first.stdout + first.stderr
    assert "evaluation at step 2 stopped by a signal after 1 of 2 batches" in out, out[-3000:]
    assert "stopped by a signal after step 2" in first.stdout
    last = tmp_path / "runs" / "toy" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 2
    history = next(v for k, v in saved["callbacks"].items() if k.startswith("MathEvalCallback"))["history"]
    assert history == []  # the stopped evaluation recorded nothing
    second = prpo_fit(["fit", *command(tmp_path)])
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "held-out accuracy at the resumed step (step 2)" in second.stdout + second.stderr
    resumed = torch.load(next(last.parent.glob("*step=4.ckpt")), weights_only=False)  # the scheduled save at 4

    straight_root = tmp_path / "straight"
    straight_root.mkdir()
    (straight_root / "signalled").write_text("never signal")
    straight = prpo_fit(["fit", *command(straight_root)])
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-4000:]
    want = torch.load(next((straight_root / "runs" / "toy" / "checkpoints").glob("*step=4.ckpt")), weights_only=False)
    assert resumed["global_step"] == want["global_step"] == 4

    def evals(ckpt):
        return [(h["step"], h["accuracy"]) for h in
                next(v for k, v in ckpt["callbacks"].items() if k.startswith("MathEvalCallback"))["history"]]

    assert evals(resumed) == evals(want) and [s for s, _ in evals(want)] == [2.0, 4.0]
    for key, value in want["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def _run_ranks(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    """``prpo-fit`` on 2 gloo ranks (Lightning's launcher starts rank 1); on a timeout the whole process group is
    killed, so no rank is left behind."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "prpo_lightning.cli", *args], cwd=str(REPO), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError("the 2-rank run hung:\n" + (out + err)[-4000:]) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_sigterm_reaching_one_ddp_rank_stops_both_after_the_same_step_and_the_requeue_resumes(tmp_path):
    """2 gloo ranks; SIGTERM reaches rank 1 only, at the end of step 2. Before, rank 1 stopped alone to save while
    rank 0 went on to step 3, and the run hung. Now the ranks agree at the end of every batch: both stop after the
    same step, last.ckpt is saved, exit 143, and the requeued command resumes from it to max_steps."""
    tok = tokenizer_dir(tmp_path)
    args = [a for a in cli_fit_args(tmp_path, tok, 4) if a != "--trainer.devices=1"][1:]
    args += ["--trainer.devices=2", "--trainer.strategy=ddp",
             "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
             "--trainer.callbacks.every_n_train_steps=10", "--trainer.callbacks.save_last=true",
             "--trainer.callbacks+=test_preemption.SignalOnce", "--trainer.callbacks.at_step=2",
             f"--trainer.callbacks.flag={tmp_path / 'signalled'}", f"--trainer.callbacks.starts={tmp_path / 'log'}",
             "--trainer.callbacks.rank=1", "--ckpt_path=last"]
    first = _run_ranks(["fit", *args])
    assert first.returncode == 143, (first.stdout + first.stderr)[-4000:]
    assert "stopped by a signal after step 2" in first.stdout
    last = tmp_path / "runs" / "toy" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    second = _run_ranks(["fit", *args])
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert sorted((tmp_path / "log").read_text().split("\n")[:-1]) == ["end 4", "end 4", "start 0", "start 0",
                                                                     "start 2", "start 2"]  # both ranks
