"""Our loss variants against TRL 1.16's ``GRPOTrainer._compute_loss`` on one fixed batch: loss and gradients.

Both sides hold the same tiny Qwen2 weights and see the same prompts, completions, old and reference log-probs and
advantages (off-policy, so ratios differ from 1 and clipping happens). Ours runs the module's real update path
(:meth:`PRPOModule._accumulate_gradients`, one micro-batch); TRL runs its own loss on its own forward pass. TRL's
``loss_type`` fixes the aggregation: ``grpo`` = our ``seq-mean-token-mean``, ``dapo``/``cispo`` = ``token-mean``
(their normaliser ``num_items_in_batch`` is the batch's token count).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.config import LossConfig, OptimConfig
from prpo_lightning.training.logprobs import completion_logprobs
from test_resume import make_module, tokenizer_dir

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PROMPT_IDS = torch.tensor([[5, 6, 7], [5, 6, 7], [8, 9, 10], [8, 9, 10]])  # (B=4, P=3): 2 prompts × G=2
COMPLETION_IDS = torch.tensor([[11, 12, 13, 14], [15, 16, 0, 0], [17, 18, 19, 0], [20, 21, 22, 23]])  # (4, T=4)
COMPLETION_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])  # (4, 4), 13 tokens
SEQ_ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])  # (4,) one advantage per completion (GRPO-style)
# old = logp + OLD_SHIFT, ref = logp + REF_SHIFT: ratios exp(−shift) span both clip sides and CISPO's cap 5
OLD_SHIFT = torch.tensor([[0.1, -0.3, 0.25, 2.0], [-0.5, 0.05, 0.0, 0.0], [0.3, -1.9, 0.1, 0.0],
                          [-0.1, 0.4, -0.2, 0.15]])  # (4, 4)
REF_SHIFT = torch.tensor([[0.2, -0.1, 0.3, 0.1], [0.05, -0.2, 0.0, 0.0], [-0.3, 0.1, 0.2, 0.0],
                          [0.1, 0.1, -0.1, 0.25]])  # (4, 4)

# (our LossConfig fields, TRL GRPOConfig fields)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sequence_grpo": (dict(importance_sampling_level="sequence", aggregation="seq-mean-token-mean"),
                      dict(importance_sampling_level="sequence", loss_type="grpo")),
    "sequence_token_mean": (dict(importance_sampling_level="sequence"),
                            dict(importance_sampling_level="sequence", loss_type="dapo")),
    "cispo": (dict(policy_loss="cispo", cispo_max_ratio=5.0), dict(loss_type="cispo", epsilon_high=5.0)),
    "cispo_sequence": (dict(policy_loss="cispo", cispo_max_ratio=1.1, importance_sampling_level="sequence"),
                       dict(loss_type="cispo", epsilon_high=1.1, importance_sampling_level="sequence")),
    "kl_bias_correction": (dict(kl_coef=0.05, kl_bias_correction=True),
                           dict(loss_type="dapo", beta=0.05, use_bias_correction_kl=True)),
    "kl_plain": (dict(kl_coef=0.05, kl_bias_correction=False),
                 dict(loss_type="dapo", beta=0.05, use_bias_correction_kl=False)),
    "top_entropy_quantile": (dict(top_entropy_quantile=0.4), dict(loss_type="dapo", top_entropy_quantile=0.4)),
    "entropy_coef": (dict(entropy_coef=0.03), dict(loss_type="dapo", entropy_coef=0.03)),
    "all_but_entropy": (dict(importance_sampling_level="sequence", policy_loss="cispo", cispo_max_ratio=1.1,
                             kl_coef=0.05, kl_bias_correction=True, top_entropy_quantile=0.5),
                        dict(importance_sampling_level="sequence", loss_type="cispo", epsilon_high=1.1, beta=0.05,
                             use_bias_correction_kl=True, top_entropy_quantile=0.5)),
}


def _trl_loss_and_grads(policy: torch.nn.Module, tok_dir: str, tmp_path, trl_kw: dict[str, Any],
                        inputs: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    base = dict(epsilon=0.2, beta=0.0)
    base.update(trl_kw)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
        temperature=1.0, use_cpu=True, report_to="none", bf16=False, fp16=False, gradient_checkpointing=False,
        **base,
    )
    model = copy.deepcopy(policy)
    model.save_pretrained(tmp_path / "policy")  # TRL builds its reference model (beta > 0) from the config's path
    model.config._name_or_path = str(tmp_path / "policy")
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": "1+1"}] * 4),
        processing_class=AutoTokenizer.from_pretrained(tok_dir),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); one step, no accumulation
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradient_equal_trl(case, tmp_path):
    ours_kw, trl_kw = CASES[case]
    tok = tokenizer_dir(tmp_path)
    module = make_module(tok, loss=LossConfig(eps_low=0.2, eps_high=0.2, dual_clip=None, **ours_kw),
                         optim=OptimConfig(ppo_epochs=2, micro_batch_size=8))  # ppo_epochs=2: old log-probs from the batch
    module.configure_model()
    module.updater.backward = lambda loss: loss.backward()
    assert module.plan.old_logprobs
    policy = module.policy
    policy.train()
    with torch.no_grad():
        logp, _ = completion_logprobs(policy, PROMPT_IDS, torch.ones_like(PROMPT_IDS), COMPLETION_IDS,
                                      COMPLETION_MASK)  # (4, 4)
    old = (logp + OLD_SHIFT) * COMPLETION_MASK  # (4, 4)
    ref = (logp + REF_SHIFT) * COMPLETION_MASK  # (4, 4)
    batch = RolloutBatch(
        prompt_ids=PROMPT_IDS, prompt_mask=torch.ones_like(PROMPT_IDS), completion_ids=COMPLETION_IDS,
        completion_mask=COMPLETION_MASK, group_ids=torch.tensor([0, 0, 1, 1]), problems=["p", "p", "q", "q"],
        answers=["a"] * 4, truncated=torch.zeros(4, dtype=torch.bool),
        advantages=SEQ_ADVANTAGES[:, None] * COMPLETION_MASK,  # (4, 4)
        old_logprobs=old, ref_logprobs=ref,
    )
    trl_inputs = dict(prompt_ids=PROMPT_IDS, prompt_mask=torch.ones_like(PROMPT_IDS), completion_ids=COMPLETION_IDS,
                      completion_mask=COMPLETION_MASK, advantages=SEQ_ADVANTAGES, old_per_token_logps=old,
                      ref_per_token_logps=ref, num_items_in_batch=COMPLETION_MASK.sum().float())
    trl_loss, trl_grads = _trl_loss_and_grads(policy, tok, tmp_path, trl_kw, trl_inputs)

    policy.zero_grad()
    stats = module.updater.accumulate(batch, torch.arange(4), module.device)
    assert stats["loss"] == pytest.approx(trl_loss, rel=1e-5, abs=1e-7)
    ours = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert set(ours) == set(trl_grads)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert any(float(g.abs().max()) > 0 for g in ours.values())
