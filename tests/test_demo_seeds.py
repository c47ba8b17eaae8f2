"""benchmarks/demo_seeds.py: the demo over several seeds, run here with a tiny random policy and one RL step."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from helpers import build_char_tokenizer, tiny_qwen2_config

REPO = Path(__file__).resolve().parents[1]


def _load_demo_seeds():
    spec = importlib.util.spec_from_file_location("demo_seeds", REPO / "benchmarks" / "demo_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_seeds = _load_demo_seeds()


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = [
        {"accuracy_before": 0.30, "accuracy_after": 0.40, "gain_points": 10.0},
        {"accuracy_before": 0.30, "accuracy_after": 0.50, "gain_points": 20.0},
        {"accuracy_before": 0.30, "accuracy_after": 0.60, "gain_points": 30.0},
    ]
    s = demo_seeds.summarize(rows)
    assert s["gain_points"]["mean"] == pytest.approx(20.0) and s["gain_points"]["std"] == pytest.approx(10.0)
    assert s["accuracy_after"]["mean"] == pytest.approx(0.5) and s["accuracy_after"]["std"] == pytest.approx(0.1)
    assert s["accuracy_before"]["std"] == 0.0
    assert demo_seeds.summarize(rows[:1])["gain_points"] == {"mean": 10.0, "std": None}  # one seed: no spread


@pytest.mark.slow
def test_demo_over_two_seeds_with_tiny_settings(tmp_path, monkeypatch):
    tokenizer = build_char_tokenizer(tmp_path / "tok")
    result = demo_seeds.main([
        "--seeds", "0", "1", "--max-steps", "1", "--num-eval", "4",
        "--out", str(tmp_path / "results"), "--log-root", str(tmp_path / "runs"),
        "--",
        "--model.policy=null", f"--model.policy_config={json.dumps(tiny_qwen2_config(vocab_size=128))}",
        f"--model.tokenizer={tokenizer}", "--model.dtype=float32",
        "--model.sampling.num_generations=2", "--model.sampling.max_new_tokens=8",
        "--data.num_train=8", "--data.batch_size=2",
    ])
    written = json.loads((tmp_path / "results" / "demo_seeds_custom.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert not (tmp_path / "results" / "demo_seeds.json").exists()  # a trial run never replaces the published file
    assert [r["seed"] for r in result["seeds"]] == [0, 1]
    for row in result["seeds"]:
        assert row["steps"] == 1 and row["num_problems"] == 4
        assert 0.0 <= row["accuracy_before"] <= 1.0 and 0.0 <= row["accuracy_after"] <= 1.0
        assert row["gain_points"] == pytest.approx((row["accuracy_after"] - row["accuracy_before"]) * 100)
        assert Path(row["log_dir"]).is_relative_to(tmp_path / "runs" / f"seed{row['seed']}")
    gains = [r["gain_points"] for r in result["seeds"]]
    assert result["summary"]["gain_points"]["mean"] == pytest.approx(sum(gains) / 2)
    assert result["summary"]["gain_points"]["std"] == pytest.approx(abs(gains[0] - gains[1]) / math.sqrt(2))
    assert "--trainer.max_steps=1" in result["overrides"] and "--data.num_eval=4" in result["overrides"]
    assert set(result["versions"]) >= {"torch", "transformers", "tokenizers", "lightning"}
    table = (tmp_path / "results" / "demo_seeds_custom.md").read_text()
    assert "| 0 |" in table and "| 1 |" in table and "**mean ± std**" in table
