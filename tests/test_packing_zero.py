"""Issue 24 under DeepSpeed ZeRO-2 and ZeRO-3: packed token-budget micro-batches give the padded passes' gradients,
and every micro-batch's gradient reaches the step.

Two gloo ranks on the CPU run DeepSpeed engines directly (Lightning's ``DeepSpeedStrategy`` refuses the CPU, and the
GPU check runs the end-to-end paths). Each rank updates on its half of a batch with lengths 0 to 24 through the
module's :class:`~prpo_lightning.training.updater.PolicyUpdater` with the engine's ``backward``:

* padded (3 rows per micro-batch) and packed with a 60-token budget give the same full gradients (gathered from
  the ZeRO partitions) within 1e-5, and both equal one process's padded gradients;
* with a token budget the ranks make different numbers of micro-batches; under ZeRO-3 the rank with fewer joins
  with zero-weighted passes (every forward gathers the partitioned parameters collectively), so nothing hangs;
* the weights move by the whole mini-batch's gradient (SGD at lr 1 after one ``engine.step()``). This caught a bug:
  with several micro-batches in one training step, ZeRO-2 and ZeRO-3 applied only the last micro-batch's gradient
  (each ``backward`` was an accumulation boundary, and ZeRO-3 counts micro-steps in the engine's ``forward``, which
  Lightning calls once per training step); ``PolicyUpdater.accumulate`` now marks the boundary and the micro-steps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"padded": {"micro_batch_size": 3},
            "packed": {"micro_batch_size": 3, "micro_batch_tokens": 60, "packing": True, "share_prompt_prefix": False}}

SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed
    sys.path.insert(0, os.path.join(os.environ["ROOT"], "tests"))
    from test_packing import CAPS, T_MAX, _model, _rollout
    from test_packing_zero import VARIANTS
    from prpo_lightning.config import LossConfig, OptimConfig
    from prpo_lightning.training.packing import micro_batches, row_lengths
    from prpo_lightning.training.plan import RunNeeds, plan_passes
    from prpo_lightning.training.updater import PolicyUpdater
    torch.set_num_threads(1)
    rollout = _rollout(kl=False, off_policy=False)
    mine = torch.arange(rollout.size)[rank::world]  # this rank's rows
    loss = LossConfig(kl_coef=0.0)
    out = {}
    for stage in (2, 3):
        for name, opts in VARIANTS.items():
            model = _model()  # the same initial weights on every rank and in every run
            before = {n: p.detach().clone() for n, p in model.named_parameters()}  # full: not partitioned yet
            config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                              config=config)
            optim = OptimConfig(**opts)
            plan = plan_passes(RunNeeds(), CAPS, loss, optim, lockstep=stage == 3)
            updater = PolicyUpdater(engine.module, loss, optim, plan, 0.7, T_MAX, 0, 0, backward=engine.backward,
                                    clip_gradients=lambda *a, **k: None, on_optimizer_step=lambda: None)
            sub = rollout.select(mine)
            pieces = micro_batches(row_lengths(sub.prompt_mask, sub.completion_mask), optim.micro_batch_size,
                                   optim.micro_batch_tokens, optim.packing)
            most = -(-rollout.size // world)  # the rows of the busiest rank; its row-count micro-batches, as update()
            n_micro = None if optim.micro_batch_tokens is not None else -(-most // optim.micro_batch_size)
            stats = updater.accumulate(rollout, mine, torch.device("cpu"), n_micro, engine)
            engine.step()  # SGD at lr 1: the weights move by exactly minus the (averaged, full) gradient
            params = list(engine.module.named_parameters())
            with deepspeed.zero.GatheredParameters([p for _, p in params]):
                grads = {n: before[n] - p.detach().clone() for n, p in params}
            out[(stage, name)] = {"loss": stats["loss"], "grads": grads, "micro_batches": len(pieces)}
            engine.destroy()
    counts = [None] * world
    dist.all_gather_object(counts, {k: v["micro_batches"] for k, v in out.items()})
    if rank == 0:
        torch.save({"runs": out, "micro_batches": counts}, os.environ["OUT"])
    dist.barrier()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_packed_token_budget_gradients_equal_padded_under_zero2_and_zero3(tmp_path):
    from test_packing import _accumulate, _model, _rollout

    from prpo_lightning.config import LossConfig, OptimConfig

    script, out = tmp_path / "zero_packing.py", tmp_path / "grads.pt"
    script.write_text(SCRIPT)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, ROOT=str(ROOT), OUT=str(out), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    result = torch.load(out, weights_only=False)
    runs, counts = result["runs"], result["micro_batches"]
    assert counts[0][(3, "packed")] != counts[1][(3, "packed")], "degenerate: the ranks make as many micro-batches"
    _, single = _accumulate(_model(), _rollout(kl=False, off_policy=False), LossConfig(kl_coef=0.0),
                            OptimConfig(micro_batch_size=3))  # one process, padded
    for stage in (2, 3):
        padded, packed = runs[(stage, "padded")], runs[(stage, "packed")]
        assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-5)
        assert set(padded["grads"]) == set(single)
        for name, want in single.items():
            torch.testing.assert_close(padded["grads"][name], want, rtol=0, atol=1e-5, msg=f"ZeRO-{stage} {name}")
            torch.testing.assert_close(packed["grads"][name], want, rtol=0, atol=1e-5, msg=f"ZeRO-{stage} {name}")
        assert any(float(g.abs().max()) > 0 for g in packed["grads"].values())
