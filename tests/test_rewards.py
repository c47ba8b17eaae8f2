"""Reward composition: weighted verifier lists (``model.verifier: [...]`` + ``model.reward_weights``), callable
rewards by dotted path with the row's fields, the ``\\boxed{}`` format reward, and a 2-step ``prpo-fit fit`` with
all of them plus ``scale_rewards`` and reference sync, for PRPO and GRPO."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from components.rewards import RewardFunctionError, combine_verifiers
from components.verifiers import BoxedFormatReward, CallableReward, SympyMathVerifier, WeightedVerifiers
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.faults import ComponentError, VerifierError
from prpo_lightning.scoring.pipeline import grade
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus
from prpo_lightning.batch import rollout_rows

SEEN_ROWS: list[dict] = []


# ---- reward functions imported by dotted path ("test_rewards:<name>")
def length_reward(completion: str, answer: str, **row) -> float:
    SEEN_ROWS.append({"completion": completion, "answer": answer, **row})
    return 0.25 * len(completion)


def answer_in_text(completion, answer, **row):
    return 1.0 if answer in completion else 0.0


def returns_text(completion, answer, **row):
    return "high"


def returns_nan(completion, answer, **row):
    return math.nan


def raises(completion, answer, **row):
    raise KeyError("no such field")


def no_row_kwargs(completion, answer):
    return 1.0


class Fixed(OutcomeVerifier):
    """Returns fixed statuses and rewards (one per row), for hand values."""

    def __init__(self, rewards, statuses=None, error=None):
        self.rewards, self.statuses, self.error = rewards, statuses, error

    def verify_batch(self, completions, golds, rows=None):
        statuses = self.statuses or [VerdictStatus.INCORRECT] * len(completions)
        return [Verdict(s, r, error=self.error) for s, r in zip(statuses, self.rewards)]

    def verify(self, completion, gold):
        raise AssertionError("not used")


def rollout(completions, answers, problems=None, ids=None):
    b = len(completions)
    return RolloutBatch(
        prompt_ids=torch.zeros(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1, dtype=torch.long),
        completion_ids=torch.zeros(b, 3, dtype=torch.long),
        completion_mask=torch.tensor([[True] * (1 + i % 3) + [False] * (2 - i % 3) for i in range(b)]),
        group_ids=torch.tensor(ids or list(range(b))), problems=problems or [f"p{i}" for i in range(b)],
        answers=answers, completions=completions, truncated=torch.tensor([i % 2 == 1 for i in range(b)]),
    )


# ------------------------------------------------------------------ WeightedVerifiers
def test_weighted_sum_and_first_status():
    first = Fixed([1.0, -1.0], [VerdictStatus.CORRECT, VerdictStatus.UNPARSABLE])
    second = Fixed([0.5, 2.0], [VerdictStatus.INCORRECT, VerdictStatus.CORRECT], error="boom")
    combined = WeightedVerifiers([first, second], reward_weights=[2.0, -0.5])
    verdicts = combined.verify_batch(["a", "b"], ["x", "y"])
    assert [v.reward for v in verdicts] == [2.0 * 1.0 - 0.5 * 0.5, 2.0 * -1.0 - 0.5 * 2.0]  # 1.75, -3.0
    assert [v.status for v in verdicts] == [VerdictStatus.CORRECT, VerdictStatus.UNPARSABLE]
    assert verdicts[0].error == "Fixed_1: boom"  # two verifiers of one class: named by position
    assert combined.batch_metrics(["a", "b"], verdicts) == {"reward/Fixed_0/mean": 0.0, "reward/Fixed_1/mean": 1.25}


def test_default_weights_are_one():
    combined = WeightedVerifiers([Fixed([1.0]), Fixed([3.0])])
    assert combined.reward_weights == [1.0, 1.0] and combined.verify_batch(["a"], ["x"])[0].reward == 4.0


def test_weights_are_validated_naming_the_key():
    with pytest.raises(ValueError, match="reward_weights has 1 weights for 2 verifiers"):
        WeightedVerifiers([Fixed([1.0]), Fixed([1.0])], [1.0])
    with pytest.raises(ValueError, match=r"reward_weights\[1\] must be a finite number"):
        WeightedVerifiers([Fixed([1.0]), Fixed([1.0])], [1.0, math.inf])
    with pytest.raises(ValueError, match="verifiers is empty"):
        WeightedVerifiers([])
    with pytest.raises(ValueError, match=r"model.reward_weights has 3 weights for 2 verifier\(s\) in model.verifier"):
        combine_verifiers([Fixed([1.0]), Fixed([1.0])], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="model.verifier is an empty list"):
        combine_verifiers([], None)


# ------------------------------------------------------------------ CallableReward
def test_callable_gets_completion_answer_and_row_fields():
    SEEN_ROWS.clear()
    reward = CallableReward("test_rewards:length_reward", correct_threshold=0.5)
    batch = rollout(["ab", "abcd"], ["1", "2"], problems=["what?", "why?"], ids=[7, 7])
    verdicts = reward.verify_batch(batch.completions, batch.answers, rollout_rows(batch))
    assert [v.reward for v in verdicts] == [0.5, 1.0]
    assert [v.status for v in verdicts] == [VerdictStatus.CORRECT, VerdictStatus.CORRECT]
    assert SEEN_ROWS == [
        {"completion": "ab", "answer": "1", "problem": "what?", "id": 7, "truncated": False, "num_tokens": 1},
        {"completion": "abcd", "answer": "2", "problem": "why?", "id": 7, "truncated": True, "num_tokens": 2},
    ]
    assert reward.name == "length_reward"
    assert CallableReward("test_rewards.answer_in_text").verify("x = 2", "2").reward == 1.0  # dotted form


def test_grade_passes_rows_through_the_scoring_pipeline():
    SEEN_ROWS.clear()
    batch = rollout(["a", "bb", "ccc"], ["1", "2", "3"])
    metrics = grade(batch, WeightedVerifiers([CallableReward("test_rewards:length_reward")]))
    assert batch.outcome_rewards.tolist() == [0.25, 0.5, 0.75]
    assert [r["problem"] for r in SEEN_ROWS] == ["p0", "p1", "p2"] and [r["id"] for r in SEEN_ROWS] == [0, 1, 2]
    assert metrics["reward/length_reward/mean"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("returns_text", r"test_rewards:returns_text returned 'high' \(str\) on row 0: it must return a finite float"),
        ("returns_nan", r"test_rewards:returns_nan returned nan"),
        ("raises", r"test_rewards:raises raised KeyError on row 0"),
        ("no_row_kwargs", r"test_rewards:no_row_kwargs raised TypeError on row 0"),
    ],
)
def test_bad_functions_fail_naming_the_function(name, match):
    batch = rollout(["a"], ["1"])
    with pytest.raises(RewardFunctionError, match=match):
        CallableReward(f"test_rewards:{name}").verify_batch(batch.completions, batch.answers, rollout_rows(batch))
    with pytest.raises(VerifierError, match=f"CallableReward failed.*test_rewards:{name}"):
        grade(batch, CallableReward(f"test_rewards:{name}"))


def test_import_errors_name_the_path():
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.rewards' of function 'no_such_pkg.rewards:fn'"):
        CallableReward("no_such_pkg.rewards:fn")
    with pytest.raises(ValueError, match="'test_rewards' has nothing named 'missing'"):
        CallableReward("test_rewards:missing")
    with pytest.raises(ValueError, match="has a list named 'SEEN_ROWS'"):
        CallableReward("test_rewards:SEEN_ROWS")
    with pytest.raises(ValueError, match="must be 'package.module:name'"):
        CallableReward("fn")


def test_callable_reward_pickles_by_path():
    copy = pickle.loads(pickle.dumps(CallableReward("test_rewards:answer_in_text")))
    assert copy.verify("the answer is 3", "3").reward == 1.0


def test_verifiers_without_rows_still_work():
    """A verifier that ignores the rows argument of verify_batch grades as usual."""
    batch = rollout(["a", "b"], ["1", "2"])
    grade(batch, Fixed([0.5, 1.5]))
    assert batch.outcome_rewards.tolist() == [0.5, 1.5]


# ------------------------------------------------------------------ BoxedFormatReward
def test_boxed_format_reward_values():
    fmt = BoxedFormatReward()
    present = fmt.verify(r"so \boxed{\frac{1}{2}} it is", "anything")
    assert (present.reward, present.status, present.extracted) == (1.0, VerdictStatus.CORRECT, r"\frac{1}{2}")
    missing = fmt.verify(r"the answer is 3, \boxed{unclosed", "3")
    assert (missing.reward, missing.status) == (0.0, VerdictStatus.UNPARSABLE)
    custom = BoxedFormatReward(present_reward=0.2, missing_reward=-1.0)
    assert [v.reward for v in custom.verify_batch([r"\fbox{4}", "4"], ["4", "4"])] == [0.2, -1.0]
    with pytest.raises(ValueError, match="BoxedFormatReward: missing_reward must be a finite number"):
        BoxedFormatReward(missing_reward=math.nan)


def test_math_verifier_plus_format_reward_hand_values():
    combined = WeightedVerifiers([SympyMathVerifier(), BoxedFormatReward()], reward_weights=[1.0, 0.1])
    try:
        verdicts = combined.verify_batch([r"\boxed{4}", r"\boxed{5}", "4"], ["4", "4", "4"])
    finally:
        combined.close()
    assert [v.reward for v in verdicts] == pytest.approx([1.1, -0.9, -1.0])
    assert [v.status for v in verdicts] == [VerdictStatus.CORRECT, VerdictStatus.INCORRECT, VerdictStatus.UNPARSABLE]


# ------------------------------------------------------------------ 2-step prpo-fit fit through the CLI
@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "prpo"])
def test_fit_two_steps_with_reward_options(tmp_path, monkeypatch, method):
    from helpers import build_char_tokenizer, tiny_qwen2_config
    from prpo_lightning.cli import cli_main

    monkeypatch.setattr("sys.argv", ["prpo-fit"])
    tok = build_char_tokenizer(tmp_path / "tok")
    aligner = ({"class_path": "components.aligners.GRPOAligner", "init_args": {"scale_rewards": "batch"}}
               if method == "grpo" else
               {"class_path": "components.aligners.PRPOAligner", "init_args": {"scale_rewards": "group"}})
    model = {
        "policy": None, "policy_config": tiny_qwen2_config(vocab_size=128), "tokenizer": tok,
        "verifier": [
            {"class_path": "components.verifiers.SympyMathVerifier"},
            {"class_path": "components.verifiers.BoxedFormatReward", "init_args": {"present_reward": 0.5}},
            {"class_path": "components.verifiers.CallableReward",
             "init_args": {"function": "test_rewards:answer_in_text"}},
        ],
        "reward_weights": [1.0, 0.2, 0.1],
        "aligner": aligner,
        "sampling": {"num_generations": 4, "max_new_tokens": 16},
        "optim": {"lr": 1e-3, "micro_batch_size": 8},
        "loss": {"kl_coef": 0.01},
        "ref_sync": {"sync_ref_model": True, "ref_model_mixup_alpha": 0.5, "ref_model_sync_steps": 1},
        "prompt_template": "Q: {problem}\nA:\n",
    }
    if method == "prpo":
        model["segmenter"] = {"class_path": "components.segmenters.EntropySpikeSegmenter",
                              "init_args": {"min_gap": 4}}
        model["prm"] = {"class_path": "components.prms.EquationCheckPRM"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": model}), encoding="utf-8")
    args = [
        "fit", f"--config={config}", "--seed_everything=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.max_steps=2", "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
        "--data=prpo_lightning.data.ArithmeticDataModule", "--data.num_train=16", "--data.num_eval=4",
        "--data.batch_size=2",
    ]
    cli = cli_main(args)
    module = cli.model
    assert cli.trainer.global_step == 2
    assert isinstance(module.verifier, WeightedVerifiers) and module.verifier.reward_weights == [1.0, 0.2, 0.1]
    assert module.aligner.scale_rewards == ("batch" if method == "grpo" else "group")
    assert module.ref_sync.optimizer_steps == 2
    # the reference was mixed with the policy twice: it is neither the initial policy nor the current one
    policy, ref = dict(module.policy.named_parameters()), dict(module._reference.named_parameters())
    assert any(not torch.equal(policy[k].detach(), ref[k]) for k in policy)
    metrics = cli.trainer.callback_metrics
    for key in ("train/reward/SympyMathVerifier/mean", "train/reward/BoxedFormatReward/mean",
                "train/reward/answer_in_text/mean", "train/reward/mean", "train/kl"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert json.loads(json.dumps(module.hparams["reward_weights"])) == [1.0, 0.2, 0.1]


class _StatusCounter(OutcomeVerifier):
    """Correct when the completion contains ``word``; its metric counts the CORRECT statuses it is given."""

    def __init__(self, word: str) -> None:
        self.word = word

    def verify(self, completion: str, gold: str) -> Verdict:
        ok = self.word in completion
        return Verdict(VerdictStatus.CORRECT if ok else VerdictStatus.INCORRECT, 1.0 if ok else 0.0)

    def batch_metrics(self, completions, verdicts) -> dict[str, float]:
        return {f"count/{self.word}": float(sum(v.status is VerdictStatus.CORRECT for v in verdicts))}


def test_each_verifiers_metrics_see_its_own_verdicts():
    """The combined verdict's status is the first verifier's; a later verifier's metrics must still be computed on
    its own verdicts (found in review: every verifier saw the combined ones)."""
    combined = WeightedVerifiers([_StatusCounter("a"), _StatusCounter("b")], reward_weights=[1.0, 0.5])
    completions = ["a", "b", "b", "c"]
    verdicts = combined.verify_batch(completions, ["", "", "", ""])
    assert [v.reward for v in verdicts] == [1.0, 0.5, 0.5, 0.0]
    assert sum(v.status is VerdictStatus.CORRECT for v in verdicts) == 1  # the combined status is the first's
    metrics = combined.batch_metrics(completions, verdicts)
    assert metrics["count/a"] == 1.0  # "a"
    assert metrics["count/b"] == 2.0  # "b", "b": its own verdicts (the combined statuses would give 1)
