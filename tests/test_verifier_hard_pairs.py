"""The hard answer-form table (dev and held-out parts) and the verifier's policy options.

The table (``tests/data/verifier_hard_{dev,heldout}.jsonl``, written by ``tests/data/make_verifier_hard_pairs.py``)
is hand-labelled from MATH500/AMC23/AIME24 answer-key forms and forms learnt from published grader tests. The
held-out part was written before the fixes it measures. Acceptance (issue 17): held-out precision >= 0.99 and recall
>= 0.90; issue 12 item 14: the forms math-verify misses (repeating decimals, percent, logs with a base, intervals vs
inequalities) all right, and no false positive anywhere in the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.verifiers import SympyMathVerifier

DATA = Path(__file__).resolve().parent / "data"
TEMPLATE = "Combining the cases, the answer is $\\boxed{{{}}}$."
ITEM_14_CATEGORIES = ("repeating_decimal", "percent", "log_base", "sets")


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def verifier():
    with SympyMathVerifier(timeout_seconds=10.0, num_workers=2) as v:
        yield v


@pytest.fixture(scope="module", params=["verifier_hard_dev.jsonl", "verifier_hard_heldout.jsonl"])
def graded(request, verifier) -> tuple[str, list[dict], list[bool]]:
    pairs = _load(request.param)
    completions = [TEMPLATE.format(p["candidate"]) for p in pairs]
    verdicts = verifier.verify_batch(completions, [p["gold"] for p in pairs], problems=[p.get("problem") for p in pairs])
    assert not any(v.timed_out for v in verdicts)
    return request.param, pairs, [v.is_correct for v in verdicts]


def _scores(pairs: list[dict], predictions: list[bool]) -> tuple[float, float]:
    tp = sum(p and q["equivalent"] for p, q in zip(predictions, pairs))
    fp = sum(p and not q["equivalent"] for p, q in zip(predictions, pairs))
    fn = sum((not p) and q["equivalent"] for p, q in zip(predictions, pairs))
    return tp / max(1, tp + fp), tp / max(1, tp + fn)


def test_table_rows_are_labelled_with_reasons():
    for name in ("verifier_hard_dev.jsonl", "verifier_hard_heldout.jsonl"):
        pairs = _load(name)
        assert len(pairs) >= 120
        assert all(p["why"] and p["source"] and isinstance(p["equivalent"], bool) for p in pairs)
        assert {p["category"] for p in pairs} >= set(ITEM_14_CATEGORIES) | {"equation", "matrix", "long", "hostile"}
    dev = {(p["gold"], p["candidate"]) for p in _load("verifier_hard_dev.jsonl")}
    held = {(p["gold"], p["candidate"]) for p in _load("verifier_hard_heldout.jsonl")}
    assert not dev & held


def test_precision_and_recall(graded):
    name, pairs, predictions = graded
    precision, recall = _scores(pairs, predictions)
    assert precision == 1.0, f"{name}: precision {precision:.3f}"  # issue 12 item 14: no false positive
    assert recall >= 0.90, f"{name}: recall {recall:.3f}"  # issue 17 held-out acceptance


def test_forms_math_verify_misses_are_all_right(graded):
    name, pairs, predictions = graded
    wrong = [
        (p["category"], p["gold"], p["candidate"])
        for p, pred in zip(pairs, predictions)
        if p["category"] in ITEM_14_CATEGORIES and pred != p["equivalent"]
    ]
    assert not wrong, f"{name}: {len(wrong)} wrong"


def _ok(verifier: SympyMathVerifier, gold: str, candidate: str) -> bool:
    return verifier.verify(TEMPLATE.format(candidate), gold).is_correct


@pytest.mark.parametrize(
    ("gold", "candidate"),
    [
        ("5", "a=2, b=5"),  # several named values are not the last one
        ("(2,5)", "b=2, a=5"),  # named values are ordered by name
        ("\\frac{1}{3}", "0.333333"),
        ("\\sqrt{2}", "1.4142135623730951"),
        ("0.5", "50"),
        ("\\text{(C)}", "(C) \\text{ or } (D)"),
        ("\\text{ellipse}", "\\text{ellipse or circle}"),
    ],
)
def test_default_policies_reject(verifier, gold, candidate):
    assert not _ok(verifier, gold, candidate)


def test_percent_policies():
    asks = "What percent of the 40 cars are red?"
    with SympyMathVerifier(num_workers=1) as default, SympyMathVerifier(num_workers=1, percent="divide") as divide:
        with SympyMathVerifier(num_workers=1, percent="ignore") as ignore:
            with SympyMathVerifier(num_workers=1, percent="divide_or_bare") as bare:
                # issue 26: by default a percent never matches its bare number, unless the problem asks for a percent
                assert not _ok(default, "20", "20\\%") and not _ok(default, "20\\%", "20")
                assert default.verify(TEMPLATE.format("20\\%"), "20", problem=asks).is_correct
                assert default.verify(TEMPLATE.format("20"), "20\\%", problem=asks).is_correct
                assert not default.verify(TEMPLATE.format("20\\%"), "20", problem="A 20% tip is added. Find x.").is_correct
                assert not divide.verify(TEMPLATE.format("20\\%"), "20", problem=asks).is_correct
                assert _ok(bare, "20", "20\\%") and not _ok(divide, "20", "20\\%") and _ok(ignore, "20", "20\\%")
                assert _ok(default, "0.2", "20\\%") and _ok(divide, "0.2", "20\\%") and not _ok(ignore, "0.2", "20\\%")
                assert not _ok(default, "0.4", "4\\%") and not _ok(divide, "0.4", "4\\%") and not _ok(bare, "0.4", "4\\%")
    with pytest.raises(ValueError, match="percent must be one of 'problem', 'divide', 'divide_or_bare', 'ignore'"):
        SympyMathVerifier(percent="drop")


def test_tolerance_option_accepts_correct_roundings_only():
    with SympyMathVerifier(num_workers=1, float_rel_tol=1e-6) as tolerant:
        assert _ok(tolerant, "\\frac{1}{3}", "0.333333")
        assert _ok(tolerant, "\\sqrt{2}", "1.414214")
        assert not _ok(tolerant, "\\frac{1}{3}", "0.33")  # not within 1e-6
        assert not _ok(tolerant, "\\sqrt{2}", "1.414215")  # within 1e-6 but not a correct rounding


def test_equation_and_unit_options():
    with SympyMathVerifier(num_workers=1, equation_as_value=False, ignore_units=False) as strict:
        assert not _ok(strict, "5", "x=5") and not _ok(strict, "x=5", "5") and _ok(strict, "x=5", "x = 5")
        assert not _ok(strict, "12", "12 \\text{ cm}") and _ok(strict, "12 \\text{ cm}", "12\\text{ cm}")
        assert _ok(strict, "90", "90^\\circ")  # degree signs are notation, not units
    with pytest.raises(TypeError, match="equation_as_value must be True or False"):
        SympyMathVerifier(equation_as_value="yes")


def test_control_characters_make_the_answer_unparsable(verifier):
    from components.math_answer.compare import CompareConfig, Outcome, compare_answers

    for control in ("\x00", "\x07", "\x0b", "\x1f", "\x7f"):
        assert verifier.verify(TEMPLATE.format(f"1{control}2"), "12").status.value == "unparsable"
        outcome, detail = compare_answers("12", f"1{control}2", CompareConfig(), symbolic=False)
        assert outcome is Outcome.UNPARSABLE and "control character" in detail
    assert verifier.verify(TEMPLATE.format("1\n2"), "12").is_correct  # line breaks are whitespace


def test_long_gold_is_graded_without_sympy(verifier):
    gold = ", ".join(str(k) for k in range(2000, 2500))
    assert len(gold) > 2000
    before = verifier.stats()["symbolic"]
    assert _ok(verifier, gold, ", ".join(reversed(gold.split(", "))))
    assert not _ok(verifier, gold, gold.replace("2222", "2223"))
    assert not _ok(verifier, gold, gold + ", 3000")
    assert verifier.stats()["symbolic"] == before
