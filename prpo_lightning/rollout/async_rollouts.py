"""Asynchronous rollouts (``model.async_rollout``): sample and score the next batch while the policy updates.

With ``max_staleness = k`` the pipeline holds ``k`` loader batches. Each training step launches the loader's batch
with the weights of that moment, takes the batch launched ``k`` steps earlier and trains on it, so every update is
off-policy by exactly ``k`` weight versions (the first ``k`` loader batches only fill the pipeline). Where the
work runs depends on the engine (decided once, :meth:`AsyncRollouts.describe`):

- **The engine holds its own weights** (``capabilities.needs_weight_sync``: ``VLLMEngine``, ``VLLMServerEngine``):
  sampling runs in a background thread while the policy updates. The trainer's passes (old log-probs, the
  reference) run when the batch is trained, on the current weights (the proximal policy); the sampler's log-probs
  are the behaviour policy, and ``model.rollout_correction`` weights the loss by ``π_old / π_sampler``, which now
  corrects the staleness as well as the engine mismatch. The sampler-vs-trainer self-check needs both at the same
  weights, so it runs on rows that are not stale (dynamic sampling's refills) and is otherwise only logged.
- **The engine reads the live policy** (the HF and static engines): sampling and the trainer's passes must run
  before the update changes the weights, on the main thread, exactly as in the synchronous step; only scoring
  overlaps the update, and ``old_logprobs`` are the behaviour policy's.

Scoring (verify, segment, PRM, align) runs in the background unless a component reads the trainer's passes
(old or reference log-probs, or entropies the engine cannot record), and is computed by the same functions as
in the synchronous step. The engine is never used by two threads: a weight sync, dynamic sampling's refill
rounds and evaluation first wait for the background. The background thread issues no collective call.

A checkpoint stores the in-flight batches once they are sampled (they are scored again on resume), so a resumed
run continues with the same samples, advantages and weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from prpo_lightning.batch import Round, RolloutBatch, StepContext
from prpo_lightning.config import AsyncRolloutConfig
from prpo_lightning.rollout.background import BackgroundWorker, done_future, wait_done
from prpo_lightning.rollout.collector import Collected, RolloutCollector, Sampled
from prpo_lightning.rollout.dynamic_sampling import fill_batch
from prpo_lightning.rollout.engine import EngineRecoveryNeeded
from prpo_lightning.rollout.sampling import pad_token_id
from prpo_lightning.training.plan import RunNeeds

T = TypeVar("T")
#: Fields of a :class:`RolloutBatch` that scoring fills (not stored with an in-flight batch: it is scored again).
_SCORED_FIELDS = ("verdicts", "outcome_rewards", "segment_spans", "step_scores", "step_mask", "token_scores",
                  "advantages")


class AsyncRolloutError(RuntimeError):
    """A background job (sampling or scoring) of an in-flight batch failed; the cause is chained."""


@dataclass
class InFlight:
    """A launched batch.

    Attributes:
        launch: loader batches launched before this one (its sampling seeds use it as the step).
        batch: the loader's prompt batch (on the CPU).
        version: the weight version it is sampled with.
        sampled: the sampled batch (the trainer's passes included when the engine reads the live policy).
        scored: its background scoring ``(rollout, prm_error, metrics)``, or None (scored when it is trained).
        ctx: the step context it was launched with (None once restored from a checkpoint: sampled already).
        resampled: whether it was sampled again after an :class:`EngineRecoveryNeeded` (once at most).
    """

    launch: int
    batch: dict[str, Any]
    version: int
    sampled: Future[Sampled]
    scored: Future[tuple[RolloutBatch | None, str | None, dict[str, float]]] | None = None
    ctx: StepContext | None = None
    resampled: bool = False


class AsyncRollouts:
    """The asynchronous pipeline in front of a :class:`~prpo_lightning.rollout.collector.RolloutCollector`: the
    same ``collect`` / ``sync_engine`` interface, with ``collect`` returning None while the pipeline fills.

    Args:
        collector: the module's collector.
        cfg: ``model.async_rollout``.
        needs: the components' combined needs (whether scoring reads the trainer's passes).
        seed: the run seed (dynamic sampling's extra draws).
    """

    def __init__(self, collector: RolloutCollector, cfg: AsyncRolloutConfig, needs: RunNeeds, seed: int) -> None:
        if collector.plan.lockstep:
            raise ValueError("model.async_rollout cannot run under DeepSpeed ZeRO-3 with several ranks (its lock-step "
                             "forward passes would have to run in the background thread); use ZeRO-2, DDP or one "
                             "process, or set model.async_rollout.enabled: false")
        self.collector, self.cfg, self.seed = collector, cfg, seed
        self.live_policy = not collector.engine.capabilities.needs_weight_sync
        self.score_in_background = self.live_policy or not (needs.reads_logprobs or needs.segmenter_entropies)
        collector.may_sleep = False
        # sampling encodes prompts while scoring (a segmenter, a PRM) may encode on another thread, and a fast
        # tokenizer's encode is not thread-safe ("Already borrowed"): sampling gets its own copy
        self.tokenizer = copy.deepcopy(collector.tokenizer)
        self.inflight: deque[InFlight] = deque()
        self.launched = 0
        self.worker = BackgroundWorker()

    def describe(self) -> str:
        """One line for the log: what overlaps the update."""
        engine = type(self.collector.engine).__name__
        where = ("sampling and the trainer's passes on the main thread before the update (the engine reads the live "
                 "policy)" if self.live_policy else "sampling in the background (the engine holds its own weights), "
                 "the trainer's passes when the batch is trained")
        scoring = "in the background" if self.score_in_background else "when the batch is trained (a component reads " \
                                                                       "the trainer's passes)"
        return (f"[prpo] asynchronous rollouts, max_staleness={self.cfg.max_staleness}, {engine}: {where}; scoring "
                f"{scoring}")

    # ------------------------------------------------------------------ one step
    def collect(self, batch: dict[str, Any], ctx: StepContext) -> Collected | None:
        """Launch the loader's batch, then return the batch launched ``max_staleness`` steps ago, trained now
        (None while the pipeline fills)."""
        self.recover_failed()
        self.raise_failed()
        self.launch(batch, ctx)
        if len(self.inflight) <= self.cfg.max_staleness:
            return None
        return self.finish(self.inflight.popleft(), ctx)

    def launch(self, batch: dict[str, Any], ctx: StepContext) -> None:
        """Sample (in the background, or now for a live-policy engine) and queue the scoring of one loader batch."""
        self.collector.setup_engine(ctx.device)  # on the main thread: a launched server starts here
        batch = {k: v.cpu() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, (list, tuple)) else v
                 for k, v in batch.items()}
        item = InFlight(self.launched, batch, self.collector.weights_version, done_future(None),
                        ctx=dataclasses.replace(ctx, step=self.launched))
        self._submit(item)
        self.inflight.append(item)
        self.launched += 1

    def _submit(self, item: InFlight) -> None:
        """Queue ``item``'s sampling (or sample now, live-policy engines) and scoring with the current weights."""
        assert item.ctx is not None
        version, ctx = self.collector.weights_version, item.ctx
        if self.live_policy:
            sampled = done_future(self._sample_on_main(item.batch, ctx))
        else:
            sampled = self.worker.submit(lambda: self._sample(item.batch, ctx, version))
        item.version, item.sampled = version, sampled
        item.scored = self.worker.submit(lambda: self._score(sampled.result(), ctx)) if self.score_in_background \
            else None

    def recover_failed(self, taken: InFlight | None = None) -> None:
        """Sample again, once, each in-flight batch (and ``taken``, the batch being trained) whose background
        sampling raised :class:`EngineRecoveryNeeded` (a launched server died), after the engine repaired it on
        this, the main, thread."""
        items = [*([taken] if taken is not None else []), *self.inflight]

        def failed() -> list[InFlight]:
            return [item for item in items if not item.resampled and item.sampled.done() and not
                    item.sampled.cancelled() and isinstance(item.sampled.exception(), EngineRecoveryNeeded)]

        if not failed():
            return
        self.wait()  # nothing else uses the engine in the background while it recovers, and every request that
        to_resample = failed()  # met the dead server has failed by now: one recovery for them all
        self.collector.engine.recover()
        for item in to_resample:
            rank_zero_warn(f"asynchronous rollouts: {item.sampled.exception()}; loader batch {item.launch} is sampled "
                           f"again with weight version {self.collector.weights_version}")
            item.resampled = True
            self._submit(item)

    def _sample(self, batch: dict[str, Any], ctx: StepContext, version: int) -> Sampled:
        t0 = time.perf_counter()
        sampled = self.collector.sample(batch, ctx, policy_version=version, tokenizer=self.tokenizer)
        seconds = time.perf_counter() - t0
        sampled.metrics.update(self._sampled_metrics(sampled.rollout, seconds, seconds))
        return sampled

    def _sample_on_main(self, batch: dict[str, Any], ctx: StepContext) -> Sampled:
        t0 = time.perf_counter()
        rollout, metrics = self.collector.make_rollout(batch, ctx, tokenizer=self.tokenizer)  # as a synchronous step
        seconds = time.perf_counter() - t0
        passes = metrics.get("time/old_logprobs_s", 0.0) + metrics.get("time/ref_logprobs_s", 0.0)
        metrics.update(self._sampled_metrics(rollout, seconds, seconds - passes))
        return Sampled(rollout, None, metrics)

    @staticmethod
    def _sampled_metrics(rollout: RolloutBatch | None, rollout_s: float, generate_s: float) -> dict[str, float]:
        tokens = float(rollout.completion_mask.sum()) if rollout is not None else 0.0
        return {"time/rollout_s": rollout_s, "time/generate_s": generate_s, "perf/sampled_tokens": tokens}

    def _score(self, sampled: Sampled, ctx: StepContext) -> tuple[RolloutBatch | None, str | None, dict[str, float]]:
        if sampled.rollout is None:
            return None, None, {"time/scoring_s": 0.0}
        t0 = time.perf_counter()
        rollout, prm_error, metrics = self.collector.scorer.score(sampled.rollout, ctx)
        metrics["time/scoring_s"] = time.perf_counter() - t0
        return rollout, prm_error, metrics

    def finish(self, item: InFlight, ctx: StepContext) -> Collected:
        """The trained half of an in-flight batch: wait for it, run the trainer's passes (engines with their own
        weights), score it unless the background did, refill it under dynamic sampling."""
        t0 = time.perf_counter()
        wait_done(item.sampled)
        self.recover_failed(item)
        sampled = self._result(item.sampled, "sampling", item)
        waited = time.perf_counter() - t0
        metrics = dict(sampled.metrics)
        if item.scored is not None:
            t0 = time.perf_counter()
            rollout, prm_error, score_metrics = self._result(item.scored, "scoring", item)
            waited += time.perf_counter() - t0
            if not self.live_policy:
                metrics.update(self.collector.add_passes(Sampled(rollout, sampled.sampler_logprobs, {}), ctx))
        else:
            if not self.live_policy:
                metrics.update(self.collector.add_passes(sampled, ctx))
            rollout, prm_error, score_metrics = self._score(sampled, ctx)
        metrics.update(score_metrics)
        first = Round(rollout, prm_error, metrics, sampled.rollout is not None)
        if not self.collector.sampling.dynamic_sampling.enabled:
            collected = Collected(rollout, prm_error, not first.fitted, False, metrics)
        else:
            waited += self.wait()  # the refill rounds use the engine and the tokenizer on this thread
            kept, prm_error, no_prompts, no_signal = fill_batch(
                first, item.batch, self.collector.sampling.dynamic_sampling, ctx, self.seed,
                lambda prompts, round_index: self.collector.collect_round(prompts, ctx, round_index),
                pad_token_id(self.collector.tokenizer))
            collected = Collected(kept, prm_error, no_prompts, no_signal, metrics)
        collected.metrics.update(self._staleness(collected.rollout))
        collected.metrics["time/batch_wait_s"] = waited
        return collected

    def _staleness(self, rollout: RolloutBatch | None) -> dict[str, float]:
        """``rollout/staleness_mean|max``: weight versions between sampling each row and this update."""
        if rollout is None or rollout.policy_versions is None:
            return {}
        stale = (self.collector.weights_version - rollout.policy_versions).float()  # (B,)
        if int(stale.max()) > self.cfg.max_staleness or int(stale.min()) < 0:
            raise RuntimeError(f"asynchronous rollouts: rows sampled {int(stale.max())} versions before their update "
                               f"exceed model.async_rollout.max_staleness={self.cfg.max_staleness} (a bug: please "
                               "report it)")
        return {"rollout/staleness_mean": float(stale.mean()), "rollout/staleness_max": float(stale.max())}

    def _result(self, future: Future[T], phase: str, item: InFlight) -> T:
        try:
            return future.result()
        except BaseException as err:
            raise self._error(phase, item, err) from err

    def _error(self, phase: str, item: InFlight, err: BaseException) -> AsyncRolloutError:
        who = type(self.collector.engine).__name__ if phase == "sampling" else "the scorer (verifier, segmenter, PRM, " \
                                                                               "aligner)"
        return AsyncRolloutError(f"asynchronous rollouts: the background {phase} of loader batch {item.launch} "
                                 f"(weight version {item.version}) in {who} failed: {type(err).__name__}: {err}")

    def raise_failed(self) -> None:
        """Raise the first failure of a finished background job (called at every step, so a failure surfaces
        within one step)."""
        for item in self.inflight:
            for phase, future in (("sampling", item.sampled), ("scoring", item.scored)):
                if future is not None and future.done() and not future.cancelled() and future.exception() is not None:
                    raise self._error(phase, item, future.exception()) from future.exception()

    # ------------------------------------------------------------------ the engine and the background
    def wait_sampling(self) -> float:
        """Wait until no batch is being sampled in the background; the seconds waited."""
        t0 = time.perf_counter()
        for item in list(self.inflight):
            wait_done(item.sampled)
        return time.perf_counter() - t0

    def wait(self) -> float:
        """Wait until the background is idle (evaluation, checkpoints, refill rounds); the seconds waited."""
        t0 = time.perf_counter()
        self.wait_sampling()
        for item in list(self.inflight):
            if item.scored is not None:
                wait_done(item.scored)
        return time.perf_counter() - t0

    def sync_engine(self) -> None:
        """Bring the engine to the policy's version once no batch is being sampled with the previous one."""
        self.wait_sampling()
        self.collector.sync_engine()

    def close(self) -> None:
        """Drop the in-flight batches and end the background thread (fit end, exceptions)."""
        self.inflight.clear()
        self.worker.close()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The in-flight batches, sampled (their scoring is redone on load), with the launch count and the weight
        version they are relative to.

        Raises:
            AsyncRolloutError: a background job failed.
        """
        self.wait()
        self.recover_failed()
        self.wait()
        self.raise_failed()
        pending = []
        for item in self.inflight:
            sampled = item.sampled.result()
            pending.append({"launch": item.launch, "batch": item.batch, "version": item.version,
                            "rollout": _rollout_state(sampled.rollout), "sampler_logprobs": sampled.sampler_logprobs,
                            "metrics": dict(sampled.metrics)})
        return {"launched": self.launched, "weights_version": self.collector.weights_version, "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the in-flight batches of :meth:`state_dict`, their versions moved to the collector's count."""
        self.close()
        self.launched = int(state["launched"])
        shift = self.collector.weights_version - int(state["weights_version"])
        for entry in state["pending"]:
            rollout = _rollout_from_state(entry["rollout"], shift)
            sampled = Sampled(rollout, entry["sampler_logprobs"], dict(entry["metrics"]))
            self.inflight.append(InFlight(int(entry["launch"]), entry["batch"], int(entry["version"]) + shift,
                                          done_future(sampled)))


def pipeline_for(collector: RolloutCollector, cfg: AsyncRolloutConfig, needs: RunNeeds,
                 seed: int) -> RolloutCollector | AsyncRollouts:
    """The module's rollout source: ``collector`` itself, or (``cfg.enabled``) the pipeline over it, announced once."""
    if not cfg.enabled:
        return collector
    rollouts = AsyncRollouts(collector, cfg, needs, seed)
    rank_zero_info(rollouts.describe())
    return rollouts


def _rollout_state(rollout: RolloutBatch | None) -> dict[str, Any] | None:
    """A sampled, unscored rollout as plain tensors and lists (loadable with ``weights_only=True``)."""
    if rollout is None:
        return None
    if rollout.extras:
        raise ValueError(f"asynchronous rollouts cannot checkpoint RolloutBatch.extras set before scoring: "
                         f"{sorted(rollout.extras)}")
    return {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)
            if f.name not in _SCORED_FIELDS and f.name != "extras"}


def _rollout_from_state(state: dict[str, Any] | None, version_shift: int) -> RolloutBatch | None:
    if state is None:
        return None
    rollout = RolloutBatch(**state)
    if rollout.policy_versions is not None:
        rollout.policy_versions = rollout.policy_versions + version_shift
    return rollout


__all__ = ["AsyncRolloutError", "AsyncRollouts", "BackgroundWorker", "InFlight", "pipeline_for"]
