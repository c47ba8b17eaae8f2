"""``scale_rewards: group | batch | none`` on the GRPO-family aligners, PRPO's outcome term, PRM-Avg and SPRO:
hand-computed values, exact zeros for equal groups, and equality with TRL 1.16's ``GRPOTrainer`` advantages."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch

from components.aligners import GRPOAligner, PRMAvgAligner, PRPOAligner, SPROAligner
from prpo_lightning.batch import RolloutBatch

# two groups: [1, 0] and [3, 3]. Group std (unbiased) of [1, 0] = √0.5; batch std of [1, 0, 3, 3]: mean 1.75,
# squared deviations 0.5625 + 3.0625 + 1.5625 + 1.5625 = 6.75, /3 = 2.25 → 1.5.
REWARDS = [1.0, 0.0, 3.0, 3.0]
GROUPS = [0, 0, 1, 1]
HAND = {
    "none": [0.5, -0.5, 0.0, 0.0],
    "group": [0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 0.0, 0.0],
    "batch": [0.5 / 1.5, -0.5 / 1.5, 0.0, 0.0],
}


def batch_of(rewards, groups, length=2, step_score=None):
    b = len(rewards)
    batch = RolloutBatch(
        prompt_ids=torch.zeros(b, 1, dtype=torch.long),
        prompt_mask=torch.ones(b, 1, dtype=torch.long),
        completion_ids=torch.zeros(b, length, dtype=torch.long),
        completion_mask=torch.ones(b, length, dtype=torch.bool),
        group_ids=torch.tensor(groups),
        problems=["q"] * b,
        answers=["a"] * b,
        outcome_rewards=torch.tensor(rewards, dtype=torch.float32),
    )
    if step_score is not None:  # one step per completion, scored step_score
        batch.segment_spans = [[(0, length)] for _ in range(b)]
        batch.step_scores = torch.full((b, 1), step_score)
        batch.step_mask = torch.ones(b, 1, dtype=torch.bool)
    return batch


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_hand_values(scale):
    adv = GRPOAligner(epsilon=0.0, scale_rewards=scale).align(batch_of(REWARDS, GROUPS))  # (4, 2)
    expected = torch.tensor(HAND[scale])[:, None].expand(4, 2)
    torch.testing.assert_close(adv, expected.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_prpo_outcome_term_hand_values(scale):
    # every step scored μ0 = 0.5 → the process z-score is 0 and A = β
    aligner = PRPOAligner(outcome_epsilon=0.0, scale_rewards=scale)
    adv = aligner.align(batch_of(REWARDS, GROUPS, step_score=0.5))
    torch.testing.assert_close(adv[:, 0], torch.tensor(HAND[scale]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_prm_avg_and_spro_hand_values(scale):
    # PRM-Avg adds the mean step score (0.5 everywhere) to R, which shifts every reward equally
    adv = PRMAvgAligner(epsilon=0.0, scale_rewards=scale).align(batch_of(REWARDS, GROUPS, step_score=0.5))
    torch.testing.assert_close(adv[:, 0], torch.tensor(HAND[scale]), atol=1e-6, rtol=1e-6)
    spro_batch = batch_of(REWARDS, GROUPS)
    spro_batch.old_logprobs = spro_batch.ref_logprobs = torch.zeros(4, 2)  # π_old = π_ref → MSA ≡ 0
    adv = SPROAligner(epsilon=0.0, scale_rewards=scale).align(spro_batch)
    torch.testing.assert_close(adv[:, 0], torch.tensor(HAND[scale]), atol=1e-6, rtol=1e-6)


def test_defaults_are_unchanged():
    assert GRPOAligner().scale_rewards == "group"
    assert GRPOAligner(std_normalize=False).scale_rewards == "none"
    assert PRPOAligner().scale_rewards == "none"  # outcome_norm="center"
    assert PRPOAligner(outcome_norm="zscore").scale_rewards == "group"
    assert PRMAvgAligner().scale_rewards == "group"


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-4])
def test_equal_groups_are_exactly_zero(scale, eps):
    # 0.1 three times: a float mean of (0.1 + 0.1 + 0.1)/3 is not 0.1, the exact helpers must still give 0
    rewards = [0.1, 0.1, 0.1, 0.7, 0.2, 0.7]
    adv = GRPOAligner(epsilon=eps, scale_rewards=scale).align(batch_of(rewards, [5, 5, 5, 9, 9, 9]))
    assert torch.equal(adv[:3], torch.zeros(3, 2))
    assert (adv[3:, 0] != 0).all()
    # a whole batch of equal rewards: batch std 0, ε = 0 is 0/0 = 0
    flat = GRPOAligner(epsilon=eps, scale_rewards=scale).align(batch_of([0.3] * 4, [0, 0, 1, 1]))
    assert torch.equal(flat, torch.zeros(4, 2))


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        GRPOAligner(scale_rewards="global")
    with pytest.raises(ValueError, match="std_normalize=False .* scale_rewards='batch'"):
        GRPOAligner(std_normalize=False, scale_rewards="batch")
    with pytest.raises(ValueError, match="outcome_norm='zscore' contradicts scale_rewards='none'"):
        PRPOAligner(outcome_norm="zscore", scale_rewards="none")


# ------------------------------------------------------------------ TRL equality
TRL_REWARDS = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, -1.0, 3.0, 0.0]
TRL_PROMPTS = ["1+1=", "2+2=", "3+3="]


@pytest.fixture(scope="module")
def trl_setup():
    pytest.importorskip("trl")
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from helpers import build_char_tokenizer, tiny_qwen2_config

    tmp = Path(tempfile.mkdtemp(prefix="trl_scale_"))
    tokenizer = AutoTokenizer.from_pretrained(build_char_tokenizer(tmp / "tok"))
    config = {k: v for k, v in tiny_qwen2_config().items() if k != "model_type"}
    torch.manual_seed(0)
    return tmp, tokenizer, Qwen2ForCausalLM(Qwen2Config(**config))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_trl_advantages(trl_setup, scale):
    """TRL computes the advantages from rewards that do not depend on the sampled text (a fixed list), so ours
    must equal TRL's for the same rewards and groups (TRL's ε is 1e-4)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tmp, tokenizer, model = trl_setup

    def fixed_rewards(completions, **_):
        return TRL_REWARDS[: len(completions)]

    args = GRPOConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=12, num_generations=4, max_completion_length=3,
        scale_rewards=scale, use_cpu=True, report_to="none", save_strategy="no", beta=0.0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=fixed_rewards, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in TRL_PROMPTS]),
                          processing_class=tokenizer)
    inputs = [{"prompt": p} for p in TRL_PROMPTS for _ in range(4)]
    theirs = trainer._generate_and_score_completions(inputs)["advantages"].float()  # (12,)
    groups = [g for g in range(3) for _ in range(4)]
    ours = GRPOAligner(epsilon=1e-4, scale_rewards=scale).align(batch_of(TRL_REWARDS, groups))[:, 0]  # (12,)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
