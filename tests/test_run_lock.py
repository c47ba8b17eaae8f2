"""Shared folders (issue 27, item 6): a fit run locks its checkpoint folder, a second live run there is refused by
name, a dead run's lock is taken over with a warning, runs started together get their own ``version_N``, and a
save never deletes another live run's temporary file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_resume import _CKPT, cli_fit_args, tokenizer_dir

from prpo_lightning.runtime.checkpoint import atomic_torch_save
from prpo_lightning.cli import cli_main
from prpo_lightning.runtime.run_lock import CheckpointFolderLockedError, RunLock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prpo-fit"])


@pytest.fixture
def live_pid():
    """The pid of a live process of ours (killed at the end)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait(timeout=30)


def _write_lock(folder: Path, pid: int) -> Path:
    import socket

    lock = RunLock(str(folder))
    Path(lock.path).parent.mkdir(parents=True, exist_ok=True)
    Path(lock.path).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "earlier",
                                           "command": "prpo-fit fit --other-run", "token": "other"}))
    return Path(lock.path)


@pytest.mark.slow
def test_second_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, live_pid):
    tok = tokenizer_dir(tmp_path)
    ckpt_dir = tmp_path / "runs" / "toy" / "checkpoints"
    lock_file = _write_lock(ckpt_dir, live_pid.pid)
    args = cli_fit_args(tmp_path, tok, 1, *_CKPT, "--ckpt_path=last")
    with pytest.raises(CheckpointFolderLockedError, match=rf"checkpoint folder {ckpt_dir} is in use by another run "
                                                          rf"\(host .*, pid {live_pid.pid}, .*--other-run"):
        cli_main(args)
    assert not ckpt_dir.exists() or not list(ckpt_dir.glob("*.ckpt"))  # refused before writing anything
    live_pid.kill()
    live_pid.wait(timeout=30)
    stale = rf"taking over the stale lock .*process {live_pid.pid} on .* no longer exists"
    with pytest.warns(UserWarning, match=stale):
        cli = cli_main(args)
    assert cli.trainer.global_step == 1 and (ckpt_dir / "last.ckpt").is_file()
    assert not lock_file.exists()  # released at the end of the run


def test_lock_is_refused_while_held_and_free_after_release(tmp_path):
    first, second = RunLock(str(tmp_path / "ck")), RunLock(str(tmp_path / "ck"))
    first.acquire()
    with pytest.raises(CheckpointFolderLockedError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()
    assert not Path(second.path).exists()


def test_save_keeps_the_temporary_file_of_another_live_run(tmp_path, live_pid):
    path = tmp_path / "last.ckpt"
    theirs = tmp_path / f"last.ckpt.tmp-{live_pid.pid}"
    theirs.write_bytes(b"partial save of another run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60)
    stale = tmp_path / f"last.ckpt.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"left by a killed run")
    atomic_torch_save({"step": 1}, path)
    assert theirs.exists() and not stale.exists()
    assert torch.load(path)["step"] == 1


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_version(tmp_path):
    tok = tokenizer_dir(tmp_path)
    args = cli_fit_args(tmp_path, tok, 1, "--trainer.enable_checkpointing=false")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-c", "import sys; from prpo_lightning.cli import cli_main; cli_main(sys.argv[1:])", *args]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = tmp_path / "runs" / "toy"
    assert sorted(d.name for d in runs.iterdir()) == ["version_0", "version_1"]
    for d in runs.iterdir():
        assert (d / "metrics.csv").is_file(), d


@pytest.mark.slow
def test_ddp_run_through_prpo_fit_locks_once_and_logs_to_one_version(tmp_path):
    """Under DDP only global rank zero locks the checkpoint folder and claims the version_N (the other rank, started
    by Lightning's launcher with the same command, must not find the lock held against it)."""
    import socket

    tok = tokenizer_dir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [a for a in cli_fit_args(tmp_path, tok, 2, *_CKPT) if a != "--trainer.devices=1"]
    args += ["--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "prpo_lightning.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    runs = tmp_path / "runs" / "toy"
    assert sorted(p.name for p in runs.iterdir()) == ["checkpoints", "version_0"]
    assert torch.load(runs / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not list(runs.parent.glob(".*prpo-lock")) and not list(runs.glob(".*prpo-lock"))
