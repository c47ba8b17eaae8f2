"""StaticCacheDecoder: token-identical to HF ``generate`` (greedy and sampled, same RNG state) on every supported
architecture, entropies equal a forward pass, unsupported models are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from prpo_lightning.rollout.decoding import StaticCacheDecoder, sample_next, unsupported_reason
from prpo_lightning.training.logprobs import completion_logprobs
from prpo_lightning.config import SamplingConfig
from prpo_lightning.rollout.sampling import generate_completions, left_pad, resolve_sampler

EOS, PAD, V = 1, 0, 96


def _model(model_type: str, **extra) -> torch.nn.Module:
    cfg = {
        "vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": EOS, "tie_word_embeddings": False,
    }
    cfg.update(extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).eval()
    with torch.no_grad():  # a larger EOS logit so that some rows stop early
        model.lm_head.weight[EOS] += 0.5 * model.lm_head.weight.abs().mean() * torch.sign(model.lm_head.weight[2])
    return model


ARCHITECTURES = {
    "qwen2": dict(),  # q/k/v biases, tied GQA
    "llama": dict(head_dim=16, attention_bias=False),  # head_dim != hidden / heads
    "llama-bias-scaled-rope": dict(attention_bias=True, mlp_bias=True,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen3": dict(head_dim=8),  # per-head q/k RMSNorm
    "mistral": dict(sliding_window=None),
}


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of different lengths, each repeated 3 times (prompt groups)."""
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(2, V, (n,), generator=gen).tolist() for n in (3, 9, 14)]
    ids, mask = left_pad(rows, PAD, torch.device("cpu"))
    return ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # (9, 14) each


def _hf(model, ids, mask, seed, max_new_tokens=24, **kw) -> torch.Tensor:
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD, **kw)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1]:]


def _static(model, ids, mask, seed, max_new_tokens=24, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return StaticCacheDecoder(model).generate(ids, mask, max_new_tokens, EOS, PAD, record_entropies=True, **kw)


def _arch(name: str) -> str:
    return name.split("-")[0]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_greedy_tokens_equal_hf_generate(name):
    model = _model(_arch(name), **ARCHITECTURES[name])
    assert unsupported_reason(model) is None
    ids, mask = _prompts()
    expected = _hf(model, ids, mask, 0, do_sample=False)
    got, _ = _static(model, ids, mask, 0, greedy=True)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize(
    "knobs",
    [dict(temperature=1.0, top_p=1.0, top_k=0), dict(temperature=0.7, top_p=0.9, top_k=0),
     dict(temperature=1.3, top_p=1.0, top_k=7), dict(temperature=0.9, top_p=0.8, top_k=20)],
)
def test_sampled_tokens_equal_hf_generate_for_the_same_seed(name, knobs):
    """Same RNG state, same logits up to rounding, same HF sampling steps: the same tokens, EOS and PAD included."""
    model = _model(_arch(name), **ARCHITECTURES[name])
    ids, mask = _prompts()
    expected = _hf(model, ids, mask, 11, do_sample=True, **knobs)
    got, _ = _static(model, ids, mask, 11, **knobs)
    assert torch.equal(got, expected)
    if knobs["top_k"] == 0 and knobs["top_p"] == 1.0:
        assert bool((got == EOS).any()), "the test must exercise rows that stop early"


def test_stops_when_every_row_has_finished_like_hf():
    """Rows that finished leave the cache (fewer rows per decode step) without changing any token."""
    model = _model("qwen2")
    ids, mask = _prompts()
    expected = _hf(model, ids, mask, 3, max_new_tokens=400, do_sample=True, top_k=0)
    rows_per_step: list[int] = []
    decode_step = StaticCacheDecoder._decode_step

    def spy(self, token, *args):
        rows_per_step.append(token.shape[0])
        return decode_step(self, token, *args)

    StaticCacheDecoder._decode_step = spy
    try:
        got, ent = _static(model, ids, mask, 3, max_new_tokens=400)
    finally:
        StaticCacheDecoder._decode_step = decode_step
    assert got.shape[1] < 400 and torch.equal(got, expected)
    assert rows_per_step[0] == 9 and rows_per_step[-1] < 9, "finished rows must leave the cache"
    assert rows_per_step == sorted(rows_per_step, reverse=True)
    assert ent.shape == got.shape


def test_entropies_equal_a_forward_pass():
    model = _model("llama", **ARCHITECTURES["llama"])
    ids, mask = _prompts()
    comp, ent = _static(model, ids, mask, 5, temperature=0.8)
    is_eos = comp == EOS
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((comp.shape[0],), comp.shape[1]))
    cmask = torch.arange(comp.shape[1])[None] <= first[:, None]  # (B, T) up to and including EOS
    _, expected = completion_logprobs(model, ids, mask, comp, cmask, temperature=0.8, with_entropy=True)
    assert torch.allclose(ent * cmask, expected, atol=1e-4)


def test_suppressed_tokens_are_never_sampled():
    model = _model("qwen2")
    model.generation_config.suppress_tokens = [EOS, 5]
    ids, mask = _prompts()
    got, _ = _static(model, ids, mask, 0)
    assert got.shape[1] == 24 and not bool(((got == EOS) | (got == 5)).any())
    assert torch.equal(got, _hf(model, ids, mask, 0, do_sample=True, top_k=0))


def test_sample_next_top_p_keeps_the_nucleus_and_the_best_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]]))
    torch.manual_seed(0)
    draws = torch.stack([sample_next(logits, False, 1.0, 0.7, 0, None) for _ in range(300)])  # (300, 2)
    assert set(draws[:, 0].tolist()) == {0, 1}, "p = 0.7 keeps the two most likely tokens (0.5 + 0.3 >= 0.7)"
    assert set(draws[:, 1].tolist()) == {0}
    assert sample_next(logits, True, 1.0, 1.0, 0, torch.tensor([0])).tolist() == [1, 1]


class _LoRALikeLinear(torch.nn.Linear):
    """Stands for any wrapper whose forward differs from F.linear(x, weight, bias)."""


@pytest.mark.parametrize(
    "breaks, reason",
    [
        (lambda m: setattr(m.model.layers[0].self_attn, "q_proj", _LoRALikeLinear(32, 32)), "plain torch.nn.Linear"),
        (lambda m: m.model.layers[1].mlp.register_forward_hook(lambda *a: None), "forward hooks"),
        (lambda m: setattr(m.generation_config, "repetition_penalty", 1.05), "repetition_penalty"),
        (lambda m: setattr(m.generation_config, "no_repeat_ngram_size", 3), "no_repeat_ngram_size"),
    ],
)
def test_unsupported_models_are_refused_with_the_reason(breaks, reason, monkeypatch):
    model = _model("qwen2")
    breaks(model)
    assert reason in unsupported_reason(model)
    with pytest.raises(ValueError, match="HFGenerateEngine"):
        StaticCacheDecoder(model)
    with pytest.raises(ValueError, match=reason):
        resolve_sampler(model, "static", synced_gpus=False)
    said: list[str] = []
    monkeypatch.setattr("prpo_lightning.rollout.sampling.rank_zero_info", said.append)
    assert resolve_sampler(model, "auto", synced_gpus=False) == "hf"
    assert len(said) == 1 and "'hf'" in said[0] and reason in said[0], "auto names its fallback and the reason"


def test_other_architectures_and_sliding_windows_are_refused():
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2))
    assert "model_type 'gpt2'" in unsupported_reason(gpt2)
    model = _model("mistral", sliding_window=16)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="sliding window"):
        StaticCacheDecoder(model).generate(ids, mask, 24, EOS, PAD)


def test_engine_choice_and_lockstep():
    model = _model("qwen2")
    assert resolve_sampler(model, "auto", synced_gpus=False) == "static"
    assert resolve_sampler(model, "auto", synced_gpus=True) == "hf"
    assert resolve_sampler(model, "hf", synced_gpus=False) == "hf"
    with pytest.raises(ValueError, match="lock-step"):
        resolve_sampler(model, "static", synced_gpus=True)
    with pytest.raises(ValueError, match="model.sampling.engine was removed.*model.engine"):
        SamplingConfig(engine="hf")


def test_generate_completions_gives_the_same_rollout_with_either_engine():
    from types import SimpleNamespace

    model = _model("qwen2")
    tok = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)
    ids, mask = _prompts()
    results = {}
    for engine in ("hf", "static"):
        sampling = SamplingConfig(max_new_tokens=24, top_k=0, generation_batch_size=4)
        torch.manual_seed(2)
        results[engine] = generate_completions(model, tok, ids, mask, sampling, record_entropies=True, sampler=engine)
    for a, b in zip(results["hf"], results["static"]):
        assert a.shape == b.shape
        assert torch.allclose(a.float(), b.float(), atol=1e-4)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_bfloat16_policies_decode_like_hf(name):
    """The policy dtype RL runs use on GPUs: the float32 norm/softmax casts follow HF's, so greedy decoding agrees."""
    model = _model(name, **ARCHITECTURES[name]).to(torch.bfloat16)
    ids, mask = _prompts()
    got, ent = _static(model, ids, mask, 0, greedy=True)
    assert torch.equal(got, _hf(model, ids, mask, 0, do_sample=False))
    assert ent.dtype == torch.float32 and bool(torch.isfinite(ent).all())


def test_entropy_of_matches_the_e1_oracle_and_ignores_suppressed_tokens():
    """prpo_spec §9 E1: H(0.5, 0.25, 0.25) = 1.039721 nats; a -inf logit (suppressed token) adds nothing."""
    from prpo_lightning.rollout.decoding import entropy_of

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]))  # row 0 ends in -inf
    assert entropy_of(logits, 1.0).tolist() == pytest.approx([1.039721, 1.386294], abs=1e-6)
    assert entropy_of(torch.tensor([[2.0, 0.0]]), 2.0).item() == pytest.approx(0.582203, abs=1e-6)  # p = σ(±1)
