"""The demo's console is quiet: ``prpo-fit fit --config configs/demo.yaml`` (its first steps) prints its own
progress bars, evaluation tables and results, Lightning's three start-up lines and its end-of-fit line, and nothing
else: no warning,
deprecation, tip or accelerator note. Runs the installed ``prpo-fit`` console script in a fresh process, as a
newcomer would, with an empty ``PRPO_CACHE``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

#: Every line the demo may print (after splitting progress-bar redraws at ``\r``).
ALLOWED = [re.compile(p) for p in (
    r"^$",
    r"^Seed set to \d+$",  # Lightning's seed_everything
    r"^(GPU|TPU|HPU) available: ",  # Lightning's device summary
    r"^`Trainer\.fit` stopped: `max_steps=\d+` reached\.$",  # Lightning's end of fit
    r"^\[prpo\] ",  # the demo's own notes and results
    r"^step: ",  # the training progress bar
    r"^eval @ step \d+: ",  # the evaluation progress bar
    r"^benchmark +group +problems",  # the evaluation table
    r"^[- ]+$",
    r"^heldout +all +\d+ +\d+ +\d+\.\d$",
)]
WARNING_WORDS = re.compile(r"warn|deprecat|tip:|\.py:\d+|accelerator to", re.IGNORECASE)


def unexpected_lines(output: str) -> list[str]:
    """Lines of ``output`` that are not on the :data:`ALLOWED` list or look like a warning."""
    lines = ANSI.sub("", output).replace("\r", "\n").splitlines()
    return [ln for ln in lines if WARNING_WORDS.search(ln) or not any(p.match(ln.strip()) for p in ALLOWED)]


def test_unexpected_lines_catches_the_known_noise():
    noise = (
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]\n"
        "[2026-12-07 07:58:31,385] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.\n"
        "/x/lightning/pytorch/utilities/_pytree.py:21: `isinstance(treespec, LeafSpec)` is deprecated\n"
        "/x/lightning/pytorch/loops/fit_loop.py:538: Found 59 module(s) in eval mode at the start of training.\n"
        "Loading weights: 100%|██████████| 50/50\n"
    )
    assert len(unexpected_lines(noise)) == 5
    fine = "Seed set to 0\nstep: 100%|█| 2/2 [00:02<00:00, reward=-0.1]\r\n[prpo] held-out accuracy: 42.0%\n"
    assert unexpected_lines(fine + "heldout    all         200        0    42.0\n") == []


@pytest.mark.slow
def test_demo_first_steps_print_no_warning_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "OMP_NUM_THREADS")}
    env.update(PRPO_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    prpo_fit = Path(sys.executable).parent / "prpo-fit"
    assert prpo_fit.exists(), f"{prpo_fit}: the console script is missing; install with scripts/install.sh"
    cmd = [str(prpo_fit), "fit", "--config", "configs/demo.yaml", "--trainer.max_steps=2",
           f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert unexpected_lines(output) == [], output[-6000:]
    assert "[prpo] held-out accuracy: before RL" in output
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))  # no SFT build


def test_a_loaded_policy_trains_in_train_mode(tmp_path):
    """``from_pretrained`` returns eval mode; PRPOModule puts the policy in train mode (Lightning's "modules in eval
    mode" warning came from here, and activation checkpointing only acts in train mode). The reference stays frozen
    in eval mode and is not a submodule."""
    from test_resume import make_module, tokenizer_dir
    from transformers import AutoConfig, AutoModelForCausalLM

    from helpers import tiny_qwen2_config

    cfg = dict(tiny_qwen2_config(vocab_size=128, hidden=32, layers=2))
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(tmp_path / "p")
    module = make_module(tokenizer_dir(tmp_path), policy=str(tmp_path / "p"), policy_config=None)
    module.configure_model()
    assert all(m.training for m in module.policy.modules())
    assert not any(name.startswith("_reference") for name, _ in module.named_modules())
    assert module._reference is not None and not module._reference.training
