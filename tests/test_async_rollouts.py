"""Asynchronous rollouts (``model.async_rollout``): the pipeline's depth and staleness, advantages equal to the
synchronous step's, importance weights against hand-computed log-probs, background failures, no orphan threads,
exact resume after ``kill -9`` at several points, and the features that must keep working (dynamic sampling, LoRA,
reference sync, evaluation).

``SnapshotEngine`` stands in for vLLM on the CPU: it samples with Hugging Face ``generate`` from its own copy of the
weights (synced by copy, like an inference engine) and returns that copy's log-probs of the sampled tokens, so the
background-sampling path runs without vLLM (``tests/test_engines_vllm_module.py`` runs it with vLLM).
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from test_resume import GroupNormAligner, ParityVerifier, ToyPrompts, make_module, make_trainer, tokenizer_dir

from prpo_lightning.batch import StepContext
from prpo_lightning.config import (
    AsyncRolloutConfig, DynamicSamplingConfig, LoRAConfig, OptimConfig, RefSyncConfig, SamplingConfig,
)
from prpo_lightning.module import PRPOModule
from prpo_lightning.rollout.async_rollouts import AsyncRolloutError, AsyncRollouts
from prpo_lightning.rollout.engine import EngineCapabilities, EngineRecoveryNeeded, RolloutResult, SampleRequest
from prpo_lightning.rollout.engines import HFGenerateEngine
from prpo_lightning.rollout.sampling import left_pad, pad_token_id
from prpo_lightning.training.logprobs import batched_logprobs

REPO = Path(__file__).resolve().parents[1]
ASYNC = AsyncRolloutConfig(enabled=True)
THREAD = "prpo-async-rollouts"


class SnapshotEngine(HFGenerateEngine):
    """HF ``generate`` on the engine's own copy of the weights, which returns the copy's log-probs (like vLLM)."""

    capabilities = EngineCapabilities(entropies=False, sampler_logprobs=True, exact_trainer_distribution=False,
                                      supports_sleep=False, needs_weight_sync=True)

    def setup(self, policy, tokenizer, device=None, lockstep=False) -> None:
        super().setup(copy.deepcopy(policy).requires_grad_(False), tokenizer, device, lockstep)

    def sync_weights(self, policy, version=None) -> None:
        self.policy.load_state_dict(policy.state_dict())
        super().sync_weights(policy, version)

    @torch.no_grad()
    def sample(self, request: SampleRequest) -> RolloutResult:
        out = super().sample(request)
        if out.size == 0:
            return out
        g = request.num_generations
        p_ids, p_mask = left_pad([p.tolist() for p in request.prompts], pad_token_id(self.tokenizer), self.device)
        p_ids, p_mask = p_ids.repeat_interleave(g, 0), p_mask.repeat_interleave(g, 0)  # (B, P)
        logp, _ = batched_logprobs(self.policy, p_ids, p_mask, out.completion_ids, out.completion_mask,
                                   request.sampling.temperature, 64, with_entropy=False)
        out.sampler_logprobs = logp.float()  # (B, T)
        return out


class FailingVerifier(ParityVerifier):
    """Raises on its ``fail_at``-th batch (a bug in a user's verifier)."""

    def __init__(self, fail_at: int = 3) -> None:
        self.fail_at, self.calls = fail_at, 0

    def verify_batch(self, completions, answers, rows=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ZeroDivisionError("the verifier's own bug")
        return super().verify_batch(completions, answers, rows)


class FailingEngine(SnapshotEngine):
    """Fails on its third sampling call."""

    calls = 0

    def sample(self, request):
        type(self).calls += 1
        if type(self).calls == 3:
            raise ConnectionError("the inference server went away")
        return super().sample(request)


class DyingServerEngine(SnapshotEngine):
    """Like a launched server that dies during its ``die_at``-th sampling call (in the background): that call
    raises ``EngineRecoveryNeeded`` and so does every later one until :meth:`recover` runs. With ``repairable``
    False, that batch's groups (its seeds) keep failing after the recovery."""

    def __init__(self, die_at: int = 3, repairable: bool = True) -> None:
        super().__init__()
        self.die_at, self.repairable, self.dead, self.doomed = die_at, repairable, False, None
        self.calls: list[list[int]] = []  # the seeds of every sampling call
        self.recovered_on: list[bool] = []  # per recovery: on the main thread?

    def sample(self, request):
        self.calls.append(list(request.seeds))
        if len(self.calls) == self.die_at:
            self.dead, self.doomed = True, list(request.seeds)
        if self.dead or (not self.repairable and list(request.seeds) == self.doomed):
            assert threading.current_thread() is not threading.main_thread()
            raise EngineRecoveryNeeded("the launched server died during a background request")
        return super().sample(request)

    def recover(self) -> None:
        self.recovered_on.append(threading.current_thread() is threading.main_thread())
        self.dead = False


class Record(L.Callback):
    """Per loader batch: the global step after it and the async metrics of the step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = pl_module.step_metrics
        self.rows.append({"step": trainer.global_step, **{k: m[k] for k in m if "stale" in k or "logp_diff" in k}})
        pl_module.step_metrics = {}


class RecordingModule(PRPOModule):
    """Keeps every trained rollout with the policy's weights before its update."""

    def update_policy(self, rollout):
        if not hasattr(self, "trained"):
            self.trained = []
        state = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        self.trained.append((rollout, state))
        return super().update_policy(rollout)


def _no_worker_thread() -> bool:
    return not any(t.name == THREAD and t.is_alive() for t in threading.enumerate())


def test_max_staleness_must_be_a_positive_integer():
    assert AsyncRolloutConfig().enabled is False and AsyncRolloutConfig().max_staleness == 1
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="max_staleness must be an integer >= 1"):
            AsyncRolloutConfig(enabled=True, max_staleness=bad)


@pytest.mark.parametrize("depth", [1, 2])
def test_the_pipeline_fills_then_trains_every_batch_at_most_max_staleness_versions_old(tmp_path, depth):
    tok = tokenizer_dir(tmp_path)
    module, rec = make_module(tok, async_rollout=AsyncRolloutConfig(enabled=True, max_staleness=depth)), Record()
    make_trainer(tmp_path, 4, [rec]).fit(module, ToyPrompts())
    assert isinstance(module.rollouts, AsyncRollouts) and module.rollouts.live_policy
    steps = [r["step"] for r in rec.rows]
    assert steps == [0] * depth + [1, 2, 3, 4]  # the first `depth` loader batches only fill the pipeline
    stale = [r["train/rollout/staleness_max"] for r in rec.rows[depth:]]
    # batch b is sampled at version max(0, b - depth) and trained at version b - depth: hand values
    assert stale == [float(min(s, depth)) for s in range(4)]
    assert module.global_step == 4 and _no_worker_thread()


@pytest.mark.parametrize("engine", ["live", "snapshot"])
def test_without_an_update_between_the_async_batch_equals_the_synchronous_one(tmp_path, engine):
    """Same weights, same loader batch, same seeds: the pipeline's rollout (sampling, passes, scores, advantages and
    importance weights) equals the synchronous collector's, value for value (two PPO epochs: both plan the old
    log-prob pass)."""
    tok = tokenizer_dir(tmp_path)
    optim = OptimConfig(lr=1e-2, warmup_steps=1, schedule="linear", total_steps=4, micro_batch_size=4, ppo_epochs=2)

    def built(async_rollout):
        m = make_module(tok, async_rollout=async_rollout, optim=optim,
                        **({"engine": SnapshotEngine()} if engine == "snapshot" else {}))
        m.configure_model()
        m.collector.setup_engine(torch.device("cpu"))
        return m

    a_batch = {"id": torch.tensor([0, 3]), "problem": ["0+0=", "3+3="], "answer": ["0", "6"]}
    b_batch = {"id": torch.tensor([1, 2]), "problem": ["1+1=", "2+2="], "answer": ["2", "4"]}
    ctx = StepContext(0, 0, 1, torch.device("cpu"), None)
    sync = built(AsyncRolloutConfig()).collector.collect(a_batch, ctx).rollout
    pipeline = built(ASYNC).rollouts
    assert pipeline.collect(a_batch, ctx) is None
    got = pipeline.collect(b_batch, ctx).rollout
    pipeline.close()
    assert sync.completions == got.completions
    for name in ("completion_ids", "old_logprobs", "entropies", "ref_logprobs", "outcome_rewards", "advantages",
                 "is_weights", "policy_versions"):
        want, have = getattr(sync, name), getattr(got, name)
        assert (want is None) == (have is None), name
        if want is not None:
            assert torch.equal(want, have), name
    assert (got.is_weights is not None) == (engine == "snapshot")


def test_background_sampling_importance_weights_equal_hand_computed_log_prob_ratios(tmp_path):
    """Rows sampled at version v − 1 and trained at v: ``old_logprobs`` are the trained weights' (recomputed here with
    a plain forward pass), the weights ``min(π_v / π_{v−1}, 2)`` (TIS), and the self-check, which compares weights of
    different versions, only logs (lr 1e-2 moves the log-probs far past its 1e-3 threshold)."""
    tok = tokenizer_dir(tmp_path)
    module, rec = make_module(tok, RecordingModule, engine=SnapshotEngine(), async_rollout=ASYNC), Record()
    make_trainer(tmp_path, 3, [rec]).fit(module, ToyPrompts())
    assert not module.rollouts.live_policy
    assert max(r.get("train/rollout/logp_diff_max", 0.0) for r in rec.rows) > 1e-2  # measured, not raised
    states = [state for _, state in module.trained]
    net = copy.deepcopy(module.policy)
    checked = 0
    for k, (rollout, state) in enumerate(module.trained):
        versions = rollout.policy_versions.unique().tolist()
        assert versions == [max(k - 1, 0)]  # batch k sampled one version before its update (the first: none)
        logp = {}
        for v in {versions[0], k}:
            net.load_state_dict(states[v])
            ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # (B, P + T)
            mask = torch.cat([rollout.prompt_mask.long(), rollout.completion_mask.long()], dim=1)
            with torch.no_grad():
                logits = net(input_ids=ids, attention_mask=mask,
                             position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits.float()
            p = rollout.prompt_ids.shape[1]
            lp = torch.log_softmax(logits[:, p - 1:-1], dim=-1).gather(-1, rollout.completion_ids[..., None])[..., 0]
            logp[v] = lp * rollout.completion_mask
        m = rollout.completion_mask
        torch.testing.assert_close(rollout.old_logprobs[m], logp[k][m], rtol=0, atol=2e-5)
        want = torch.exp(logp[k] - logp[versions[0]]).clamp(max=2.0)
        torch.testing.assert_close(rollout.is_weights[m], want[m], rtol=0, atol=2e-4)
        checked += int(versions[0] != k and bool((want[m] != 1).any()))
    assert checked >= 1  # a stale batch whose weights are not all 1


def test_a_failing_background_scorer_surfaces_within_one_step_with_its_cause(tmp_path):
    tok = tokenizer_dir(tmp_path)
    module, rec = make_module(tok, verifier=FailingVerifier(fail_at=3), async_rollout=ASYNC), Record()
    with pytest.raises(AsyncRolloutError, match=r"background scoring of loader batch 2 .*verifier FailingVerifier "
                                                r"failed .*ZeroDivisionError: the verifier's own bug") as err:
        make_trainer(tmp_path, 4, [rec]).fit(module, ToyPrompts())
    cause = err.value.__cause__  # the scorer's error naming the component, then the component's own traceback
    assert isinstance(cause.__cause__, ZeroDivisionError) and cause.__cause__.__traceback__ is not None
    assert len(rec.rows) <= 3  # batch 2 was launched at the third loader batch; the fourth step raised
    assert _no_worker_thread()


def test_a_failing_background_engine_is_named(tmp_path):
    tok = tokenizer_dir(tmp_path)
    FailingEngine.calls = 0
    module = make_module(tok, engine=FailingEngine(), async_rollout=ASYNC)
    with pytest.raises(AsyncRolloutError, match="background sampling of loader batch 2 .* in FailingEngine failed: "
                                                "ConnectionError: the inference server went away"):
        make_trainer(tmp_path, 4).fit(module, ToyPrompts())
    assert _no_worker_thread()


@pytest.mark.parametrize("die_at", [1, 3])
def test_a_batch_whose_server_died_in_the_background_is_sampled_again_after_a_main_thread_recovery(tmp_path, die_at):
    """die_at 3: batch 2, launched at version 1, fails; the sync to version 2 waits for it, so the next step finds
    the failure, samples it again at version 2 and trains it there (staleness 0). die_at 1: batch 0 (no update
    before it) fails, found at the next step or while it is being taken: sampled again at version 0."""
    tok = tokenizer_dir(tmp_path)
    engine, rec = DyingServerEngine(die_at=die_at), Record()
    module = make_module(tok, engine=engine, async_rollout=ASYNC)
    batch, version = (2, 2) if die_at == 3 else (0, 0)
    with pytest.warns(UserWarning, match=f"server died during a background request; loader batch {batch} is sampled "
                                         f"again with weight version {version}"):
        make_trainer(tmp_path, 4, [rec]).fit(module, ToyPrompts())
    assert engine.recovered_on == [True]  # once, on the main thread
    # 5 loader batches (4 steps + the pipeline's first) and the resample; with die_at 1, batch 1 may also have
    # met the dead engine before the recovery (then it is resampled too, by the same recovery)
    assert len(engine.calls) == 5 + 1 if die_at == 3 else len(engine.calls) in (6, 7)
    assert engine.calls.count(engine.doomed) == 2  # the failed call and its resample, same seeds
    assert module.global_step == 4 and [r["step"] for r in rec.rows] == [0, 1, 2, 3, 4]
    want = [0.0, 1.0, 0.0, 1.0] if die_at == 3 else [0.0, 1.0, 1.0, 1.0]  # batch 3 is launched at version 2
    assert [r["train/rollout/staleness_max"] for r in rec.rows[1:]] == want
    assert _no_worker_thread()


def test_a_server_that_stays_dead_after_recovery_raises_after_one_resample(tmp_path):
    tok = tokenizer_dir(tmp_path)
    engine = DyingServerEngine(die_at=3, repairable=False)
    module = make_module(tok, engine=engine, async_rollout=ASYNC)
    with pytest.warns(UserWarning, match="sampled again"), pytest.raises(
            AsyncRolloutError, match="background sampling of loader batch 2 .*EngineRecoveryNeeded: the launched server"):
        make_trainer(tmp_path, 4).fit(module, ToyPrompts())
    assert engine.recovered_on == [True] and engine.calls.count(engine.doomed) == 2  # one resample, then the error
    assert _no_worker_thread()


@pytest.mark.parametrize("features", ["ref_sync", "lora"])
def test_dynamic_sampling_lora_ref_sync_and_evaluation_run_with_async_rollouts(tmp_path, features):
    """Refill rounds are sampled on the current weights (staleness 0), so a refilled batch's mean staleness is in
    [0, 1]; LoRA adapters (no reference sync: the reference is the base), the reference sync and a held-out
    evaluation every 2 steps work as in a synchronous run."""
    from prpo_lightning.callbacks import MathEvalCallback

    tok = tokenizer_dir(tmp_path)
    sampling = SamplingConfig(num_generations=4, max_new_tokens=8, max_prompt_length=32,
                              dynamic_sampling=DynamicSamplingConfig(enabled=True, max_rounds=2))
    extra: dict[str, Any] = ({"lora": LoRAConfig(r=4)} if features == "lora" else {"ref_sync": RefSyncConfig(
        sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=2)})
    module = make_module(tok, engine=SnapshotEngine(), sampling=sampling, async_rollout=ASYNC, **extra)
    rec, evaluation = Record(), MathEvalCallback(every_n_steps=2)
    make_trainer(tmp_path, 4, [rec, evaluation], limit_val_batches=None).fit(module, ToyPrompts(n=12, batch_size=4))
    means = [r["train/rollout/staleness_mean"] for r in rec.rows if "train/rollout/staleness_mean" in r]
    assert len(means) >= 3 and all(0.0 <= m <= 1.0 for m in means)
    assert module.global_step == 4 and len(evaluation.history) >= 2
    assert _no_worker_thread()


# ---------------------------------------------------------------- exact resume after kill -9
_CHILD = r"""
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from lightning.pytorch.callbacks import ModelCheckpoint
import lightning as L
from test_resume import ToyPrompts, make_module, make_trainer
from test_async_rollouts import SnapshotEngine
from prpo_lightning.config import AsyncRolloutConfig
torch.set_num_threads(1)
root, tok, kill, engine, steps = {root!r}, {tok!r}, {kill!r}, {engine!r}, {steps}

class Kill(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if kill == f"update{{trainer.global_step}}":
            os.kill(os.getpid(), signal.SIGKILL)  # in the middle of an update
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if kill == f"end{{trainer.global_step}}":
            os.kill(os.getpid(), signal.SIGKILL)  # after the update, before the step's checkpoint

class KillingEngine(SnapshotEngine):
    launches = 0
    def sample(self, request):
        type(self).launches += 1
        if kill == f"sampling{{type(self).launches}}":
            os.kill(os.getpid(), signal.SIGKILL)  # in the background thread, while the policy updates
        return super().sample(request)

eng = {{"live": None, "snapshot": KillingEngine()}}[engine]
module = make_module(tok, async_rollout=AsyncRolloutConfig(enabled=True), **({{"engine": eng}} if eng else {{}}))
ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True, save_top_k=-1)
last = os.path.join(root, "last.ckpt")
make_trainer(root, steps, [Kill(), ckpt], enable_checkpointing=True).fit(
    module, ToyPrompts(), ckpt_path=last if os.path.exists(last) else None)
torch.save(module.policy.state_dict(), os.path.join(root, "final.pt"))
"""


def _run_child(root: Path, tok: str, kill: str, engine: str, steps: int) -> int:
    code = _CHILD.format(tests=str(REPO / "tests"), root=str(root), tok=tok, kill=kill, engine=engine, steps=steps)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-4000:])
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("engine,kills", [("snapshot", ["sampling4", "update3", "end2"]), ("live", ["update2"])])
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_weights(tmp_path, engine, kills):
    """kill -9 in the background sampling, in the middle of an update, between an update and its checkpoint: each
    resumed run ends with exactly the weights of the run that was never killed."""
    tok = tokenizer_dir(tmp_path)
    steps = 4  # make_module's linear schedule spans 4 steps
    assert _run_child(tmp_path / "straight", tok, "", engine, steps) == 0
    want = torch.load(tmp_path / "straight" / "final.pt")
    for kill in kills:
        root = tmp_path / kill
        assert _run_child(root, tok, kill, engine, steps) == -signal.SIGKILL, kill
        assert (root / "last.ckpt").exists(), kill
        assert _run_child(root, tok, "", engine, steps) == 0, kill
        got = torch.load(root / "final.pt")
        for name in want:
            assert torch.equal(want[name], got[name]), (kill, name)


def test_async_accuracy_pairs_each_seed_with_its_synchronous_run(tmp_path):
    """``benchmarks/async_accuracy.py`` on hand-made runs: final held-out accuracies, paired async − sync."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    import async_accuracy

    finals = {"grpo": [0.40, 0.50, 0.45], "grpo_async": [0.42, 0.49, 0.47], "prpo_rule_prm": [0.5, 0.5, 0.5],
              "prpo_rule_prm_async": [0.5, 0.5, 0.5]}
    for method, values in finals.items():
        for seed, value in enumerate(values):
            path = tmp_path / method / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"curves": {"eval/accuracy": [[0, 0.1], [20, value]]}}))
    out = async_accuracy.compare(tmp_path, [0, 1, 2])
    assert out["grpo"]["sync"] == [0.40, 0.50, 0.45] and out["grpo"]["async"] == [0.42, 0.49, 0.47]
    assert out["grpo"]["async_minus_sync"] == pytest.approx((0.02 - 0.01 + 0.02) / 3)
    assert out["grpo"]["sign_flip_p"] == pytest.approx(4 / 8)  # |sum| >= 0.03 for 4 of the 8 sign patterns
    assert out["prpo_rule_prm"]["async_minus_sync"] == 0.0 and out["prpo_rule_prm"]["paired_t_p"] == 1.0


class Interrupt(L.Callback):
    """Ctrl-C at the end of the second loader batch (the background is then sampling or scoring the next one)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            raise KeyboardInterrupt


def test_ctrl_c_ends_the_background_thread(tmp_path):
    tok = tokenizer_dir(tmp_path)
    module = make_module(tok, engine=SnapshotEngine(), async_rollout=ASYNC)
    trainer = make_trainer(tmp_path, 4, [Interrupt()])
    try:  # Lightning turns Ctrl-C into a graceful stop (some versions exit)
        trainer.fit(module, ToyPrompts())
    except SystemExit:
        pass
    assert trainer.interrupted and module.global_step == 1 and _no_worker_thread()
