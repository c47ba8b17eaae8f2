"""Phase timings and throughput (issue 23): ``train/time/*`` and ``train/perf/*`` checked by hand.

A fake clock stands in for ``time.perf_counter``: it stands still unless a component advances it by a known amount
(generation 2 s, the old log-prob pass 11 s, the reference pass 13 s, the verifier 5 s, the PRM 3 s, the update
17 s, the weight sync 19 s, the gap between two steps 23 s), so every logged time is an exact sum. No test reads a
real duration.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from golden_run import DigitSharePRM
from test_resume import ParityVerifier, ToyPrompts, make_module, make_trainer, tokenizer_dir

from components.aligners import PRPOAligner
from components.segmenters import FixedLengthSegmenter
from prpo_lightning.callbacks.progress import StepProgressBar, step_time_item
from prpo_lightning.config import LossConfig, OptimConfig, SamplingConfig
from prpo_lightning.rollout import collector as collector_mod
from prpo_lightning.training.timing import StepTimer, reduce_phase_metrics
from prpo_lightning.scoring.verifier import VerdictStatus
from prpo_lightning.training.updater import PolicyUpdater

GENERATE, OLD, REF, VERIFY, PRM, UPDATE, SYNC, GAP = 2.0, 11.0, 13.0, 5.0, 3.0, 17.0, 19.0, 23.0


class FakeClock:
    """``time.perf_counter`` that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------- the step timer alone
def test_step_s_spans_start_to_start_and_tokens_per_s_pairs_it_with_the_same_step() -> None:
    clock = FakeClock()
    timer = StepTimer(clock)
    timer.start()
    clock.advance(4.0)
    timer.mark("update")
    clock.advance(6.0)
    timer.mark("sync")
    clock.advance(1.0)
    first = timer.finish({"time/rollout_s": 3.0, "time/generate_s": 3.0, "perf/sampled_tokens": 30.0}, trained=60.0)
    assert "time/step_s" not in first and "perf/tokens_per_s" not in first  # nothing to span yet
    assert first["time/scoring_s"] == 1.0 and first["time/update_s"] == 6.0 and first["time/weight_sync_s"] == 1.0
    assert first["perf/sampled_tokens_per_s"] == 10.0 and first["perf/trained_tokens_per_s"] == 10.0
    clock.advance(9.0)  # after the step: callbacks, the next batch
    timer.start()
    clock.advance(2.0)
    skipped = timer.finish({"time/rollout_s": 2.0, "time/generate_s": 2.0, "perf/sampled_tokens": 8.0})
    assert skipped["time/step_s"] == 4.0 + 6.0 + 1.0 + 9.0  # the previous step, start to start
    assert skipped["perf/tokens_per_s"] == 30.0 / 20.0  # the previous step's sampled tokens over its step time
    assert "time/update_s" not in skipped and "perf/trained_tokens" not in skipped  # no update on this step
    timer.reset()  # a new fit: its first step spans nothing
    timer.start()
    assert "time/step_s" not in timer.finish({})


def test_reduce_in_one_process_keeps_what_is_there() -> None:
    metrics = {"time/rollout_s": 1.5, "perf/sampled_tokens": 7.0, "loss": 0.25}
    assert reduce_phase_metrics(metrics) == metrics


def _reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # rank 1 has no prompts: no log-prob pass, no sampled tokens (its keys differ; the calls do not)
        mine = ({"time/rollout_s": 2.0, "time/old_logprobs_s": 1.5, "perf/sampled_tokens": 12.0, "loss": 0.5}
                if rank == 0 else {"time/rollout_s": 3.0, "perf/trained_tokens": 4.0, "loss": 0.7})
        Path(out, f"rank{rank}.json").write_text(json.dumps(reduce_phase_metrics(mine)))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_max_the_times_and_sum_the_tokens(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_reduce_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, metrics in enumerate(got):
        assert metrics["time/rollout_s"] == 3.0  # the slowest rank
        assert metrics["time/old_logprobs_s"] == 1.5  # the rank that ran the pass
        assert metrics["perf/sampled_tokens"] == 12.0 and metrics["perf/trained_tokens"] == 4.0  # summed
        assert "time/ref_logprobs_s" not in metrics  # no rank had it
        assert metrics["loss"] == (0.5, 0.7)[rank]  # other metrics are left alone


# ---------------------------------------------------------------- a tiny run on the fake clock
def _timed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dynamic: bool) -> tuple[list[dict], list[dict]]:
    """Two training steps of PRPO (PRM, reference, 2 PPO epochs) on the fake clock; per step, the logged metrics and
    the hand counts (completion tokens generated, loss tokens updated on, dynamic-sampling rounds)."""
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    counts: list[dict[str, float]] = []

    class SlowVerifier(ParityVerifier):
        def verify_batch(self, completions: Any, golds: Any, rows: Any = None) -> Any:
            clock.advance(VERIFY)
            return super().verify_batch(completions, golds, rows)

        def verify(self, completion: str, gold: str) -> Any:  # groups of "2i+2i=", i even, have no signal
            verdict = super().verify(completion, gold)
            return verdict if int(gold) % 4 else type(verdict)(VerdictStatus.INCORRECT, 0.0)

    class SlowPRM(DigitSharePRM):
        def score(self, batch: Any, tokenizer: Any) -> Any:
            clock.advance(PRM)
            return super().score(batch, tokenizer)

    real_logprobs, real_update = collector_mod.batched_logprobs, PolicyUpdater.update

    def logprobs(model: Any, *args: Any, **kwargs: Any) -> Any:
        clock.advance(OLD if model is module.policy else REF)
        return real_logprobs(model, *args, **kwargs)

    def update(self: PolicyUpdater, rollout: Any, *args: Any, **kwargs: Any) -> Any:
        clock.advance(UPDATE)
        counts[-1]["trained"] = float(rollout.completion_mask.sum()) if rollout is not None else 0.0
        return real_update(self, rollout, *args, **kwargs)

    monkeypatch.setattr(collector_mod, "batched_logprobs", logprobs)
    monkeypatch.setattr(PolicyUpdater, "update", update)
    tok = tokenizer_dir(tmp_path)
    sampling = SamplingConfig(num_generations=4, max_new_tokens=8, max_prompt_length=32,
                              dynamic_sampling={"enabled": dynamic, "max_rounds": 2, "criterion": "outcome"})
    module = make_module(tok, verifier=SlowVerifier(), aligner=PRPOAligner(), prm=SlowPRM(),
                         segmenter=FixedLengthSegmenter(segment_length=3), sampling=sampling,
                         loss=LossConfig(kl_coef=0.01), optim=OptimConfig(lr=1e-2, micro_batch_size=4, ppo_epochs=2))
    real_generate, real_sync = module.engine.generate, module.engine.sync_weights

    def generate(request: Any) -> Any:
        clock.advance(GENERATE)
        result = real_generate(request)
        counts[-1]["sampled"] += float(result.completion_mask.sum())
        counts[-1]["rounds"] += 1
        return result

    def sync_weights(*args: Any, **kwargs: Any) -> Any:
        clock.advance(SYNC)
        return real_sync(*args, **kwargs)

    module.engine.generate, module.engine.sync_weights = generate, sync_weights
    rows: list[dict[str, float]] = []

    class Steps(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            counts.append({"sampled": 0.0, "trained": 0.0, "rounds": 0})

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            rows.append(dict(pl_module.step_metrics))
            clock.advance(GAP)

    trainer = make_trainer(tmp_path, 4, callbacks=[Steps()])  # 2 steps of 2 optimizer steps (ppo_epochs=2)
    trainer.fit(module, ToyPrompts(n=8, batch_size=2, seed=1))
    assert len(rows) == 2
    return rows, counts


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_phase_times_add_up_and_tokens_per_s_match_a_hand_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                dynamic: bool) -> None:
    rows, counts = _timed_run(tmp_path, monkeypatch, dynamic)
    assert not dynamic or all(count["rounds"] > 1 for count in counts)  # the rounds' times and tokens add up
    for row, count in zip(rows, counts):
        n = count["rounds"]  # generate -> log-prob passes -> score, once per round
        assert n == (1 + row["train/dynamic_sampling/rounds"] if dynamic else 1)
        assert row["train/time/generate_s"] == GENERATE * n
        assert row["train/time/old_logprobs_s"] == OLD * n
        assert row["train/time/ref_logprobs_s"] == REF * n
        assert row["train/time/rollout_s"] == (GENERATE + OLD + REF) * n  # the breakdown adds up
        assert row["train/time/verify_s"] == VERIFY * n and row["train/time/prm_s"] == PRM * n
        assert row["train/time/scoring_s"] == (VERIFY + PRM) * n
        assert row["train/time/update_s"] == UPDATE and row["train/time/weight_sync_s"] == SYNC
        assert row["train/perf/sampled_tokens"] == count["sampled"] > 0
        assert row["train/perf/sampled_tokens_per_s"] == count["sampled"] / (GENERATE * n)
        assert row["train/perf/trained_tokens"] == 2 * count["trained"] > 0  # each PPO epoch trains every token
        assert row["train/perf/trained_tokens_per_s"] == 2 * count["trained"] / UPDATE
    assert "train/time/step_s" not in rows[0] and "train/perf/tokens_per_s" not in rows[0]
    first = counts[0]["rounds"]
    step_1 = (GENERATE + OLD + REF + VERIFY + PRM) * first + UPDATE + SYNC + GAP
    assert rows[1]["train/time/step_s"] == step_1  # start of step 1 -> start of step 2, the gap included
    assert rows[1]["train/perf/tokens_per_s"] == counts[0]["sampled"] / step_1


# ---------------------------------------------------------------- the progress bar
def test_progress_bar_shows_the_step_time() -> None:
    assert step_time_item({}) == {}  # the first step: not known yet
    assert step_time_item({"train/time/step_s": 1.234}) == {"step": "1.23s"}
    bar = StepProgressBar()
    trainer = SimpleNamespace(progress_bar_metrics={"reward": 0.5}, loggers=[])
    module = SimpleNamespace(step_metrics={"train/time/step_s": 12.0})
    items = bar.get_metrics(trainer, module)  # type: ignore[arg-type]
    assert items["step"] == "12.00s" and items["reward"] == 0.5
