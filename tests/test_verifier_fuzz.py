"""Adversarial fuzzing of SympyMathVerifier: >= 10,000 generated hostile completions.

Checks: no exception escapes, every verdict is well-formed, no single check hangs past the timeout (plus slack for
replacing a killed worker), nothing is executed (a sentinel file that every code-injection string would create never
appears, and ``os.system``/``eval``/``subprocess.run`` in this process are never called), and no hostile input
is graded correct.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from components.verifiers import SympyMathVerifier
from prpo_lightning.scoring.verifier import Verdict, VerdictStatus

MATH500 = Path(__file__).resolve().parents[2] / "shared" / "data" / "math500" / "test.jsonl"
TIMEOUT = 3.0
SLACK = 6.0  # killing and replacing a worker, scheduling noise on a shared 2-core machine
N_SOUP = 6800
N_MUTATIONS = 2600
FALLBACK_GOLDS = ["5", "\\frac{1}{2}", "(3,4]", "\\{1,2\\}", "x^2+1", "\\text{(B)}", "2\\sqrt{3}", "-2+7i"]

TOKENS = [
    "\\frac", "\\dfrac", "\\sqrt", "{", "}", "{", "}", "(", ")", "[", "]", "\\{", "\\}", "^", "_", "!", ",", "=",
    "+", "-", "*", "/", "\\cdot", "\\times", "\\pm", "\\le", "<", "\\infty", "\\pi", "e", "i", "x", "y", "n",
    "0", "1", "2", "9", "10", "99", "\\cup", "\\in", "\\left(", "\\right)", "\\begin{pmatrix}", "\\end{pmatrix}",
    "&", "\\\\", "\\text{", "\\mathrm{", "\\%", "\\$", "^\\circ", "\\sin", "\\log", "\\ln", "\\int", "\\sum",
    "\\lim", "\\binom", "\\boxed{", "\\fbox{", "\\\\boxed", ":", ";", ".", "\\,", "\\!", " ", "\\ldots", "|", "'",
    "\\mathbf{", "\\operatorname{", "\\over", "\\choose", "\\det", "\\matrix{", "\\overline{", "\\prime",
]
UNICODE = "αβγπ∞√∑∫≤≥±×÷−–—‐·°∈∪∩∅ℝ\u200b\u200e\u202e\ufeff\u0301\u0000\u0007\U0001f600\U0001f4a9中文答案"


def _code_strings(sentinel: Path) -> list[str]:
    path = str(sentinel)
    payloads = [
        f"__import__('os').system('touch {path}')",
        f"__import__('subprocess').call(['touch', '{path}'])",
        f"open('{path}', 'w').write('x')",
        f"eval(\"__import__('os').system('touch {path}')\")",
        f"exec(\"open('{path}','w')\")",
        f"().__class__.__base__.__subclasses__()[0]('{path}')",
        f"lambda: __import__('os').system('touch {path}')",
        f"Symbol('x').__class__.__init__.__globals__['os'].system('touch {path}')",
        f"[x for x in ().__class__.__bases__[0].__subclasses__() if x.__name__ == 'Popen'][0](['touch','{path}'])",
        f"\\text{{{path}}} + __import__('os').system('touch {path}')",
        f"sympify(\"__import__('os').system('touch {path}')\")",
        f"parse_expr(\"open('{path}','w')\")",
        f"\\sqrt{{__import__('os').system('touch {path}')}}",
        f"\\frac{{open('{path}','w')}}{{2}}",
        f"$(touch {path})",
        f"`touch {path}`",
        f"; touch {path}",
    ]
    wrappers = ["\\boxed{{{}}}", "The answer is \\boxed{{{}}}.", "{}", "\\fbox{{{}}}", "\\boxed{{x = {}}}",
                "\\boxed{{\\{{{}, 1\\}}}}", "\\boxed{{({}, 2)}}", "\\boxed{{\\begin{{pmatrix}}{} \\\\ 1\\end{{pmatrix}}}}"]
    return [w.format(p) for p in payloads for w in wrappers]


def _huge_strings() -> list[str]:
    bodies = [
        "10^{10^{10}}", "9^{9^{9^{9}}}", "100000!", "(100000)!", "2^{2^{64}}", "(10^{5000})^{5000}",
        "((10^{1000})^{1000})^{1000}", "\\binom{1000000000}{500000000}", "10!!!!!!!!", "\\sqrt[10^{9}]{2}",
        "e^{e^{e^{100}}}", "10^{-10^{10}}", "1e999999", "2^{3^{4^{5}}}", "(x+y+z)^{1000}", "(x+1)^{100000}",
        "\\prod_{k=1}^{10^{9}} k", "\\sum_{k=1}^{10^{12}} k^{k}", "\\int_0^{10^{9}} e^{x^{2}} dx", "x^{x^{x^{x}}}",
        "10^{10}^{10}^{10}", "9^9^9^9", "\\left(\\left(2^{2}\\right)^{2}\\right)^{2^{100}}", "0^{-1}", "\\frac{1}{0}",
        "\\lim_{x\\to 0} \\frac{1}{x}", "\\infty - \\infty", "99999999999999999999999^{99999}", "5000!^{5000!}",
    ]
    out = []
    for body in bodies:
        out += [f"\\boxed{{{body}}}", f"\\boxed{{{body} + 1}}", f"\\boxed{{x = {body}}}", f"\\boxed{{({body}, 1)}}",
                f"\\boxed{{\\{{{body}, 2\\}}}}", f"\\boxed{{{body}}} \\boxed{{-{body}}}", f"\\boxed{{[{body}, \\infty)}}"]
    return out


def _heavy_singles() -> list[str]:
    return [
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
        "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
        "\\boxed{" + "\\frac{1}{" * 3000 + "2" + "}" * 3000 + "}",
        "\\boxed{" + "\\sqrt{" * 3000 + "2" + "}" * 3000 + "}",
        "\\boxed{" + "1" * 1_000_000 + "}",
        "\\boxed{" + "x+" * 500_000 + "1}",
        "a" * 1_000_000,
        "\\boxed{" * 100_000,
        "}" * 100_000 + "\\boxed{1}",
        ("\\boxed{1}" * 100_000),
        "\\boxed{" + "," * 200_000 + "}",
        "\\boxed{" + "(1," * 50_000 + "1" + ")" * 50_000 + "}",
        "\\boxed{" + "".join(chr(c) for c in range(0x20, 0x3000)) + "}",
        "\\boxed{" + "2^{" * 2000 + "2" + "}" * 2000 + "}",
        "\\boxed{" + "\\left(" * 2000 + "1" + "\\right)" * 2000 + "}",
        "\\boxed{\\begin{pmatrix}" + "&".join(["1"] * 5000) + "\\end{pmatrix}}",
        "\\boxed{" + "1,000," * 10_000 + "}",
        "\\boxed{" + "\\text{" * 5000 + "a" + "}" * 5000 + "}",
    ]


def _soup(rng: random.Random) -> str:
    body = "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 40)))
    return f"... so the answer is $\\boxed{{{body}}}$"


def _mutate(gold: str, rng: random.Random) -> str:
    chars = list(gold)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randint(0, len(chars))
        if op < 0.4:
            chars.insert(pos, rng.choice(UNICODE + "{}()[]^_!\\,.-+=0123456789xe"))
        elif op < 0.7 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif chars:
            chars[min(pos, len(chars) - 1)] = rng.choice(UNICODE + "{}^!0123456789")
    return "Final answer: \\boxed{" + "".join(chars) + "}"


@pytest.fixture(scope="module")
def golds() -> list[str]:
    if MATH500.exists():
        return [json.loads(line)["answer"] for line in MATH500.read_text().splitlines() if line.strip()]
    return FALLBACK_GOLDS


def _well_formed(verdict: Verdict) -> bool:
    return isinstance(verdict, Verdict) and isinstance(verdict.status, VerdictStatus) and isinstance(verdict.reward, float)


def test_fuzz_no_hang_no_crash_nothing_executed(tmp_path, monkeypatch, golds):
    sentinel = tmp_path / "executed.txt"
    calls: list[str] = []

    def forbidden(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called during verification")

        return record

    rng = random.Random(1234)
    code = _code_strings(sentinel)
    huge = _huge_strings()
    soup = [_soup(rng) for _ in range(N_SOUP)]
    mutations = [_mutate(rng.choice(golds), rng) for _ in range(N_MUTATIONS)]
    unicode_strings = ["\\boxed{" + "".join(rng.choice(UNICODE) for _ in range(rng.randint(1, 30))) + "}"
                       for _ in range(300)]
    heavy = _heavy_singles()
    bulk = code + huge + soup + mutations + unicode_strings
    assert len(bulk) + len(heavy) >= 10_000

    with SympyMathVerifier(timeout_seconds=TIMEOUT, num_workers=2) as verifier:
        verifier.verify("\\boxed{\\sqrt{4}}", "2")  # start the workers before timing
        monkeypatch.setattr(os, "system", forbidden("os.system"))
        monkeypatch.setattr(os, "popen", forbidden("os.popen"))
        monkeypatch.setattr(builtins, "eval", forbidden("eval"))
        monkeypatch.setattr(subprocess, "run", forbidden("subprocess.run"))
        monkeypatch.setattr(subprocess, "call", forbidden("subprocess.call"))

        for text in heavy:  # one at a time: each must finish within the hard limit
            start = time.perf_counter()
            verdict = verifier.verify(text, rng.choice(golds))
            elapsed = time.perf_counter() - start
            assert _well_formed(verdict)
            assert elapsed < TIMEOUT + SLACK, (elapsed, text[:80])
            assert not verdict.is_correct or text.startswith("}") or text.startswith("\\boxed{1}")

        start = time.perf_counter()
        bulk_golds = [golds[k % len(golds)] for k in range(len(bulk))]
        verdicts = []
        for k in range(0, len(bulk), 500):  # chunks keep any single hang visible in the timing
            chunk_start = time.perf_counter()
            verdicts += verifier.verify_batch(bulk[k : k + 500], bulk_golds[k : k + 500])
            chunk_timeouts = sum(v.timed_out for v in verdicts[k : k + 500])
            assert time.perf_counter() - chunk_start < 60 + chunk_timeouts * (TIMEOUT + SLACK)
        elapsed = time.perf_counter() - start
        stats = verifier.stats()

    assert len(verdicts) == len(bulk) and all(_well_formed(v) for v in verdicts)
    assert not sentinel.exists(), "a code-injection string was executed"
    assert not calls, calls
    hostile = len(code) + len(huge)
    assert not any(v.is_correct for v in verdicts[:hostile]), [
        (t, g) for t, g, v in zip(bulk, bulk_golds, verdicts) if v.is_correct
    ][:5]
    # Timeouts and errors are reported, never silently scored: each is UNPARSABLE and counted.
    for v in verdicts:
        if v.timed_out or v.error:
            assert v.status is VerdictStatus.UNPARSABLE
    assert stats["timeouts"] == sum(v.timed_out for v in verdicts)
    assert elapsed < 240, f"bulk fuzz took {elapsed:.1f}s"
    print(f"fuzz: {len(bulk) + len(heavy)} strings, bulk {elapsed:.1f}s, stats {stats}")
