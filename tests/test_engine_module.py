"""The module and its rollout engine: capabilities decide the no-grad pass, the self-check and the IS-weighted loss,
sync after updates, stale engines refused (main environment, tiny models; the vLLM checks are in
test_engines_vllm.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from components.engines import AutoEngine, HFGenerateEngine
import prpo_lightning.training.updater as update
from prpo_lightning.config import LossConfig, OptimConfig
from prpo_lightning.rollout.engine import EngineCapabilities, RolloutResult, SampleRequest, StaleWeightsError
from prpo_lightning.training.logprobs import completion_logprobs
from prpo_lightning.config import MismatchCheck, RolloutCorrectionConfig, SamplerMismatchError
from prpo_lightning.rollout.sampling import left_pad, pad_token_id
from test_resume import ToyPrompts, make_module, make_trainer, tokenizer_dir

DELTA = 0.1  # the test engine's sampler log-probs are the trainer's minus DELTA on every sampled token


class OffsetLogprobEngine(HFGenerateEngine):
    """HF ``generate`` that claims not to be the trainer's distribution and reports ``log π − DELTA`` as its
    sampler log-probs (so every mismatch metric and IS weight has a hand-computable value)."""

    capabilities = EngineCapabilities(entropies=False, sampler_logprobs=True, exact_trainer_distribution=False)

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[torch.Tensor] = []  # (B,) completion lengths of every rollout

    def sample(self, request: SampleRequest) -> RolloutResult:
        res = super().sample(dataclasses.replace(request, record_entropies=False))
        prompts, num_generations, sampling = request.prompts, request.num_generations, request.sampling
        if not prompts:
            return res
        ids, mask = left_pad([p.tolist() for p in prompts], pad_token_id(self.tokenizer), self.device)  # (N, P)
        ids, mask = ids.repeat_interleave(num_generations, 0), mask.repeat_interleave(num_generations, 0)  # (B, P)
        with torch.no_grad():
            logp, _ = completion_logprobs(self.policy, ids, mask, res.completion_ids, res.completion_mask,
                                          sampling.temperature)  # (B, T)
        res.sampler_logprobs = (logp.float() - DELTA) * res.completion_mask  # (B, T)
        self.lengths.append(res.completion_mask.sum(dim=1))
        return res


class NoSyncEngine(HFGenerateEngine):
    """An engine whose ``sync_weights`` forgets to record the new version (the missed-sync bug)."""

    def sync_weights(self, policy, version=None) -> None:
        return None


def test_default_engine_is_auto_and_exact(tmp_path):
    module = make_module(tokenizer_dir(tmp_path), optim=OptimConfig(micro_batch_size=4), loss=LossConfig(kl_coef=0.0))
    assert isinstance(module.engine, AutoEngine)
    assert not module.plan.old_logprobs  # exact engine, on-policy update: no separate pass


def test_non_exact_engine_gets_a_logprob_pass_self_check_and_is_weights(tmp_path):
    engine = OffsetLogprobEngine()
    module = make_module(tokenizer_dir(tmp_path), engine=engine, loss=LossConfig(kl_coef=0.0),
                         optim=OptimConfig(lr=1e-2, micro_batch_size=4),
                         rollout_correction=RolloutCorrectionConfig(mode="token_truncate"),
                         rollout_check=MismatchCheck(metric="logp_diff_mean", threshold=0.5, mode="raise"))
    assert module.plan.old_logprobs and not module.plan.generation_entropies
    trainer = make_trainer(tmp_path, 1)
    trainer.fit(module, ToyPrompts(n=4, batch_size=2, seed=1))
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert m["train/rollout/logp_diff_mean"] == pytest.approx(DELTA, abs=1e-5)
    assert m["train/rollout/logp_diff_max"] == pytest.approx(DELTA, abs=1e-5)
    # log r = log π_trainer − log π_sampler = +DELTA per token: k3 = e^δ − 1 − δ, summed over each row's tokens
    lengths = engine.lengths[0].double()
    k3 = math.expm1(DELTA) - DELTA
    assert m["train/rollout/kl"] == pytest.approx(float((lengths * k3)[lengths > 0].mean()), rel=1e-3)
    # ρ = π_old / π_sampler = e^δ ≈ 1.105, inside TIS's [0, 2]: every weight is e^δ, nothing clipped
    assert m["train/is/weight_mean"] == pytest.approx(math.exp(DELTA), rel=1e-4)
    assert m["train/is/frac_clipped"] == 0.0
    assert engine.weight_version == module.collector.weights_version == 1  # synced after the optimizer step


def test_self_check_raises_through_the_module(tmp_path):
    module = make_module(tokenizer_dir(tmp_path), engine=OffsetLogprobEngine(), loss=LossConfig(kl_coef=0.0),
                         rollout_check=MismatchCheck(metric="logp_diff_max", threshold=DELTA / 2, mode="raise"))
    with pytest.raises(SamplerMismatchError, match="logp_diff_max"):
        make_trainer(tmp_path, 1).fit(module, ToyPrompts(n=4, batch_size=2, seed=1))


def test_missed_sync_is_refused(tmp_path):
    module = make_module(tokenizer_dir(tmp_path), engine=NoSyncEngine(), loss=LossConfig(kl_coef=0.0))
    with pytest.raises(StaleWeightsError, match="version 0 but the policy is at version 1"):
        make_trainer(tmp_path, 2).fit(module, ToyPrompts(n=4, batch_size=2, seed=1))


def test_is_weights_multiply_the_policy_gradient_term_by_hand():
    cfg = LossConfig(eps_low=0.2, eps_high=0.2, dual_clip=None)
    old = torch.log(torch.tensor([[0.5, 0.25]]))  # (1, 2)
    logp = old + torch.tensor([[0.1, -0.5]])  # ratios e^0.1 ≈ 1.10517 (inside), e^-0.5 ≈ 0.60653 (below 0.8)
    adv = torch.tensor([[1.0, -2.0]])
    w = torch.tensor([[2.0, 0.5]])
    pg, clipped = update.policy_gradient_terms(logp, old, adv, w, cfg)
    # token 0: −min(1.10517·1, 1.10517·1) = −1.10517, × 2 → −2.21034
    # token 1: −min(0.60653·(−2), 0.8·(−2)) = −min(−1.21306, −1.6) = 1.6 (clipped), × 0.5 → 0.8
    assert pg.tolist()[0] == pytest.approx([-2.0 * math.exp(0.1), 0.8], abs=1e-6)
    assert clipped.tolist() == [[False, True]]
    unweighted, _ = update.policy_gradient_terms(logp, old, adv, None, cfg)
    assert unweighted.tolist()[0] == pytest.approx([-math.exp(0.1), 1.6], abs=1e-6)


def test_module_loss_uses_the_rollout_is_weights(tmp_path):
    """pg_loss of the module's update equals the token-mean of w_t · PPO term (on-policy: term = −A_t)."""
    module = make_module(tokenizer_dir(tmp_path), loss=LossConfig(kl_coef=0.0), optim=OptimConfig(micro_batch_size=4))
    module.configure_model()
    module.updater.backward = lambda loss: loss.backward()
    from prpo_lightning.batch import RolloutBatch

    batch = RolloutBatch(
        prompt_ids=torch.tensor([[5, 6], [5, 6]]), prompt_mask=torch.ones(2, 2, dtype=torch.long),
        completion_ids=torch.tensor([[7, 8, 9], [7, 9, 0]]), completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        group_ids=torch.tensor([0, 0]), problems=["p", "p"], answers=["a", "a"], truncated=torch.zeros(2, dtype=torch.bool),
        advantages=torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]),
    )
    plain = module.updater.accumulate(batch, torch.arange(2), module.device)
    assert plain["pg_loss"] == pytest.approx(-(3 - 2) / 5, abs=1e-6)  # −mean(A) over 5 tokens
    batch.is_weights = torch.tensor([[2.0, 2.0, 2.0], [0.5, 0.5, 0.0]])
    weighted = module.updater.accumulate(batch, torch.arange(2), module.device)
    assert weighted["pg_loss"] == pytest.approx(-(6 - 1) / 5, abs=1e-6)  # −Σ w·A / 5
