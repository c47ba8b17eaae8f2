"""Rollout engine: log-probs match the sampler's distribution under left padding; EOS masking; entropy oracle."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import build_char_tokenizer, tiny_qwen2_config
from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer
from prpo_lightning.training.logprobs import completion_logprobs
from prpo_lightning.config import SamplingConfig
from prpo_lightning.rollout.sampling import generate_completions, pad_token_id, tokenize_prompts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = load_tokenizer(build_char_tokenizer(tmp_path_factory.mktemp("tok")))
    model = load_causal_lm(config=tiny_qwen2_config(vocab_size=len(tok)), seed=0).eval()
    return model, tok


def test_logprobs_match_generate_scores_with_left_padding(tiny):
    model, tok = tiny
    ids, mask = tokenize_prompts(tok, ["Q: 1+1\nA:", "Q: a much longer prompt 12*7\nA:"], torch.device("cpu"))
    assert mask[0, 0] == 0, "prompts must be left-padded"
    torch.manual_seed(0)
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, output_scores=True,
                         return_dict_in_generate=True)
    comp = out.sequences[:, ids.shape[1]:]  # (B, T)
    scores = torch.stack(out.scores, dim=1).log_softmax(-1)  # (B, T, V)
    expected = torch.gather(scores, 2, comp.unsqueeze(-1)).squeeze(-1)  # (B, T)
    cmask = torch.ones_like(comp, dtype=torch.bool)
    logp, ent = completion_logprobs(model, ids, mask, comp, cmask, temperature=1.0, with_entropy=True)
    assert torch.allclose(logp, expected, atol=1e-4)
    assert bool((ent > 0).all())


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_generate_masks_after_eos_and_flags_truncation(tiny, engine):
    model, tok = tiny
    eos = tok.eos_token_id
    ids, mask = tokenize_prompts(tok, ["Q: 1\nA:"] * 6, torch.device("cpu"))
    torch.manual_seed(1)
    comp, cmask, truncated, no_entropies = generate_completions(model, tok, ids, mask,
                                                                SamplingConfig(max_new_tokens=8), sampler=engine)
    assert no_entropies is None  # only recorded when asked for
    for row, m, tr in zip(comp, cmask, truncated):
        length = int(m.sum())
        assert bool(m[:length].all()) and not bool(m[length:].any())
        eos_pos = (row == eos).nonzero().flatten().tolist()
        if tr:
            assert length == 8 and (not eos_pos or eos_pos[0] >= 8)
        else:
            assert row[length - 1] == eos, "the EOS token is the last valid token"
        assert bool((row[length:] == tok.pad_token_id).all())


class _FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are a fixed vector, for the entropy oracle."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.vec = logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        b, n = input_ids.shape
        logits = self.vec.expand(b, n, -1).clone()
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


@pytest.mark.parametrize(
    "probs, expected",
    [((0.5, 0.25, 0.25), 1.039721), ((0.25, 0.25, 0.25, 0.25), math.log(4))],  # prpo_spec §9 E1
)
def test_entropy_oracle(probs, expected):
    model = _FixedLogits(torch.log(torch.tensor(probs)))
    p = torch.zeros(1, 2, dtype=torch.long)
    c = torch.zeros(1, 3, dtype=torch.long)
    logp, ent = completion_logprobs(model, p, torch.ones_like(p), c, torch.ones_like(c, dtype=torch.bool), with_entropy=True)
    assert ent.tolist()[0] == pytest.approx([expected] * 3, abs=1e-6)
    assert logp.tolist()[0] == pytest.approx([math.log(probs[0])] * 3, abs=1e-6)


def test_temperature_divides_logits():
    model = _FixedLogits(torch.tensor([2.0, 0.0]))
    p = torch.zeros(1, 1, dtype=torch.long)
    c = torch.zeros(1, 1, dtype=torch.long)
    logp, _ = completion_logprobs(model, p, torch.ones_like(p), c, torch.ones_like(c, dtype=torch.bool), temperature=2.0)
    assert float(logp) == pytest.approx(-math.log1p(math.exp(-1.0)), abs=1e-6)


@pytest.mark.parametrize("engine", ["hf", "static"])
@pytest.mark.parametrize("per_group", [False, True])
def test_generation_entropies_match_forward_pass(tiny, per_group, engine):
    """Both samplers (HF ``generate`` + EntropyRecorder, StaticCacheDecoder) give, for free, the entropies a
    separate forward pass computes (left padding too)."""
    from prpo_lightning.rollout.sampling import generate_groups

    model, tok = tiny
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.8)
    texts = ["Q: 1+1\nA:", "Q: a longer prompt 12*7\nA:"]
    torch.manual_seed(3)
    if per_group:
        prompts = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        comp, cmask, _, recorded = generate_groups(model, tok, prompts, 2, sampling, seeds=[1, 2],
                                                   record_entropies=True, sampler=engine)
        ids, mask = tokenize_prompts(tok, texts, torch.device("cpu"))
        ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    else:
        ids, mask = tokenize_prompts(tok, texts, torch.device("cpu"))
        comp, cmask, _, recorded = generate_completions(model, tok, ids, mask, sampling, record_entropies=True,
                                                        sampler=engine)
    _, ent = completion_logprobs(model, ids, mask, comp, cmask, temperature=0.8, with_entropy=True)
    assert recorded.shape == ent.shape
    assert torch.allclose(recorded, ent, atol=1e-4)
    assert bool((recorded[~cmask] == 0).all())


def test_pad_token_id_falls_back_to_eos_and_refuses_neither():
    """Item 13 of issue 12: the one pad-id rule used by sampling, prompt padding and the module."""
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=1)) == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))
