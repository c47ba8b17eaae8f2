"""Batches that update nothing never stall a run: they count as steps, and too many in a row stop it with an error
naming the cause. Programming errors in a component always raise, whatever ``on_prm_error`` says.

Every run here is guarded by an alarm, so a regression (a run that loops forever) fails instead of hanging.
"""

from __future__ import annotations

import os
import signal
import socket
from contextlib import contextmanager

import pytest
import torch
from test_resume import (GroupNormAligner, StepRecorder, ToyPrompts, cli_fit_args, make_module, make_trainer,
                         tokenizer_dir)

from prpo_lightning.config import OptimConfig
from prpo_lightning.batch import ComponentContractError
from prpo_lightning.training.outcome import RankReport, SkipBudget, SkippedBatchesError
from prpo_lightning.scoring.prm import ProcessRewardModel, pad_step_scores
from prpo_lightning.scoring.segmenter import Segmenter
from prpo_lightning.scoring.verifier import OutcomeVerifier


class RunStalled(BaseException):
    """Raised by :func:`deadline`; a ``BaseException``, so no ``except Exception`` in the framework (the PRM guard
    turns exceptions into skippable PRM errors) can swallow it."""


@contextmanager
def deadline(seconds: int):
    """Fail with :class:`RunStalled` instead of hanging when the body runs longer than ``seconds``."""

    def _expired(signum, frame):
        raise RunStalled(f"the run did not stop within {seconds} s: it stalls")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prpo-fit"])


class OneSegment(Segmenter):
    def segment(self, batch, tokenizer):
        return [[(0, int(n))] if n else [] for n in batch.lengths.tolist()]


class ProcessGroupNorm(GroupNormAligner):
    uses_process_scores = True


class DownPRM(ProcessRewardModel):
    """A PRM whose server is down: every call raises ConnectionError."""

    def score(self, batch, tokenizer):
        raise ConnectionError("PRM server at 10.0.0.7:8000 refused the connection")


class FirstCallDownPRM(ProcessRewardModel):
    """Fails on its first call only, then scores every step 1."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, batch, tokenizer):
        self.calls += 1
        if self.calls == 1:
            raise TimeoutError("PRM did not answer in 30 s")
        return pad_step_scores([[1.0] * len(spans) for spans in batch.segment_spans])


class BuggyPRM(ProcessRewardModel):
    def score(self, batch, tokenizer):
        return batch.no_such_field  # AttributeError: a bug, not an outage


class ListPRM(ProcessRewardModel):
    def score(self, batch, tokenizer):
        return [[1.0] for _ in range(batch.size)]  # a list instead of ProcessScores


class StringVerifier(OutcomeVerifier):
    def verify(self, completion, gold):
        return "correct"  # a str instead of a Verdict


PRM_ARGS = ["--model.aligner=test_skips.ProcessGroupNorm", "--model.segmenter=test_skips.OneSegment",
            "--model.on_prm_error=skip"]


# ---------------------------------------------------------------- through prpo-fit
@pytest.mark.slow
def test_prm_down_under_skip_stops_with_named_cause(tmp_path):
    from prpo_lightning.cli import cli_main

    args = cli_fit_args(tmp_path, tokenizer_dir(tmp_path), 50, *PRM_ARGS, "--model.prm=test_skips.DownPRM")
    with deadline(180), pytest.raises(SkippedBatchesError) as err:
        cli_main(args)
    message = str(err.value)
    assert "4 batches in a row updated nothing" in message and "max_consecutive_skips=3" in message
    assert "the PRM failed and model.on_prm_error is 'skip'" in message and "refused the connection" in message
    assert "on_prm_error: raise" in message  # the fix
    assert "max_prompt_length" not in message  # only the actual cause


@pytest.mark.slow
def test_prompts_all_too_long_stop_with_named_cause(tmp_path):
    from prpo_lightning.cli import cli_main

    args = cli_fit_args(tmp_path, tokenizer_dir(tmp_path), 50, "--model.sampling.max_prompt_length=2",
                        "--model.max_consecutive_skips=1")
    with deadline(180), pytest.raises(SkippedBatchesError) as err:
        cli_main(args)
    message = str(err.value)
    assert "2 batches in a row updated nothing" in message and "max_consecutive_skips=1" in message
    assert "longer than sampling.max_prompt_length=2 tokens" in message and "PRM" not in message


@pytest.mark.slow
def test_skipped_batches_count_toward_max_steps(tmp_path):
    """Within the budget, skipped batches are steps: the run ends at max_steps with the weights untouched."""
    from prpo_lightning.cli import cli_main

    args = cli_fit_args(tmp_path, tokenizer_dir(tmp_path), 3, "--model.sampling.max_prompt_length=2",
                        "--model.max_consecutive_skips=5")
    with deadline(180):
        cli = cli_main(args)
    assert cli.trainer.global_step == 3
    assert cli.trainer.current_epoch <= 1  # 3 batches of a 3-batch epoch, not thousands of empty epochs
    assert cli.trainer.optimizers[0].state_dict()["state"] == {}  # no optimizer step was taken
    metrics = cli.trainer.callback_metrics
    assert metrics["train/data/skipped_long_prompts"] == 2.0 and metrics["train/faults/consecutive_skips"] == 3.0


# ---------------------------------------------------------------- through the API
@pytest.mark.slow
def test_skipped_step_keeps_lr_schedule_on_global_step(tmp_path):
    """The first batch is skipped (PRM timeout): global_step and the schedule advance without an update; the
    next two steps update with the schedule's rates at steps 1 and 2; the logged rate is the one each step used."""
    lr, total = 1e-2, 4
    module = make_module(tokenizer_dir(tmp_path), segmenter=OneSegment(), prm=FirstCallDownPRM(),
                         aligner=ProcessGroupNorm(), on_prm_error="skip",
                         optim=OptimConfig(lr=lr, warmup_steps=0, schedule="linear", total_steps=total,
                                           micro_batch_size=4))
    recorder = StepRecorder()
    trainer = make_trainer(tmp_path, 3, [recorder])
    with deadline(180):
        trainer.fit(module, ToyPrompts())
    assert trainer.global_step == 3
    assert [r["step"] for r in recorder.rows] == [1, 2, 3]
    expected = [lr * (1 - k / total) for k in range(3)]  # linear schedule at steps 0, 1, 2
    assert [r["train/lr"] for r in recorder.rows] == pytest.approx(expected, rel=1e-6)
    assert "train/loss" not in recorder.rows[0] and "train/loss" in recorder.rows[1]
    adam = trainer.optimizers[0].state_dict()["state"]
    assert {float(s["step"]) for s in adam.values()} == {2.0}  # two real optimizer steps


@pytest.mark.parametrize("prm, match", [
    (BuggyPRM(), r"PRM BuggyPRM\.score raised AttributeError.*programming error.*never skipped"),
    (ListPRM(), r"PRM ListPRM\.score returned a list: return prpo_lightning\.ProcessScores.*pad_step_scores"),
])
def test_prm_programming_errors_raise_under_skip(tmp_path, prm, match):
    module = make_module(tokenizer_dir(tmp_path), segmenter=OneSegment(), prm=prm, aligner=ProcessGroupNorm(),
                         on_prm_error="skip")
    with deadline(180), pytest.raises(ComponentContractError, match=match):
        make_trainer(tmp_path, 1).fit(module, ToyPrompts())


def test_verifier_wrong_return_type_names_the_verifier(tmp_path):
    module = make_module(tokenizer_dir(tmp_path), verifier=StringVerifier())
    with deadline(180), pytest.raises(ComponentContractError, match=r"verifier StringVerifier\.verify_batch returned a str"):
        make_trainer(tmp_path, 1).fit(module, ToyPrompts())


def test_negative_max_consecutive_skips_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="model.max_consecutive_skips must be >= 0"):
        make_module(tokenizer_dir(tmp_path), max_consecutive_skips=-1)


# ---------------------------------------------------------------- every rank takes the same decision
def _budget_worker(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    budget, decisions = SkipBudget(max_consecutive_skips=2), []
    # batch 1: only rank 0 has no prompts; batch 2: both ranks' PRM fails; batch 3: rank 1's PRM fails -> stop
    plan = [(rank == 0, None), (False, "PRM down"), (False, "PRM down" if rank == 1 else None)]
    try:
        for step, (no_prompts, prm_error) in enumerate(plan):
            outcome = budget.decide(RankReport(no_prompts, prm_error), step, max_prompt_length=16)
            decisions.append(not outcome.update)
        decisions.append("no error")
    except SkippedBatchesError as err:
        decisions.append(str(err))
    torch.save(decisions, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_skip_budget_is_the_same_on_every_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with deadline(180):
        torch.multiprocessing.spawn(_budget_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # batch 1: one rank still updates (False on both); batch 2: nothing anywhere (True on both); batch 3: stop
    assert r0[:2] == r1[:2] == [False, True]
    assert "3 batches in a row updated nothing" in r0[2] and "3 batches in a row" in r1[2]
    assert "on 1 of 2 ranks" in r0[2] and "on 1 of 2 ranks" in r1[2]
    assert "this rank's error: PRM down" in r1[2] and "this rank's error" not in r0[2]
