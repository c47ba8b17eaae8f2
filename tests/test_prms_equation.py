"""EquationCheckPRM and the safe arithmetic evaluator it shares with the verifier package."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.aligners import PRPOAligner
from components.equation_check import EquationCheckPRM, check_equation, find_equations
from components.math_answer.arithmetic import evaluate_arithmetic
from components.prms import EquationCheckPRM as Reexported
from components.segmenters import DelimiterSegmenter, FixedLengthSegmenter
from prpo_lightning.batch import RolloutBatch

torch.set_num_threads(1)


class CharTokenizer:
    """One character per token; ids index into ``alphabet``; id 0 is EOS (decoded as "" when skipped)."""

    def __init__(self, alphabet: str):
        self.alphabet = "\x00" + alphabet

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]

    def batch_decode(self, seqs, skip_special_tokens=False, **_):
        return ["".join("" if (t == 0 and skip_special_tokens) else self.alphabet[t] for t in s) for s in seqs]


def char_batch(texts, tok, rewards):
    rows = [tok.encode(t) + [0] for t in texts]  # EOS at the end
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    mask = torch.arange(t)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
    return RolloutBatch(
        prompt_ids=torch.zeros(len(rows), 1, dtype=torch.long),
        prompt_mask=torch.ones(len(rows), 1, dtype=torch.long),
        completion_ids=ids,
        completion_mask=mask,
        group_ids=torch.zeros(len(rows), dtype=torch.long),
        problems=["q"] * len(rows),
        answers=["29"] * len(rows),
        outcome_rewards=torch.tensor(rewards, dtype=torch.float32),
    )


@pytest.mark.parametrize(
    "text,value",
    [
        ("3 + 4*(2 - 1)", Fraction(7)),
        ("35 - 6", Fraction(29)),
        ("7 \\times 5", Fraction(35)),
        ("\\frac{6}{4}", Fraction(3, 2)),
        ("-2^2", Fraction(-4)),
        ("0.1 + 0.2", Fraction(3, 10)),
        ("12 \\div 4 \\cdot 3", Fraction(9)),
        ("2^10^10", None),  # exponent bound
        ("9" * 500, None),  # digit bound (verifier's parse_number)
        ("(" * 100 + "1" + ")" * 100, None),  # depth bound
        ("1/0", None),
        ("__import__('os').system('echo hi')", None),  # never evaluated as Python
        ("2(3)", None),  # no implicit multiplication
        ("", None),
    ],
)
def test_safe_arithmetic_evaluator(text, value):
    assert evaluate_arithmetic(text) == value


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3 + 4 = 7", [True]),
        ("7 * 2 = 15", [False]),
        ("7 * 2 = 14\n\\boxed{14}", [True]),
        ("7 * 2 = \\boxed{14}", [True]),
        ("so 3+4=8, and 8 - 1 = 7.", [False, True]),
        ("a = 3 + 4 = 7", [True]),
        ("3 \\times 4 = 12 = 2^2 \\cdot 3", [True]),
        ("1/3 = 0.33", [True]),  # decimal rounded to its written precision
        ("1/3 = 0.4", [False]),
        ("5/0 = 1", [False]),
        ("x + 3 = 7", []),  # glued to a variable: not arithmetic
        ("x2 = 2", []),
        ("2 = 2x", []),
        ("x = 5", []),
        ("\\pi - 3 = 0.14", []),
        ("The answer is \\boxed{29}", []),
    ],
)
def test_find_and_check_equations(text, expected):
    assert [check_equation(e) for e in find_equations(text)] == expected


def test_equation_check_prm_on_the_demo_format():
    prm = Reexported()
    assert prm is not None and isinstance(prm, EquationCheckPRM) and not prm.needs.reference_logprobs
    texts = [
        "3 + 4 = 7\n7 * 5 = 35\n35 - 6 = 29\n\\boxed{29}",  # all right
        "3 + 4 = 7\n7 * 5 = 36\n36 - 6 = 30\n\\boxed{30}",  # an arithmetic slip in step 2
        "I think it is \\boxed{29}",  # no equation at all
        "",  # empty completion (just EOS)
    ]
    tok = CharTokenizer("0123456789 +-*/=\\{}abcdefghijklmnopqrstuvwxyzI\n")
    batch = char_batch(texts, tok, [1.0, -1.0, 1.0, -1.0])
    batch.segment_spans = DelimiterSegmenter(delimiters=["\n"]).segment(batch, tok)
    scores = prm.score(batch, tok)
    assert scores.step_mask.sum(1).tolist() == [4, 4, 1, 1]
    assert scores.step_scores[0].tolist() == [1.0, 1.0, 1.0, 0.5]
    assert scores.step_scores[1].tolist() == [1.0, 0.0, 1.0, 0.5]  # 36 - 6 = 30 is itself true
    assert scores.step_scores[2, 0].item() == 0.5 and scores.step_scores[3, 0].item() == 0.5
    assert scores.token_scores is None
    # PRPO consumes it: the slipped step's tokens get Z = (0 − 0.5)/σ0 plus β
    batch.step_scores, batch.step_mask = scores.step_scores, scores.step_mask
    adv = PRPOAligner().align(batch)
    s, _ = batch.segment_spans[1][1]
    assert float(adv[1, s]) == pytest.approx(-0.5 / (1 / 12) ** 0.5 + (-1.0 - 0.0), abs=1e-5)


def test_equation_cut_by_a_segment_boundary_is_credited_to_its_last_segment():
    prm = EquationCheckPRM(no_equation_score=0.25)
    assert prm.score_steps(["3 + 4 = 7\n7 * 5 = ", "35\n35 - 6 = 28\n", "\\boxed{28}"]) == [1.0, 0.5, 0.25]
    tok = CharTokenizer("0123456789 +-*=\n")
    batch = char_batch(["3 + 4 = 7\n7 * 5 = 35"], tok, [1.0])
    batch.segment_spans = FixedLengthSegmenter(segment_length=7).segment(batch, tok)
    got = prm.score(batch, tok).step_scores[0].tolist()
    # chars 0-6 "3 + 4 =", 7-13 " 7\n7 * ", 14-20 "5 = 35" + EOS: eq1 ends in seg 1, eq2 in seg 2
    assert got == [0.25, 1.0, 1.0]
    with pytest.raises(ValueError):
        EquationCheckPRM(no_equation_score=1.5)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="0123456789 +-*/^=()x.\n\\{}frac", max_size=60))
def test_property_scores_in_unit_interval_for_any_text(text):
    scores = EquationCheckPRM().score_steps([text[: len(text) // 2], text[len(text) // 2 :]])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
