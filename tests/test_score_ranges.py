"""Scores and rewards out of range are contract errors naming the component; a step without signal counts as a skip
(issue 27, item 4: out-of-range PRM scores, extra scores per row, rewards beyond float32, dynamic sampling without
signal)."""

from __future__ import annotations

import pytest
import torch
from test_faults import _batch

from components.aligners import PRPOAligner
from components.segmenters import FixedLengthSegmenter
from prpo_lightning.batch import ComponentContractError
from prpo_lightning.scoring.pipeline import compute_advantages, grade
from prpo_lightning.scoring.prm import ProcessRewardModel, ProcessScores, pad_step_scores
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus
from prpo_lightning.training.outcome import RankReport, SkipBudget, SkippedBatchesError


class ConstantScores(ProcessRewardModel):
    """Scores every segment ``value`` (``extra`` more scores than segments on every row)."""

    def __init__(self, value: float, extra: int = 0) -> None:
        self.value, self.extra = value, extra

    def score(self, batch, tokenizer) -> ProcessScores:
        return pad_step_scores([[self.value] * (len(spans) + self.extra) for spans in batch.segment_spans])


class LogitScale(ConstantScores):
    score_range = (-20.0, 20.0)


class FixedReward(OutcomeVerifier):
    def __init__(self, reward: float) -> None:
        self.reward = reward

    def verify(self, completion: str, gold: str) -> Verdict:
        return Verdict(VerdictStatus.CORRECT, self.reward)


def _scored(prm: ProcessRewardModel) -> dict[str, float]:
    batch = _batch(["ok", "no"], [1, 1], [4, 3], [False, False])
    return compute_advantages(batch, FixedReward(1.0), PRPOAligner(), FixedLengthSegmenter(segment_length=2), prm, None)


def test_prm_scores_outside_the_declared_range_name_the_prm_and_the_range():
    with pytest.raises(ComponentContractError, match=r"ConstantScores.score returned step scores in \[34, 34\], "
                                                     r"outside its score_range \[0.0, 1.0\]"):
        _scored(ConstantScores(34.0))
    assert "advantage/process_abs_mean" in _scored(LogitScale(3.5))  # a PRM on another scale declares it
    assert "advantage/process_abs_mean" in _scored(ConstantScores(1.0))  # the bounds themselves are in range


def test_extra_scores_per_row_are_a_contract_error():
    with pytest.raises(ComponentContractError, match="marked 3 step scores on row 0, which has 2 segments"):
        _scored(ConstantScores(0.5, extra=1))


@pytest.mark.parametrize("reward", [1e300, float("inf"), float("nan")])
def test_rewards_outside_float32_are_refused_naming_the_verifier(reward):
    batch = _batch(["ok", "no"], [1, 1], [4, 3], [False, False])
    with pytest.raises(ComponentContractError, match=r"verifier FixedReward gave row 0 the reward"):
        grade(batch, FixedReward(reward))
    grade(batch, FixedReward(3e38))  # within float32's range


def test_steps_without_signal_count_against_the_skip_budget():
    budget = SkipBudget(1)
    assert budget.decide(RankReport(False, None, no_signal=True), 0, 8).reason == "no_signal"
    assert budget.consecutive == 1
    with pytest.raises(SkippedBatchesError, match="kept no group with learning signal.*constant reward"):
        budget.decide(RankReport(False, None, no_signal=True), 1, 8)
    fresh = SkipBudget(1)
    fresh.decide(RankReport(False, None, no_signal=True), 0, 8)
    assert fresh.decide(RankReport(False, None), 1, 8).update and fresh.consecutive == 0  # an update resets it
