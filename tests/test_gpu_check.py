"""The prepared GPU check (``benchmarks/gpu_check.sh``): its ``--dry-run`` runs every section on the CPU with tiny
shapes and writes the JSON, Markdown and log; a failing section is recorded and the next one still runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

SECTIONS = ("environment", "decoder", "throughput", "train_grpo", "train_prpo", "train_zero2", "train_zero3", "resume",
            "export", "resume_zero2", "export_zero2", "train_zero3_prpo", "packing", "served", "async")
DEEPSPEED_SECTIONS = {"train_zero2", "train_zero3", "resume_zero2", "export_zero2", "train_zero3_prpo"}


@pytest.mark.slow
def test_dry_run_passes_every_section_and_writes_the_results(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--work", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert "[gpu_check] done" in (out / "gpu_check.log").read_text()
    assert report["dry_run"] and report["device"] == "cpu"
    assert tuple(report["sections"]) == SECTIONS
    for name, entry in report["sections"].items():
        assert f"| {name} | **{entry['status']}** |" in md
        assert entry["seconds"] >= 0 and entry["budget_s"] > 0
        if name == "served":  # the main environment has no vLLM (the vLLM suite runs the section: below)
            assert entry["status"] == "skipped" and "vLLM is not installed" in entry["skip_reason"]
            continue
        if name in DEEPSPEED_SECTIONS:
            assert entry["status"] == "skipped"
            assert "DeepSpeedStrategy refuses the CPU accelerator" in entry["skip_reason"]
            continue
        assert entry["status"] == "passed", (name, entry.get("error"), entry.get("checks"))
        assert entry["checks"] and all(c["passed"] in (True, None) for c in entry["checks"].values())
    assert report["summary"] == {"passed": 9, "failed": 0, "skipped": len(DEEPSPEED_SECTIONS) + 1}

    sections = report["sections"]
    decoder = sections["decoder"]["checks"]
    for name in ("fp32_greedy_identical", "fp32_sampled_identical", "fp32_sampled_top_p_top_k_identical",
                 "bf16_greedy_identical_up_to_ties"):
        assert decoder[name]["passed"] is True and decoder[name]["rows_identical"] == decoder[name]["rows"] == 9
    assert decoder["fp32_sampled_top_p_top_k_identical"]["rows_with_eos"] > 0, "rows must stop early somewhere"
    assert decoder["fp32_shared_prefix_logprobs"]["grad_max_abs"] > 0
    assert decoder["bf16_shared_prefix_logprobs"]["passed"] is None  # informational

    gen = sections["throughput"]["results"]["generation"]
    assert [(g["engine"], g["batch"]) for g in gen] == [("hf", 2), ("hf", 4), ("static", 2), ("static", 4)]
    assert all(g["tokens"] == g["batch"] * 16 and g["tokens_per_s"] > 0 for g in gen), "EOS is suppressed"
    update = sections["throughput"]["results"]["update_pass"]
    assert [u["share_prompts"] for u in update] == [False, True] and all(u["mfu"] > 0 for u in update)

    packing = sections["packing"]
    assert packing["checks"]["fp32_packed_vs_padded_sdpa"]["passed"] is True
    assert packing["checks"]["flash_attention_2_packed"] == {
        "passed": None, "skipped": "flash-attention needs a CUDA GPU (the dry run has none)"}
    assert [u["config"] for u in packing["results"]["update_pass"]] == ["padded", "budget", "packed", "budget_packed"]
    assert "## Packing (issue 24)" in md

    asynchronous = sections["async"]
    assert asynchronous["checks"]["staleness_bounded"]["value"][-1] == 1.0
    assert asynchronous["results"]["median_step_s"]["sync"] > 0 and asynchronous["results"]["async_over_sync"] > 0

    grpo, resume, export = (sections[n]["results"] for n in ("train_grpo", "resume", "export"))
    assert grpo["steps_reached"] == 2 and resume["steps_reached"] == 3
    assert grpo["policy_dtype"] == "torch.bfloat16" and grpo["precision"] == "bf16-true"
    assert resume["resumed_from"].endswith("train_grpo/ckpt/last.ckpt")
    assert export["parameters"] == grpo["policy_parameters"] > 0 and export["dtypes"] == ["torch.bfloat16"]


def _check(tmp_path: Path) -> gpu_check.Check:
    return gpu_check.Check(gpu_check.dry_run_profile(), tmp_path / "out", tmp_path / "work")


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    check = _check(tmp_path)
    check.run("decoder", lambda budget: 1 / 0)
    check.run("throughput", lambda budget: {"checks": {"a": {"passed": True}, "b": {"passed": False}}})
    check.run("environment", lambda budget: {"results": {}, "checks": {"a": {"passed": True}, "b": {"passed": None}}})
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    decoder, throughput, environment = (report["sections"][n] for n in ("decoder", "throughput", "environment"))
    assert decoder["status"] == "failed" and "ZeroDivisionError" in decoder["error"]
    assert throughput["status"] == "failed", "a failed check fails its section"
    assert environment["status"] == "passed", "informational entries (passed: None) do not decide the status"
    assert report["summary"] == {"passed": 1, "failed": 2, "skipped": 0}
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| throughput | **failed** |" in md and "failed checks: b" in md
    assert "ZeroDivisionError" in md  # the traceback's tail under "Failures"


def test_sections_past_the_deadline_are_skipped_with_the_reason(tmp_path):
    check = _check(tmp_path)
    check.p.deadline_s = check.elapsed() + check.p.min_start_s - 1.0

    def must_not_run(budget):
        raise AssertionError("a section started after the deadline")

    check.run("train_grpo", must_not_run)
    entry = check.report["sections"]["train_grpo"]
    assert entry["status"] == "skipped" and entry["skip_reason"].startswith("global deadline")


def test_the_budget_given_to_a_section_is_capped_by_the_time_left(tmp_path):
    check = _check(tmp_path)
    check.p.deadline_s = check.elapsed() + 30.0
    seen = []
    check.run("train_prpo", lambda budget: seen.append(budget.seconds) or {"checks": {}})
    assert check.p.budgets["train_prpo"] > 30.0 and 29.0 < seen[0] <= 30.0


def test_compare_reports_each_differing_row_and_its_first_position():
    import torch
    from gpu_check_sections import PAD, _compare

    hf = torch.tensor([[5, 6, 7, 1], [5, 6, 7, 8], [9, 9, 9, 9]])
    static = torch.tensor([[5, 6, 7, 1], [5, 4, 7, 3], [9, 9, 9, 2]])
    out = _compare(hf, static)
    assert out["passed"] is False and out["rows_identical"] == 1 and out["rows"] == 3
    assert out["mismatches"] == [[1, 1], [2, 3]] and out["first_mismatch_row_pos"] == [1, 1]
    assert out["rows_with_eos"] == 1
    longer = torch.cat([hf, torch.tensor([[PAD], [PAD], [4]])], dim=1)  # (3, 5): only row 2 ran on
    assert _compare(longer, hf)["mismatches"] == [[2, 4]] and _compare(hf, longer)["rows_identical"] == 2
    assert _compare(hf, hf.clone())["passed"] is True


def test_bf16_style_check_passes_only_when_every_divergence_is_a_near_tie(monkeypatch):
    """The greedy tie rule on a hand-made divergence: the static engine takes the runner-up token at (row 0, pos 0);
    the gap there decides the check against ``tie_tol``."""
    import torch
    import gpu_check_sections as sections

    p = gpu_check.dry_run_profile()
    model = sections.build_model(p.model, p.vocab, torch.device("cpu"), torch.float32, boost_eos=False)
    ids, mask = sections.prompts(2, 2, p.vocab, 6, 10, torch.device("cpu"))
    with torch.no_grad():
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids[:1], attention_mask=mask[:1], position_ids=pos[:1]).logits[0, -1]  # (V,)
    top = logits.topk(2)
    gap = float(top.values[0] - top.values[1])
    scale = max(1.0, abs(float(top.values[0])))
    real_static = sections._static_generate

    def runner_up_first(*args, **kwargs):
        out = real_static(*args, **kwargs).clone()
        out[0, 0] = top.indices[1]
        return out[:, :1]

    monkeypatch.setattr(sections, "_static_generate", runner_up_first)
    loose, _ = sections._identity(model, ids, mask, 1, 0, True, {}, tie_tol=gap / scale * 1.01)
    strict, _ = sections._identity(model, ids, mask, 1, 0, True, {}, tie_tol=gap / scale * 0.99)
    exact, _ = sections._identity(model, ids, mask, 1, 0, True, {})
    assert loose["mismatches"] == [[0, 0]] and abs(loose["divergence_gaps"][0]["top1_minus_top2"] - gap) < 1e-6
    assert loose["passed"] is True and strict["passed"] is False and exact["passed"] is False
