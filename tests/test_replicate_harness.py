"""The replication harness (benchmarks/replicate.py): its statistics against hand values, the GRPO row each method is
paired with, the refusal to reuse a run trained with other settings, and the grid-specific plots."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import replicate
import replicate_grids
import replicate_plots
import replicate_stats


def test_paired_tests_hand_values():
    # d = [0.1, 0.2, 0.3]: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3); for df = 2, p = 1 - t / sqrt(2 + t^2)
    mean, t_p, flip_p = replicate_stats.paired_tests([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    t = 0.2 / (0.1 / math.sqrt(3))
    assert mean == pytest.approx(0.2)
    assert t_p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)
    assert flip_p == 0.25  # only the all-plus and all-minus sign patterns are as extreme: 2 of 8
    assert replicate_stats.paired_tests([0.4, 0.4], [0.4, 0.4])[1:] == (1.0, 1.0)  # no difference at all
    mean, t_p, flip_p = replicate_stats.paired_tests([0.5, 0.5, 0.5], [0.4, 0.4, 0.4])  # the same gain on every seed
    assert mean == pytest.approx(0.1) and math.isnan(t_p) and flip_p == 0.25  # t undefined, not "p = 0"


def test_t_quantile_and_confidence_interval_hand_values():
    assert replicate_stats.t_quantile_975(4) == pytest.approx(2.776445, abs=1e-5)
    mean, half = replicate_stats.mean_ci([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.302653
    assert (mean, half) == pytest.approx((2.0, 4.302653 / math.sqrt(3)), abs=1e-5)


@pytest.mark.parametrize("method, baseline", [
    ("spro_beta0.05_lr3e-05", "grpo_lr3e-05"),
    ("spro_beta0.2_lr0.0001", "grpo"),  # the budget's own lr
    ("spro_beta0.2_lr0.0003", "grpo_lr0.0003"),
    ("prpo_rule_prm", "grpo"),
    ("h1_prpo_noise0.2_early0.3", "grpo"),
])
def test_each_method_is_paired_with_grpo_at_its_own_lr(method, baseline):
    assert replicate_grids.baseline_of(method) == baseline
    assert baseline in replicate.METHODS


def _result(method: str, seed: int, final: float) -> dict:
    curves = {k: [] for k in replicate.CURVE_KEYS}
    curves["eval/accuracy"] = [(0, 0.42), (20, final)]
    curves["train/completion/length_mean"] = [(20, 37.0)]
    curves["train/completion/no_boxed_frac"] = [(20, 0.0)]
    return {"method": method, "seed": seed, "seconds": 30.0, "curves": curves}


def test_aggregate_pairs_by_seed_with_the_methods_own_baseline():
    results = [_result("grpo", 0, 0.10), _result("grpo", 1, 0.10),  # the wrong baseline: must not be used
               _result("grpo_lr3e-05", 0, 0.40), _result("grpo_lr3e-05", 1, 0.50),
               _result("spro_beta0.05_lr3e-05", 1, 0.50), _result("spro_beta0.05_lr3e-05", 0, 0.50)]
    table, _ = replicate.aggregate(results, threshold=0.45)
    row = table["spro_beta0.05_lr3e-05"]
    assert row["baseline"] == "grpo_lr3e-05"
    assert row["vs_grpo"][0] == pytest.approx(0.05)  # (0.10 + 0.00) / 2, paired by seed, not by position
    assert "vs_grpo" not in table["grpo_lr3e-05"]  # a baseline is not compared with itself
    assert row["steps_to_threshold"] == [20, 20]


def test_a_run_trained_with_other_settings_is_refused_not_reused(tmp_path):
    method, seed = "grpo", 0
    run = replicate.run_dir(tmp_path, method, seed)
    run.mkdir(parents=True)
    stale = {"method": method, "seed": seed, "max_steps": 20, "overrides": ["--model.optim.lr=3e-4"], "curves": {}}
    (run / "result.json").write_text(json.dumps(stale))
    with pytest.raises(RuntimeError, match="trained with other settings"):
        replicate.run_one(tmp_path, method, seed, max_steps=20, eval_every=10, extra=[])
    same = dict(stale, overrides=[*replicate.BUDGET, *replicate.METHODS[method]])
    (run / "result.json").write_text(json.dumps(same))
    assert replicate.run_one(tmp_path, method, seed, max_steps=20, eval_every=10, extra=[]) == same


def test_h1_reuses_the_main_tables_exact_prm_runs_as_its_unbiased_point():
    grid = replicate_grids.hypothesis1()
    assert grid["prpo_rule_prm"] == replicate.METHODS["prpo_rule_prm"]
    assert grid["process_only"] == replicate.METHODS["process_only"]
    assert not any(name.endswith("_noise0_early0") for name in grid)
    # GRPO + two aligners x (three noise levels x two bonuses + six stronger one-kind biases)
    assert len(grid) == 1 + 2 * (3 * 2 + 6)
    late = json.loads(grid["h1_prpo_late1"][-1].split("=", 1)[1])["init_args"]
    assert late["late_step_penalty"] == 1.0 and "noise_std" not in late


def test_h1_hot_grid_reruns_the_strongest_biases_at_lr_3e_4_against_grpo_at_3e_4():
    hot = replicate_grids.hypothesis1_hot()
    h1 = replicate_grids.hypothesis1()
    assert hot["h1_prpo_late1_lr0.0003"] == [*h1["h1_prpo_late1"], "--model.optim.lr=0.0003"]
    assert hot["grpo_lr0.0003"] == replicate.METHODS["grpo_lr0.0003"]  # the sweep's GRPO run, trained once
    assert {replicate_grids.baseline_of(m) for m in hot} == {"grpo_lr0.0003"}
    assert len(hot) == 1 + 2 * (1 + 4)


def test_h1_points_put_each_run_on_its_bias_kind():
    names = ["process_only", "prpo_rule_prm", "h1_prpo_noise0.4_early0", "h1_prpo_noise0_early1",
             "h1_prpo_noise0.2_early0.3", "h1_process_only_late0.5", "h1_prpo_short1", "grpo"]
    points = replicate_plots.h1_points({name: [name] for name in names})
    assert points[("prpo", "noise σ")] == [(0.0, ["prpo_rule_prm"]), (0.4, ["h1_prpo_noise0.4_early0"])]
    assert points[("prpo", "early-stop bonus")] == [(0.0, ["prpo_rule_prm"]), (1.0, ["h1_prpo_noise0_early1"])]
    assert points[("process_only", "late-step penalty")] == [(0.0, ["process_only"]), (0.5, ["h1_process_only_late0.5"])]
    assert points[("prpo", "short-step bonus")] == [(0.0, ["prpo_rule_prm"]), (1.0, ["h1_prpo_short1"])]
    assert not any("h1_prpo_noise0.2_early0.3" in runs for pts in points.values() for _, runs in pts)  # a combination


def test_implicit_sweep_and_spro_cap_grids():
    implicit = replicate_grids.implicit_sweep()
    assert len(implicit) == 3 + 3 * 3  # GRPO at each lr + beta x lr
    assert "--model.prm.init_args.beta=0.2" in implicit["prpo_implicit_beta0.2_lr0.0003"]
    cap = replicate_grids.spro_cap()
    capped = cap["spro_cap0.25_beta0.2_lr0.0003"]
    assert capped[:-1] == replicate.METHODS["spro_beta0.2_lr0.0003"]  # the same run, plus the cap
    assert capped[-1] == "--model.aligner.init_args.max_process_to_outcome=0.25"
    assert replicate_grids.baseline_of("spro_cap0.25_beta0.2_lr0.0003") == "grpo_lr0.0003"


def test_grid_plots_are_written(tmp_path):
    results = []
    for seed in (0, 1):
        for method in ("spro_beta0.05_lr3e-05", "spro_beta0.2_lr0.0003", "grpo", "h1_prpo_noise0.2_early0",
                       "h1_prpo_late0.5", "spro_msa0_beta0.2_lr0.0003", "spro_beta0.2_lr0.0001",
                       "h1_prpo_late1_lr0.0003", "process_only_lr0.0003", "grpo_lr0.0003",
                       "h1_process_only_noise0_early0.3", "prpo_rule_prm", "prpo_implicit_beta0.05_lr3e-05"):
            r = _result(method, seed, 0.4 + 0.01 * seed)
            r["curves"]["train/aligner/implicit_reward/cpr_final_mean"] = [(1, 0.0), (2, 0.1 * (seed + 1))]
            r["curves"]["train/advantage/process_to_outcome"] = [(1, 1e-8), (2, 0.5)]
            results.append(r)
    for tag, name in (("replication-spro-sweep", "mechanism"), ("replication-h1", "summary"),
                      ("replication-implicit-sweep", "mechanism"), ("replication-spro-cap", "drift"),
                      ("replication-h1-hot", "summary")):
        path = replicate_plots.extra_plots(results, tmp_path, tag)
        assert path == tmp_path / f"{tag}_{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert replicate_plots.extra_plots(results, tmp_path, "replication") is None  # the main grid has none
