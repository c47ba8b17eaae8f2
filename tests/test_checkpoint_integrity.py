"""Checkpoint integrity (issue 27, item 7): every checkpoint is checked against the CRC-32 checksums that
``torch.save`` stores with each record before it is loaded (``--ckpt_path``, ``prpo-export``); a damaged file is
refused with its path and the next-newest intact checkpoint; ``prpo-export`` refuses a non-checkpoint file by name
and writes files with normal permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from test_resume import _CKPT, REPO, cli_fit_args, tokenizer_dir

from prpo_lightning.runtime.checkpoint import AtomicCheckpointIO, CheckpointDamagedError, verify_checkpoint
from prpo_lightning.cli import cli_main
from prpo_lightning.export import main as export_main


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prpo-fit"])


def _damage(path, data: bytes) -> None:
    """Overwrite bytes in the middle of ``path`` (inside a tensor's record for these checkpoints)."""
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        fh.write(data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step toy run with a checkpoint after every step (step=1, step=2 and last.ckpt)."""
    root = tmp_path_factory.mktemp("integrity")
    tok = tokenizer_dir(root)
    mp = pytest.MonkeyPatch()
    mp.setattr("sys.argv", ["prpo-fit"])
    try:
        cli_main(cli_fit_args(root, tok, 2, *_CKPT))
    finally:
        mp.undo()
    return root, tok, root / "runs" / "toy" / "checkpoints"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["zeros", "random"])
def test_damaged_checkpoint_is_refused_by_ckpt_path_naming_the_next_good_one(trained, damage, tmp_path):
    root, tok, ckpt_dir = trained
    bad = tmp_path / "checkpoints"
    bad.mkdir()
    for name in ("epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"):
        (bad / name).write_bytes((ckpt_dir / name).read_bytes())
    os.utime(bad / "epoch=0-step=1.ckpt", (1, 1))
    verify_checkpoint(bad / "last.ckpt")  # intact copies pass
    torch.manual_seed(0)
    noise = torch.randint(0, 256, (16384,), dtype=torch.uint8).numpy().tobytes()
    _damage(bad / "last.ckpt", bytes(16384) if damage == "zeros" else noise)
    _damage(bad / "epoch=0-step=2.ckpt", b"\x00" * 64)
    message = (rf"checkpoint {bad / 'last.ckpt'} is damaged: "
               r"(record .* does not match its CRC-32 checksum|its archive structure is damaged).*"
               rf"next-newest intact checkpoint in that folder is {bad / 'epoch=0-step=1.ckpt'}")
    with pytest.raises(CheckpointDamagedError, match=message):
        cli_main(cli_fit_args(root, tok, 3, f"--ckpt_path={bad / 'last.ckpt'}", "--trainer.enable_checkpointing=false"))
    with pytest.raises(CheckpointDamagedError, match=message):  # the Trainer's own load path checks too
        AtomicCheckpointIO().load_checkpoint(bad / "last.ckpt")
    args = [a for a in cli_fit_args(root, tok, 1, f"--ckpt_path={bad / 'last.ckpt'}") if "max_steps" not in a]
    with pytest.raises(CheckpointDamagedError, match=message):
        cli_main(["test", *args[1:]])


@pytest.mark.slow
def test_prpo_export_refuses_damaged_and_foreign_files_by_name_and_writes_0644(trained, tmp_path):
    _, _, ckpt_dir = trained
    bad = tmp_path / "last.ckpt"
    bad.write_bytes((ckpt_dir / "last.ckpt").read_bytes())
    _damage(bad, bytes(4096))
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    for path, why in ((bad, "does not match its CRC-32 checksum"), (text, "not a torch checkpoint archive")):
        proc = subprocess.run([sys.executable, "-m", "prpo_lightning.export", str(path), str(tmp_path / "out")],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"prpo-export: error: checkpoint {path} is damaged: " in proc.stderr and why in proc.stderr
        assert "Traceback" not in proc.stderr
    old = os.umask(0o022)
    try:
        export_main([str(ckpt_dir / "last.ckpt"), str(tmp_path / "hf")])
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "hf").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}
