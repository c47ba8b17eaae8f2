"""Issue 24: token-budget micro-batches (``optim.micro_batch_tokens``) and padding-free packed passes
(``optim.packing``) give the padded passes' log-probs, losses, gradients and weights (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_qwen2_config
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.config import LoRAConfig, LossConfig, OptimConfig, SamplingConfig
from prpo_lightning.rollout.engine import EngineCapabilities
from prpo_lightning.training.logprobs import batched_logprobs, completion_logprobs
from prpo_lightning.training.packing import (
    check_packing_support, micro_batches, packed_completion_logits, row_lengths, trim_padding,
)
from prpo_lightning.training.plan import RunNeeds, plan_passes
from prpo_lightning.training.policy import build_policy
from prpo_lightning.training.updater import PolicyUpdater

T_MAX, P_MAX, VOCAB = 24, 7, 128
CAPS = EngineCapabilities(entropies=True, exact_trainer_distribution=True, needs_weight_sync=False)
VARIANTS = {  # each against the padded passes of micro_batch_size=3 rows
    "packed": dict(packing=True, share_prompt_prefix=False),
    "budget": dict(micro_batch_tokens=60),
    "budget_packed": dict(micro_batch_tokens=60, packing=True, share_prompt_prefix=False),
    "budget_below_longest_row": dict(micro_batch_tokens=8, packing=True, share_prompt_prefix=False),
}


def _model(gradient_checkpointing: bool = False, lora: LoRAConfig | None = None, attn: str | None = None):
    cfg = tiny_qwen2_config(vocab_size=VOCAB, hidden=32, layers=2)
    if attn is not None:
        cfg["attn_implementation"] = attn
    sampling = SamplingConfig(max_new_tokens=T_MAX, max_prompt_length=P_MAX)
    policy, _ = build_policy(None, cfg, "float32", 0, sampling, gradient_checkpointing, lora, None, False)
    return policy


def _rows(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Completions of every length from 1 to ``T_MAX`` (plus an empty one), prompts of 1 to ``P_MAX`` tokens, each
    prompt shared by 4 consecutive rows (a group: the shared-prompt pass has something to share)."""
    g = torch.Generator().manual_seed(seed)
    c_len = torch.cat([torch.randperm(T_MAX, generator=g) + 1, torch.tensor([0])])  # (B,)
    b = c_len.shape[0]
    group = torch.arange(b) // 4  # (B,)
    p_len = torch.randint(1, P_MAX + 1, (b,), generator=g)[group]  # (B,)
    p_mask = (torch.arange(P_MAX)[None] >= P_MAX - p_len[:, None]).long()  # (B, P) left padding
    c_mask = (torch.arange(T_MAX)[None] < c_len[:, None]).long()  # (B, T) right padding
    p_ids = torch.randint(3, VOCAB, (b, P_MAX), generator=g)[group] * p_mask  # (B, P)
    c_ids = torch.randint(3, VOCAB, (b, T_MAX), generator=g) * c_mask  # (B, T)
    return p_ids, p_mask, c_ids, c_mask


# ---------------------------------------------------------------- grouping, by hand
def test_micro_batches_by_hand():
    lengths = torch.tensor([5, 1, 9, 3, 3])
    as_lists = lambda pieces: [p.tolist() for p in pieces]  # noqa: E731
    assert as_lists(micro_batches(lengths, 2)) == [[0, 1], [2, 3], [4]]  # no budget: rows in order
    # sorted 9(r2) 5(r0) 3(r3) 3(r4) 1(r1); padded cost = rows × longest: [9] | 2·5=10 | 3·5>10 -> [3], 2·3=6
    assert as_lists(micro_batches(lengths, 2, tokens=10)) == [[2], [0, 3], [4, 1]]
    # padded at 12: [9] (18 > 12) | [5, 3] (10; 15 > 12) | [3, 1]
    assert as_lists(micro_batches(lengths, 2, tokens=12)) == [[2], [0, 3], [4, 1]]
    # packed cost = sum of lengths: [9] (14 > 12) | 5+3+3+1 = 12
    assert as_lists(micro_batches(lengths, 2, tokens=12, packed=True)) == [[2], [0, 3, 4, 1]]
    # a row longer than the budget goes alone; ties keep the row order
    assert as_lists(micro_batches(torch.tensor([2, 50, 2]), 1, tokens=4, packed=True)) == [[1], [0, 2]]
    pieces = micro_batches(torch.randint(1, 40, (37,), generator=torch.Generator().manual_seed(0)), 3, tokens=64)
    assert sorted(torch.cat(pieces).tolist()) == list(range(37))


def test_row_lengths_and_trim_padding_by_hand():
    p_mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    c_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert row_lengths(p_mask, c_mask).tolist() == [4, 2]
    p_ids, pm, c_ids, cm = trim_padding(p_mask * 7, p_mask, c_mask * 5, c_mask)
    assert pm.tolist() == [[1, 1], [0, 1]] and p_ids.tolist() == [[7, 7], [0, 7]]
    assert cm.tolist() == [[1, 1], [1, 0]] and c_ids.tolist() == [[5, 5], [5, 0]]


def test_packed_pass_feeds_one_sequence_with_restarting_positions():
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, input_ids, position_ids, use_cache, logits_to_keep, **kwargs):
            seen.update(ids=input_ids, pos=position_ids, keep=logits_to_keep, use_cache=use_cache, **kwargs)
            return type("Out", (), {"logits": torch.zeros(1, len(logits_to_keep), 3)})()

    p_ids, p_mask = torch.tensor([[0, 4, 5], [6, 7, 8]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    c_ids, c_mask = torch.tensor([[9, 10], [11, 0]]), torch.tensor([[1, 1], [1, 0]])
    assert packed_completion_logits(Recorder(), p_ids, p_mask, c_ids, c_mask).shape == (3, 3)
    assert seen["ids"].tolist() == [[4, 5, 9, 10, 6, 7, 8, 11]]
    assert seen["pos"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert seen["keep"].tolist() == [1, 2, 6] and seen["use_cache"] is False  # the token before each completion token
    assert seen["cu_seq_lens_q"].tolist() == seen["cu_seq_lens_k"].tolist() == [0, 4, 8]  # row boundaries
    assert seen["max_length_q"] == seen["max_length_k"] == 4
    with pytest.raises(ValueError, match="right-padded"):
        packed_completion_logits(Recorder(), p_ids, p_mask, c_ids, torch.tensor([[0, 1], [1, 0]]))


# ---------------------------------------------------------------- log-probs
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_regrouped_logprobs_equal_padded(variant, attn):
    model = _model(attn=attn)
    p_ids, p_mask, c_ids, c_mask = _rows()
    want_lp, want_ent = batched_logprobs(model, p_ids, p_mask, c_ids, c_mask, 0.7, 3, with_entropy=True)  # padded
    opts = VARIANTS[variant]
    lp, ent = batched_logprobs(model, p_ids, p_mask, c_ids, c_mask, 0.7, 3, with_entropy=True,
                               share_prompts=opts.get("share_prompt_prefix", True),
                               micro_batch_tokens=opts.get("micro_batch_tokens"), packing=opts.get("packing", False))
    assert lp.shape == want_lp.shape and bool((lp[c_mask == 0] == 0).all())
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-5)


def test_packed_rows_do_not_see_each_other():
    """A changed token of one row changes no log-prob of the other rows of the packed pass (only its own)."""
    model = _model().eval()
    p_ids, p_mask, c_ids, c_mask = _rows()
    with torch.no_grad():
        a, _ = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, packed=True)
        c_ids2 = c_ids.clone()
        c_ids2[0, 0] = (c_ids2[0, 0] + 1) % VOCAB
        b, _ = completion_logprobs(model, p_ids, p_mask, c_ids2, c_mask, packed=True)
    assert torch.equal(a[1:], b[1:]) and not torch.equal(a[0], b[0])


@pytest.mark.parametrize("setting", ["gradient_checkpointing", "lora"])
def test_packed_gradients_equal_padded_with_lora_and_gradient_checkpointing(setting):
    gc = setting == "gradient_checkpointing"
    model = _model(gradient_checkpointing=gc, lora=LoRAConfig(r=4) if setting == "lora" else None)
    p_ids, p_mask, c_ids, c_mask = _rows()
    grads = []
    for packed in (False, True):
        model.zero_grad()
        lp, ent = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, 0.7, with_entropy=True,
                                      entropy_grad=True, packed=packed)
        (lp.sum() + 0.1 * ent.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------- the update: loss and every gradient
def _rollout(kl: bool, off_policy: bool) -> RolloutBatch:
    p_ids, p_mask, c_ids, c_mask = _rows(seed=1)
    b = c_ids.shape[0]
    g = torch.Generator().manual_seed(2)
    batch = RolloutBatch(p_ids, p_mask, c_ids, c_mask, torch.arange(b) // 4, ["p"] * b, ["a"] * b,
                         truncated=(c_mask.sum(1) == T_MAX))
    batch.advantages = torch.randn(b, T_MAX, generator=g) * batch.completion_mask  # (B, T)
    if kl:
        batch.ref_logprobs = (-torch.rand(b, T_MAX, generator=g) * 5) * batch.completion_mask
    if off_policy:
        batch.old_logprobs = (-torch.rand(b, T_MAX, generator=g) * 5) * batch.completion_mask
    return batch


def _accumulate(model, rollout, loss: LossConfig, optim: OptimConfig) -> tuple[dict, dict]:
    plan = plan_passes(RunNeeds(), CAPS, loss, optim)
    updater = PolicyUpdater(model, loss, optim, plan, 0.7, T_MAX, 0, 0, backward=lambda x: x.backward(),
                            clip_gradients=lambda *a, **k: None, on_optimizer_step=lambda: None)
    model.zero_grad()
    stats = updater.accumulate(rollout, torch.arange(rollout.size), torch.device("cpu"))
    return stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                         "seq-mean-token-sum-norm"])
def test_loss_and_every_gradient_equal_padded(aggregation):
    model = _model()
    cases = [  # (loss settings, off-policy old log-probs)
        (LossConfig(aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01, mask_truncated_completions=True), True),
        (LossConfig(aggregation=aggregation, importance_sampling_level="sequence", kl_coef=0.1,
                    kl_bias_correction=True), False),
    ]
    for loss, off_policy in cases:
        rollout = _rollout(kl=True, off_policy=off_policy)
        extra = dict(mini_batch_size=rollout.size) if off_policy else {}
        want_stats, want = _accumulate(model, rollout, loss, OptimConfig(micro_batch_size=3, **extra))
        assert want_stats["loss"] != 0.0 and len(want) == len(list(model.parameters()))
        for name, opts in VARIANTS.items():
            stats, got = _accumulate(model, rollout, loss, OptimConfig(micro_batch_size=3, **extra, **opts))
            for key in want_stats:
                assert stats[key] == pytest.approx(want_stats[key], abs=1e-5), (name, key)
            for param in want:
                torch.testing.assert_close(got[param], want[param], rtol=0, atol=1e-5, msg=f"{name} {param}")


# ---------------------------------------------------------------- settings
def test_settings_are_validated_with_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"model.optim.micro_batch_tokens must be null .* or an integer >= 1"):
        OptimConfig(micro_batch_tokens=0)
    with pytest.raises(ValueError, match=r"model.optim.packing: true .*share_prompt_prefix: false"):
        OptimConfig(packing=True)
    with pytest.raises(ValueError, match=r"micro_batch_tokens=512 .*top_entropy_quantile=0.2"):
        plan_passes(RunNeeds(), CAPS, LossConfig(top_entropy_quantile=0.2), OptimConfig(micro_batch_tokens=512))
    plan = plan_passes(RunNeeds(), CAPS, LossConfig(), OptimConfig(micro_batch_tokens=512, packing=True,
                                                                   share_prompt_prefix=False))
    assert (plan.micro_batch_tokens, plan.packing) == (512, True) and "512 tokens" in plan.describe()
    default = plan_passes(RunNeeds(), CAPS, LossConfig(), OptimConfig())
    assert (default.micro_batch_tokens, default.packing) == (None, False)


def test_packing_refuses_an_attention_that_would_mix_rows():
    model = _model()
    check_packing_support(model)  # sdpa
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match=r"model.optim.packing.*'paged\|sdpa'.*packing: false"):
        check_packing_support(model)
    optim = OptimConfig(packing=True, share_prompt_prefix=False)
    with pytest.raises(ValueError, match="model.optim.packing"):
        PolicyUpdater(model, LossConfig(), optim, plan_passes(RunNeeds(), CAPS, LossConfig(), optim), 1.0, 8, 0, 0,
                      backward=lambda x: None, clip_gradients=lambda *a, **k: None, on_optimizer_step=lambda: None)


# ---------------------------------------------------------------- a training run
def test_two_training_steps_give_the_same_weights(tmp_path):
    """2 steps of the module (reference, old-log-prob and update passes, 2 optimizer steps each): packed token-budget
    passes end at the padded run's weights."""
    from test_resume import ToyPrompts, make_module, make_trainer, tokenizer_dir

    import lightning as L

    class Initial(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.weights = {n: p.detach().clone() for n, p in pl_module.policy.named_parameters()}

    tok = tokenizer_dir(tmp_path)
    weights, initial = [], Initial()
    for opts in ({}, dict(micro_batch_tokens=24, packing=True, share_prompt_prefix=False)):
        optim = OptimConfig(lr=1e-3, micro_batch_size=4, mini_batch_size=4, **opts)
        module = make_module(tok, optim=optim, sampling=SamplingConfig(num_generations=4, max_new_tokens=12,
                                                                       max_prompt_length=32))
        trainer = make_trainer(tmp_path / str(len(weights)), max_steps=2, callbacks=[] if weights else [initial])
        trainer.fit(module, datamodule=ToyPrompts(batch_size=2))
        assert module.plan.packing == bool(opts) and module.plan.old_logprobs and module.plan.reference
        weights.append({n: p.detach().clone() for n, p in module.policy.named_parameters()})
    moved = max(float((weights[0][n] - p).abs().max()) for n, p in initial.weights.items())
    assert moved > 1e-4  # the run trained
    for name, want in weights[0].items():
        torch.testing.assert_close(weights[1][name], want, rtol=0, atol=1e-5, msg=name)


def test_token_budget_ranks_make_equal_passes(monkeypatch):
    """Under DDP/ZeRO every rank backpropagates as many micro-batches as the rank with the most: with a token budget
    the count is all-reduced (max) and the missing passes are zero-weighted dummies that leave the gradient alone."""
    import prpo_lightning.training.updater as updater_mod

    model = _model()
    rollout, loss = _rollout(kl=False, off_policy=False), LossConfig()
    optim = OptimConfig(micro_batch_tokens=60, packing=True, share_prompt_prefix=False)
    _, want = _accumulate(model, rollout, loss, optim)
    own = len(micro_batches(row_lengths(rollout.prompt_mask, rollout.completion_mask), 8, 60, packed=True))
    monkeypatch.setattr(updater_mod, "all_reduce_max", lambda n: n + 2)  # another rank cut 2 more micro-batches
    passes: list[int] = []
    plan = plan_passes(RunNeeds(), CAPS, loss, optim)
    updater = PolicyUpdater(model, loss, optim, plan, 0.7, T_MAX, 0, 0,
                            backward=lambda x: (passes.append(1), x.backward()),
                            clip_gradients=lambda *a, **k: None, on_optimizer_step=lambda: None)
    model.zero_grad()
    updater.accumulate(rollout, torch.arange(rollout.size), torch.device("cpu"))
    assert len(passes) == own + 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=1e-6, msg=name)


def test_sdpa_runs_packed_rows_one_by_one_and_leaves_other_passes_bit_identical():
    """A packed pass switches an sdpa policy to the row-by-row SDPA (Σ L² attention instead of S²): the padded passes
    before and after the switch are bit-identical, and the row-by-row attention equals one SDPA call per row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from prpo_lightning.training.packing import SDPA_VARLEN, sdpa_varlen_attention

    model = _model().eval()
    p_ids, p_mask, c_ids, c_mask = _rows()
    with torch.no_grad():
        before, _ = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, with_entropy=True)
        completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, packed=True)
        assert model.config._attn_implementation == SDPA_VARLEN
        after, _ = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, with_entropy=True)
    assert torch.equal(before, after)
    layer = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 9, 8, generator=g) for h in (4, 2, 2))  # (1, H, S, D), rows of 2, 3 and 4 tokens
    cu = torch.tensor([0, 2, 5, 9], dtype=torch.int32)
    out, _ = sdpa_varlen_attention(layer, q, k, v, None, scaling=8 ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    for s, e in ((0, 2), (2, 5), (5, 9)):
        want, _ = sdpa_attention_forward(layer, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, scaling=8 ** -0.5)
        torch.testing.assert_close(out[:, s:e], want, rtol=0, atol=1e-6)
