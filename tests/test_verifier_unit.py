"""Unit tests of SympyMathVerifier and its private pipeline (extraction, normalisation, shapes, comparison, pool)."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from components.math_answer.compare import WARMUP_PAYLOAD, CompareConfig, Outcome, compare_answers, symbolic_task
from components.math_answer.extract import extract_answer, extract_last_boxed
from components.math_answer.normalize import normalize
from components.math_answer.numeric import parse_number
from components.math_answer.parse import UnsafeExpression, check_latex
from components.math_answer.pool import TimeoutPool
from components.verifiers import SympyMathVerifier
from prpo_lightning.scoring.verifier import OutcomeVerifier, VerdictStatus


def slow_task(payload):
    """Worker handler for the timeout tests: hangs on the candidate ``\\sqrt{9}``, else grades normally."""
    if payload[1] == "\\sqrt{9}":
        time.sleep(60)
    return symbolic_task(payload)


@pytest.fixture(scope="module")
def verifier():
    with SympyMathVerifier(timeout_seconds=10.0, num_workers=2) as v:
        yield v


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{3} no wait \\boxed{4}", "4"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # two nesting levels (the authors' regex fails)
        ("\\boxed{\\boxed{7}}", "7"),
        ("\\fbox{x+1}", "x+1"),
        ("$\\boxed 9$", "9"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{2} and then \\boxed{ truncated", "2"),
        ("\\boxed{a} and \\boxed{\\fbox{b} c}", "\\fbox{b} c"),
        ("no box here, the answer is 5", None),
        ("the last number is 42", None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


def test_extract_any_depth_and_linear_time():
    deep = "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"
    assert extract_last_boxed(deep) == "{" * 5000 + "1" + "}" * 5000
    start = time.perf_counter()
    assert extract_last_boxed("\\boxed{" * 200_000) is None
    assert time.perf_counter() - start < 5


def test_answer_is_fallback_off_by_default():
    text = "Thus the answer is $\\frac{1}{2}$.\nDone"
    assert extract_answer(text) is None
    assert extract_answer(text, answer_is_fallback=True) == "\\frac{1}{2}"


# ----------------------------------------------------------------------------- normalisation and numbers


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("10,\\!080", "10,080"),
        ("\\$18.90", "18.90"),
        ("106^\\circ", "106"),
        ("15\\mbox{ cm}^2", "15"),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
        ("\\frac 34", "\\frac{3}{4}"),
        ("11\\sqrt2", "11\\sqrt{2}"),
        (".35625", "0.35625"),
        ("25\\%", "25"),
        ("\\cot x", "\\cot x"),
        ("2m", "2m"),  # a variable is never taken for a unit
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_parse_number_exact():
    assert parse_number("\\frac{3}{4}").value == parse_number("0.75").value
    assert parse_number("137\\frac{1}{2}").value * 2 == 275
    assert parse_number("-\\frac{35}{9}").value < 0
    assert parse_number("6.72\\times10^{-5}").value == parse_number("0.0000672").value
    assert parse_number("\\sqrt{2}") is None
    assert parse_number("1" * 5000) is None


# ----------------------------------------------------------------------------- comparison (gold-guided)

EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\dfrac{1}{2}"),
    ("58,500", "58500"),
    ("10080", "10,080"),
    ("3, 5, 7", "7, 3, 5"),
    ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1-\\sqrt{5}, 1+\\sqrt5"),
    ("\\text{(B)}", "B"),
    ("\\text{Evelyn}", "\\text{evelyn}"),
    ("x \\in [-2,7]", "-2 \\le x \\le 7"),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(3, \\infty) \\cup (-\\infty, 2)"),
    ("204_5", "204_{5}"),
    ("x=5", "5"),
    ("5", "x = 5"),
    ("y = 2x + 3", "2x+3"),
    ("2x+4y-3=0", "y = -\\frac{1}{2}x + \\frac{3}{4}"),
    ("(a+5)(b+2)", "ab+2a+5b+10"),
    ("\\cot x", "\\frac{\\cos x}{\\sin x}"),
    ("-2 + 7i", "7i - 2"),
    ("14 - i", "14.0 - 1.0i"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("11\\sqrt2", "\\sqrt{242}"),
    ("\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}", "\\begin{bmatrix} 0.2 \\\\ -3.6 \\end{bmatrix}"),
    ("137 \\frac{1}{2}", "\\frac{275}{2}"),
    ("e^{16}-1", "-1+e^{16}"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{3}", "0.33"),
    ("\\pm 2021", "2021"),
    ("\\frac{1}{2004!}", "\\frac{1}{2006!}"),
    ("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}"),
    ("(2,4)", "[2,4]"),
    ("(15,-29)", "(-29,15)"),
    ("58,500", "58, 500"),
    ("1 - \\frac{1}{\\mathrm{e}}", "1 + \\frac{1}{\\mathrm{e}}"),
    ("12:00", "1:00"),
    ("\\text{(B)}", "C"),
    ("y = 2x + 3", "y = 2x - 3"),
    ("3x-1y+13=0", "3x + 4y + 14=0"),
    ("25", "25, 26"),
    ("5", "\\pm 5"),
    ("\\frac{\\pi}{6}", "30^\\circ"),  # no unit conversion guessing
    ("25", "0.25"),  # no percent guessing
]


@pytest.mark.parametrize(("gold", "candidate"), EQUIVALENT)
def test_equivalent(verifier, gold, candidate):
    verdict = verifier.verify(f"so the answer is $\\boxed{{{candidate}}}$", gold)
    assert verdict.status is VerdictStatus.CORRECT, verdict


@pytest.mark.parametrize(("gold", "candidate"), NOT_EQUIVALENT)
def test_not_equivalent(verifier, gold, candidate):
    verdict = verifier.verify(f"so the answer is $\\boxed{{{candidate}}}$", gold)
    assert verdict.status is not VerdictStatus.CORRECT, verdict


def test_fast_path_decides_plain_numbers_without_sympy():
    config = CompareConfig()
    assert compare_answers("\\frac{3}{4}", "0.75", config, symbolic=False)[0] is Outcome.EQUAL
    assert compare_answers("12", "13", config, symbolic=False)[0] is Outcome.DIFFERENT
    assert compare_answers("\\sqrt{4}", "2", config, symbolic=False)[0] is Outcome.UNKNOWN


def test_float_tolerance_is_relative_and_configurable():
    assert compare_answers("3.14159265", "3.1415927", CompareConfig(1e-6), False)[0] is Outcome.EQUAL
    assert compare_answers("3.14159265", "3.1415927", CompareConfig(0.0), False)[0] is Outcome.DIFFERENT
    assert compare_answers("0.0000672", "0.0000673", CompareConfig(1e-6), False)[0] is Outcome.DIFFERENT
    assert compare_answers("\\frac{1}{3}", "0.333333", CompareConfig(1e-6), False)[0] is Outcome.EQUAL
    assert compare_answers("1000000", "1000001.0", CompareConfig(1e-6), False)[0] is Outcome.DIFFERENT
    assert compare_answers("6", "6.0000001", CompareConfig(1e-6), False)[0] is Outcome.DIFFERENT  # not a rounding
    assert compare_answers("0.3", "0.30000000000000004", CompareConfig(1e-6), False)[0] is Outcome.EQUAL


# ----------------------------------------------------------------------------- verdicts, rewards, safety nets


def test_rewards_are_configurable():
    with SympyMathVerifier(correct_reward=2.0, incorrect_reward=-0.5, unparsable_reward=-3.0) as v:
        assert v.verify("\\boxed{4}", "4").reward == 2.0
        assert v.verify("\\boxed{5}", "4").reward == -0.5
        no_box = v.verify("I think it is 4", "4")
        assert no_box.status is VerdictStatus.UNPARSABLE and no_box.reward == -3.0 and no_box.extracted is None
        assert v.stats()["total"] == 3 and v.stats()["unparsable"] == 1


def test_is_an_outcome_verifier_and_batch_checks_lengths(verifier):
    assert isinstance(verifier, OutcomeVerifier)
    with pytest.raises(ValueError, match="completions"):
        verifier.verify_batch(["\\boxed{1}"], ["1", "2"])


def test_constructor_validation():
    with pytest.raises(ValueError):
        SympyMathVerifier(timeout_seconds=0)
    with pytest.raises(ValueError):
        SympyMathVerifier(num_workers=0)


def test_guards_reject_huge_inputs_before_sympy(verifier):
    for bad in ("10^{10^{10}}", "100000!", "(x)!", "\\binom{1000000}{3}", "9" * 400):
        with pytest.raises(UnsafeExpression):
            check_latex(normalize(bad))
    for candidate in ("10^{10^{10}}", "100000!", "2^{2^{2^{2^{2^{2}}}}}", "(10^{5000})^{5000}"):
        verdict = verifier.verify(f"\\boxed{{{candidate}}}", "5")
        assert verdict.status is VerdictStatus.UNPARSABLE and not verdict.timed_out, verdict


def test_unreadable_gold_is_counted_as_error(verifier):
    verdict = verifier.verify("\\boxed{\\sqrt{2}}", "\\frac{1}{0}")
    assert verdict.status is VerdictStatus.UNPARSABLE
    assert verdict.error is not None and "gold" in verdict.error


def test_timeout_kills_worker_and_is_never_scored_wrong():
    with SympyMathVerifier(timeout_seconds=1.0, num_workers=2, unparsable_reward=-7.0) as v:
        v._pool = TimeoutPool("test_verifier_unit:slow_task", num_workers=2, warmup=WARMUP_PAYLOAD)
        warm = v.verify_batch(["\\boxed{\\sqrt{4}}", "\\boxed{\\sqrt{25}}"], ["2", "5"])  # both workers up
        assert all(x.is_correct for x in warm)
        start = time.perf_counter()
        verdicts = v.verify_batch(["\\boxed{\\sqrt{4}}", "\\boxed{\\sqrt{9}}", "\\boxed{\\sqrt{4}}"], ["2", "3", "2"])
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0 + 5.0
        assert verdicts[1].timed_out and verdicts[1].status is VerdictStatus.UNPARSABLE and verdicts[1].reward == -7.0
        assert verdicts[0].is_correct and verdicts[2].is_correct
        assert v.stats()["timeouts"] == 1
        assert v.verify("\\boxed{\\sqrt{16}}", "4").is_correct  # the replacement worker serves


def test_works_from_threads(verifier):
    results: list[bool] = []

    def work(k: int) -> None:
        results.append(verifier.verify(f"\\boxed{{\\sqrt{{{k * k}}}}}", str(k)).is_correct)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [True] * 6


def test_pickle_and_lazy_pool():
    v = SympyMathVerifier(num_workers=1)
    assert v._pool is None  # nothing started by construction
    clone = pickle.loads(pickle.dumps(v))
    assert clone._pool is None and clone.timeout_seconds == v.timeout_seconds
    assert clone.verify("\\boxed{0.5}", "\\frac12").is_correct  # fast path: still no worker
    assert clone._pool is None
    clone.close()


def test_pool_timeout_and_recovery():
    pool = TimeoutPool("time:sleep", num_workers=2)
    try:
        results = pool.run([0.01, 30, 0.01], timeout=1.0)
        assert [r.timed_out for r in results] == [False, True, False]
        assert results[1].seconds < 3.0
        assert all(not r.timed_out for r in pool.run([0.01, 0.01], timeout=2.0))
    finally:
        pool.close()


def test_jsonargparse_can_build_it():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(SympyMathVerifier, "verifier")
    cfg = parser.parse_args(["--verifier.timeout_seconds=2.5", "--verifier.incorrect_reward=0"])
    built = parser.instantiate_classes(cfg).verifier
    assert built.timeout_seconds == 2.5 and built.incorrect_reward == 0.0
