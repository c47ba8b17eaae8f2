"""Real multi-process evaluation (gloo, CPU): 500 problems split over 3 or 7 ranks by a padding DistributedSampler give
exactly the single-process summary (headline metric, pass@k, breakdowns and the per-completion rows)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

from prpo_lightning.data import PromptDataset, collate_prompts
from prpo_lightning.evaluation.runner import BenchmarkEvaluator, EvalConfig
from prpo_lightning.scoring.verifier import Verdict, VerdictStatus

N = 500


class _Rollout:
    def __init__(self, completions, verdicts, rows, group_ids):
        self.completions, self.verdicts, self.extras, self.group_ids = completions, verdicts, {"batch_rows": rows}, group_ids


class FakeModule:
    """Deterministic per problem (like seeded per-problem sampling): verdicts depend only on the problem index."""

    device = torch.device("cpu")

    def generate_and_grade(self, batch, greedy=True, num_samples=1, **kw):
        n = 1 if greedy else num_samples
        rows = [r for r in range(len(batch["problem"])) for _ in range(n)]
        verdicts, texts = [], []
        for j, r in enumerate(rows):
            i, s = batch["index"][r], j % n
            ok = (i * 7919 % 13 < 5) if greedy else ((i * 31 + s * 17) % 11 < 4)
            verdicts.append(Verdict(VerdictStatus.CORRECT if ok else VerdictStatus.INCORRECT, float(ok), extracted=str(i)))
            texts.append(f"problem {i} sample {s}")
        return _Rollout(texts, verdicts, rows, batch["id"][torch.tensor(rows)])


def _rows() -> list[dict]:
    subjects = ["Algebra", "Geometry", "Number Theory"]
    return [{"id": i, "index": i, "benchmark": "toy", "problem_id": f"toy/{i}", "problem": "p", "answer": "a",
             "subject": subjects[i % 3], "level": 1 + i % 5} for i in range(N)]


def _evaluate(rank: int, world: int, out: Path) -> dict:
    dataset = PromptDataset(_rows())
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    loader = DataLoader(dataset, batch_size=16, sampler=sampler, collate_fn=collate_prompts)
    ev = BenchmarkEvaluator(["toy"], EvalConfig(n_samples=4, ks=[2, 4]))
    for batch in loader:
        ev.run_batch(FakeModule(), batch)
    return ev.finalize(step=3, stage="test", output_dir=out, is_global_zero=rank == 0)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _evaluate(rank, world, Path(out) / "files")
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"summary": result["summary"], "metrics": result["metrics"]}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [3, 7])
def test_gloo_ranks_equal_one_process(tmp_path, world):
    single = _evaluate(0, 1, tmp_path / "single")
    single = json.loads(json.dumps({"summary": single["summary"], "metrics": single["metrics"]}))
    # fork: the workers inherit the imported modules (spawn would re-import torch and Lightning in each)
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path / "multi")), nprocs=world, join=True,
                       start_method="fork")
    for rank in range(world):
        got = json.loads((tmp_path / "multi" / f"rank{rank}.json").read_text())
        assert got == single  # every rank gets the same, exact numbers
    assert single["metrics"]["toy/num_problems"] == N
    one = (tmp_path / "single" / "completions.jsonl").read_text()
    many = (tmp_path / "multi" / "files" / "completions.jsonl").read_text()
    assert one == many and len(one.splitlines()) == N * 5
