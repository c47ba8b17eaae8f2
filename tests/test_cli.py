"""LightningCLI: an end-to-end ``prpo-fit fit`` on a tiny random model, and every YAML in configs/ parses and
instantiates with tiny local models swapped in for hub names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import build_char_tokenizer, tiny_qwen2_config
from prpo_lightning.cli import cli_main
from prpo_lightning.module import PRPOModule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI reads sys.argv too; keep pytest's own arguments out of it."""
    monkeypatch.setattr("sys.argv", ["prpo-fit"])


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory) -> str:
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _tiny_overrides(tokenizer: str) -> list[str]:
    return [
        "--model.policy=null",
        f"--model.policy_config={json.dumps(tiny_qwen2_config(vocab_size=128))}",
        f"--model.tokenizer={tokenizer}",
        "--model.dtype=float32",
        "--model.gradient_checkpointing=false",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "prpo"])
def test_fit_two_steps_through_cli(tmp_path, char_tokenizer, method):
    aligner = {"grpo": "components.aligners.GRPOAligner", "prpo": "components.aligners.PRPOAligner"}[method]
    args = [
        "fit",
        "--seed_everything=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_steps=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=prpo_lightning.callbacks.MathEvalCallback",
        "--trainer.callbacks+=prpo_lightning.callbacks.TrainingCurves",
        *_tiny_overrides(char_tokenizer),
        "--model.verifier=components.verifiers.SympyMathVerifier",
        f"--model.aligner={aligner}",
        "--model.sampling.num_generations=4",
        "--model.sampling.max_new_tokens=24",
        "--model.optim.lr=1e-4",
        "--model.optim.micro_batch_size=8",
        "--model.loss.kl_coef=0.01",
        "--model.prompt_template=Q: {problem}\nA:\n",
        "--data=prpo_lightning.data.ArithmeticDataModule",
        "--data.num_train=16",
        "--data.num_eval=4",
        "--data.batch_size=2",
    ]
    if method == "prpo":
        args += [
            "--model.segmenter=components.segmenters.EntropySpikeSegmenter",
            "--model.segmenter.min_gap=4",
            "--model.prm=components.prms.EquationCheckPRM",
        ]
    cli = cli_main(args)
    assert isinstance(cli.model, PRPOModule)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    for key in ("train/reward/mean", "train/accuracy", "train/frac_zero_std_groups", "train/clip_frac",
                "train/kl", "train/entropy", "train/completion/length_mean", "train/completion/truncated_frac",
                "train/verifier/unparsable", "train/verifier/timeouts", "train/grad_norm"):
        assert key in metrics, key
        assert torch.isfinite(metrics[key]), key
    if method == "prpo":
        assert "train/segments/per_completion" in metrics and "train/prm/score_mean" in metrics
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "training_curves.csv").exists() and (log_dir / "training_curves.png").exists()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_instantiates(config, char_tokenizer, tmp_path):
    args = [
        "--config", str(config),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        f"--trainer.default_root_dir={tmp_path}",
        *_tiny_overrides(char_tokenizer),
    ]
    cli = cli_main(args, run=False)
    model = cli.model
    assert isinstance(model, PRPOModule)
    model.configure_model()
    assert model.policy is not None and model.tokenizer is not None
    assert (model._reference is not None) == model.plan.reference
    if model.aligner.needs.process_scores:
        assert model.segmenter is not None and model.prm is not None
    assert cli.datamodule is not None


def test_console_script_exits_zero(monkeypatch):
    """The ``prpo-fit`` entry point must return None: setuptools wraps it as ``sys.exit(main())``."""
    import tomllib

    from prpo_lightning import cli

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["prpo-fit"] == "prpo_lightning.cli:main"
    monkeypatch.setattr(cli, "cli_main", lambda: object())
    assert cli.main() is None


@pytest.mark.slow
def test_logged_lr_is_the_rate_each_step_used(tmp_path):
    """Cosine over 3 steps from 1e-2: steps 0, 1, 2 use 1e-2 · (1, 0.75, 0.25); the last step does not log 0."""
    import csv

    from test_resume import cli_fit_args, tokenizer_dir

    args = cli_fit_args(tmp_path, tokenizer_dir(tmp_path), 3, "--model.optim.schedule=cosine",
                        "--model.optim.warmup_steps=0")
    cli = cli_main(args)
    with (Path(cli.trainer.log_dir) / "metrics.csv").open() as fh:
        lrs = [float(r["train/lr"]) for r in csv.DictReader(fh) if r.get("train/lr")]
    assert lrs == pytest.approx([1e-2, 0.75e-2, 0.25e-2], rel=1e-6)


def test_failed_run_leaves_no_empty_version_folder(tmp_path):
    """A run that fails before producing anything (here: a negative lr, rejected by the optimizer) removes the
    ``version_N`` folder it opened (a run that failed after writing outputs keeps it: test_resume's requeue test)."""
    from test_resume import cli_fit_args, tokenizer_dir

    tok = tokenizer_dir(tmp_path)
    with pytest.raises(ValueError, match="learning rate"):
        cli_main(cli_fit_args(tmp_path, tok, 1, "--model.optim.lr=-1.0"))
    assert not list((tmp_path / "runs" / "toy").glob("version_*"))


@pytest.mark.parametrize("engine", ["HFGenerateEngine", "StaticCacheEngine"])
def test_demo_config_fits_with_an_engine_by_class_path(tmp_path, char_tokenizer, engine):
    """``prpo-fit fit --config configs/demo.yaml --model.engine=components.engines.<Engine>`` with a tiny policy."""
    args = [
        "fit", "--config", str(REPO / "configs" / "demo.yaml"),
        f"--model.engine=components.engines.{engine}",
        "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        "--trainer.callbacks=[]", "--model.sampling.num_generations=2", "--model.sampling.max_new_tokens=8",
        "--data.init_args.batch_size=2",
        *_tiny_overrides(char_tokenizer),
    ]
    cli = cli_main(args)
    assert type(cli.model.engine).__name__ == engine
    assert cli.trainer.global_step == 2
    assert cli.model.engine.weight_version == cli.model.collector.weights_version == 2  # synced after both updates
    assert "train/rollout/kl" not in cli.trainer.callback_metrics  # exact engine: no sampler log-probs
