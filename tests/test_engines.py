"""HF / static / auto rollout engines through the RolloutEngine contract: token-identical to the samplers they
wrap (rollout.generate_groups / generate_completions) in both seed modes, entropies in the result."""

from __future__ import annotations


import pytest
import torch

from components.engines import AutoEngine, HFGenerateEngine, StaticCacheEngine
from helpers import build_char_tokenizer, tiny_qwen2_config
from prpo_lightning.runtime.distributed import group_seed
from prpo_lightning.rollout.engine import RolloutResult, StaleWeightsError, pack_completions, pack_sampled, SampleRequest
from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer
from prpo_lightning.config import SamplingConfig
from prpo_lightning.rollout.sampling import generate_completions, generate_groups, left_pad

ENGINES = {"hf": HFGenerateEngine, "static": StaticCacheEngine, "auto": AutoEngine}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = load_tokenizer(build_char_tokenizer(tmp_path_factory.mktemp("tok")))
    model = load_causal_lm(config=tiny_qwen2_config(vocab_size=len(tok)), seed=0).eval()
    with torch.no_grad():  # make EOS likely so that rows end at different lengths
        model.lm_head.weight[tok.eos_token_id] *= 0.0
    prompts = [torch.tensor(tok(t)["input_ids"]) for t in ("Q: 1+1=", "a longer prompt 12*7 =", "x")]
    return model, tok, prompts


SAMPLING = SamplingConfig(num_generations=4, max_new_tokens=12, temperature=0.9, top_p=0.95)


@pytest.mark.parametrize("name", ["hf", "static", "auto"])
def test_per_group_seeds_equal_generate_groups(tiny, name):
    model, tok, prompts = tiny
    seeds = [group_seed(3, 5, pid) for pid in (10, 11, 12)]
    engine = ENGINES[name]()
    engine.setup(model, tok)
    result = engine.generate(SampleRequest(prompts, 4, SAMPLING, seeds, record_entropies=True))
    sampler = "static" if name == "auto" else name  # auto picks static for a plain Qwen2
    ids, mask, truncated, entropies = generate_groups(
        model, tok, prompts, 4, SAMPLING, seeds, record_entropies=True, sampler=sampler
    )
    assert torch.equal(result.completion_ids, ids) and torch.equal(result.completion_mask, mask)
    assert torch.equal(result.truncated, truncated)
    assert torch.equal(result.entropies, entropies) and result.sampler_logprobs is None
    assert result.size == 12 and len(set(result.completion_mask.sum(1).tolist())) > 1, "rows of varied length"


@pytest.mark.parametrize("name", ["hf", "static"])
def test_batch_seed_equals_todays_batched_call(tiny, name):
    """sampling.seed_per_group false: one batched call seeded from group_seed(seed, step, -1 - rank)."""
    model, tok, prompts = tiny
    batch_seed = group_seed(0, 2, -1)
    engine = ENGINES[name]()
    engine.setup(model, tok)
    result = engine.generate(SampleRequest(prompts, 4, SAMPLING, [1, 2, 3], batch_seed=batch_seed, record_entropies=True))
    ids, mask = left_pad([p.tolist() for p in prompts], tok.pad_token_id, torch.device("cpu"))
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(batch_seed)
        ref = generate_completions(model, tok, ids, mask, SAMPLING, record_entropies=True, sampler=name)
    assert all(torch.equal(a, b) for a, b in zip((result.completion_ids, result.completion_mask, result.truncated), ref))
    assert torch.equal(result.entropies, ref.entropies)


def test_hf_and_static_engines_agree_and_leave_the_callers_rng_alone(tiny):
    model, tok, prompts = tiny
    before = torch.get_rng_state()
    out = []
    for cls in (HFGenerateEngine, StaticCacheEngine):
        engine = cls()
        engine.setup(model, tok)
        out.append(engine.generate(SampleRequest(prompts, 4, SAMPLING, [7, 8, 9])))
    assert torch.equal(out[0].completion_ids, out[1].completion_ids)
    assert torch.equal(torch.get_rng_state(), before)


def test_greedy_empty_and_capabilities(tiny):
    model, tok, prompts = tiny
    engine = AutoEngine()
    engine.setup(model, tok)
    greedy = engine.generate(SampleRequest(prompts, 1, SAMPLING, [0, 0, 0], greedy=True))
    again = engine.generate(SampleRequest(prompts, 1, SAMPLING, [5, 6, 7], greedy=True))
    assert torch.equal(greedy.completion_ids, again.completion_ids), "greedy ignores seeds"
    for batch_seed in (None, 1):
        empty = engine.generate(SampleRequest([], 4, SAMPLING, [], batch_seed=batch_seed))
        assert empty.size == 0 and empty.completion_ids.shape == (0, 1)
    caps = engine.capabilities
    assert caps.entropies and caps.exact_trainer_distribution and not caps.sampler_logprobs
    assert not caps.needs_weight_sync


def test_stale_weight_version_is_refused(tiny):
    model, tok, prompts = tiny
    engine = HFGenerateEngine()
    with pytest.raises(RuntimeError, match="before setup"):
        engine.generate(SampleRequest(prompts, 1, SAMPLING, [0, 0, 0]))
    engine.setup(model, tok)
    engine.generate(SampleRequest(prompts, 1, SAMPLING, [0, 0, 0], policy_version=0))
    with pytest.raises(StaleWeightsError, match="weight version 0 but the policy is at version 1"):
        engine.generate(SampleRequest(prompts, 1, SAMPLING, [0, 0, 0], policy_version=1))
    engine.sync_weights(model)
    assert engine.generate(SampleRequest(prompts, 1, SAMPLING, [0, 0, 0], policy_version=1)).weight_version == 1
    engine.sync_weights(model, version=9)  # e.g. after a checkpoint load at step 9
    assert engine.weight_version == 9


def test_contract_errors(tiny):
    model, tok, prompts = tiny
    engine = HFGenerateEngine()
    engine.setup(model, tok)
    with pytest.raises(ValueError, match="3 prompts but 2 seeds"):
        engine.generate(SampleRequest(prompts, 2, SAMPLING, [1, 2]))
    with pytest.raises(ValueError, match="lock-step"):
        StaticCacheEngine().setup(model, tok, lockstep=True)
    with pytest.raises(ValueError, match="must be"):
        RolloutResult(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.bool),
                      torch.zeros(2, dtype=torch.bool))


def test_pack_completions_conventions():
    eos, pad = 1, 0
    rows = [[5, 1, 7, 7], [5, 6, 7, 8], [5, 6], [], [1]]
    ids, mask, truncated = pack_completions(rows, eos, pad, max_new_tokens=4)
    assert ids.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [5, 6, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert mask.sum(1).tolist() == [2, 4, 2, 0, 1]  # EOS included, nothing after it
    assert truncated.tolist() == [False, True, False, False, False]  # no EOS and the whole budget used


def test_pack_sampled_keeps_the_log_probs_of_the_kept_tokens():
    rows, logprobs = [[5, 1, 7], [5, 6], []], [[-0.5, -1.0, -9.0], [-0.25, -2.0], []]
    out = pack_sampled(rows, logprobs, eos_id=1, pad_id=0, max_new_tokens=3)
    assert out.completion_ids.tolist() == [[5, 1], [5, 6], [0, 0]]
    # the token after EOS (-9.0) is cut with it; padding is 0
    assert out.sampler_logprobs.tolist() == [[-0.5, -1.0], [-0.25, -2.0], [0.0, 0.0]]
    assert out.sampler_logprobs.dtype == torch.float32 and out.truncated.tolist() == [False, False, False]
