"""Shared prompt prefixes: computing each distinct prompt once gives the same log-probs, entropies, gradients and
training updates as one forward pass per completion."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from test_resume import ToyPrompts, make_module, make_trainer, tokenizer_dir
from prpo_lightning.runtime.compat import enable_activation_checkpointing
from prpo_lightning.config import LossConfig, OptimConfig
from prpo_lightning.training.logprobs import completion_logprobs, shared_prompt_logits
from prpo_lightning.rollout.sampling import left_pad

PAD, V = 0, 64


def _model(model_type: str) -> torch.nn.Module:
    cfg = AutoConfig.for_model(
        model_type, vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=1,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).train()


def _batch() -> tuple[torch.Tensor, ...]:
    """3 prompts of different lengths × 3 completions each, rows shuffled, completions right-padded."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, V, (n,), generator=gen).tolist() for n in (4, 9, 6)]
    ids, mask = left_pad(prompts, PAD, torch.device("cpu"))  # (3, 9)
    order = torch.tensor([4, 0, 8, 2, 5, 1, 7, 3, 6])
    ids, mask = ids.repeat_interleave(3, 0)[order], mask.repeat_interleave(3, 0)[order]  # (9, 9)
    comp = torch.randint(2, V, (9, 7), generator=gen)  # (9, 7)
    lengths = torch.tensor([7, 3, 5, 7, 1, 6, 7, 2, 4])
    cmask = torch.arange(7)[None] < lengths[:, None]  # (9, 7)
    return ids, mask, torch.where(cmask, comp, PAD), cmask


def _logprobs_and_grads(model, share: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    ids, mask, comp, cmask = _batch()
    weights = torch.linspace(-1, 1, comp.numel()).view_as(comp)  # (9, 7) a fixed per-token "advantage"
    logp, ent = completion_logprobs(model, ids, mask, comp, cmask, 0.7, with_entropy=True, share_prompts=share)
    model.zero_grad()
    (logp * weights * cmask).sum().backward()
    return logp.detach(), ent, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_shared_prompts_give_the_same_logprobs_entropies_and_gradients(model_type):
    model = _model(model_type)
    logp, ent, grads = _logprobs_and_grads(model, share=False)
    s_logp, s_ent, s_grads = _logprobs_and_grads(model, share=True)
    assert torch.allclose(logp, s_logp, atol=1e-5)
    assert torch.allclose(ent, s_ent, atol=1e-5)
    for g, s in zip(grads, s_grads):
        assert torch.allclose(g, s, atol=1e-6, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_nothing_to_share_returns_none_and_gradient_checkpointing_is_refused():
    model = _model("qwen2")
    ids, mask, comp, cmask = _batch()
    attn = torch.cat([mask.long(), cmask.long()], dim=1)
    distinct = torch.tensor([1, 0, 2])  # rows 1, 0 and 2 hold three different prompts
    assert shared_prompt_logits(model, ids[distinct], mask[distinct], comp[distinct], attn[distinct]) is None
    enable_activation_checkpointing(model)
    model.config.use_cache = False
    with pytest.raises(RuntimeError, match="share_prompt_prefix"):
        shared_prompt_logits(model, ids, mask, comp, attn)


def _train(tmp_path, share: bool) -> dict[str, torch.Tensor]:
    module = make_module(
        tokenizer_dir(tmp_path), loss=LossConfig(kl_coef=0.01),
        optim=OptimConfig(lr=1e-2, micro_batch_size=4, ppo_epochs=2, share_prompt_prefix=share),
    )
    assert module.plan.share_prompt_prefix == share
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, ToyPrompts(n=8, batch_size=2, seed=1))
    return {k: v.clone() for k, v in module.policy.state_dict().items()}


def test_training_with_shared_prompts_reaches_the_same_weights(tmp_path):
    """Two rollouts × 2 PPO epochs with a KL reference: the old-log-prob, reference and training passes all
    share prompts (micro-batches of shuffled rows share partly)."""
    shared = _train(tmp_path / "shared", True)
    separate = _train(tmp_path / "separate", False)
    for name in shared:
        assert torch.allclose(shared[name], separate[name], atol=1e-5), name


def test_gradient_checkpointing_turns_sharing_off(tmp_path):
    module = make_module(tokenizer_dir(tmp_path), gradient_checkpointing=True)
    assert module.optim_cfg.share_prompt_prefix and not module.plan.share_prompt_prefix
