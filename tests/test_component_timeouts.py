"""Time limits on user code and parallel reward functions (issue 27, item 2).

Before: a component that never answered hung the run forever and SIGTERM was ignored (a reward function sleeping,
a PRM whose server stalls, with or without ``on_prm_error: skip``); a 10-second reward function made every step
take minutes with no warning, rows being called one at a time. Every run here is guarded by an alarm
(:func:`test_skips.deadline`), so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from helpers import prpo_fit
from test_resume import ParityVerifier, ToyPrompts, cli_fit_args, make_module, make_trainer, tokenizer_dir
from test_skips import OneSegment, ProcessGroupNorm, deadline

from components.rewards import CallableReward, RewardFunctionError
from prpo_lightning.scoring.deadline import RewardClock, StepAbandoned, call_with_deadline, parallel_map
from prpo_lightning.scoring.faults import ComponentTimeoutError, PRMError, VerifierError
from prpo_lightning.scoring.prm import ProcessRewardModel, pad_step_scores

REPO = Path(__file__).resolve().parents[1]
FOREVER = threading.Event()  # never set: a call waiting on it never returns


# ---------------------------------------------------------------- components that never answer
class StalledPRM(ProcessRewardModel):
    """A PRM whose server stalls: ``score`` never returns."""

    def score(self, batch, tokenizer):
        FOREVER.wait()


class StallsOncePRM(ProcessRewardModel):
    """Stalls on its first call, then scores every step 1."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, batch, tokenizer):
        self.calls += 1
        if self.calls == 1:
            FOREVER.wait()
        return pad_step_scores([[1.0] * len(spans) for spans in batch.segment_spans])


class SignalThenStallPRM(ProcessRewardModel):
    """At step 2 of the first start (no ``flag`` file yet): sends SIGTERM to its own process, then stalls."""

    def __init__(self, flag: str) -> None:
        self.flag, self.calls = Path(flag), 0

    def score(self, batch, tokenizer):
        self.calls += 1
        if self.calls == 3 and not self.flag.exists():
            self.flag.write_text("signalled")
            os.kill(os.getpid(), signal.SIGTERM)
            FOREVER.wait()
        return pad_step_scores([[1.0] * len(spans) for spans in batch.segment_spans])


def sleeping_reward(completion: str, answer: str, **row) -> float:
    FOREVER.wait()
    return 0.0


def slow_reward(completion: str, answer: str, **row) -> float:
    time.sleep(0.05)
    return float(len(completion) % 3) + 0.25 * (row.get("id", 0) or 0)


FAKE_NOW = [0.0]  # the reward clock's time in the warning test: only the reward function advances it


def ten_second_reward(completion: str, answer: str, **row) -> float:
    FAKE_NOW[0] += 10.0  # a 10-second reward function, without the wait
    return 1.0


async def async_reward(completion: str, answer: str, **row) -> float:
    await asyncio.sleep(0.05)
    return float(len(completion) % 3) + 0.25 * (row.get("id", 0) or 0)


def failing_on_row_2(completion: str, answer: str, **row) -> float:
    if row.get("id") == 2:
        raise ValueError("no score for id 2")
    return 1.0


# ---------------------------------------------------------------- the deadline itself
def test_a_call_within_its_limit_returns_its_value_and_its_errors():
    assert call_with_deadline(lambda: 41 + 1, 5.0, "PRM P.score on 2 completions", "model.component_timeout_s") == 42
    with pytest.raises(KeyError, match="boom"):
        call_with_deadline(lambda: {}["boom"], 5.0, "x", "model.component_timeout_s")
    with pytest.raises(SystemExit):
        call_with_deadline(lambda: sys.exit(3), 5.0, "x", "model.component_timeout_s")


def test_a_call_that_never_returns_is_abandoned_after_its_limit_in_a_daemon_thread():
    start = time.monotonic()
    with deadline(30), pytest.raises(ComponentTimeoutError, match=r"PRM P\.score on 2 completions did not return "
                                                                  r"within 0\.3 s \(model\.component_timeout_s=0\.3\)"):
        call_with_deadline(FOREVER.wait, 0.3, "PRM P.score on 2 completions", "model.component_timeout_s")
    assert time.monotonic() - start < 5
    stuck = [t for t in threading.enumerate() if t.name.startswith("prpo-component")]
    assert stuck and all(t.daemon for t in stuck)  # it cannot keep the process alive


def test_a_stop_signal_while_waiting_abandons_the_step():
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # as the preemption callback installs it
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        with deadline(30), pytest.raises(StepAbandoned, match="stop signal arrived while waiting for PRM P.score"):
            call_with_deadline(FOREVER.wait, 600, "PRM P.score", "model.component_timeout_s")
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_parallel_map_keeps_the_order_and_raises_the_first_failing_item():
    assert parallel_map(lambda i: i * i, 20, 4) == [i * i for i in range(20)]
    with pytest.raises(ValueError, match="item 3"):
        parallel_map(lambda i: (_ for _ in ()).throw(ValueError(f"item {i}")) if i in (3, 7) else i, 10, 4)


# ---------------------------------------------------------------- reward functions in parallel
def _rows(n):
    return [{"id": i, "problem": f"p{i}"} for i in range(n)]


@pytest.mark.parametrize("function", ["slow_reward", "async_reward"])
def test_rewards_in_parallel_give_the_same_numbers_in_the_same_order(function):
    completions, golds = [f"c{'x' * i}" for i in range(16)], ["0"] * 16
    serial = CallableReward(f"test_component_timeouts:{function}", workers=1)
    parallel = CallableReward(f"test_component_timeouts:{function}", workers=8)
    start = time.monotonic()
    want = serial.verify_batch(completions, golds, _rows(16))
    t_serial = time.monotonic() - start
    start = time.monotonic()
    got = parallel.verify_batch(completions, golds, _rows(16))
    t_parallel = time.monotonic() - start
    assert [v.reward for v in got] == [v.reward for v in want] and [v.status for v in got] == [v.status for v in want]
    assert t_parallel < t_serial / 2, (t_serial, t_parallel)  # 16 × 50 ms: 0.8 s serially, 2 rounds of 8 in parallel


def test_a_failing_row_is_named_in_parallel_too():
    reward = CallableReward("test_component_timeouts:failing_on_row_2", workers=4)
    with pytest.raises(RewardFunctionError, match=r"failing_on_row_2 raised ValueError on row 2: no score for id 2"):
        reward.verify_batch(["a"] * 6, ["0"] * 6, _rows(6))


def test_workers_is_checked_naming_the_key():
    with pytest.raises(ValueError, match=r"CallableReward: workers must be null or an integer >= 1; got 0"):
        CallableReward("test_component_timeouts:slow_reward", workers=0)


def test_the_reward_clock_warns_only_when_rewards_take_longer_than_the_rest_of_the_step():
    now = [0.0]
    clock = RewardClock(min_seconds=1.0, clock=lambda: now[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reward_s, rest_s in ((5.0, 0.0), (0.5, 0.1), (3.0, 4.0)):  # first call (no step before it), too short,
            now[0] += rest_s                                           # shorter than the rest of the step
            with clock.timing("R"):
                now[0] += reward_s
    now[0] += 1.0
    with pytest.warns(UserWarning, match=r"the reward \(R\) took 3\.0 s, longer than the rest of the step \(1\.0 s"):
        with clock.timing("R"):
            now[0] += 3.0


@pytest.mark.slow
def test_slow_rewards_warn_once_that_they_dominate_the_step(tmp_path):
    module = make_module(tokenizer_dir(tmp_path),
                         verifier=CallableReward("test_component_timeouts:ten_second_reward"))
    module.configure_model()
    module.collector.scorer.reward_clock = RewardClock(clock=lambda: FAKE_NOW[0])  # 80 s of reward per step
    with deadline(300), pytest.warns(UserWarning) as caught:
        make_trainer(tmp_path, 3).fit(module, ToyPrompts())
    dominate = [str(w.message) for w in caught if "longer than the rest of the step" in str(w.message)]
    assert len(dominate) == 1, dominate  # warned once, not every step
    assert "CallableReward" in dominate[0] and "workers" in dominate[0] and "async" in dominate[0]


# ---------------------------------------------------------------- through a run
@pytest.mark.slow
def test_a_stalled_prm_under_skip_is_timed_out_and_skipped(tmp_path, caplog):
    module = make_module(tokenizer_dir(tmp_path), segmenter=OneSegment(), prm=StallsOncePRM(),
                         aligner=ProcessGroupNorm(), on_prm_error="skip", component_timeout_s=0.5)
    trainer = make_trainer(tmp_path, 3)
    with deadline(300), caplog.at_level(logging.WARNING):
        trainer.fit(module, ToyPrompts())
    assert "step 0: skipping the batch's update: PRM StallsOncePRM.score on 8 completions did not return within " \
           "0.5 s (model.component_timeout_s=0.5)" in caplog.text
    assert trainer.global_step == 3
    adam = trainer.optimizers[0].state_dict()["state"]
    assert {float(s["step"]) for s in adam.values()} == {2.0}  # the stalled batch was skipped, the others trained


@pytest.mark.slow
def test_a_stalled_prm_under_raise_stops_the_run_naming_the_setting(tmp_path):
    module = make_module(tokenizer_dir(tmp_path), segmenter=OneSegment(), prm=StalledPRM(),
                         aligner=ProcessGroupNorm(), on_prm_error="raise", component_timeout_s=0.5)
    with deadline(300), pytest.raises(PRMError, match=r"PRM StalledPRM\.score on 8 completions did not return within "
                                                      r"0\.5 s \(model\.component_timeout_s=0\.5\)"):
        make_trainer(tmp_path, 3).fit(module, ToyPrompts())


@pytest.mark.slow
def test_a_sleeping_reward_function_stops_the_run_naming_it(tmp_path):
    module = make_module(tokenizer_dir(tmp_path), verifier=CallableReward("test_component_timeouts:sleeping_reward"),
                         component_timeout_s=0.5)
    with deadline(300), pytest.raises(VerifierError, match=r"verifier CallableReward\.verify_batch on 8 completions "
                                                           r"did not return within 0\.5 s"):
        make_trainer(tmp_path, 3).fit(module, ToyPrompts())


def test_the_timeout_is_checked_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"model\.component_timeout_s must be null \(no limit\) or a number of "
                                         r"seconds > 0; got 0"):
        make_module(tokenizer_dir(tmp_path), component_timeout_s=0)




@pytest.mark.slow
def test_sigterm_while_a_prm_stalls_saves_the_state_before_the_step_and_exits_143(tmp_path):
    """The PRM stalls at step 2 after SIGTERM: the step is abandoned, last.ckpt holds step 2, the process exits 143
    (the stalled daemon thread does not keep it alive), and the requeued command trains steps 2 and 3 to the same
    weights as a run that was never interrupted."""
    import torch

    tok = tokenizer_dir(tmp_path)

    def command(root: Path) -> list[str]:
        return cli_fit_args(root, tok, 4, "--model.aligner=test_skips.ProcessGroupNorm",
                            "--model.segmenter=test_skips.OneSegment",
                            "--model.prm=test_component_timeouts.SignalThenStallPRM",
                            f"--model.prm.flag={root / 'signalled'}", "--model.component_timeout_s=300",
                            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                            "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_last=true",
                            "--ckpt_path=last")[1:]

    start = time.monotonic()
    first = prpo_fit(["fit", *command(tmp_path)])
    assert first.returncode == 143, (first.stdout + first.stderr)[-4000:]
    assert time.monotonic() - start < 250  # not the 300 s limit: the signal ended the wait
    assert "stopped by a signal after step 2" in first.stdout
    last = tmp_path / "runs" / "toy" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    second = prpo_fit(["fit", *command(tmp_path)])
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 4
    straight_root = tmp_path / "straight"
    straight_root.mkdir()
    (straight_root / "signalled").write_text("never signal")
    straight = prpo_fit(["fit", *command(straight_root)])
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-4000:]
    want = torch.load(straight_root / "runs" / "toy" / "checkpoints" / "last.ckpt", weights_only=False)
    assert want["global_step"] == 4
    for key, value in want["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_the_default_run_has_a_finite_time_limit():
    """Out of the box a hung verifier or PRM cannot block a run (or its SIGTERM) forever: one hour per call."""
    import inspect

    from prpo_lightning.module import PRPOModule

    assert inspect.signature(PRPOModule.__init__).parameters["component_timeout_s"].default == 3600.0
