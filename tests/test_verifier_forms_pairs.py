"""The answer-forms table of issue 26 (dev and held-out parts) and the policies that read the problem text.

The table (``tests/data/verifier_forms_{dev,heldout}.jsonl``, written by ``tests/data/make_verifier_forms_pairs.py``)
is hand-labelled over named values, inequalities, sets, units/currency/words, answer letters with their option
text, sentences, times of day, matrix arithmetic, trigonometric identities and the policies (several boxes,
rounding, list order, percent). The held-out part was written and committed before the fixes it measures.
Acceptance (issue 26): held-out precision 1.000 and recall >= 0.98.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from components.math_answer.context import problem_hints
from components.math_answer.extract import extract_final_boxes
from components.math_answer.interval_sets import integer_members, real_set
from components.math_answer.words import lone_number, time_of_day
from components.verifiers import SympyMathVerifier

DATA = Path(__file__).resolve().parent / "data"
PARTS = ("verifier_forms_dev.jsonl", "verifier_forms_heldout.jsonl")
TEMPLATE = "Putting it together, the answer is $\\boxed{{{}}}$."
CATEGORIES = {"named", "inequality", "sets", "units", "other", "policy"}


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def _completion(pair: dict) -> str:
    return pair.get("completion") or TEMPLATE.format(pair["candidate"])


@pytest.fixture(scope="module")
def verifier():
    with SympyMathVerifier(timeout_seconds=10.0, num_workers=2) as v:
        yield v


@pytest.fixture(scope="module", params=PARTS)
def graded(request, verifier) -> tuple[str, list[dict], list[bool]]:
    pairs = _load(request.param)
    rows = [{"problem": p.get("problem", "")} for p in pairs]
    verdicts = verifier.verify_batch([_completion(p) for p in pairs], [p["gold"] for p in pairs], rows)
    assert not any(v.timed_out for v in verdicts)
    return request.param, pairs, [v.is_correct for v in verdicts]


def test_table_is_large_labelled_and_split():
    dev, held = _load(PARTS[0]), _load(PARTS[1])
    assert len(dev) + len(held) >= 300 and len(held) >= 150
    for pairs in (dev, held):
        assert {p["category"] for p in pairs} == CATEGORIES
        assert all(p["why"] and p["source"] and isinstance(p["equivalent"], bool) for p in pairs)
        negatives = sum(not p["equivalent"] for p in pairs)
        assert negatives >= len(pairs) // 3  # near misses that must be rejected
    key = lambda p: (p["gold"], p["candidate"], p.get("problem", ""), p.get("completion", ""))  # noqa: E731
    assert not {key(p) for p in dev} & {key(p) for p in held}


def test_precision_and_recall(graded):
    name, pairs, predictions = graded
    tp = sum(p and q["equivalent"] for p, q in zip(predictions, pairs))
    fp = sum(p and not q["equivalent"] for p, q in zip(predictions, pairs))
    fn = sum((not p) and q["equivalent"] for p, q in zip(predictions, pairs))
    wrong = [(q["category"], q["gold"], q["candidate"]) for p, q in zip(predictions, pairs) if p != q["equivalent"]]
    assert fp == 0, f"{name}: false positives {wrong}"
    assert tp / (tp + fn) >= 0.98, f"{name}: recall {tp / (tp + fn):.3f}, misses {wrong}"


# ---------------------------------------------------------------- policies


def _ok(verifier: SympyMathVerifier, gold: str, candidate: str, problem: str | None = None) -> bool:
    return verifier.verify(TEMPLATE.format(candidate), gold, problem=problem).is_correct


def test_problem_hints_read_explicit_requests_only():
    assert problem_hints("Round your answer to the nearest tenth.").round_places == 1
    assert problem_hints("Give the price to the nearest cent.").round_places == 2
    assert problem_hints("Express it correct to three decimal places.").round_places == 3
    assert problem_hints("to the nearest hundred").round_places == -2
    assert problem_hints("What is the nearest integer to $\\sqrt{50}$?").round_places is None
    assert problem_hints("List the roots from least to greatest.").ordered
    assert not problem_hints("Find all roots, separated by commas.").ordered
    assert problem_hints("What percent of the votes did Ann get?").asks_percent
    assert problem_hints("Express the answer as a percentage.").asks_percent
    assert not problem_hints("After a 20% discount, what is the price?").asks_percent
    assert problem_hints(None) == problem_hints("")


def test_rounding_policy():
    problem = "Find the length to the nearest tenth."
    with SympyMathVerifier(num_workers=1) as default, SympyMathVerifier(num_workers=1, rounding="exact") as exact:
        assert _ok(default, "4.5", "4.47", problem) and _ok(default, "4.5", "4.45", problem)  # half away from zero
        assert not _ok(default, "4.5", "4.44", problem) and not _ok(default, "4.5", "4.47")
        assert not _ok(exact, "4.5", "4.47", problem)
        assert _ok(default, "-4.5", "-4.46", problem) and not _ok(default, "-4.5", "-4.56", problem)
        assert _ok(default, "1300", "1271", "Round to the nearest hundred.")
    with pytest.raises(ValueError, match="rounding must be one of 'problem', 'exact'"):
        SympyMathVerifier(rounding="loose")


def test_list_order_policy():
    ordered = "Enter the solutions in decreasing order."
    with SympyMathVerifier(num_workers=1) as default, SympyMathVerifier(num_workers=1, list_order="any") as free:
        with SympyMathVerifier(num_workers=1, list_order="always") as always:
            assert not _ok(default, "5, 2", "2, 5", ordered) and _ok(default, "5, 2", "5, 2", ordered)
            assert _ok(default, "5, 2", "2, 5") and _ok(free, "5, 2", "2, 5", ordered)
            assert not _ok(always, "5, 2", "2, 5") and _ok(always, "\\{5, 2\\}", "\\{2, 5\\}")
            assert not _ok(default, "(5, 2)", "(2, 5)")  # tuples are always ordered
    with pytest.raises(ValueError, match="list_order must be one of 'problem', 'any', 'always'"):
        SympyMathVerifier(list_order="sorted")


def test_multiple_boxes_policy():
    both = "Hence $x = \\boxed{-3}$ or $x = \\boxed{4}$."
    hedged = "It is $\\boxed{4}$ or $\\boxed{5}$."
    intermediate = "We get $\\boxed{2}$ for the width.\n\nSo the area is $\\boxed{8}$."
    with SympyMathVerifier(num_workers=1) as final, SympyMathVerifier(num_workers=1, multiple_boxes="last") as last:
        assert final.verify(both, "-3, 4").is_correct and not last.verify(both, "-3, 4").is_correct
        assert not final.verify(hedged, "5").is_correct and last.verify(hedged, "5").is_correct
        assert final.verify(intermediate, "8").is_correct and last.verify(intermediate, "8").is_correct
    assert extract_final_boxes("Checking: \\boxed{0} was wrong, the value is \\fbox{7}.") == ["7"]
    assert extract_final_boxes("$\\boxed{3}$, $\\boxed{3}$") == ["3"]
    with pytest.raises(ValueError, match="multiple_boxes must be one of 'final', 'last'"):
        SympyMathVerifier(multiple_boxes="all")


def test_verify_batch_reads_the_problem_text_of_the_rows():
    with SympyMathVerifier(num_workers=1) as verifier:
        completions = [TEMPLATE.format("40\\%")] * 2
        rows = [{"problem": "What percent of the 5 apples are red?"}, {"problem": "How many apples are red?"}]
        verdicts = verifier.verify_batch(completions, ["40", "40"], rows)
        assert [v.is_correct for v in verdicts] == [True, False]
        problems = [row["problem"] for row in rows]
        assert [v.is_correct for v in verifier.verify_batch(completions, ["40", "40"], problems=problems)] == [True, False]
        with pytest.raises(ValueError, match="2 completions but 1 rows"):
            verifier.verify_batch(completions, ["40", "40"], rows[:1])
        assert "multiple_boxes='final'" in repr(verifier) and "rounding='problem'" in repr(verifier)


# ---------------------------------------------------------------- building blocks


def test_real_sets_are_canonical():
    one_to_seven = [(Fraction(1), True, Fraction(7), True)]
    assert real_set("[1,3]\\cup[3,7]") == one_to_seven == real_set("|x-4|\\le3") == real_set("7\\ge t\\ge1")
    assert real_set("\\mathbb{R}\\setminus(0,4)") == real_set("x\\le0,x\\ge4") == real_set("|x-2|\\ge2")
    assert real_set("x<2\\land x>3") == []
    assert real_set("-2\\le x\\le4,x\\ne1") == real_set("[-2,4]\\setminus\\{1\\}")
    assert real_set("x<1,y>2") is None  # two variables
    assert real_set("x<\\sqrt{2}") is None  # not a rational endpoint: left to the structural comparison
    assert integer_members("\\{n\\in\\mathbb{Z}:-1<n\\le2\\}") == [0, 1, 2]
    assert integer_members("\\{n\\in\\mathbb{Z}:n>0\\}") is None  # unbounded


def test_words_and_times():
    assert lone_number("\\text{Sam ate } 1,200 \\text{ calories}") == "1200"
    assert lone_number("12 \\text{ marbles}") == "12"
    for refused in ("\\text{at least } 12", "12 \\text{ or more}", "\\text{not } 12", "12 \\text{ dozen}",
                    "12 \\text{ and } 3", "\\text{about 12 cars}", "12x", "12 \\frac{a}{b}"):
        assert lone_number(refused) is None, refused
    assert time_of_day("12:05 \\text{ a.m.}") == (5, True) and time_of_day("12:05 PM") == (725, True)
    assert time_of_day("23:59") == (1439, False) and time_of_day("24:10") is None and time_of_day("13:00 pm") is None


@pytest.mark.parametrize(
    ("gold", "candidate"),
    [
        ("20", "20\\%"),  # issue 26: the known false positive, a percent for the bare number of the same digits
        ("(1, 2)", "(b, a) = (1, 2)"),  # named tuple: b=1, a=2 is (2, 1) in name order
        ("AB = 3, CD = 4", "AB = 3, CE = 4"),  # other segment named
        ("x > 2", "2 > x"),
        ("[1, 5]", "|x - 3| < 2"),
        ("\\textbf{(B) } 6", "(B) 7"),  # right letter, wrong option value
        ("7", "\\text{7 or 8}"),
        ("13:15", "1:15 \\text{ AM}"),
        ("\\begin{pmatrix} 1 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 0 \\end{pmatrix}\\begin{pmatrix} 0 \\\\ 1 \\end{pmatrix}"),
        ("\\frac{1}{2}", "\\sin 30"),  # radians without a degree sign
    ],
)
def test_near_misses_are_rejected(verifier, gold, candidate):
    assert not _ok(verifier, gold, candidate)


def test_subclass_with_the_two_argument_verify_batch_is_told_what_to_change():
    with pytest.raises(TypeError, match=r"define verify_batch\(self, completions, golds, rows=None\)"):
        class TwoArgument(SympyMathVerifier):
            def verify_batch(self, completions, golds):
                return super().verify_batch(completions, golds)
