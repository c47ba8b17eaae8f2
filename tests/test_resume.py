"""Exact resume: 4 straight steps == 2 steps + checkpoint + 2 resumed steps, bit for bit; atomic checkpoint saves.

Also holds the small builders shared by ``test_ddp.py``, ``test_faults.py`` and ``test_export.py`` (a
length-parity verifier that gives non-trivial rewards on a random model, a GRPO-style aligner, a toy
prompt data module and a tiny random Qwen2 policy).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import build_char_tokenizer, tiny_qwen2_config

from prpo_lightning.scoring.aligner import AdvantageAligner
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.runtime.checkpoint import AtomicCheckpointIO, atomic_torch_save
from prpo_lightning.config import LossConfig, OptimConfig
from prpo_lightning.data import PromptDataModule
from prpo_lightning.scoring.grouping import group_mean, group_std
from prpo_lightning.module import PRPOModule
from prpo_lightning.config import SamplingConfig
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- shared builders
class ParityVerifier(OutcomeVerifier):
    """Correct when the completion has an even number of characters (random policies get mixed rewards)."""

    def verify(self, completion: str, gold: str) -> Verdict:
        ok = len(completion) % 2 == 0
        return Verdict(VerdictStatus.CORRECT if ok else VerdictStatus.INCORRECT, 1.0 if ok else 0.0)


class GroupNormAligner(AdvantageAligner):
    """GRPO: ``(r − mean_g) / (std_g + 1e-4)`` broadcast over each completion's tokens."""

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        r = batch.outcome_rewards
        adv = (r - group_mean(r, batch.group_ids)) / (group_std(r, batch.group_ids) + 1e-4)  # (B,)
        return {"outcome": adv[:, None] * batch.completion_mask.float()}  # (B, T)


class ToyPrompts(PromptDataModule):
    """``n`` short prompts ``"<i>+<i>="`` and 2 evaluation prompts."""

    def __init__(self, n: int = 6, batch_size: int = 2, seed: int = 0, rows: list[dict] | None = None):
        super().__init__(batch_size=batch_size, eval_batch_size=2, seed=seed)
        self.n, self.rows = n, rows

    def load_rows(self):
        rows = self.rows or [{"id": i, "problem": f"{i}+{i}=", "answer": str(2 * i)} for i in range(self.n)]
        return rows, [{"id": 100 + i, "problem": f"{i}*2=", "answer": str(2 * i)} for i in range(2)]


def tokenizer_dir(root: Path) -> str:
    return build_char_tokenizer(Path(root) / "tok")


def make_module(tok: str, module_cls: type = PRPOModule, **overrides: Any) -> PRPOModule:
    kw: dict[str, Any] = dict(
        verifier=ParityVerifier(),
        aligner=GroupNormAligner(),
        policy_config=tiny_qwen2_config(vocab_size=128, hidden=32, layers=2),
        tokenizer=tok,
        sampling=SamplingConfig(num_generations=4, max_new_tokens=8, max_prompt_length=32),
        loss=LossConfig(kl_coef=0.01),
        optim=OptimConfig(lr=1e-2, warmup_steps=1, schedule="linear", total_steps=4, micro_batch_size=4),
        prompt_template="{problem}",
        use_chat_template=False,
        seed=3,
    )
    kw.update(overrides)
    return module_cls(**kw)


def make_trainer(root: Path, max_steps: int, callbacks: list | None = None, **kw: Any) -> L.Trainer:
    base = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
        callbacks=callbacks or [],
        plugins=[AtomicCheckpointIO()],
    )
    base.update(kw)
    return L.Trainer(**base)


class StepRecorder(L.Callback):
    """Records the prompt ids of every training batch and the logged loss/reward (stateful, like user callbacks)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        self.rows.append(
            {
                "step": trainer.global_step,
                "ids": batch["id"].tolist(),
                **{k: float(m[k]) for k in ("train/loss", "train/reward/mean", "train/lr", "train/kl") if k in m},
            }
        )


def cli_fit_args(root: Path, tok: str, max_steps: int, *extra: str) -> list[str]:
    """``prpo-fit fit`` arguments for the toy run of :func:`make_module` on :class:`ToyPrompts`, logging to
    ``<root>/runs/toy/version_N`` with a CSVLogger (as the configs do)."""
    return [
        "fit", "--seed_everything=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
        f"--trainer.max_steps={max_steps}", "--trainer.log_every_n_steps=1", "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root / 'runs'}",
        "--trainer.logger.name=toy",
        "--model.verifier=test_resume.ParityVerifier", "--model.aligner=test_resume.GroupNormAligner",
        f"--model.policy_config={json.dumps(tiny_qwen2_config(vocab_size=128, hidden=32, layers=2))}",
        f"--model.tokenizer={tok}", "--model.sampling.num_generations=4", "--model.sampling.max_new_tokens=8",
        "--model.sampling.max_prompt_length=32", "--model.prompt_template={problem}", "--model.use_chat_template=false",
        "--model.seed=3", "--model.optim.lr=1e-2", "--model.optim.micro_batch_size=4",
        "--data=test_resume.ToyPrompts", *extra,
    ]


# ---------------------------------------------------------------- exact resume
def _callbacks(ckpt_dir: Path | None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from prpo_lightning.callbacks import MathEvalCallback, TrainingCurves

    cbs: list = [StepRecorder(), MathEvalCallback(every_n_steps=2), TrainingCurves(dirpath=str(ckpt_dir or "."))]
    if ckpt_dir is not None:
        cbs.append(ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1, save_last=True, save_top_k=-1))
    return cbs


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    """6 prompts / batch 2 = 3 batches per epoch: the resume at step 2 is mid-epoch, step 4 is in epoch 2."""
    tok = tokenizer_dir(tmp_path)

    straight = make_module(tok)
    cbs_a = _callbacks(tmp_path / "a")
    make_trainer(tmp_path / "a", 4, cbs_a, enable_checkpointing=True).fit(straight, ToyPrompts())

    first = make_module(tok)
    make_trainer(tmp_path / "b", 2, _callbacks(tmp_path / "b"), enable_checkpointing=True).fit(first, ToyPrompts())
    last = tmp_path / "b" / "last.ckpt"
    assert last.exists()
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 2 and "prpo_rng_states" in ckpt
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_done"] == 2

    resumed = make_module(tok)
    cbs_c = _callbacks(tmp_path / "c")
    make_trainer(tmp_path / "c", 4, cbs_c, enable_checkpointing=True).fit(resumed, ToyPrompts(), ckpt_path=str(last))

    a, c = straight.policy.state_dict(), resumed.policy.state_dict()
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k
    # optimizer state (Adam moments) too
    opt_a, opt_c = straight.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    for pid, st in opt_a["state"].items():
        for name, val in st.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(opt_c["state"][pid][name])), (pid, name)
    # data order, logged metrics and callback state (restored rows of steps 1–2 + resumed 3–4)
    rec_a, rec_c = cbs_a[0].rows, cbs_c[0].rows
    assert [r["ids"] for r in rec_a] == [r["ids"] for r in rec_c]
    assert rec_a == rec_c
    assert len({i for r in rec_a[:3] for i in r["ids"]}) == 6  # epoch 1 covers every prompt once
    assert cbs_a[1].history == cbs_c[1].history and [h["step"] for h in cbs_a[1].history] == [0.0, 2.0, 4.0]
    assert cbs_a[2].rows == cbs_c[2].rows and len(cbs_c[2].rows) == 4


# ---------------------------------------------------------------- atomic save
_KILL_CHILD = r"""
import sys, time, torch
sys.path.insert(0, {repo!r})
from pathlib import Path
import prpo_lightning.runtime.checkpoint as ck
from prpo_lightning.runtime.checkpoint import AtomicCheckpointIO

path, flag = Path(sys.argv[1]), Path(sys.argv[2])
io = AtomicCheckpointIO()
io.save_checkpoint({{"step": 1, "w": torch.arange(1000.)}}, path)      # the good, previous checkpoint
real_save = torch.save

def slow_save(obj, f, *a, **k):                                        # write half the bytes, then hang
    import io as _io
    buf = _io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    flag.write_text("mid-write")
    time.sleep(600)

ck.torch.save = slow_save
io.save_checkpoint({{"step": 2, "w": torch.zeros(100000)}}, path)
"""


def test_atomic_save_survives_kill_mid_write(tmp_path):
    path, flag = tmp_path / "ckpts" / "last.ckpt", tmp_path / "flag"
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD.format(repo=str(REPO)))
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(flag)])
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert proc.poll() is None, "child exited before reaching the save"
            assert time.time() < deadline, "child never reached the middle of the save"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stray = list(path.parent.glob("last.ckpt.tmp-*"))
    assert stray, "the killed save should have left its partial temporary file"
    assert stray[0].stat().st_size > 0
    state = AtomicCheckpointIO().load_checkpoint(path)  # the previous checkpoint is intact
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(1000.0))
    atomic_torch_save({"step": 3}, path)  # the next save replaces it and removes the stray file
    assert torch.load(path)["step"] == 3 and not list(path.parent.glob("last.ckpt.tmp-*"))


def test_cli_installs_atomic_checkpoint_io(tmp_path):
    from prpo_lightning.cli import cli_main

    tok = tokenizer_dir(tmp_path)
    cli = cli_main(
        {
            "trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(tmp_path)},
            "model": {
                "verifier": {"class_path": "test_resume.ParityVerifier"},
                "aligner": {"class_path": "test_resume.GroupNormAligner"},
                "policy_config": tiny_qwen2_config(),
                "tokenizer": tok,
            },
            "data": {"class_path": "test_resume.ToyPrompts"},
        },
        run=False,
    )
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---------------------------------------------------------------- requeue: the same command twice
class CrashOnce(L.Callback):
    """Raises at the start of step ``at_step`` the first time (a job killed mid-run); ``flag`` marks that it did.
    Writes the ``global_step`` every training start sees to ``starts`` (one line per run)."""

    def __init__(self, at_step: int, flag: str, starts: str) -> None:
        self.at_step, self.flag, self.starts = at_step, Path(flag), Path(starts)

    def on_train_start(self, trainer, pl_module) -> None:
        with self.starts.open("a") as fh:
            fh.write(f"{trainer.global_step}\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step and not self.flag.exists():
            self.flag.write_text("crashed")
            raise RuntimeError("simulated node failure")


_CKPT = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
         "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true",
         "--trainer.callbacks.save_top_k=-1"]


@pytest.mark.slow
def test_requeued_command_resumes_from_saved_step(tmp_path, monkeypatch):
    """The requeue recipe of docs/scaling.md: the same ``prpo-fit fit ... --ckpt_path last`` command, started,
    killed at step 2 and started again, continues from step 2 (not 0) and finishes at max_steps."""
    from prpo_lightning.cli import cli_main

    monkeypatch.setattr("sys.argv", ["prpo-fit"])
    tok = tokenizer_dir(tmp_path)
    starts = tmp_path / "starts.txt"
    crash = ["--trainer.callbacks+=test_resume.CrashOnce", "--trainer.callbacks.at_step=2",
             f"--trainer.callbacks.flag={tmp_path / 'crashed'}", f"--trainer.callbacks.starts={starts}"]
    command = cli_fit_args(tmp_path, tok, 4, *_CKPT, *crash, "--ckpt_path=last")
    with pytest.warns(UserWarning, match="no checkpoint in .* STARTS AT STEP 0"):
        with pytest.raises(RuntimeError, match="simulated node failure"):
            cli_main(command)
    last = tmp_path / "runs" / "toy" / "checkpoints" / "last.ckpt"  # one folder for every version_N
    assert torch.load(last, weights_only=False)["global_step"] == 2
    cli = cli_main(command)
    assert starts.read_text().split() == ["0", "2"]  # the rerun continued from the saved step
    assert cli.trainer.global_step == 4
    assert torch.load(last, weights_only=False)["global_step"] == 4
    assert sorted(p.name for p in (tmp_path / "runs" / "toy").iterdir()) == ["checkpoints", "version_0", "version_1"]


def test_ckpt_path_last_without_save_last_raises(tmp_path, monkeypatch):
    """``--ckpt_path last`` with no ModelCheckpoint that saves last.ckpt could never resume: an error, not step 0."""
    from prpo_lightning.cli import cli_main

    monkeypatch.setattr("sys.argv", ["prpo-fit"])
    args = cli_fit_args(tmp_path, tokenizer_dir(tmp_path), 2, "--ckpt_path=last")
    with pytest.raises(ValueError, match="no ModelCheckpoint callback saves one.*save_last: true"):
        cli_main(args)


def test_ckpt_path_last_with_other_checkpoints_only_raises(tmp_path, monkeypatch):
    from prpo_lightning.cli import cli_main

    monkeypatch.setattr("sys.argv", ["prpo-fit"])
    ckpt_dir = tmp_path / "runs" / "toy" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "epoch=0-step=3.ckpt").write_bytes(b"x")
    args = cli_fit_args(tmp_path, tokenizer_dir(tmp_path), 2, *_CKPT, "--ckpt_path=last")
    with pytest.raises(ValueError, match=r"found no last\.ckpt in .*epoch=0-step=3\.ckpt.*--ckpt_path <file>"):
        cli_main(args)
