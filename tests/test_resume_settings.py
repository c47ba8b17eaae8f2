"""``--ckpt_path FILE`` keeps the YAML / command-line settings (LightningCLI would replace them with the
checkpoint's), refuses LoRA changes the checkpoint cannot be loaded with by name, and every ``target_modules``
entry must match a module (issue 27, items 3 and 5)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_qwen2_config

pytest.importorskip("peft")

from test_resume import _CKPT, cli_fit_args, tokenizer_dir  # noqa: E402

from prpo_lightning.cli import cli_main  # noqa: E402
from prpo_lightning.runtime.resume_check import ResumeSettingsError, check_resume_settings  # noqa: E402

LORA = ["--model.lora.r=4", "--model.lora.alpha=8", "--model.lora.target_modules=[q_proj,v_proj]"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prpo-fit"])


def _ckpt_dir(root):
    return root / "runs" / "toy" / "checkpoints"


@pytest.mark.slow
def test_test_with_ckpt_file_uses_the_given_settings_and_says_what_differs(tmp_path):
    tok = tokenizer_dir(tmp_path)
    cli_main(cli_fit_args(tmp_path, tok, 1, *_CKPT))
    last = _ckpt_dir(tmp_path) / "last.ckpt"
    assert torch.load(last, weights_only=True)["hyper_parameters"]["sampling"]["max_new_tokens"] == 8
    args = [a for a in cli_fit_args(tmp_path, tok, 1, f"--ckpt_path={last}", "--model.sampling.max_new_tokens=5")
            if not a.startswith("--trainer.max_steps")]
    differ = (r"(?s)1 setting\(s\) differ.*take effect:\n"
              r"  model\.sampling\.max_new_tokens: 8 \(checkpoint\) -> 5 \(now\)")
    with pytest.warns(UserWarning, match=differ):
        cli = cli_main(["test", *args[1:]])
    assert cli.model.hparams.sampling["max_new_tokens"] == 5  # LightningCLI alone gives 8 (the checkpoint's)
    assert cli.model.sampling.max_new_tokens == 5
    wider = json.dumps(tiny_qwen2_config(vocab_size=128, hidden=64, layers=2))
    with pytest.raises(ResumeSettingsError, match=r"model\.policy_config\.hidden_size is 64 but the checkpoint .* was "
                                                  r"trained with model\.policy_config\.hidden_size=32"):
        cli_main(["test", *args[1:], f"--model.policy_config={wider}"])  # before: torch size-mismatch errors


@pytest.mark.slow
def test_lora_changes_on_resume_are_refused_by_name(tmp_path):
    tok = tokenizer_dir(tmp_path)
    cli_main(cli_fit_args(tmp_path, tok, 1, *_CKPT, *LORA))
    last = _ckpt_dir(tmp_path) / "last.ckpt"
    cases = [
        ([f"--ckpt_path={last}", "--model.lora.r=8"], r"model\.lora\.r is 8 but the checkpoint .*last\.ckpt was "
                                                      r"trained with model\.lora\.r=4"),
        (["--ckpt_path=last", "--model.lora.r=8"], r"model\.lora\.r is 8 .* model\.lora\.r=4"),
        ([f"--ckpt_path={last}", "--model.lora.alpha=32"],
         r"model\.lora\.alpha is 32\.0 .*model\.lora\.alpha=8\.0.*rescales"),
        ([f"--ckpt_path={last}", "--model.lora.target_modules=[q_proj]"],
         r"model\.lora\.target_modules is \['q_proj'\]"),
        ([f"--ckpt_path={last}", "--model.lora=null"], r"model\.lora is None but the checkpoint"),
    ]
    for extra, message in cases:
        with pytest.raises(ResumeSettingsError, match=message):
            cli_main(cli_fit_args(tmp_path, tok, 2, *_CKPT, *LORA, *extra))
    # the same settings resume (the order of target_modules does not matter), and the dropout may change
    with pytest.warns(UserWarning, match=r"model\.lora\.dropout: 0\.0 \(checkpoint\) -> 0\.1 \(now\)"):
        cli = cli_main(cli_fit_args(tmp_path, tok, 2, *_CKPT, *LORA, "--model.lora.target_modules=[v_proj,q_proj]",
                                    "--model.lora.dropout=0.1", f"--ckpt_path={last}"))
    assert cli.trainer.global_step == 2


@pytest.mark.slow
def test_misspelt_target_module_is_named_with_the_available_names(tmp_path):
    tok = tokenizer_dir(tmp_path)
    args = cli_fit_args(tmp_path, tok, 1, "--model.lora.r=4", "--model.lora.target_modules=[q_proj,v_prj]",
                        "--trainer.enable_checkpointing=false")
    with pytest.raises(ValueError, match=r"target_modules: \['v_prj'\] match no module .*available: \[.*'q_proj'.*"
                                         r"'v_proj'.*\]"):
        cli_main(args)


def test_optimizer_settings_are_listed_as_taking_effect():
    stored = {"optim": {"lr": 1e-3, "ppo_epochs": 1}, "lora": None}
    effective = check_resume_settings({"optim": {"lr": 2e-3, "ppo_epochs": 2}, "lora": None}, stored, "x.ckpt")
    assert effective == ["model.optim.lr: 0.001 (checkpoint) -> 0.002 (now)",
                         "model.optim.ppo_epochs: 1 (checkpoint) -> 2 (now)"]
    assert check_resume_settings({"optim": {"lr": 1e-3, "ppo_epochs": 1}, "lora": None}, stored, "x.ckpt") == []
