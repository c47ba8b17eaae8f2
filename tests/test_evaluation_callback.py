"""MathEvalCallback and ``validate``/``test`` on a tiny random model over the first 10 MATH500 problems: every output
file is produced, metrics are logged, and a completions table reaches the logger."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from helpers import build_char_tokenizer, tiny_qwen2_config
from prpo_lightning.callbacks import MathEvalCallback
from prpo_lightning.data import ArithmeticDataModule
from prpo_lightning.evaluation.benchmarks import DATA_DIR_ENV
from prpo_lightning.evaluation.datamodule import MathBenchmarkDataModule
from prpo_lightning.evaluation.runner import EvalConfig
from prpo_lightning.module import PRPOModule
from prpo_lightning.config import SamplingConfig
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
MATH500 = DATA_DIR / "math500" / "test.jsonl"
needs_math500 = pytest.mark.skipif(not MATH500.exists(), reason=f"MATH500 not found at {MATH500}")
OUTPUT_FILES = ("completions.jsonl", "summary.csv", "summary.txt", "breakdown.png", "samples.md")


class ExactMatchVerifier(OutcomeVerifier):
    """The last ``\\boxed{...}`` (or the whole text) compared as a stripped string."""

    def verify(self, completion: str, gold: str) -> Verdict:
        start = completion.rfind("\\boxed{")
        if start < 0:
            return Verdict(VerdictStatus.UNPARSABLE, 0.0)
        extracted = completion[start + 7 :].split("}")[0].strip()
        ok = extracted == gold.strip()
        return Verdict(VerdictStatus.CORRECT if ok else VerdictStatus.INCORRECT, float(ok), extracted=extracted)


class TableLogger(Logger):
    """A logger with ``log_table`` (like WandbLogger) that records what it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.metrics: list[dict] = []

    @property
    def name(self) -> str:
        return "table"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append(dict(metrics, step=step))

    def log_table(self, key, columns, data, step=None) -> None:
        self.tables.append({"key": key, "columns": columns, "data": data, "step": step})


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory) -> str:
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _module(tokenizer: str) -> PRPOModule:
    from components.aligners import GRPOAligner

    return PRPOModule(
        verifier=ExactMatchVerifier(),
        aligner=GRPOAligner(),
        policy_config=tiny_qwen2_config(vocab_size=128),
        tokenizer=tokenizer,
        sampling=SamplingConfig(num_generations=2, max_new_tokens=6),
        prompt_template="{problem}\nA:",
    )


def _trainer(tmp_path: Path, callbacks=(), loggers=None, **kw) -> L.Trainer:
    kw = {"num_sanity_val_steps": 0, "limit_val_batches": 0, **kw}
    return L.Trainer(
        accelerator="cpu", devices=1, logger=loggers if loggers is not None else False, callbacks=list(callbacks),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **kw,
    )


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_math500
def test_callback_on_math500_slice_writes_every_output(tmp_path, char_tokenizer, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA_DIR))
    table_logger = TableLogger()
    cb = MathEvalCallback(
        every_n_steps=1, benchmarks=["math500"], max_problems=10, batch_size=5, n_samples=3, ks=[2, 3],
        output_dir=str(tmp_path / "eval"), num_logged_completions=4,
    )
    trainer = _trainer(tmp_path, [cb], [CSVLogger(tmp_path / "logs"), table_logger], max_steps=1)
    trainer.fit(_module(char_tokenizer), datamodule=ArithmeticDataModule(num_train=4, num_eval=2, batch_size=2))

    assert [h["step"] for h in cb.history] == [0.0, 1.0]  # before RL and after step 1 (end: same step, not repeated)
    for h in cb.history:
        assert h["num_problems"] == 10.0 and 0.0 <= h["accuracy"] <= 1.0
        assert {"math500/pass@1", "math500/pass@2", "math500/pass@3", "math500/mean@3"} <= set(h)
    for step in ("000000", "000001"):
        out = tmp_path / "eval" / f"fit-step{step}"
        for name in OUTPUT_FILES:
            assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    out = tmp_path / "eval" / "fit-step000001"
    rows = _read_jsonl(out / "completions.jsonl")
    assert len(rows) == 10 * (1 + 3)  # one greedy and three sampled completions per problem
    assert {"problem_id", "completion", "extracted", "verdict", "correct", "subject", "level", "step"} <= set(rows[0])
    assert rows[0]["problem_id"] == "test/precalculus/807.json"
    assert {r["mode"] for r in rows} == {"greedy", "sample"}
    with (out / "summary.csv").open() as fh:
        summary = list(csv.DictReader(fh))
    assert summary[0]["breakdown"] == "overall" and summary[0]["problems"] == "10"
    assert {"pass@1", "pass@2", "pass@3", "mean@3"} <= set(summary[0])
    assert {r["breakdown"] for r in summary} == {"overall", "subject", "level"}
    assert sum(int(r["problems"]) for r in summary if r["breakdown"] == "subject") == 10
    assert sum(int(r["problems"]) for r in summary if r["breakdown"] == "level") == 10
    assert (out / "breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| benchmark | problem_id |" in (out / "samples.md").read_text()
    # the table logger got the completion sample, and every logger got the metrics
    assert table_logger.tables and len(table_logger.tables[-1]["data"]) == 4
    assert table_logger.tables[-1]["columns"][:2] == ["benchmark", "problem_id"]
    assert any("eval/math500/pass@1" in m for m in table_logger.metrics)
    assert "eval/math500/pass@1" in trainer.callback_metrics
    # the greedy pass@1 equals the share of correct greedy rows
    greedy = [r for r in rows if r["mode"] == "greedy"]
    assert cb.history[-1]["math500/pass@1"] == sum(r["correct"] for r in greedy) / 10


def test_callback_defaults_to_the_datamodule_eval_set(tmp_path, char_tokenizer):
    cb = MathEvalCallback(output_dir=str(tmp_path / "eval"))
    trainer = _trainer(tmp_path, [cb], max_steps=1)
    trainer.fit(_module(char_tokenizer), datamodule=ArithmeticDataModule(num_train=4, num_eval=3, batch_size=2))
    assert [h["step"] for h in cb.history] == [0.0, 1.0]
    assert all(h["num_problems"] == 3.0 for h in cb.history)
    assert set(cb.history[0]) >= {"step", "accuracy", "num_problems", "heldout/pass@1"}
    assert cb.state_dict()["history"] == cb.history
    assert (tmp_path / "eval" / "fit-step000001" / "summary.csv").is_file()


@needs_math500
def test_prpo_fit_test_on_math500_slice(tmp_path, char_tokenizer, monkeypatch):
    """``trainer.test`` with MathBenchmarkDataModule: the same metrics, outputs under the log dir."""
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA_DIR))
    dm = MathBenchmarkDataModule(["math500"], max_problems=10, eval_batch_size=4,
                                 eval=EvalConfig(n_samples=2, ks=[2]))
    module = _module(char_tokenizer)
    trainer = _trainer(tmp_path, loggers=CSVLogger(tmp_path, name="t"))
    (result,) = trainer.test(module, datamodule=dm)
    assert {"test/accuracy", "test/math500/pass@1", "test/math500/pass@2", "test/math500/mean@2",
            "test/math500/num_problems"} <= set(result)
    assert result["test/math500/num_problems"] == 10
    out = Path(module.eval_results["test"]["files"]["summary_csv"]).parent
    assert out.parent == Path(trainer.log_dir) / "eval"
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    assert len(_read_jsonl(out / "completions.jsonl")) == 10 * 3


def test_long_prompts_count_as_wrong_not_dropped(tmp_path, char_tokenizer):
    """A problem whose prompt exceeds max_prompt_length stays in the denominator with verdict 'skipped'."""
    module = _module(char_tokenizer)
    module.sampling.max_prompt_length = 40
    rows = [{"id": 0, "problem": "1+1", "answer": "2"}, {"id": 1, "problem": "x" * 100, "answer": "3"}]
    dm = MathBenchmarkDataModule(["math500"], eval=EvalConfig())
    dm.eval_rows = [dict(r, index=r["id"], benchmark="math500", problem_id=f"p{r['id']}") for r in rows]
    dm.train_rows = [rows[0]]
    trainer = _trainer(tmp_path, limit_val_batches=1.0)
    trainer.validate(module, datamodule=dm)
    records = module.eval_results["val"]
    assert records["metrics"]["math500/num_problems"] == 2.0
    out = Path(records["files"]["completions_jsonl"])
    verdicts = {r["problem_id"]: r["verdict"] for r in _read_jsonl(out)}
    assert verdicts["p1"] == "skipped"


@needs_math500
def test_prpo_fit_test_command_with_eval_config(tmp_path, char_tokenizer, monkeypatch):
    """The README's one command, ``prpo-fit test --config configs/eval_math500.yaml``, with a tiny local model."""
    from prpo_lightning.cli import cli_main

    monkeypatch.setenv(DATA_DIR_ENV, str(DATA_DIR))
    cli = cli_main([
        "test", "--config", str(REPO / "configs" / "eval_math500.yaml"),
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--model.policy=null", f"--model.policy_config={json.dumps(tiny_qwen2_config(vocab_size=128))}",
        f"--model.tokenizer={char_tokenizer}", "--model.dtype=float32", "--model.sampling.max_new_tokens=4",
        "--data.max_problems=4", "--data.eval_batch_size=4",
    ])
    result = cli.model.eval_results["test"]
    assert result["metrics"]["math500/num_problems"] == 4.0
    out = Path(result["files"]["summary_csv"]).parent
    assert out == tmp_path / "eval" / "version_0" / "eval" / "test-step000000"
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_prpo_fit_test_labels_outputs_with_the_checkpoints_step(tmp_path, monkeypatch):
    """``prpo-fit test --ckpt_path X`` after 2 training steps: the output folder, the recorded step of every
    completion and the logged metrics are labelled with step 2, the checkpoint's own."""
    from test_resume import cli_fit_args, tokenizer_dir

    from prpo_lightning.cli import cli_main

    monkeypatch.setattr("sys.argv", ["prpo-fit"])
    args = cli_fit_args(tmp_path, tokenizer_dir(tmp_path), 2, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                        "--trainer.callbacks.save_last=true")
    cli_main(args)
    ckpt = tmp_path / "runs" / "toy" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    test = cli_main(["test", *args[1:], f"--ckpt_path={ckpt}"])
    assert test.trainer.global_step == 0  # Lightning does not restore the fit loop for `test`
    result = test.model.eval_results["test"]
    out = Path(result["files"]["summary_csv"]).parent
    assert out.name == "test-step000002"
    assert {r["step"] for r in _read_jsonl(out / "completions.jsonl")} == {2}
    with (Path(test.trainer.log_dir) / "metrics.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("test/accuracy")]
    assert [r["step"] for r in rows] == ["2"]
