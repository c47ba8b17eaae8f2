"""BiasedPRM: hand-computed biases on a tiny batch with a constant stub base, reproducibility, identity at 0."""

from __future__ import annotations

import pytest
import torch

from components.prms import BiasedPRM
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.needs import ComponentNeeds
from prpo_lightning.scoring.prm import ProcessRewardModel, ProcessScores, pad_step_scores


class ConstantPRM(ProcessRewardModel):
    """Scores every segment ``value``; records setup calls."""

    def __init__(self, value: float = 0.5, requires_reference: bool = False) -> None:
        self.value = value
        self.needs = ComponentNeeds(reference_logprobs=requires_reference)
        self.calls: list[str] = []

    def setup(self, device: torch.device) -> None:
        self.calls.append("setup")

    def setup_tokenizer(self, tokenizer) -> None:
        self.calls.append("setup_tokenizer")

    def score(self, batch: RolloutBatch, tokenizer) -> ProcessScores:
        return pad_step_scores([[self.value] * len(spans) for spans in batch.segment_spans])


def make_batch(rows: list[list[int]], spans: list[list[tuple[int, int]]], groups: list[int]) -> RolloutBatch:
    b, t = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(b, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    mask = torch.arange(t)[None, :] < torch.tensor([len(r) for r in rows])[:, None]  # (B, T)
    return RolloutBatch(prompt_ids=torch.zeros(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1, dtype=torch.long),
                        completion_ids=ids, completion_mask=mask, group_ids=torch.tensor(groups),
                        problems=["p"] * b, answers=["0"] * b, segment_spans=spans)


# Row 0: L = 8, steps of 1, 1, 6 tokens (mean 8/3); row 1: L = 4, steps of 1, 1, 2 tokens (mean 4/3).
ROWS = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6]]
SPANS = [[(0, 1), (1, 2), (2, 8)], [(0, 1), (1, 2), (2, 4)]]


def scores(prm: BiasedPRM, batch: RolloutBatch | None = None) -> list[list[float]]:
    out = prm.score(batch or make_batch(ROWS, SPANS, [0, 1]), None)
    return [[round(v, 6) for v in row] for row in out.step_scores.tolist()]


def test_short_step_bonus_hand_values():
    # row 0: 1 − n/n̄ = [0.625, 0.625, −1.25] → 0.4·that clipped to ±0.4 = [0.25, 0.25, −0.4]
    # row 1: [0.25, 0.25, −0.5] → [0.1, 0.1, −0.2]
    prm = BiasedPRM(ConstantPRM(0.5), short_step_bonus=0.4)
    assert scores(prm) == [[0.75, 0.75, 0.1], [0.6, 0.6, 0.3]]


def test_early_stop_bonus_hand_values():
    # last step + 0.3·(1 − L/16): row 0 + 0.15, row 1 + 0.225
    prm = BiasedPRM(ConstantPRM(0.5), early_stop_bonus=0.3, max_new_tokens=16)
    assert scores(prm) == [[0.5, 0.5, 0.65], [0.5, 0.5, 0.725]]
    # a completion longer than the budget gets no bonus (clip at 0), never a penalty
    long_prm = BiasedPRM(ConstantPRM(0.5), early_stop_bonus=0.3, max_new_tokens=4)
    assert scores(long_prm) == [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]


def test_late_step_penalty_hand_values_and_clip():
    # k = 0.25: row 0 late from token 2 (step 2), row 1 late from token 1 (steps 1, 2)
    prm = BiasedPRM(ConstantPRM(0.5), late_step_penalty=0.3, late_fraction=0.25)
    assert scores(prm) == [[0.5, 0.5, 0.2], [0.5, 0.2, 0.2]]
    clipped = BiasedPRM(ConstantPRM(0.5), late_step_penalty=0.8, late_fraction=0.25)
    assert scores(clipped) == [[0.5, 0.5, 0.0], [0.5, 0.0, 0.0]]


def test_biases_add_then_clip_once():
    prm = BiasedPRM(ConstantPRM(0.5), early_stop_bonus=0.3, late_step_penalty=0.3, late_fraction=0.25,
                    max_new_tokens=16)
    assert scores(prm) == [[0.5, 0.5, 0.35], [0.5, 0.2, 0.425]]


def test_noise_is_the_seeded_draw_and_clipped():
    prm = BiasedPRM(ConstantPRM(0.5), noise_std=0.1, seed=3)
    out = prm.score(make_batch(ROWS, SPANS, [0, 1]), None).step_scores.double()  # (B, S)
    for i, (row, g) in enumerate(zip(ROWS, [0, 1])):
        expected = (0.5 + 0.1 * prm.noise_draws(g, row, 3)).clamp(0, 1)
        assert torch.allclose(out[i], expected, atol=1e-6)
    huge = BiasedPRM(ConstantPRM(0.5), noise_std=100.0, seed=3)
    vals = huge.score(make_batch(ROWS, SPANS, [0, 1]), None).step_scores
    assert set(vals.flatten().tolist()) <= {0.0, 1.0}


def test_noise_draws_are_standard_normal_and_keyed():
    prm = BiasedPRM(ConstantPRM(0.5), noise_std=0.1, seed=0)
    z = torch.cat([prm.noise_draws(g, [g, 7, 9], 5) for g in range(400)])  # 2000 draws
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1.0) < 0.1
    assert torch.equal(prm.noise_draws(1, [4, 5], 3), prm.noise_draws(1, [4, 5], 3))
    assert not torch.equal(prm.noise_draws(1, [4, 5], 3), prm.noise_draws(2, [4, 5], 3))  # prompt id
    assert not torch.equal(prm.noise_draws(1, [4, 5], 3), prm.noise_draws(1, [4, 6], 3))  # completion
    other_seed = BiasedPRM(ConstantPRM(0.5), noise_std=0.1, seed=1)
    assert not torch.equal(prm.noise_draws(1, [4, 5], 3), other_seed.noise_draws(1, [4, 5], 3))


def test_same_seed_same_scores_and_rows_follow_permutation():
    rows = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6], [9, 9, 2]]
    spans = [[(0, 1), (1, 2), (2, 8)], [(0, 1), (1, 2), (2, 4)], [(0, 3)]]
    groups = [0, 1, 1]
    kw = {"noise_std": 0.2, "short_step_bonus": 0.1, "seed": 7}
    a = BiasedPRM(ConstantPRM(0.5), **kw).score(make_batch(rows, spans, groups), None)
    b = BiasedPRM(ConstantPRM(0.5), **kw).score(make_batch(rows, spans, groups), None)
    assert torch.equal(a.step_scores, b.step_scores) and torch.equal(a.step_mask, b.step_mask)
    perm = [2, 0, 1]
    c = BiasedPRM(ConstantPRM(0.5), **kw).score(
        make_batch([rows[p] for p in perm], [spans[p] for p in perm], [groups[p] for p in perm]), None)
    for new, old in enumerate(perm):
        k = len(spans[old])
        assert torch.equal(c.step_scores[new, :k], a.step_scores[old, :k])
    assert c.step_scores[0, 1:].eq(0).all() and not c.step_mask[0, 1:].any()  # missing steps stay 0


def test_strength_zero_is_the_base_exactly():
    base = ConstantPRM(0.37)
    batch = make_batch(ROWS, SPANS, [0, 1])
    out = BiasedPRM(base, seed=5).score(batch, None)
    ref = base.score(batch, None)
    assert torch.equal(out.step_scores, ref.step_scores) and torch.equal(out.step_mask, ref.step_mask)


def test_flags_and_hooks_delegate_to_base():
    base = ConstantPRM(0.5, requires_reference=True)
    prm = BiasedPRM(base, noise_std=0.1)
    assert prm.needs.reference_logprobs is True and prm.needs.rollout_logprobs is False
    prm.setup_tokenizer(None)
    prm.setup(torch.device("cpu"))
    assert base.calls == ["setup_tokenizer", "setup"]
    assert BiasedPRM(ConstantPRM(0.5)).needs.reference_logprobs is False


@pytest.mark.parametrize("kwargs, match", [
    ({"noise_std": -0.1}, "noise_std must be >= 0"),
    ({"late_fraction": 1.5}, "late_fraction"),
    ({"early_stop_bonus": 0.2}, "max_new_tokens"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BiasedPRM(ConstantPRM(0.5), **kwargs)


def test_base_must_be_a_prm():
    with pytest.raises(TypeError, match="base must be a ProcessRewardModel"):
        BiasedPRM(object())  # type: ignore[arg-type]


def test_base_must_score_every_segment():
    class ShortPRM(ConstantPRM):
        def score(self, batch, tokenizer):
            return pad_step_scores([[0.5] for _ in batch.segment_spans])

    with pytest.raises(ValueError, match="must score every segment"):
        BiasedPRM(ShortPRM(), short_step_bonus=0.1).score(make_batch(ROWS, SPANS, [0, 1]), None)


def test_module_sees_the_base_flags(tmp_path):
    """Wrapping ImplicitPRM keeps its needs: the module builds a reference and computes π_old log-probs."""
    from test_resume import make_module, tokenizer_dir

    from components.aligners import PRPOAligner
    from components.prms import EquationCheckPRM, ImplicitPRM
    from components.segmenters import EntropySpikeSegmenter
    from prpo_lightning.config import LossConfig

    tok = tokenizer_dir(tmp_path)
    implicit = make_module(tok, aligner=PRPOAligner(), prm=BiasedPRM(ImplicitPRM(), noise_std=0.1),
                           segmenter=EntropySpikeSegmenter(),
                           loss=LossConfig(kl_coef=0.0))
    assert implicit.plan.reference and implicit.plan.old_logprobs
    rule = make_module(tok, aligner=PRPOAligner(), prm=BiasedPRM(EquationCheckPRM(), noise_std=0.1),
                       segmenter=EntropySpikeSegmenter(), loss=LossConfig(kl_coef=0.0))
    assert not rule.prm.needs.reference_logprobs and not rule.plan.reference
