"""DeepSpeed ZeRO-2/3 configs and end-to-end runs.

Lightning's ``DeepSpeedStrategy`` refuses the CPU accelerator, so the end-to-end runs need a CUDA GPU and are
skipped on CPU-only machines (CI); on CPU only the configs are checked (they parse and build the strategy).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_resume import REPO, ToyPrompts, make_module, make_trainer, tokenizer_dir

CONFIGS = {2: REPO / "configs" / "deepspeed" / "zero2.yaml", 3: REPO / "configs" / "deepspeed" / "zero3.yaml"}
NO_CUDA = "DeepSpeed end-to-end needs a CUDA GPU: Lightning's DeepSpeedStrategy refuses CPUAccelerator"


def _strategy_args(stage: int) -> dict:
    cfg = yaml.safe_load(Path(CONFIGS[stage]).read_text())
    strat = cfg["trainer"]["strategy"]
    assert strat["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    return strat["init_args"]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_build_the_strategy(stage):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    args = _strategy_args(stage)
    assert args["config"]["zero_optimization"]["stage"] == stage
    assert "gradient_accumulation_steps" not in args["config"]  # Lightning sets it
    assert args["exclude_frozen_parameters"] is True
    strategy = DeepSpeedStrategy(**args)
    assert strategy.zero_stage_3 == (stage == 3)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_end_to_end_on_gpu(tmp_path, stage):
    """2 steps with the config's ZeRO stage on one GPU, a checkpoint, a resume and an HF export."""
    pytest.importorskip("deepspeed")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from transformers import AutoModelForCausalLM

    from prpo_lightning.export import HFExportCallback, export_checkpoint

    tok = tokenizer_dir(tmp_path)
    args = _strategy_args(stage)
    cbs = [ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True), HFExportCallback(str(tmp_path / "hf"))]
    module = make_module(tok)
    trainer = make_trainer(tmp_path, 2, cbs, accelerator="gpu", devices=1, strategy=DeepSpeedStrategy(**args),
                           precision="32-true", enable_checkpointing=True, plugins=None)
    trainer.fit(module, ToyPrompts())
    assert trainer.global_step == 2
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert all(torch.isfinite(p).all() for p in exported.parameters())
    last = tmp_path / "ck" / "last.ckpt"
    assert last.is_dir()  # DeepSpeed writes a directory of shards
    export_checkpoint(last, tmp_path / "from_ckpt")
    from_ckpt = AutoModelForCausalLM.from_pretrained(tmp_path / "from_ckpt")
    for (k, a), b in zip(exported.state_dict().items(), from_ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    resumed = make_module(tok)
    trainer = make_trainer(tmp_path / "r", 3, [], accelerator="gpu", devices=1, strategy=DeepSpeedStrategy(**args),
                           precision="32-true", plugins=None)
    trainer.fit(resumed, ToyPrompts(), ckpt_path=str(last))
    assert trainer.global_step == 3
