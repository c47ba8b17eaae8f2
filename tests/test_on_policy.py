"""The on-policy shortcut (no separate old-log-prob pass) gives the same update as the explicit pass."""

from __future__ import annotations

import dataclasses

import torch

from test_resume import ToyPrompts, make_module, make_trainer, tokenizer_dir
from prpo_lightning.config import LossConfig, OptimConfig
from prpo_lightning.module import PRPOModule


class ExplicitPass(PRPOModule):
    """Forces the separate no-grad pass after sampling."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plan = dataclasses.replace(self.plan, old_logprobs=True)


def _train(tmp_path, cls) -> tuple[dict, dict]:
    module = make_module(
        tokenizer_dir(tmp_path), cls,
        loss=LossConfig(kl_coef=0.0), optim=OptimConfig(lr=1e-2, micro_batch_size=4),
    )
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, ToyPrompts(n=8, batch_size=2, seed=1))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {k: v.clone() for k, v in module.policy.state_dict().items()}, metrics


def test_shortcut_is_selected_only_when_on_policy(tmp_path):
    tok = tokenizer_dir(tmp_path)
    assert not make_module(tok, optim=OptimConfig(micro_batch_size=4), loss=LossConfig(kl_coef=0.01)).plan.old_logprobs
    assert make_module(tok, optim=OptimConfig(ppo_epochs=2)).plan.old_logprobs
    assert make_module(tok, optim=OptimConfig(mini_batch_size=4)).plan.old_logprobs


def test_on_policy_shortcut_matches_explicit_old_logprob_pass(tmp_path):
    fast_state, fast = _train(tmp_path / "fast", PRPOModule)
    slow_state, slow = _train(tmp_path / "slow", ExplicitPass)
    for name in fast_state:
        assert torch.allclose(fast_state[name], slow_state[name], atol=1e-6), name
    assert fast["train/clip_frac"] == 0.0
    assert abs(fast["train/entropy"] - slow["train/entropy"]) < 1e-4
    assert abs(fast["train/loss"] - slow["train/loss"]) < 1e-6


def test_entropy_spike_prpo_records_entropies_during_generation(tmp_path):
    """PRPO with an entropy-spike segmenter needs entropies but, on-policy, no separate pass computes them."""
    from components.aligners import PRPOAligner
    from components.prms import EquationCheckPRM, ImplicitPRM
    from components.segmenters import EntropySpikeSegmenter

    tok = tokenizer_dir(tmp_path)
    module = make_module(tok, aligner=PRPOAligner(), segmenter=EntropySpikeSegmenter(min_gap=2), prm=EquationCheckPRM(),
                         loss=LossConfig(kl_coef=0.0), optim=OptimConfig(micro_batch_size=4))
    assert module.plan.generation_entropies and not module.plan.old_logprobs
    trainer = make_trainer(tmp_path, 1)
    trainer.fit(module, ToyPrompts(n=4, batch_size=2, seed=1))
    assert trainer.callback_metrics["train/segments/per_completion"] >= 1
    assert float(trainer.callback_metrics["train/entropy"]) > 0
    implicit = make_module(tok, aligner=PRPOAligner(), segmenter=EntropySpikeSegmenter(), prm=ImplicitPRM())
    assert implicit.plan.old_logprobs and not implicit.plan.generation_entropies
