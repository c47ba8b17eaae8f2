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
    bab = [_bab(m, lr, seed, 0.4 + 0.01 * seed, [0.42, 0.45, 0.5]) for m in ("grpo", "pure") for lr in (1e-5, 3e-4)
           for seed in (0, 1)]
    bab[0]["curves"][VAL] = [(0, 0.3), (30, 0.35), (60, 0.4)]
    path = replicate_plots.extra_plots(bab, tmp_path, "replication-bab")
    assert path == tmp_path / "replication-bab_best.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- best against best (issue 28)
import replicate_bab  # noqa: E402
import replicate_splits  # noqa: E402

VAL = replicate_splits.VALIDATION_KEY


def test_curve_auc_and_steps_to_threshold_hand_values():
    curve = [(0, 0.4), (10, 0.5), (20, 0.5)]
    # trapezoids: 10 * (0.4 + 0.5) / 2 + 10 * (0.5 + 0.5) / 2 = 4.5 + 5 = 9.5; / 20 = 0.475
    assert replicate_bab.curve_auc(curve, 20) == pytest.approx(0.475)
    assert replicate_bab.curve_auc([(0, 0.2), (20, 0.6)], 20) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="step 0 and at step 30"):
        replicate_bab.curve_auc(curve, 30)  # not evaluated at the horizon: no guess
    assert replicate_bab.steps_to(curve, 0.45) == 10
    assert replicate_bab.steps_to(curve, 0.4) == 0
    assert replicate_bab.steps_to(curve, 0.6) is None
    assert replicate_bab.split_name("bab_prpo_rule_prm_lr0.0001") == ("bab", "prpo_rule_prm", 1e-4)
    assert replicate_bab.split_name("long_grpo_lr3e-05") == ("long", "grpo", 3e-5)


def _bab(method: str, lr: float, seed: int, val: float, held: list[float]) -> dict:
    """A 60-step run: held-out accuracy at steps 0, 30, 60 and final validation accuracy ``val``."""
    curves = {k: [] for k in replicate.CURVE_KEYS}
    curves["eval/accuracy"] = list(zip((0, 30, 60), held))
    curves[VAL] = [(0, 0.3), (60, val)]
    return {"method": f"bab_{method}_lr{lr:g}", "seed": seed, "seconds": 60.0, "curves": curves}


def test_lr_is_chosen_on_mean_final_validation_accuracy_over_common_seeds_ties_to_smaller_lr():
    results = [_bab("grpo", 1e-5, 0, 0.40, [0.4, 0.4, 0.4]), _bab("grpo", 1e-5, 1, 0.50, [0.4, 0.4, 0.4]),
               _bab("grpo", 3e-5, 0, 0.46, [0.4, 0.4, 0.4]), _bab("grpo", 3e-5, 1, 0.44, [0.4, 0.4, 0.4]),
               _bab("grpo", 1e-4, 0, 0.60, [0.4, 0.4, 0.4]),  # best on seed 0, but seed 1 is not finished here
               _bab("pure", 1e-5, 0, 0.5, [0.4, 0.4, 0.4]), _bab("pure", 3e-5, 0, 0.5, [0.4, 0.4, 0.4])]
    choice = replicate_bab.choose_lrs(results, (1e-5, 3e-5, 1e-4))
    g = choice["grpo"]
    assert g["seeds"] == [0]  # only seed 0 finished at every lr
    assert g["by_lr"] == pytest.approx({1e-5: 0.40, 3e-5: 0.46, 1e-4: 0.60})
    assert g["lr"] == 1e-4 and g["missing"] == []
    without = replicate_bab.choose_lrs(results[:4], (1e-5, 3e-5, 1e-4))["grpo"]  # seeds 0 and 1 at two lrs
    assert without["by_lr"] == pytest.approx({1e-5: 0.45, 3e-5: 0.45}) and without["missing"] == [1e-4]
    assert without["lr"] == 1e-5  # a tie (0.45 = 0.45) goes to the smaller lr
    assert choice["pure"]["lr"] == 1e-5 and choice["pure"]["missing"] == [1e-4]


def test_best_against_best_pairs_each_method_at_its_lr_with_grpo_at_grpos_lr():
    results = []
    for seed, (g_hi, g_lo, p_hi, p_lo) in enumerate([(0.44, 0.40, 0.50, 0.30), (0.46, 0.42, 0.46, 0.30),
                                                     (0.48, 0.40, 0.54, 0.30)]):
        # GRPO's validation prefers 3e-5, PRPO's 1e-4; the held-out finals of the other lrs must not be used
        results += [_bab("grpo", 3e-5, seed, 0.5, [0.42, 0.43, g_hi]), _bab("grpo", 1e-4, seed, 0.4, [0.42, 0.43, g_lo]),
                    _bab("prpo_rule_prm", 3e-5, seed, 0.4, [0.42, 0.43, p_lo]),
                    _bab("prpo_rule_prm", 1e-4, seed, 0.5, [0.42, 0.50, p_hi])]
    table = replicate_bab.best_against_best(results, (3e-5, 1e-4), horizon=60, threshold=0.45)
    assert table["grpo"]["lr"] == 3e-5 and "vs_grpo" not in table["grpo"]
    row = table["prpo_rule_prm"]
    assert row["lr"] == 1e-4 and row["grpo_lr"] == 3e-5
    mean, t_p, flip_p, seeds = row["vs_grpo"]  # d = [0.06, 0.00, 0.06]: mean 0.04, sd = sqrt(0.0012)
    assert seeds == [0, 1, 2] and mean == pytest.approx(0.04)
    t = 0.04 / (math.sqrt(0.0012) / math.sqrt(3))
    assert t_p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)
    assert flip_p == pytest.approx(0.5)  # |sum| 0.12 is reached by 4 of the 8 sign patterns (the 0.00 seed's sign is free)
    assert row["final_mean"] == pytest.approx(0.50)
    # AUC: (30 * (0.42 + 0.50) / 2 + 30 * (0.50 + final) / 2) / 60 = 0.23 + 0.125 + final / 4; mean final 0.50
    assert row["auc_mean"] == pytest.approx(0.23 + 0.125 + 0.50 / 4)
    auc_mean = row["auc_vs_grpo"][0]  # PRPO's middle point 0.50 vs GRPO's 0.43, plus the final difference
    assert auc_mean == pytest.approx((0.50 - 0.43) / 2 + 0.04 / 4)
    assert row["steps_to_threshold"] == [30, 30, 30] and table["grpo"]["steps_to_threshold"] == [None, 60, 60]
    lines = replicate_bab.report_lines(results, (3e-5, 1e-4), 60, 0.45, 16)
    assert lines[0].startswith("Runs finished: **12 of 16** (partial")
    assert "| prpo_rule_prm | 0.0001 | 3 | 50.0% ± 4.0% | +4.0 pts (3 seeds) |" in "\n".join(lines)
    partial = replicate_bab.report_lines(results[:2], (3e-5, 1e-4, 3e-4), 60, 0.45, 24)
    assert "| grpo | 3e-05* | 1 | 44.0% (1 seed) | — | — | — |" in partial  # 3e-4 has no run yet: starred


def test_validation_split_is_train_distribution_disjoint_from_train_rows_and_held_out(tmp_path):
    from prpo_lightning.demo.arithmetic import make_split, split_of

    val = replicate_splits.validation_problems(50)
    train, held_out = make_split(replicate_splits.TASK_SEED, replicate_splits.NUM_TRAIN, replicate_splits.NUM_HELD_OUT)
    texts = {p["problem"] for p in val}
    assert len(texts) == 50 and {split_of(t) for t in texts} == {"train"}
    assert not texts & {p["problem"] for p in train} and not texts & {p["problem"] for p in held_out}
    assert replicate_splits.validation_problems(50) == val  # deterministic
    heldout_path, val_path = replicate_splits.write_eval_sets(tmp_path, 50)
    from prpo_lightning.demo.arithmetic import read_jsonl

    assert read_jsonl(heldout_path) == held_out  # exactly the datamodule's held-out rows
    assert read_jsonl(val_path) == val
    val_path.write_text(val_path.read_text().replace("+", "-", 1))  # a changed generator is refused, not overwritten
    with pytest.raises(RuntimeError, match="holds other problems"):
        replicate_splits.write_eval_sets(tmp_path, 50)


def test_bab_grids_name_every_method_at_every_lr_and_pair_with_their_own_grpo():
    bab, long = replicate_grids.best_vs_best("bab"), replicate.METHODS
    assert len(bab) == 6 * 4
    assert bab["bab_prpo_rule_prm_lr3e-05"] == [*replicate.METHODS["prpo_rule_prm"], "--model.optim.lr=3e-05"]
    assert long["long_prpo_rule_prm_lr3e-05"] == [*replicate.METHODS["prpo_rule_prm"], *replicate_grids.LONG_TASK,
                                                  "--model.optim.lr=3e-05"]
    long_grid = replicate_grids.GRIDS["long"][0]  # GRPO and PRPO at every lr
    assert sorted(long_grid) == sorted(f"long_{m}_lr{lr:g}" for m in ("grpo", "prpo_rule_prm")
                                       for lr in replicate_grids.BAB_LRS)
    assert all(replicate_grids.GRID_SETTINGS[g]["lrs"] == replicate_grids.BAB_LRS for g in ("bab", "long", "learned"))
    assert replicate_grids.baseline_of("bab_pure_lr0.0001") == "bab_grpo_lr0.0001"  # not the 20-step main table's
    assert replicate_grids.baseline_of("long_prm_avg_lr1e-05") == "long_grpo_lr1e-05"
    assert replicate_grids.GRID_SETTINGS["bab"]["max_steps"] == 60


def test_a_committed_copy_resumes_a_run_and_a_stale_copy_or_other_eval_sets_are_refused(tmp_path):
    method, seed = "bab_grpo_lr3e-05", 2
    sets = {"task": "default", "validation": 200, "paths": ["h.jsonl", "v.jsonl"]}
    stored = {"task": "default", "validation": 200}
    done = {"method": method, "seed": seed, "max_steps": 60, "eval_sets": stored, "curves": {},
            "overrides": [*replicate.BUDGET, *replicate.METHODS[method]]}
    mirror = tmp_path / "mirror"
    (mirror / method).mkdir(parents=True)
    (mirror / method / "seed2.json").write_text(json.dumps(done))
    out = tmp_path / "runs"
    assert replicate.run_one(out, method, seed, 60, 10, [], eval_sets=sets, mirror=mirror) == done
    assert json.loads((replicate.run_dir(out, method, seed) / "result.json").read_text()) == done  # restored
    with pytest.raises(RuntimeError, match="trained with other settings"):  # other validation size
        replicate.run_one(out, method, seed, 60, 10, [], eval_sets=dict(sets, validation=100), mirror=mirror)
    with pytest.raises(RuntimeError, match="trained with other settings"):  # no validation at all
        replicate.run_one(out, method, seed, 60, 10, [], mirror=mirror)
    (replicate.run_dir(out, method, seed) / "result.json").unlink()
    (mirror / method / "seed2.json").write_text(json.dumps(dict(done, max_steps=20)))
    with pytest.raises(RuntimeError, match="trained with other settings"):
        replicate.run_one(out, method, seed, 60, 10, [], eval_sets=sets, mirror=mirror)


def test_learned_prm_grid_shares_the_bab_runs_and_swaps_only_the_prm():
    learned = replicate_grids.GRIDS["learned"][0]
    assert learned["bab_grpo_lr3e-05"] == replicate.METHODS["bab_grpo_lr3e-05"]  # trained once for both grids
    assert len(learned) == 5 * 4
    exact, ours = learned["bab_process_only_lr0.0001"], learned["bab_process_only_learned_prm_lr0.0001"]
    assert [a for a in exact if a not in ours] == [f"--model.prm={replicate_grids.EQ_PRM}"]
    assert [a for a in ours if a not in exact] == ["--model.prm=components.prms.LearnedArithPRM"]
    assert replicate_grids.baseline_of("bab_prpo_learned_prm_lr1e-05") == "bab_grpo_lr1e-05"


def test_read_curves_takes_the_validation_accuracy_from_the_csv_loggers_metrics(tmp_path):
    (tmp_path / "training_curves.csv").write_text("step,eval/accuracy,train/reward/mean\n0,0.42,\n1,,0.5\n10,0.45,0.6\n")
    (tmp_path / "metrics.csv").write_text(f"step,eval/accuracy,{VAL},train/loss\n0,0.42,0.40,\n1,,,0.3\n10,0.45,0.47,\n")
    curves = replicate.read_curves(tmp_path / "training_curves.csv")
    assert curves["eval/accuracy"] == [(0, 0.42), (10, 0.45)]
    assert curves[VAL] == [(0, 0.40), (10, 0.47)]
    assert curves["train/reward/mean"] == [(1, 0.5), (10, 0.6)]


def test_warm_start_overlap_counts_the_problems_the_warm_start_saw(tmp_path):
    # a warm start that drew the first 10 problems of the RL training stream: exactly the first 10 training rows,
    # none of the validation split (which excludes every training row) and none of the held-out problems
    ws = tmp_path / "warm_start.json"
    ws.write_text(json.dumps({"sft": {"seed": replicate_splits.TASK_SEED, "steps": 2, "batch_size": 5}}))
    assert replicate_splits.warm_start_overlap(ws, 20) == {
        "warm_start_problems": 10, "validation_seen": 0, "validation": 20, "train_rows_seen": 10,
        "train_rows": replicate_splits.NUM_TRAIN, "held_out_seen": 0}


# ---------------------------------------------------------------- cross-grid tables (issue 28)
import replicate_compare  # noqa: E402


def test_welch_p_hand_values():
    # a = [1, 3], b = [5, 7]: squared standard errors 2/2 = 1 each, t = (2 - 6) / sqrt(2), df = 2^2 / (1 + 1) = 2;
    # with 2 degrees of freedom the two-sided p is 1 - |t| / sqrt(2 + t^2) = 1 - sqrt(8) / sqrt(10)
    assert replicate_stats.welch_p([1, 3], [5, 7]) == pytest.approx(1 - math.sqrt(8 / 10), abs=1e-9)
    assert replicate_stats.welch_p([0, 2], [0, 2]) == pytest.approx(1.0)
    assert math.isnan(replicate_stats.welch_p([1], [1, 2]))  # one value: no variance
    assert math.isnan(replicate_stats.welch_p([1, 1], [2, 2]))  # no variance in either: t undefined


def _run(grid: str, method: str, lr: float, seed: int, val: float, held: list[float], **train) -> dict:
    run = _bab(method, lr, seed, val, held)
    run["method"] = f"{grid}_{method}_lr{lr:g}"
    for key, values in train.items():  # train curves logged at steps 1, 10, 50 and 60
        run["curves"][f"train/completion/{key}" if key != "prm" else "train/prm/score_mean"] = list(zip((1, 10, 50, 60), values))
    return run


def test_chain_length_table_pairs_each_task_at_its_chosen_lrs_and_compares_the_gains():
    bab, long = [], []
    for seed, (d_bab, d_long) in enumerate([(0.02, 0.10), (0.04, 0.12), (0.06, 0.14)]):
        # bab: both choose 1e-4; long: GRPO's validation prefers 3e-5 (the 1e-4 held-out values must not be used)
        bab += [_run("bab", "grpo", 1e-4, seed, 0.5, [0.4, 0.4, 0.40]), _run("bab", "grpo", 3e-5, seed, 0.4, [0.4, 0.4, 0.9]),
                _run("bab", "prpo_rule_prm", 1e-4, seed, 0.5, [0.4, 0.4, 0.40 + d_bab]),
                _run("bab", "prpo_rule_prm", 3e-5, seed, 0.4, [0.4, 0.4, 0.9])]
        long += [_run("long", "grpo", 3e-5, seed, 0.2, [0.0, 0.1, 0.10]), _run("long", "grpo", 1e-4, seed, 0.1, [0.0, 0.1, 0.9]),
                 _run("long", "prpo_rule_prm", 1e-4, seed, 0.2, [0.0, 0.1, 0.10 + d_long])]
    gains = replicate_compare.gains(long, (3e-5, 1e-4), "prpo_rule_prm", "grpo", 60)
    assert gains == pytest.approx({0: 0.10, 1: 0.12, 2: 0.14})
    # AUC gain: only the final point differs, by d, and it weighs 30 * d / 2 / 60 = d / 4
    assert replicate_compare.gains(bab, (3e-5, 1e-4), "prpo_rule_prm", "grpo", 60, "auc") == pytest.approx(
        {0: 0.005, 1: 0.01, 2: 0.015})
    lines = replicate_compare.chain_length_lines({"default": (bab, (3e-5, 1e-4)), "long": (long, (3e-5, 1e-4))}, 60)
    text = "\n".join(lines)
    # bab: d = [0.02, 0.04, 0.06], mean 0.04, sd 0.02, CI half-width t_{0.975,2} * 0.02 / sqrt(3) = 4.303 * 0.01155
    half = replicate_stats.t_quantile_975(2) * 0.02 / math.sqrt(3)
    assert f"| default | 3e-05, 0.0001 | 0.0001: 40.0% (3 seeds) | 0.0001: 44.0% (3 seeds) | +4.0 ± {half * 100:.1f} pts" in text
    assert "| long | 3e-05, 0.0001 | 3e-05: 10.0% (3 seeds) | 0.0001: 22.0% (3 seeds) | +12.0 ± " in text
    # the gains differ by 0.08 with equal spreads (sd 0.02, n 3): t = 0.08 / sqrt(2 * 0.0004 / 3), df = 4
    t = 0.08 / math.sqrt(2 * 0.0004 / 3)
    p = replicate_stats.t_two_sided_p(t, 4)
    assert f"Gain on long minus gain on default: final +8.0 pts (Welch t p = {p:.3f}), AUC +2.0 pts" in text


def test_learned_prm_table_pairs_learned_with_exact_and_lists_the_collapse_symptoms():
    results = []
    for seed in range(2):
        results += [_run("bab", "grpo", 1e-4, seed, 0.5, [0.42, 0.45, 0.48], no_boxed_frac=[0.0, 0.0, 0.0, 0.02],
                         length_mean=[36, 36, 38, 38]),
                    _run("bab", "process_only", 3e-5, seed, 0.5, [0.42, 0.44, 0.46], prm=[0.6, 0.6, 0.8, 0.8]),
                    _run("bab", "process_only_learned_prm", 3e-5, seed, 0.5, [0.42, 0.20, 0.30 + 0.02 * seed],
                         no_boxed_frac=[0.0, 0.1, 0.2, 0.4], length_mean=[40, 30, 20, 10], prm=[0.5, 0.6, 0.7, 0.9])]
    # seed 0 also at lr 1e-4, where validation is worse (3e-5 stays chosen): it shows up in the largest-lr table only
    results.append(_run("bab", "process_only_learned_prm", 1e-4, 0, 0.1, [0.42, 0.10, 0.05],
                        no_boxed_frac=[0.1, 0.3, 0.5, 0.7]))
    lines = replicate_compare.learned_prm_lines(results, (3e-5, 1e-4), 60,
                                                {"process_only_learned_prm": "process_only"})
    text = "\n".join(lines)
    # learned - exact per seed: 0.30 - 0.46 = -0.16 and 0.32 - 0.46 = -0.14: mean -0.15
    assert "| process_only_learned_prm | process_only | 3e-05: 46.0% (2 seeds) | 3e-05: 31.0% (2 seeds) | -15.0 ± " in text
    # symptoms: start 42%, lowest of each seed 0.20, final mean 0.31; vs GRPO's 0.48: -17 pts; train columns: the
    # mean over steps 1 and 10 (steps 0-10) → over step 60 (steps 51-60)
    assert ("| process_only_learned_prm | 3e-05 | 2 | 42.0% → 20.0% → 31.0% | -17.0 pts | 0.05 → 0.40 | 35.00 → 10.00 "
            "| 0.55 → 0.90 |") in text
    assert "| grpo | 0.0001 | 2 | 42.0% → 42.0% → 48.0% | — | 0.00 → 0.02 | 36.00 → 38.00 | — → — |" in text
    hot = text.split("The same at lr 0.0001")[1]  # every method at the largest lr, paired with GRPO at that lr
    assert "| process_only_learned_prm | 0.0001 | 1 | 42.0% → 5.0% → 5.0% | -43.0 pts | 0.20 → 0.70 | — → — | — → — |" in hot
    assert "| process_only |" not in hot  # no run at 1e-4



def test_completion_equations_counts_true_equations_and_operators_by_hand():
    import completion_equations

    stats = completion_equations.equation_stats(["1 + 2 = 3\n3 * 2 = 7\n\\boxed{7}", "no equation here",
                                                "8 - 2 - 1 = 5\n10 / 0 = 1"])
    # 4 equations over 3 completions; true: 1 + 2 = 3 and 8 - 2 - 1 = 5 (10 / 0 is undefined: false);
    # operators on the left sides: +, *, -, -, / (5 in all)
    assert stats["equations_per_completion"] == pytest.approx(4 / 3)
    assert stats["true_frac"] == pytest.approx(0.5)
    assert (stats["op_add"], stats["op_sub"], stats["op_mul"], stats["op_div"]) == pytest.approx((0.2, 0.4, 0.2, 0.2))
