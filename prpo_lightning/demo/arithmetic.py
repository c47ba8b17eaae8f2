"""A seeded synthetic multi-step arithmetic task for the offline demo.

Each problem is a short chain of 2–4 operations on small integers, stated in words::

    Start with 3, add 4, multiply by 5, subtract 6.

and its worked solution states one true equation per line, applied left to right, then the boxed answer::

    3 + 4 = 7
    7 * 5 = 35
    35 - 6 = 29
    \\boxed{29}

Operators are ``+``, ``-``, ``*`` and ``/`` (integer division that always divides exactly); every intermediate
value is a non-negative integer no larger than ``max_value``.

Train/held-out split. Whether a problem is held out depends only on a hash of its text, never on the seed or the
sizes requested, so every held-out problem of every call is disjoint from every training problem of every call
(including the problems the builtin demo policy was warm-started on). Within a split, problems are unique.

Main entry points: :func:`make_split`, :func:`generate_problems`, :func:`write_jsonl` / :func:`read_jsonl`, and for
grading :func:`extract_boxed` / :func:`is_correct`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Problem = dict[str, Any]
"""A problem record: ``{"id": int, "problem": str, "solution": str, "answer": str}``."""

SPLITS = ("train", "eval")
HELD_OUT_MODULUS = 5  # a problem is held out iff hash(problem text) % 5 == 0 (about 20% of the problem space)

_WORDS = {"+": "add {b}", "-": "subtract {b}", "*": "multiply by {b}", "/": "divide by {b}"}


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty knobs of the generator (the defaults are what the demo policy is trained and evaluated on).

    Attributes:
        min_ops, max_ops: number of operations per problem (inclusive).
        start_range: inclusive range of the starting number.
        add_range: inclusive range of added / subtracted operands.
        mul_range: inclusive range of multipliers and divisors.
        max_value: upper bound on every intermediate value.
        style: ``"words"`` (``Start with 3, add 4, multiply by 5.``) or ``"expr"`` (``(3 + 4) * 5``).
    """

    min_ops: int = 2
    max_ops: int = 4
    start_range: tuple[int, int] = (1, 12)
    add_range: tuple[int, int] = (1, 9)
    mul_range: tuple[int, int] = (2, 4)
    max_value: int = 50
    style: str = "expr"


DEFAULT_SPEC = TaskSpec()
LONG_SPEC = TaskSpec(min_ops=5, max_ops=8)
"""Harder chains: 5–8 operations per problem (the default mixes 2–4), same operands and value bound."""
TASKS: dict[str, TaskSpec] = {"default": DEFAULT_SPEC, "long": LONG_SPEC}
"""Named task variants (``ArithmeticDataModule(task=...)``, ``benchmarks/replicate_grids.py``)."""


def task_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of a named variant of :data:`TASKS`.

    Raises:
        ValueError: if ``task`` is not one of them.
    """
    if task not in TASKS:
        raise ValueError(f"unknown arithmetic task {task!r}: use one of {sorted(TASKS)}")
    return TASKS[task]


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} does not divide exactly")
        return a // b
    raise ValueError(f"unknown operator {op!r}")


def _random_chain(rng: random.Random, spec: TaskSpec) -> tuple[int, list[tuple[str, int]]]:
    """Draw a start value and a list of ``(op, operand)`` keeping all values in ``[0, spec.max_value]``."""
    n_ops = rng.randint(spec.min_ops, spec.max_ops)
    start = rng.randint(*spec.start_range)
    cur = start
    steps: list[tuple[str, int]] = []
    while len(steps) < n_ops:
        choices: list[tuple[str, int]] = []
        lo, hi = spec.add_range
        if cur + lo <= spec.max_value:
            choices.append(("+", rng.randint(lo, min(hi, spec.max_value - cur))))
        if cur - lo >= 0:
            choices.append(("-", rng.randint(lo, min(hi, cur))))
        mlo, mhi = spec.mul_range
        if cur > 0 and cur * mlo <= spec.max_value:
            choices.append(("*", rng.randint(mlo, min(mhi, spec.max_value // cur))))
        divisors = [d for d in range(mlo, mhi + 1) if cur > 0 and cur % d == 0]
        if divisors:
            choices.append(("/", rng.choice(divisors)))
        op, b = rng.choice(choices)  # "+" or "-" is always possible for the default spec
        steps.append((op, b))
        cur = _apply(cur, op, b)
    return start, steps


def render(start: int, steps: list[tuple[str, int]], style: str = "words") -> tuple[str, str, str]:
    """Return ``(problem, solution, answer)`` text for a chain.

    The solution is one equation ``a op b = c`` per line, then ``\\boxed{answer}`` on the last line.
    """
    if style == "words":
        parts = [f"Start with {start}"] + [_WORDS[op].format(b=b) for op, b in steps]
        problem = ", ".join(parts) + "."
    elif style == "expr":
        problem = str(start)
        for i, (op, b) in enumerate(steps):
            problem = f"({problem} {op} {b})" if i < len(steps) - 1 else f"{problem} {op} {b}"
    else:
        raise ValueError(f"unknown style {style!r}")
    lines = []
    cur = start
    for op, b in steps:
        nxt = _apply(cur, op, b)
        lines.append(f"{cur} {op} {b} = {nxt}")
        cur = nxt
    lines.append(f"\\boxed{{{cur}}}")
    return problem, "\n".join(lines), str(cur)


def split_of(problem_text: str) -> str:
    """``"eval"`` if the problem text hashes into the held-out bucket, else ``"train"`` (seed-independent)."""
    h = int.from_bytes(hashlib.sha256(problem_text.encode("utf-8")).digest()[:8], "big")
    return "eval" if h % HELD_OUT_MODULUS == 0 else "train"


def iter_problems(seed: int, split: str, spec: TaskSpec = DEFAULT_SPEC) -> Iterator[Problem]:
    """Yield an endless, deterministic stream of unique problems of ``split`` (``"train"`` or ``"eval"``).

    Ids count from 0 within the stream.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"prpo-demo-arith:{seed}")
    seen: set[str] = set()
    idx = 0
    misses = 0
    while True:
        problem, solution, answer = render(*_random_chain(rng, spec), style=spec.style)
        if problem in seen or split_of(problem) != split:
            misses += 1
            if misses > 1_000_000:
                raise RuntimeError("problem space exhausted: widen the TaskSpec ranges or ask for fewer problems")
            continue
        misses = 0
        seen.add(problem)
        yield {"id": idx, "problem": problem, "solution": solution, "answer": answer}
        idx += 1


def generate_problems(seed: int, n: int, split: str = "train", spec: TaskSpec = DEFAULT_SPEC) -> list[Problem]:
    """The first ``n`` problems of :func:`iter_problems` (deterministic given ``seed``, ``split``, ``spec``)."""
    out = []
    for p in iter_problems(seed, split, spec):
        if len(out) >= n:
            break
        out.append(p)
    return out


def make_split(seed: int, n_train: int, n_eval: int, spec: TaskSpec = DEFAULT_SPEC) -> tuple[list[Problem], list[Problem]]:
    """Seeded train and held-out problem lists.

    Args:
        seed: any int; the same seed always gives the same problems.
        n_train: number of training problems.
        n_eval: number of held-out problems.
        spec: difficulty knobs (defaults match the builtin demo policy).

    Returns:
        ``(train, eval)``: lists of ``{"id", "problem", "solution", "answer"}`` dicts. The two lists are disjoint
        by problem text, and held-out problems are never among the problems the demo policy was trained on.
    """
    return generate_problems(seed, n_train, "train", spec), generate_problems(seed, n_eval, "eval", spec)


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write one JSON object per line; creates parent directories. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Problem]:
    """Read a JSONL file written by :func:`write_jsonl`."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` in ``text`` (stripped), or None."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def is_correct(completion: str, answer: str) -> bool:
    """Exact numeric match of the completion's last boxed answer (a simple grader for measurement and tests)."""
    got = extract_boxed(completion)
    if got is None:
        return False
    try:
        return float(got) == float(answer)
    except ValueError:
        return got == answer.strip()


_EQ = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


def check_equation(line: str) -> bool | None:
    """True/False for a line ``a op b = c`` that is true/false; None if the line is not such an equation."""
    m = _EQ.match(line)
    if not m:
        return None
    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    try:
        return _apply(a, op, b) == c
    except ValueError:
        return False
