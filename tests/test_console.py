"""What a user sees in the terminal during ``prpo-fit fit``: a progress bar counting true steps (also after a
resume), the evaluation tables and the final line, and no warning repeated at every evaluation or save.

Runs ``python -m prpo_lightning.cli`` in a subprocess (a fresh process, as a user's) and reads its output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_resume import cli_fit_args, tokenizer_dir

REPO = Path(__file__).resolve().parents[1]
EVAL_AND_SAVE_EVERY_STEP = [
    "--trainer.callbacks+=prpo_lightning.callbacks.MathEvalCallback", "--trainer.callbacks.every_n_steps=1",
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=1",
    "--trainer.callbacks.save_last=true",
]


def _prpo_fit(args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "prpo_lightning.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(REPO))
    out = (proc.stdout + proc.stderr).replace("\r", "\n")
    assert proc.returncode == 0, out[-6000:]
    return out


def _bar_counts(out: str) -> list[tuple[int, int]]:
    """Every ``n/total`` the training bar (``step: ...``) showed, in order."""
    return [(int(n), int(t)) for n, t in re.findall(r"^step:.*?\| *(\d+)/(\d+) ", out, flags=re.M)]


@pytest.mark.slow
def test_console_of_a_run_and_its_resume(tmp_path):
    tok = tokenizer_dir(tmp_path)
    first = _prpo_fit(cli_fit_args(tmp_path, tok, 3, *EVAL_AND_SAVE_EVERY_STEP, "--ckpt_path=last"))

    counts = _bar_counts(first)
    assert counts and counts[-1] == (3, 3) and {t for _, t in counts} == {3}
    assert [n for n, _ in counts] == sorted(n for n, _ in counts)
    assert "Epoch" not in first and "v_num" not in first
    for step in range(4):  # the evaluation table before RL and after every step
        assert f"[prpo] eval evaluation at step {step}\nbenchmark" in first
    assert re.search(r"\[prpo\] held-out accuracy: before RL .* -> after RL .*\(.* points, 2 problems\)", first)
    # warnings that used to repeat at every evaluation or checkpoint save
    assert "Using ModelCheckpoint with manual optimization" not in first  # 13 lines at every save
    assert "cannot log tables" not in first  # CSVLogger: samples.md is the table, no note at every evaluation
    assert first.count("`past_key_values` is deprecated and will be removed") <= 1
    assert first.count("STARTS AT STEP 0") == 1  # first start of a requeued job: said once, loudly

    resumed = _prpo_fit(cli_fit_args(tmp_path, tok, 5, *EVAL_AND_SAVE_EVERY_STEP, "--ckpt_path=last"))
    counts = _bar_counts(resumed)
    assert counts[0] == (3, 5) and counts[-1] == (5, 5)  # true steps after the resume, not batches of the epoch
    assert all(n <= t for n, t in counts) and "Epoch" not in resumed and "v_num" not in resumed
    assert "[prpo] eval evaluation at step 4" in resumed and "[prpo] eval evaluation at step 3\n" not in resumed
