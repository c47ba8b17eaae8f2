"""The demo's synthetic arithmetic task: determinism, split disjointness, 2–4 true equations, boxed answers."""

from __future__ import annotations

import re

import pytest

from prpo_lightning.demo.arithmetic import (
    DEFAULT_SPEC,
    TaskSpec,
    check_equation,
    extract_boxed,
    generate_problems,
    is_correct,
    make_split,
    read_jsonl,
    split_of,
    write_jsonl,
)


def test_make_split_is_deterministic_and_seed_dependent():
    a = make_split(3, 50, 20)
    b = make_split(3, 50, 20)
    c = make_split(4, 50, 20)
    assert a == b
    assert a[0] != c[0]
    train, held = a
    assert len(train) == 50 and len(held) == 20
    assert [p["id"] for p in train] == list(range(50))
    assert all(set(p) == {"id", "problem", "solution", "answer"} for p in train + held)


def test_prefix_stability():
    """Asking for more problems extends the list without changing the first ones."""
    small, _ = make_split(0, 10, 0)
    big, _ = make_split(0, 100, 0)
    assert big[:10] == small


def test_splits_disjoint_unique_and_seed_independent():
    train0, held0 = make_split(0, 2000, 500)
    train1, held1 = make_split(1, 2000, 500)
    train_texts = {p["problem"] for p in train0 + train1}
    held_texts = {p["problem"] for p in held0 + held1}
    assert not train_texts & held_texts
    assert len({p["problem"] for p in train0}) == len(train0)
    assert len({p["problem"] for p in held0}) == len(held0)
    assert all(split_of(p["problem"]) == "train" for p in train0)
    assert all(split_of(p["problem"]) == "eval" for p in held0)


@pytest.mark.parametrize("seed", [0, 7])
def test_solutions_are_true_equation_chains_ending_in_boxed_answer(seed):
    train, held = make_split(seed, 300, 100)
    n_ops_seen = set()
    for p in train + held:
        lines = p["solution"].split("\n")
        eqs, last = lines[:-1], lines[-1]
        n_ops_seen.add(len(eqs))
        assert 2 <= len(eqs) <= 4
        assert last == f"\\boxed{{{p['answer']}}}"
        assert extract_boxed(p["solution"]) == p["answer"]
        assert is_correct(p["solution"], p["answer"])
        prev = None
        for line in eqs:
            assert check_equation(line) is True, line
            a, _, _, _, c = line.split(" ")
            if prev is not None:
                assert a == prev  # each line continues from the previous result
            prev = c
            assert 0 <= int(c) <= DEFAULT_SPEC.max_value
        assert prev == p["answer"]
        # the statement is the left-to-right chain as a parenthesised expression
        expr = eqs[0].split(" = ")[0]
        for line in eqs[1:]:
            expr = f"({expr}) {line.split(' = ')[0].split(' ', 1)[1]}"
        assert p["problem"] == expr
    assert n_ops_seen == {2, 3, 4}


def test_words_style():
    probs = generate_problems(0, 20, "train", TaskSpec(style="words"))
    for p in probs:
        n = p["solution"].count("\n")
        assert p["problem"].startswith("Start with ") and p["problem"].endswith(".")
        assert len(re.findall(r", (add|subtract|multiply by|divide by) \d+", p["problem"])) == n


def test_division_is_exact_and_all_operators_occur():
    train, _ = make_split(0, 500, 0)
    ops = set()
    for p in train:
        for line in p["solution"].split("\n")[:-1]:
            a, op, b, _, c = line.split(" ")
            ops.add(op)
            if op == "/":
                assert int(a) % int(b) == 0 and int(a) // int(b) == int(c)
    assert ops == {"+", "-", "*", "/"}


def test_spec_knobs():
    probs = generate_problems(0, 50, "train", TaskSpec(min_ops=2, max_ops=2, max_value=30))
    for p in probs:
        assert p["solution"].count("\n") == 2
        assert int(p["answer"]) <= 30


def test_jsonl_round_trip(tmp_path):
    train, held = make_split(0, 5, 5)
    path = write_jsonl(train, tmp_path / "sub" / "train.jsonl")
    assert read_jsonl(path) == train


def test_grading_helpers():
    assert extract_boxed("x\n\\boxed{3}\n\\boxed{ 12 }") == "12"
    assert extract_boxed("no box") is None
    assert is_correct("1 + 1 = 2\n\\boxed{2}", "2")
    assert not is_correct("\\boxed{3}", "2")
    assert not is_correct("2", "2")
    assert check_equation("3 + 4 = 7") is True
    assert check_equation("3 * 4 = 13") is False
    assert check_equation("7 / 2 = 3") is False
    assert check_equation("\\boxed{7}") is None


def test_long_task_variant_has_5_to_8_true_equations_and_reaches_the_datamodule():
    from prpo_lightning.data import ArithmeticDataModule
    from prpo_lightning.demo.arithmetic import LONG_SPEC, task_spec

    assert task_spec("long") == LONG_SPEC and task_spec("default") == DEFAULT_SPEC
    problems = generate_problems(0, 200, "train", LONG_SPEC)
    lengths = {len(p["solution"].splitlines()) - 1 for p in problems}  # equations, then the boxed line
    assert lengths == {5, 6, 7, 8}
    assert all(check_equation(line) for p in problems for line in p["solution"].splitlines()[:-1])
    dm = ArithmeticDataModule(num_train=6, num_eval=3, task="long")
    train, held_out = dm.load_rows()
    assert train == generate_problems(1234, 6, "train", LONG_SPEC)
    assert held_out == generate_problems(1234, 3, "eval", LONG_SPEC)
    with pytest.raises(ValueError, match="unknown arithmetic task 'longer'"):
        ArithmeticDataModule(task="longer")
