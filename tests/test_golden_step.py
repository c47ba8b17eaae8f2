"""The training step's numbers are pinned: a change of its wiring must not change any of them.

``tests/data/golden_steps.json`` was recorded by ``tests/golden_run.py --write`` before the architecture redesign of
issue 21 (the one-class-over-mixins module, on main ``dcd2627``). For each scenario (GRPO and PRPO, on- and
off-policy, PRPO with dynamic sampling, GRPO on 2 DDP ranks) it holds every sampled token, every advantage part,
every logged step metric and a digest of the final weights. On the CPU and torch build it was recorded on the check
is bit-exact; on another CPU (other SIMD kernels round differently) tokens must still be equal and floats equal to
1e-5 relative.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from golden_run import GOLDEN, machine, record_all


def _close(a: float, b: float, exact: bool) -> bool:
    if exact:
        return a == b or (math.isnan(a) and math.isnan(b))
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


def _compare(name: str, got: dict, want: dict, exact: bool) -> list[str]:
    errors: list[str] = []
    if len(got["batches"]) != len(want["batches"]):
        return [f"{name}: {len(got['batches'])} scored batches, golden {len(want['batches'])}"]
    for i, (g, w) in enumerate(zip(got["batches"], want["batches"])):
        for key in ("group_ids", "completion_ids", "completion_mask"):
            if g[key] != w[key]:
                errors.append(f"{name} batch {i}: {key} differ")
        if sorted(g["terms"]) != sorted(w["terms"]):
            errors.append(f"{name} batch {i}: advantage parts {sorted(g['terms'])} vs {sorted(w['terms'])}")
            continue
        for part in w["terms"]:
            flat_g = [x for row in g["terms"][part] for x in row]
            flat_w = [x for row in w["terms"][part] for x in row]
            if len(flat_g) != len(flat_w) or not all(_close(a, b, exact) for a, b in zip(flat_g, flat_w)):
                errors.append(f"{name} batch {i}: advantage part {part!r} differs")
    if len(got["metrics"]) != len(want["metrics"]):
        errors.append(f"{name}: {len(got['metrics'])} logged steps, golden {len(want['metrics'])}")
    for i, (g, w) in enumerate(zip(got["metrics"], want["metrics"])):
        missing = sorted(set(w) - set(g))
        if missing:
            errors.append(f"{name} step {i}: metrics missing {missing}")
        for key in set(w) & set(g):
            if not _close(float(g[key]), float(w[key]), exact):
                errors.append(f"{name} step {i}: {key} = {g[key]!r}, golden {w[key]!r}")
    if exact and got["weights_sha256"] != want["weights_sha256"]:
        errors.append(f"{name}: final weights differ (sha256)")
    if not _close(got["weights_sum"], want["weights_sum"], exact):
        errors.append(f"{name}: final weight sum {got['weights_sum']!r}, golden {want['weights_sum']!r}")
    return errors


@pytest.mark.slow
def test_first_steps_match_the_golden_recording(tmp_path: Path) -> None:
    want = json.loads(GOLDEN.read_text())
    exact = machine() == want["machine"]
    got = record_all(tmp_path)
    errors: list[str] = []
    for name, rec in want["scenarios"].items():
        if name == "grpo_ddp":
            for rank, rank_rec in rec.items():
                errors += _compare(f"{name}/{rank}", got["scenarios"][name][rank], rank_rec, exact)
        else:
            errors += _compare(name, got["scenarios"][name], rec, exact)
    assert not errors, f"{len(errors)} differences from the golden recording (exact={exact}):\n" + "\n".join(errors[:40])
