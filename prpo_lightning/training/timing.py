"""Phase timings and throughput of a training step (``train/time/*``, ``train/perf/*``), always on.

Every time is wall-clock seconds (``time.perf_counter``) on one rank, then the maximum over ranks (the slowest rank
sets the pace of a collective step); every token count is summed over ranks. How the phases nest::

    step_s          start of the previous step -> start of this one (logged one row late, from the second step)
    |- rollout_s    = generate_s + old_logprobs_s + ref_logprobs_s    (summed over dynamic-sampling rounds)
    |- scoring_s    verify_s + prm_s + segmentation, alignment, dynamic-sampling filtering, the skip decision
    |- update_s     the PPO update
    |- weight_sync_s
    '- the rest     Lightning's loop, callbacks (checkpoints, validation), fetching the next batch

``step_s`` spans start to start so that work that overlaps the step (an asynchronous rollout) shows as a step
shorter than the sum of its phases. With asynchronous rollouts, ``time/batch_wait_s`` is the time the step waited
for its batch (sampling and scoring still running in the background), and ``rollout_s``/``scoring_s`` are the
background's own times, which overlap the update.
Throughput (``docs/metrics.rst`` defines each key):

- ``perf/sampled_tokens_per_s``: ``perf/sampled_tokens`` / ``time/generate_s``;
- ``perf/trained_tokens_per_s``: ``perf/trained_tokens`` / ``time/update_s``;
- ``perf/tokens_per_s``: the previous step's ``perf/sampled_tokens`` / ``time/step_s`` (end to end).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.config import LossConfig
from prpo_lightning.runtime.distributed import all_reduce_max_floats, all_reduce_sum
from prpo_lightning.training.updater import loss_mask

#: Phase times reduced by their maximum over ranks (a key no rank logged stays absent).
TIME_KEYS = (
    "time/rollout_s", "time/generate_s", "time/old_logprobs_s", "time/ref_logprobs_s", "time/scoring_s",
    "time/verify_s", "time/prm_s", "time/update_s", "time/weight_sync_s", "time/step_s", "time/batch_wait_s",
)
#: Token counts summed over ranks (a key no rank logged stays absent).
TOKEN_KEYS = ("perf/sampled_tokens", "perf/trained_tokens")
_ABSENT = -1.0  # below every duration: the maximum over ranks is the largest logged value, or absent


def reduce_phase_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` with :data:`TIME_KEYS` maxed and :data:`TOKEN_KEYS` summed over ranks (a collective call).

    Every rank sends every key (a missing one as absent), so ranks whose metrics differ (a rank without prompts
    runs no log-prob pass) still make the same calls; a key is in the result on every rank when some rank had it.
    """
    out = dict(metrics)
    times = all_reduce_max_floats([float(metrics.get(k, _ABSENT)) for k in TIME_KEYS])
    counts = all_reduce_sum([float(metrics.get(k, 0.0)) for k in TOKEN_KEYS]
                            + [float(k in metrics) for k in TOKEN_KEYS])
    for key, value in zip(TIME_KEYS, times):
        if value == _ABSENT:
            out.pop(key, None)
        else:
            out[key] = value
    for key, value, present in zip(TOKEN_KEYS, counts[: len(TOKEN_KEYS)], counts[len(TOKEN_KEYS):]):
        if present:
            out[key] = value
        else:
            out.pop(key, None)
    return out


def trained_tokens(rollout: RolloutBatch | None, loss_cfg: LossConfig, ppo_epochs: int) -> float:
    """This rank's loss tokens (:func:`~prpo_lightning.training.updater.loss_mask`) times ``ppo_epochs``: each
    PPO epoch runs the forward and backward pass over every one of them once."""
    if rollout is None:
        return 0.0
    return float(loss_mask(rollout, loss_cfg).sum()) * ppo_epochs


class StepTimer:
    """Times the phases of :meth:`~prpo_lightning.module.PRPOModule.training_step` that the module runs itself and
    turns one step's metrics into its reduced ``time/*`` and ``perf/*`` metrics.

    The rollout stage times its own parts (``time/rollout_s``, ``generate_s``, the log-prob passes) and the scoring
    stage its own (``verify_s``, ``prm_s``); this class adds ``scoring_s`` (the rest of collecting), ``update_s``,
    ``weight_sync_s`` and ``step_s``.

    Args:
        clock: returns seconds (default ``time.perf_counter``, read at every call so that tests can patch it).
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock
        self.marks: dict[str, float] = {}
        self.last_start: float | None = None
        self.last_sampled: float | None = None  # the previous step's global sampled tokens
        self.step_s: float | None = None

    def now(self) -> float:
        return self.clock() if self.clock is not None else time.perf_counter()

    def reset(self) -> None:
        """Forget the previous step (a new fit starts: its first step has no ``step_s``)."""
        self.last_start = self.last_sampled = self.step_s = None
        self.marks = {}

    def start(self) -> None:
        """A step starts: the previous step's ``step_s`` ends here."""
        now = self.now()
        self.step_s = None if self.last_start is None else now - self.last_start
        self.last_start, self.marks = now, {"start": now}

    def mark(self, name: str) -> None:
        """A phase starts: ``update`` (the PPO update) or ``sync`` (the weight sync)."""
        self.marks[name] = self.now()

    def finish(self, metrics: dict[str, float], trained: float | None = None) -> dict[str, float]:
        """The step's metrics with the module's phase times, ``step_s`` and throughput (a collective call).

        Args:
            metrics: the step's metrics so far (the collector's ``time/*`` and ``perf/sampled_tokens`` included).
            trained: this rank's trained tokens (:func:`trained_tokens`), or None when the step did not update.

        Returns:
            ``metrics`` with times maxed and token counts summed over ranks, and the ``perf/*_per_s`` rates.
        """
        end, marks, out = self.now(), self.marks, dict(metrics)
        if "update" in marks and "sync" in marks:
            if "time/batch_wait_s" not in out:  # asynchronous rollouts time their own (overlapped) scoring
                out["time/scoring_s"] = marks["update"] - marks["start"] - out.get("time/rollout_s", 0.0)
            out["time/update_s"] = marks["sync"] - marks["update"]
            out["time/weight_sync_s"] = end - marks["sync"]
        if self.step_s is not None:
            out["time/step_s"] = self.step_s
        if trained is not None:
            out["perf/trained_tokens"] = trained
        out = reduce_phase_metrics(out)
        for rate, count, seconds in (("perf/sampled_tokens_per_s", "perf/sampled_tokens", "time/generate_s"),
                                     ("perf/trained_tokens_per_s", "perf/trained_tokens", "time/update_s")):
            if count in out and out.get(seconds, 0.0) > 0:
                out[rate] = out[count] / out[seconds]
        if self.last_sampled is not None and out.get("time/step_s", 0.0) > 0:
            out["perf/tokens_per_s"] = self.last_sampled / out["time/step_s"]
        self.last_sampled = out.get("perf/sampled_tokens")
        return out
