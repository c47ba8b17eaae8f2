"""Export: the trained policy as a Hugging Face directory (safetensors + tokenizer) that ``from_pretrained`` loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_resume import REPO, ToyPrompts, make_module, make_trainer, tokenizer_dir

from prpo_lightning.export import HFExportCallback, export_checkpoint, main


@pytest.mark.slow
def test_export_callback_and_command_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = tokenizer_dir(tmp_path)
    module = make_module(tok)
    cbs = [HFExportCallback(str(tmp_path / "hf")), ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)]
    make_trainer(tmp_path, 1, cbs, enable_checkpointing=True).fit(module, ToyPrompts())
    trained = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    init = make_module(tok)
    init.configure_model()
    assert any(not torch.equal(trained[k], v) for k, v in init.policy.state_dict().items()), "training changed nothing"

    def check(out_dir):
        assert (out_dir / "model.safetensors").exists() and (out_dir / "config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(out_dir)
        for k, v in model.state_dict().items():
            assert torch.equal(v, trained[k]), k
        tk = AutoTokenizer.from_pretrained(out_dir)
        assert tk.eos_token == "<eos>" and tk("1+1=")["input_ids"] == module.tokenizer("1+1=")["input_ids"]

    check(tmp_path / "hf")  # callback at fit end
    ckpt = tmp_path / "ck" / "last.ckpt"
    main([str(ckpt), str(tmp_path / "cmd")])  # prpo-export CKPT OUT_DIR
    check(tmp_path / "cmd")
    out = subprocess.run(
        [sys.executable, "-m", "prpo_lightning.export", str(ckpt), str(tmp_path / "bf16"), "--dtype", "bfloat16"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    m16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(m16.parameters()).dtype == torch.bfloat16


def test_export_rejects_checkpoint_without_policy(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"other.weight": torch.zeros(1)}, "hyper_parameters": {}}, path)
    with pytest.raises(ValueError, match="no 'policy"):
        export_checkpoint(path, tmp_path / "out")
