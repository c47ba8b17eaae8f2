"""Evaluation data: the benchmark registry, answer normalisation, bad files named by file and line, and the
evaluator's summary/breakdown on a model-free fake."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prpo_lightning.data import DataFileError, collate_prompts
from prpo_lightning.evaluation import report
from prpo_lightning.evaluation.benchmarks import (
    BENCHMARKS,
    DATA_DIR_ENV,
    PAPER_COMPETITION_PROMPT,
    load_benchmark,
    normalize_gold,
    resolve_benchmark,
)
from prpo_lightning.evaluation.datamodule import MathBenchmarkDataModule
from prpo_lightning.evaluation.runner import BenchmarkEvaluator, EvalConfig
from prpo_lightning.scoring.verifier import Verdict, VerdictStatus

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA_DIR / "math500" / "test.jsonl").exists(), reason=f"no data at {DATA_DIR}")

GOOD = {"problem": "1+1?", "answer": "2", "subject": "Algebra", "level": 1}


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (json.dumps({"problem": "2+2?"}), "missing field 'answer'"),
        (json.dumps({"answer": "4"}), "missing field 'problem'"),
        (json.dumps({"problem": "2+2?", "answer": "  "}), "empty field 'answer'"),
        ('{"problem": "2+2?", "answer": "4"', "broken JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_dataset_file_names_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), bad_line, json.dumps(GOOD)])
    with pytest.raises(DataFileError, match=message) as err:
        load_benchmark(str(path))
    assert f"{path}:3:" in str(err.value)
    dm = MathBenchmarkDataModule([str(path)])
    with pytest.raises(DataFileError, match=f"{path}:3:"):
        dm.setup("test")


def test_empty_dataset_file_is_an_error(tmp_path):
    path = _write(tmp_path, [""])
    with pytest.raises(DataFileError, match=str(path)):
        load_benchmark(str(path))


def test_unknown_benchmark_and_missing_file():
    with pytest.raises(ValueError, match="unknown benchmark 'math5000'"):
        resolve_benchmark("math5000")
    with pytest.raises(FileNotFoundError):
        resolve_benchmark("/nonexistent/test.jsonl")


def test_registry_and_gold_normalisation():
    assert {"math500", "amc23", "aime24"} <= set(BENCHMARKS)
    assert BENCHMARKS["math500"].hub_id == "HuggingFaceH4/MATH-500"
    assert BENCHMARKS["math500"].prompt_template is None  # the model's prompt (default: the paper's)
    assert BENCHMARKS["aime24"].prompt_template == PAPER_COMPETITION_PROMPT
    assert normalize_gold(27.0) == "27"
    assert normalize_gold("27.0") == "27"
    assert normalize_gold("025") == "25"
    assert normalize_gold("0") == "0"
    assert normalize_gold("\\frac{14}{3}") == "\\frac{14}{3}"
    assert normalize_gold("0.5") == "0.5"


@needs_data
def test_local_benchmarks_load_with_stable_ids(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA_DIR))
    math500 = load_benchmark("math500")
    assert len(math500) == 500 and [r["index"] for r in math500[:3]] == [0, 1, 2]
    assert math500[0]["problem_id"] == "test/precalculus/807.json"
    assert {"subject", "level"} <= set(math500[0])
    amc, aime = load_benchmark("amc23"), load_benchmark("aime24")
    assert (len(amc), len(aime)) == (40, 30)
    assert amc[0]["answer"] == "27" and all("." not in r["answer"] for r in amc)
    assert "keep only one \\boxed{}" in aime[0]["prompt_template"].format(problem="x")
    dm = MathBenchmarkDataModule(["math500", "amc23"], max_problems=5, eval_batch_size=4)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["id"].tolist() == [0, 1, 2, 3]
    assert {"subject", "level", "benchmark", "index", "problem_id", "prompt_template"} <= set(batch)
    assert [r["id"] for r in dm.eval_rows] == list(range(10))  # unique across benchmarks


class FakeModule:
    """Answers ``answer`` for even indices, ``wrong`` otherwise; sample s of problem i is right iff (i + s) % 3 == 0."""

    device = torch.device("cpu")

    def generate_and_grade(self, batch, greedy=True, num_samples=1, **kw):
        n = 1 if greedy else num_samples
        rows = [r for r in range(len(batch["problem"])) for _ in range(n)]
        verdicts = []
        for j, r in enumerate(rows):
            i, s = batch["index"][r], j % n
            ok = (i % 2 == 0) if greedy else ((i + s) % 3 == 0)
            verdicts.append(Verdict(VerdictStatus.CORRECT if ok else VerdictStatus.INCORRECT, float(ok), extracted="x"))
        return SimpleNamespace(completions=["c"] * len(rows), verdicts=verdicts, extras={"batch_rows": rows},
                               group_ids=batch["id"][torch.tensor(rows)])


def test_evaluator_summary_breakdown_and_outputs(tmp_path):
    rows = [{"id": i, "index": i, "benchmark": "toy", "problem_id": f"toy/{i}", "problem": "p", "answer": "a",
             "subject": "A" if i < 4 else "B", "level": 1 + i % 2} for i in range(6)]
    ev = BenchmarkEvaluator(["toy"], EvalConfig(n_samples=3, ks=[2, 3], num_logged_completions=5))
    for s in range(0, 6, 4):
        ev.run_batch(FakeModule(), collate_prompts(rows[s : s + 4]))
    ev.run_batch(FakeModule(), collate_prompts(rows[:1]))  # a padded repeat: must not count twice
    out = ev.finalize(step=7, stage="test", output_dir=tmp_path / "o")
    overall = out["summary"][0]
    assert overall["problems"] == 6
    assert overall["pass@1"] == 0.5  # indices 0, 2, 4
    # each problem has exactly one correct sample of 3: pass@2 = 1 - C(2,2)/C(3,2) = 2/3, pass@3 = 1, mean@3 = 1/3
    assert overall["pass@2"] == pytest.approx(2 / 3) and overall["pass@3"] == 1.0
    assert overall["mean@3"] == pytest.approx(1 / 3)
    subj = {r["group"]: r for r in out["summary"] if r["breakdown"] == "subject"}
    assert (subj["A"]["problems"], subj["A"]["pass@1"], subj["B"]["pass@1"]) == (4, 0.5, 0.5)
    level = {r["group"]: r for r in out["summary"] if r["breakdown"] == "level"}
    assert (level[1]["pass@1"], level[2]["pass@1"]) == (1.0, 0.0)
    assert out["metrics"]["accuracy"] == 0.5 and out["metrics"]["toy/pass@3"] == 1.0
    lines = (tmp_path / "o" / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 6 * 4 and json.loads(lines[0])["step"] == 7
    table = report.format_table(out["summary"])
    assert table.splitlines()[0].split() == ["benchmark", "group", "problems", "skipped", "pass@1", "pass@2", "pass@3",
                                             "mean@3"]
    assert "subject=A" in table and "50.0" in table
    # the evaluator is reset for the next round
    assert ev.states["toy"].records == [] and ev.states["toy"].greedy.problem_ids == []


class SkippingModule(FakeModule):
    """Like FakeModule, but problems with an odd index are skipped as too long (absent from the rollout)."""

    def generate_and_grade(self, batch, greedy=True, num_samples=1, **kw):
        keep = [r for r in range(len(batch["problem"])) if batch["index"][r] % 2 == 0]
        sub = {k: ([v[r] for r in keep] if isinstance(v, list) else v[torch.tensor(keep)]) for k, v in batch.items()}
        out = super().generate_and_grade(sub, greedy, num_samples, **kw)
        out.extras["batch_rows"] = [keep[r] for r in out.extras["batch_rows"]]
        return out


@pytest.mark.parametrize("n_samples", [0, 2])
def test_skipped_problems_are_counted_in_summary_table_csv_and_metrics(tmp_path, n_samples):
    """Item 9 of issue 12: too-long problems stay in the denominator as wrong and are counted, by name, everywhere."""
    rows = [{"id": i, "index": i, "benchmark": "toy", "problem_id": f"toy/{i}", "problem": "p", "answer": "a",
             "subject": "A" if i < 4 else "B"} for i in range(6)]
    ev = BenchmarkEvaluator(["toy"], EvalConfig(n_samples=n_samples))
    ev.run_batch(SkippingModule(), collate_prompts(rows))
    with pytest.warns(UserWarning, match=r"toy: 3 of 6 problems were skipped .*max_prompt_length"):
        out = ev.finalize(step=1, stage="val", output_dir=tmp_path / "o")
    overall = out["summary"][0]
    assert (overall["problems"], overall["skipped"]) == (6, 3)
    assert overall["pass@1"] == 0.5  # the 3 kept (even) problems are right, the 3 skipped count as wrong
    subj = {r["group"]: r["skipped"] for r in out["summary"] if r["breakdown"] == "subject"}
    assert subj == {"A": 2, "B": 1}  # indices 1, 3 and 5
    assert out["metrics"]["toy/num_skipped"] == 3.0 and out["metrics"]["num_skipped"] == 3.0
    with (tmp_path / "o" / "summary.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert csv_rows[0]["skipped"] == "3" and csv_rows[0]["problems"] == "6"
    header, _, first = report.format_table(out["summary"]).splitlines()[:3]
    assert header.split()[:4] == ["benchmark", "group", "problems", "skipped"] and first.split()[2:4] == ["6", "3"]


def test_eval_config_validation():
    with pytest.raises(ValueError, match="greedy=True or n_samples"):
        EvalConfig(greedy=False, n_samples=0)
    with pytest.raises(ValueError, match="every k"):
        EvalConfig(n_samples=4, ks=[8])
    assert EvalConfig(n_samples=8).pass_ks == [2, 4, 8]
    assert EvalConfig().pass_ks == []


def test_hub_fallback_names_the_local_path_and_the_env_var(tmp_path, monkeypatch):
    """Item 8 of issue 12: a missing local benchmark file is named, with the variable that chose its directory."""
    import prpo_lightning.evaluation.benchmarks as benchmarks

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    expected = str((tmp_path / "math500" / "test.jsonl").resolve())

    def offline(spec, keep):
        raise OSError("no route to host")

    monkeypatch.setattr(benchmarks, "_load_hub", offline)
    with pytest.warns(UserWarning, match="loading HuggingFaceH4/MATH-500 from the Hugging Face hub"):
        with pytest.raises(RuntimeError) as info:
            load_benchmark("math500")
    message = str(info.value)
    assert expected in message and f"${DATA_DIR_ENV}={tmp_path}" in message and "no route to host" in message
    monkeypatch.setattr(benchmarks, "_load_hub", lambda spec, keep: [{"id": 0, "problem": "1+1", "answer": "2"}])
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning) as record:
        rows = load_benchmark("math500")
    assert rows[0]["answer"] == "2"
    text = str(record[0].message)
    assert str((tmp_path / ".." / "shared" / "data" / "math500" / "test.jsonl").resolve()) in text
    assert f"set ${DATA_DIR_ENV}" in text
