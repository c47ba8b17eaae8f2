"""The builtin demo policy: tokenizer round trip, prompt format, and a tiny warm-start smoke test through the cache."""

from __future__ import annotations

import json

import pytest
import torch

from prpo_lightning.demo import policy
from prpo_lightning.demo.arithmetic import is_correct, make_split


@pytest.fixture(scope="module")
def tok():
    return policy.build_tokenizer()


def test_tokenizer_round_trips_task_text(tok):
    train, held = make_split(0, 100, 50)
    for p in train + held:
        text = policy.format_prompt(p["problem"]) + p["solution"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    odd = "  12 * 3 = 36\n\n-7 / 1 = -7\t?\\boxed{ 0 }{}\\boxed"
    assert tok.decode(tok(odd.replace("\t", " "), add_special_tokens=False)["input_ids"]) == odd.replace("\t", " ")


def test_tokenizer_specials(tok):
    assert tok.is_fast
    assert tok.eos_token == policy.EOS and tok.pad_token == policy.PAD
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.bos_token is None
    assert tok("3 + 4 = 7")["input_ids"] == tok("3 + 4 = 7", add_special_tokens=False)["input_ids"]  # adds nothing
    ids = tok("\\boxed{7}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "\\boxed{7}"
    assert len(tok("\\boxed{7}", add_special_tokens=False)["input_ids"]) == 3  # "\boxed{" is one token
    assert tok.padding_side == "left"


def test_tokenizer_reloads_with_autotokenizer_next_to_a_qwen2_config(tok, tmp_path):
    """transformers 5 rebuilds a qwen2 checkpoint's tokenizer as Qwen2Tokenizer: it must still tokenize identically."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    policy.model_config(tok).save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.is_fast
    train, _ = make_split(1, 50, 0)
    for p in train + [{"problem": "Start with 3, add 4.", "solution": "3 + 4 = 7\n\n\\boxed{7}"}]:
        text = policy.format_prompt(p["problem"]) + p["solution"]
        assert again(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert again.decode(again(text)["input_ids"]) == text
    assert again.eos_token_id == tok.eos_token_id and again.pad_token_id == tok.pad_token_id


def test_prompt_template_and_sft_labels(tok):
    assert policy.DEMO_PROMPT_TEMPLATE.format(problem="X") == policy.format_prompt("X")
    train, _ = make_split(0, 3, 0)
    batch = policy.sft_batch(tok, train)
    for i, p in enumerate(train):
        lab = batch["labels"][i]
        target = lab[lab != -100].tolist()
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target[:-1]) == p["solution"]
        n_prompt = len(tok(policy.format_prompt(p["problem"]), add_special_tokens=False)["input_ids"])
        assert (lab[:n_prompt] == -100).all()
        assert batch["input_ids"][i, n_prompt : n_prompt + len(target)].tolist() == target


def test_built_builtin_is_built_once_into_the_cache(tmp_path, monkeypatch):
    """A built builtin runs its builder (here a 4-step warm start) into $PRPO_CACHE once and loads like a hub model."""
    import prpo_lightning.runtime.models as models

    monkeypatch.setenv("PRPO_CACHE", str(tmp_path))
    calls = []

    def builder(out_dir):
        calls.append(out_dir)
        policy.warm_start(out_dir, max_steps=4, eval_every=2, n_dev=4, n_held_out=4, batch_size=8, progress=False)

    monkeypatch.setitem(models._BUILTIN_MODELS, "prpo-test/tiny-built", builder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread avoids oversubscription stalls on a busy CPU
    try:
        path = models.resolve_model_path("prpo-test/tiny-built")
        assert path == str(tmp_path / "models" / "prpo-test--tiny-built") and len(calls) == 1
        metrics = json.loads((tmp_path / "models" / "prpo-test--tiny-built" / "warm_start.json").read_text())
        assert metrics["sft"]["steps"] == 4 and metrics["sft"]["target_accuracy"] is None
        assert [h["step"] for h in metrics["dev_history"]] == [2, 4]
        assert 0.0 <= metrics["held_out"]["greedy_accuracy"] <= 1.0
        assert metrics["prompt_template"] == policy.DEMO_PROMPT_TEMPLATE
        assert metrics["built_with"]["torch_threads"] == 1 and metrics["built_with"]["cpu"]
        model = models.load_causal_lm("prpo-test/tiny-built")
        tok = models.load_tokenizer("prpo-test/tiny-built")
        assert model.config.model_type == "qwen2" and model.config.vocab_size >= len(tok)
        assert model.generation_config.eos_token_id == tok.eos_token_id
        _, held = make_split(0, 0, 3)
        outs = policy.generate(model, tok, held, max_new_tokens=8, do_sample=True, num_return_sequences=2)
        assert len(outs) == 6 and all(isinstance(o, str) for o in outs)
        assert models.resolve_model_path("prpo-test/tiny-built") == path and len(calls) == 1  # cached
    finally:
        torch.set_num_threads(threads)


def test_target_accuracy_stops_early_only_when_asked():
    _, _, fixed = policy.warm_start(max_steps=3, eval_every=1, n_dev=2, n_held_out=2, batch_size=4, progress=False)
    assert fixed["sft"]["steps"] == 3  # default: no early stop
    _, _, stop = policy.warm_start(max_steps=3, eval_every=1, n_dev=2, n_held_out=2, batch_size=4,
                                   target_accuracy=0.0, progress=False)
    assert stop["sft"]["steps"] == 1  # any accuracy reaches 0: stops at the first evaluation


def test_warm_start_is_deterministic_on_one_cpu():
    kwargs = dict(max_steps=3, eval_every=3, n_dev=2, n_held_out=2, batch_size=4, progress=False)
    a, _, _ = policy.warm_start(**kwargs)
    b, _, _ = policy.warm_start(**kwargs)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
