"""Items 6, 7 and 9 of issue 12, met the way a user meets them: ``prpo-fit fit`` with user components named by
``class_path`` (this module is importable as ``test_contracts``), and ``prpo-fit test`` on a benchmark file.

* components (segmenter, PRM, verifier, aligner) run under ``torch.no_grad()``;
* the segmenter and the PRM get the policy tokenizer once (``setup_tokenizer``), before the first step;
* a broken contract fails with an error that names the component, the rule and the fix;
* evaluation counts the problems skipped as too long.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from components.aligners import GRPOAligner, PRPOAligner
from components.prms import EquationCheckPRM
from components.segmenters import FixedLengthSegmenter
from components.verifiers import SympyMathVerifier
from helpers import build_char_tokenizer, tiny_qwen2_config
from prpo_lightning.batch import ComponentContractError, SpanContractError
from prpo_lightning.cli import cli_main
from prpo_lightning.scoring.faults import PRMError

CALLS: list[tuple[str, Any]] = []  # (event, value) recorded by the components below, in call order


class RecordingSegmenter(FixedLengthSegmenter):
    def setup_tokenizer(self, tokenizer: Any) -> None:
        CALLS.append(("segmenter.setup_tokenizer", tokenizer is not None))

    def segment(self, batch, tokenizer=None):
        CALLS.append(("segmenter.grad", torch.is_grad_enabled()))
        return super().segment(batch, tokenizer)


class RecordingPRM(EquationCheckPRM):
    def setup_tokenizer(self, tokenizer: Any) -> None:
        CALLS.append(("prm.setup_tokenizer", tokenizer is not None))

    def score(self, batch, tokenizer):
        CALLS.append(("prm.grad", torch.is_grad_enabled()))
        return super().score(batch, tokenizer)


class RecordingVerifier(SympyMathVerifier):
    def verify_batch(self, completions, golds, rows=None):
        CALLS.append(("verifier.grad", torch.is_grad_enabled()))
        return super().verify_batch(completions, golds, rows)


class RecordingAligner(PRPOAligner):
    def advantage_terms(self, batch):
        CALLS.append(("aligner.grad", torch.is_grad_enabled()))
        return super().advantage_terms(batch)


class ListPRM(EquationCheckPRM):
    """Returns plain lists of step scores instead of ``ProcessScores``."""

    def score(self, batch, tokenizer):
        return [[0.5] * len(spans) for spans in batch.segment_spans]


class OverlappingSegmenter(FixedLengthSegmenter):
    def segment(self, batch, tokenizer=None):
        return [[(0, n), (n - 1, n)] if n > 1 else [(0, n)] for n in batch.lengths.tolist()]


class EmptySpanSegmenter(FixedLengthSegmenter):
    def segment(self, batch, tokenizer=None):
        return [[(0, 0), (0, n)] if n else [] for n in batch.lengths.tolist()]


class OldLogprobPRM(EquationCheckPRM):
    """Reads ``old_logprobs`` without declaring ``rollout_logprobs``."""

    def score(self, batch, tokenizer):
        _ = batch.old_logprobs.sum()
        return super().score(batch, tokenizer)


class EntropyAligner(GRPOAligner):
    """Reads ``entropies`` without declaring ``rollout_logprobs``."""

    def advantage_terms(self, batch):
        _ = batch.entropies
        return super().advantage_terms(batch)


class LogprobSegmenter(FixedLengthSegmenter):
    """A segmenter reading ``old_logprobs``: not an input of segmenters."""

    def segment(self, batch, tokenizer=None):
        _ = batch.old_logprobs
        return super().segment(batch, tokenizer)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prpo-fit"])
    CALLS.clear()


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory) -> str:
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _fit(tmp_path: Path, tokenizer: str, *extra: str) -> Any:
    """One RL step of a tiny random policy on the arithmetic task, through ``prpo-fit fit``."""
    return cli_main([
        "fit", "--seed_everything=0", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.policy=null", f"--model.policy_config={json.dumps(tiny_qwen2_config(vocab_size=128))}",
        f"--model.tokenizer={tokenizer}", "--model.prompt_template=Q: {problem}\nA:\n",
        "--model.verifier=components.verifiers.SympyMathVerifier", "--model.verifier.num_workers=1",
        "--model.aligner=components.aligners.PRPOAligner",
        "--model.segmenter=components.segmenters.FixedLengthSegmenter", "--model.segmenter.segment_length=3",
        "--model.prm=components.prms.EquationCheckPRM",
        "--model.sampling.num_generations=2", "--model.sampling.max_new_tokens=8", "--model.optim.lr=1e-4",
        "--data=prpo_lightning.data.ArithmeticDataModule", "--data.num_train=4", "--data.num_eval=2",
        "--data.batch_size=2",
        *extra,
    ])


def test_components_run_without_grad_and_get_the_tokenizer_once(tmp_path, char_tokenizer):
    """Item 6: segmenter, PRM, verifier and aligner all run with autograd off; item 7: setup_tokenizer once, first."""
    cli = _fit(tmp_path, char_tokenizer, "--model.segmenter=test_contracts.RecordingSegmenter",
               "--model.prm=test_contracts.RecordingPRM", "--model.verifier=test_contracts.RecordingVerifier",
               "--model.verifier.num_workers=1", "--model.aligner=test_contracts.RecordingAligner")
    assert cli.trainer.global_step == 1
    grad = {event: value for event, value in CALLS if event.endswith(".grad")}
    assert grad == {"segmenter.grad": False, "prm.grad": False, "verifier.grad": False, "aligner.grad": False}
    setups = [event for event, value in CALLS if event.endswith("setup_tokenizer") and value]
    assert sorted(setups) == ["prm.setup_tokenizer", "segmenter.setup_tokenizer"]  # once each, with the tokenizer
    first_step = min(i for i, (event, _) in enumerate(CALLS) if event.endswith(".grad"))
    assert max(i for i, (event, _) in enumerate(CALLS) if event.endswith("setup_tokenizer")) < first_step


@pytest.mark.parametrize(
    ("extra", "error", "patterns"),
    [
        (["--model.prm=test_contracts.ListPRM"], ComponentContractError,
         ["PRM ListPRM.score returned a list", "ProcessScores", "pad_step_scores"]),
        (["--model.segmenter=test_contracts.OverlappingSegmenter"], SpanContractError,
         ["segmenter OverlappingSegmenter.segment", "do not tile", "non-empty, contiguous", "cuts_to_spans"]),
        (["--model.segmenter=test_contracts.EmptySpanSegmenter"], SpanContractError,
         ["segmenter EmptySpanSegmenter.segment", "(0, 0)", "non-empty", "cuts_to_spans"]),
        (["--model.prm=test_contracts.OldLogprobPRM"], (ComponentContractError, PRMError),
         ["prm OldLogprobPRM read batch.old_logprobs", "ComponentNeeds(rollout_logprobs=True)"]),
        # entropies exist here (ppo_epochs 2 computes them), yet the undeclared read still fails: no accidental use
        (["--model.aligner=test_contracts.EntropyAligner", "--model.optim.ppo_epochs=2"], ComponentContractError,
         ["aligner EntropyAligner read batch.entropies", "ComponentNeeds(rollout_logprobs=True)"]),
        (["--model.segmenter=test_contracts.LogprobSegmenter"], ComponentContractError,
         ["segmenter LogprobSegmenter read batch.old_logprobs", "a segmenter cannot read it"]),
    ],
    ids=["prm-returns-list", "overlapping-spans", "empty-span", "prm-undeclared-logprobs",
         "aligner-undeclared-entropies", "segmenter-reads-logprobs"],
)
def test_contract_errors_name_component_rule_and_fix(tmp_path, char_tokenizer, extra, error, patterns):
    """Item 7: each broken contract stops ``prpo-fit fit`` with a message naming the component, rule and fix."""
    with pytest.raises(error) as info:
        _fit(tmp_path, char_tokenizer, *extra)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))


def test_prpo_fit_test_counts_problems_skipped_as_too_long(tmp_path, char_tokenizer):
    """Item 9: a problem whose prompt exceeds max_prompt_length is counted under 'skipped' (and scored wrong)."""
    bench = tmp_path / "toy" / "test.jsonl"
    bench.parent.mkdir()
    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "9" * 80, "answer": "3"}, {"problem": "2+2", "answer": "4"}]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="1 of 3 problems were skipped"):
        cli = cli_main([
            "test", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            "--model.policy=null", f"--model.policy_config={json.dumps(tiny_qwen2_config(vocab_size=128))}",
            f"--model.tokenizer={char_tokenizer}", "--model.prompt_template=Q: {problem}\nA:\n",
            "--model.verifier=components.verifiers.SympyMathVerifier", "--model.verifier.num_workers=1",
            "--model.aligner=components.aligners.GRPOAligner", "--model.sampling.max_new_tokens=4",
            "--model.sampling.max_prompt_length=40",
            "--data=prpo_lightning.evaluation.datamodule.MathBenchmarkDataModule", f"--data.benchmarks=[{bench}]",
            f"--data.eval.output_dir={out}",
        ])
    result = cli.model.eval_results["test"]
    assert result["metrics"]["toy/num_problems"] == 3.0 and result["metrics"]["toy/num_skipped"] == 1.0
    with Path(result["files"]["summary_csv"]).open() as fh:
        overall = next(csv.DictReader(fh))
    assert (overall["problems"], overall["skipped"]) == ("3", "1")
    assert "skipped" in Path(result["files"]["summary_txt"]).read_text().splitlines()[0]


def test_no_boxed_fraction_is_the_math_verifiers_metric():
    """Item 13: ``completion/no_boxed_frac`` comes from the math verifier (complete boxes only), not generic scoring."""
    from prpo_lightning.scoring.verifier import OutcomeVerifier

    texts = ["so \\boxed{3}", "no box here", "cut off \\boxed{1", "\\fbox{2}"]
    verifier = SympyMathVerifier(num_workers=1)
    assert verifier.batch_metrics(texts, verifier.verify_batch(texts, ["3"] * 4)) == {"completion/no_boxed_frac": 0.5}
    assert OutcomeVerifier.batch_metrics(verifier, texts, []) == {}  # the generic base adds nothing task-specific


def test_math_train_answers_use_the_verifiers_boxed_extraction(monkeypatch):
    """Item 13: ``answer_from_solution`` reads the gold answer with the verifier's own extraction (nested braces,
    the last complete box, surrounding spaces stripped)."""
    import datasets

    from prpo_lightning.data import JsonlMathDataModule

    solutions = ["so $\\boxed{ \\frac{1}{2} }$.", "first \\boxed{1}, then \\boxed{\\sqrt{3}}", "no answer"]
    rows = [{"problem": f"p{i}", "solution": s} for i, s in enumerate(solutions)]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split: rows)
    dm = JsonlMathDataModule(train_path="hub/math", train_hub_split="train", answer_from_solution="solution")
    train, _ = dm.load_rows()
    assert [(r["id"], r["answer"]) for r in train] == [(0, "\\frac{1}{2}"), (1, "\\sqrt{3}")]
