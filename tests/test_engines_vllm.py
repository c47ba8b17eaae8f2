"""VLLMEngine with the real vLLM CPU build (run in .venv-vllm; skipped where vLLM is not installed).

    PYTHONPATH=$PWD .venv-vllm/bin/python -m pytest -q tests/test_engines_vllm.py
"""

from __future__ import annotations

import os

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402

from components.engines import HFGenerateEngine, VLLMEngine  # noqa: E402
from helpers import build_char_tokenizer  # noqa: E402
from prpo_lightning.rollout.engine import StaleWeightsError  # noqa: E402
from prpo_lightning.training.logprobs import completion_logprobs  # noqa: E402
from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer  # noqa: E402
from prpo_lightning.config import MismatchCheck, SamplerMismatchError
from prpo_lightning.rollout.offpolicy import mismatch_metrics  # noqa: E402
from prpo_lightning.config import SamplingConfig
from prpo_lightning.rollout.sampling import left_pad  # noqa: E402
from prpo_lightning import SampleRequest  # noqa: E402

# Largest |log π_vLLM − log π_HF| over sampled tokens measured on this CPU in float32: ~1e-6 (see the report);
# the tolerance leaves two orders of magnitude of room for other CPUs' kernels.
LOGP_TOL = 1e-4
SAMPLING = SamplingConfig(max_new_tokens=16, temperature=1.0)


def qwen2_config(vocab_size: int) -> dict:
    """Tiny Qwen2 with a head size the CPU attention supports (64)."""
    return {
        "model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64,
        "max_position_embeddings": 256, "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1,
        "bos_token_id": 1,
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(build_char_tokenizer(tmp_path_factory.mktemp("tok")))
    model = load_causal_lm(config=qwen2_config(len(tok)), seed=0).eval()
    with torch.no_grad():  # a larger EOS embedding (tied with lm_head) makes EOS common: rows of varied length
        model.model.embed_tokens.weight[tok.eos_token_id] *= 8.0
    engine = VLLMEngine(kv_cache_memory_gib=0.25, max_model_len=256)
    engine.setup(model, tok)
    hf = HFGenerateEngine()
    hf.setup(model, tok)
    prompts = [torch.tensor(tok(t)["input_ids"]) for t in ("Q: 1+1=", "a longer prompt 12*7 =", "x", "(3+4)*2")]
    yield model, tok, engine, hf, prompts
    engine.teardown()


def trainer_logprobs(model, tok, prompts, g, result, temperature):
    ids, mask = left_pad([p.tolist() for p in prompts], tok.pad_token_id, torch.device("cpu"))
    ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)  # (B, P)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, ids, mask, result.completion_ids, result.completion_mask, temperature)
    return logp * result.completion_mask  # (B, T)


def assert_same(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask) and torch.equal(a.truncated, b.truncated)


def test_greedy_equals_hf_generate(setup):
    model, tok, engine, hf, prompts = setup
    seeds = [0] * len(prompts)
    assert_same(engine.generate(SampleRequest(prompts, 1, SAMPLING, seeds, greedy=True)), hf.generate(SampleRequest(prompts, 1, SAMPLING, seeds, greedy=True)))


def test_eos_pad_and_truncation_conventions(setup):
    model, tok, engine, hf, prompts = setup
    result = engine.generate(SampleRequest(prompts, 8, SAMPLING, [11, 12, 13, 14]))
    lengths = result.completion_mask.sum(dim=1)  # (B,)
    assert result.size == 32 and 0 < int(result.truncated.sum()) < 32, "some rows end with EOS, some truncated"
    for row, mask, length, truncated in zip(result.completion_ids, result.completion_mask, lengths, result.truncated):
        n = int(length)
        assert bool(mask[:n].all()) and not bool(mask[n:].any())
        assert bool((row[n:] == tok.pad_token_id).all())
        assert tok.eos_token_id not in row[: n - 1].tolist()
        assert bool(truncated) == (row[n - 1] != tok.eos_token_id and n == SAMPLING.max_new_tokens)


def test_same_seed_same_samples_and_batch_independence(setup):
    model, tok, engine, hf, prompts = setup
    a = engine.generate(SampleRequest(prompts, 4, SAMPLING, [1, 2, 3, 4]))
    b = engine.generate(SampleRequest(prompts, 4, SAMPLING, [1, 2, 3, 4], batch_seed=99))
    assert_same(a, b)
    assert torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    alone = engine.generate(SampleRequest(prompts[2:3], 4, SAMPLING, [3]))  # a group's samples do not depend on the batch
    assert torch.equal(alone.completion_ids[:, : a.completion_ids.shape[1]], a.completion_ids[8:12, : alone.completion_ids.shape[1]])
    other = engine.generate(SampleRequest(prompts, 4, SAMPLING, [5, 6, 7, 8]))
    assert not torch.equal(a.completion_ids, other.completion_ids)
    assert len({tuple(r) for r in a.completion_ids[:4].tolist()}) > 1, "the G samples of a group differ"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_trainer(setup, temperature):
    model, tok, engine, hf, prompts = setup
    sampling = SamplingConfig(max_new_tokens=16, temperature=temperature)
    result = engine.generate(SampleRequest(prompts, 8, sampling, [21, 22, 23, 24]))
    ref = trainer_logprobs(model, tok, prompts, 8, result, temperature)
    diff = (result.sampler_logprobs - ref).abs().max().item()
    print(f"max |logp_vllm - logp_trainer| at T={temperature}: {diff:.3g}")
    assert diff < LOGP_TOL
    metrics = mismatch_metrics(result.sampler_logprobs, ref, result.completion_mask)
    assert MismatchCheck(threshold=LOGP_TOL, metric="logp_diff_max", mode="raise")(metrics)


def test_sync_after_optimizer_steps_and_skipped_sync_detected(setup):
    model, tok, engine, hf, prompts = setup
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    text = torch.tensor([tok("Q: 1+1=2 and 12*7=84")["input_ids"]])
    for _ in range(3):  # a few optimizer steps of next-token cross-entropy
        loss = model(input_ids=text, labels=text).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with pytest.raises(StaleWeightsError):
        engine.generate(SampleRequest(prompts, 4, SAMPLING, [1, 2, 3, 4], policy_version=3))
    stale = engine.generate(SampleRequest(prompts, 4, SAMPLING, [1, 2, 3, 4]))  # a skipped sync, no version passed
    metrics = mismatch_metrics(stale.sampler_logprobs, trainer_logprobs(model, tok, prompts, 4, stale, 1.0),
                               stale.completion_mask)
    print("skipped sync:", metrics)
    with pytest.raises(SamplerMismatchError):
        MismatchCheck(threshold=0.05, mode="raise")(metrics)
    engine.sync_weights(model, version=3)
    seeds = [0] * len(prompts)
    greedy = engine.generate(SampleRequest(prompts, 1, SAMPLING, seeds, greedy=True, policy_version=3))
    assert_same(greedy, hf.generate(SampleRequest(prompts, 1, SAMPLING, seeds, greedy=True)))
    fresh = engine.generate(SampleRequest(prompts, 4, SAMPLING, [1, 2, 3, 4], policy_version=3))
    metrics = mismatch_metrics(fresh.sampler_logprobs, trainer_logprobs(model, tok, prompts, 4, fresh, 1.0),
                               fresh.completion_mask)
    assert MismatchCheck(threshold=0.05, mode="raise")(metrics)


def test_never_synced_engine_trips_the_default_check(setup):
    """A sync that never happens (the version bumped, no weights streamed) is caught by the default self-check
    (``logp_diff_max`` with the float32 threshold 1e-3), not only by a hand-tuned one."""
    model, tok, engine, hf, prompts = setup
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    text = torch.tensor([tok("Q: 1+1=2 and 12*7=84")["input_ids"]])
    loss = model(input_ids=text, labels=text).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()
    stale = engine.generate(SampleRequest(prompts, 4, SAMPLING, [1, 2, 3, 4]))
    metrics = mismatch_metrics(stale.sampler_logprobs, trainer_logprobs(model, tok, prompts, 4, stale, 1.0),
                               stale.completion_mask)
    print("never synced after one lr-1e-3 step:", metrics)
    with pytest.raises(SamplerMismatchError, match="logp_diff_max"):
        MismatchCheck()(metrics)
    engine.sync_weights(model)
    fresh = engine.generate(SampleRequest(prompts, 4, SAMPLING, [1, 2, 3, 4]))
    assert MismatchCheck()(mismatch_metrics(fresh.sampler_logprobs, trainer_logprobs(model, tok, prompts, 4, fresh, 1.0),
                                            fresh.completion_mask))


def test_partial_weight_stream_is_refused_before_the_version_advances(setup, monkeypatch):
    import components.engine_vllm as engine_module
    from components.vllm_support import IncompleteWeightsError

    model, tok, engine, hf, prompts = setup
    version = engine.weight_version
    full = engine_module.policy_weights
    monkeypatch.setattr(engine_module, "policy_weights",
                        lambda policy: ((n, t) for n, t in full(policy) if ".layers.1." not in n))
    with pytest.raises(IncompleteWeightsError, match=r"ended without \d+ of the \d+ tensors.*layers\.1\."):
        engine.sync_weights(model, version + 1)
    assert engine.weight_version == version
    with pytest.raises(StaleWeightsError):
        engine.generate(SampleRequest(prompts, 1, SAMPLING, [0] * 4, greedy=True, policy_version=version + 1))
    monkeypatch.setattr(engine_module, "policy_weights", full)
    engine.sync_weights(model, version + 1)  # a complete stream is accepted again
    ours = engine.generate(SampleRequest(prompts, 1, SAMPLING, [0] * 4, greedy=True, policy_version=version + 1))
    assert_same(ours, hf.generate(SampleRequest(prompts, 1, SAMPLING, [0] * 4, greedy=True)))


def test_sleep_mode_is_refused_on_cpu_and_capabilities(setup):
    model, tok, engine, hf, prompts = setup
    with pytest.raises(ValueError, match="enable_sleep_mode needs a CUDA device"):
        VLLMEngine(enable_sleep_mode=True).setup(model, tok)
    caps = engine.capabilities
    assert caps.sampler_logprobs and not caps.entropies and not caps.exact_trainer_distribution
    with pytest.raises(ValueError, match="cannot record entropies"):
        engine.generate(SampleRequest(prompts, 1, SAMPLING, [0] * 4, record_entropies=True))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(SampleRequest(prompts, 1, SamplingConfig(max_new_tokens=300), [0] * 4))


def test_teardown_releases_vllm_and_a_new_engine_samples_the_same(setup):
    """A second engine in the same process draws the same samples as the first, and its teardown unfreezes the
    start-up objects vLLM gc-froze (else its weights and KV cache are never freed). It joined the process group the
    first engine created, so it does not shut that down (the fixture's teardown does)."""
    import gc

    model, tok, engine, hf, prompts = setup
    first = engine.generate(SampleRequest(prompts, 4, SAMPLING, [5, 6, 7, 8]))
    second_engine = VLLMEngine(kv_cache_memory_gib=0.25, max_model_len=256)
    second_engine.setup(model, tok)
    assert gc.get_freeze_count() > 0, "vLLM froze its start-up objects (what teardown must undo)"
    second = second_engine.generate(SampleRequest(prompts, 4, SAMPLING, [5, 6, 7, 8]))
    second_engine.teardown()
    assert second_engine.llm is None and gc.get_freeze_count() == 0
    assert_same(first, second)
    assert torch.equal(first.sampler_logprobs, second.sampler_logprobs)


# ---------------------------------------------------------------- start-up checks (issue 27, item 9)
@pytest.mark.parametrize(("kwargs", "named"), [
    (dict(kv_cache_memory_gib=0.0005, max_model_len=256), r"kv_cache_memory_gib 0\.0005 and max_model_len 256"),
    (dict(gpu_memory_utilization=0.0001, max_model_len=256),
     r"gpu_memory_utilization 0\.0001 \(a fraction of host RAM"),
])
def test_tiny_cpu_memory_settings_get_our_message(kwargs, named, tmp_path):
    tok = load_tokenizer(build_char_tokenizer(tmp_path / "tok"))
    model = load_causal_lm(config=qwen2_config(len(tok)), seed=0).eval()
    engine = VLLMEngine(**kwargs)
    with pytest.raises(ValueError, match=rf"VLLMEngine: vLLM could not fit its KV cache with model\.engine\.{named}.*"
                                         r"Fix: .*vLLM said: "):
        engine.setup(model, tok)
    engine.teardown()


def test_model_folder_of_a_killed_run_is_removed_by_the_next_start(tmp_path):
    import socket
    import subprocess
    import sys
    import tempfile

    script = f"""
import os, signal, sys
sys.path.insert(0, {str(tmp_path.parent)!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_engines_vllm import qwen2_config
from helpers import build_char_tokenizer
from pathlib import Path
from components.engines import VLLMEngine
from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer
tok = load_tokenizer(build_char_tokenizer(Path({str(tmp_path / 'tok')!r})))
engine = VLLMEngine(kv_cache_memory_gib=0.25, max_model_len=256)
engine.setup(load_causal_lm(config=qwen2_config(len(tok)), seed=0).eval(), tok)
print(engine._model_dir.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == -9, proc.stderr[-3000:]
    left = proc.stdout.strip().splitlines()[-1]
    assert os.path.isdir(left) and os.path.basename(left).startswith(f"prpo_vllm_{socket.gethostname()}_")
    assert os.path.dirname(left) == tempfile.gettempdir()
    tok = load_tokenizer(build_char_tokenizer(tmp_path / "tok2"))
    engine = VLLMEngine(kv_cache_memory_gib=0.25, max_model_len=256)
    engine.setup(load_causal_lm(config=qwen2_config(len(tok)), seed=0).eval(), tok)
    try:
        assert not os.path.exists(left)  # the killed run's folder went when this engine started
    finally:
        engine.teardown()


def test_rotary_reload_warning_is_shown_once_not_at_every_sync(setup):
    import logging

    model, _, engine, _, _ = setup
    shown: list[str] = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            shown.append(record.getMessage())

    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")  # vLLM's logger of the warning
    handler = Record(level=logging.WARNING)
    log.addHandler(handler)
    try:
        for _ in range(3):
            engine.sync_weights(model)
    finally:
        log.removeHandler(handler)
    assert shown.count("RotaryEmbedding: Failed to load weights") <= 1  # before: one per sync

