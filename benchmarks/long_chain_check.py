"""Can the shipped warm-start policy still answer the harder-chains task variant (5–8 operations)?

Greedy accuracy, the fraction of completions with a ``\\boxed{}`` answer, and completion lengths of the demo policy
on the 200 held-out problems of each task variant (``prpo_lightning.demo.arithmetic.TASKS``), and sampled (T = 1)
accuracy over 8 samples of the first 50 problems, with the completion budgets of the replication grids (64 tokens
for the default task, 128 for ``long``). Writes ``benchmarks/results/long_chain_check.json``.

Usage::

    .venv/bin/python benchmarks/long_chain_check.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prpo_lightning.demo.arithmetic import extract_boxed, generate_problems, is_correct, task_spec  # noqa: E402
from prpo_lightning.demo.policy import MODEL_NAME, generate  # noqa: E402
from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer  # noqa: E402

BUDGETS = {"default": 64, "long": 128}  # sampling.max_new_tokens of the bab and long grids


def check(model, tok, task: str, max_new_tokens: int, seed: int = 0) -> dict:
    """Greedy and sampled accuracy, boxed fraction and lengths of the policy on ``task``'s held-out problems."""
    problems = generate_problems(1234, 200, "eval", task_spec(task))
    outs = generate(model, tok, problems, max_new_tokens=max_new_tokens)
    lengths = [len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs]
    lines = [sum(1 for line in o.splitlines() if "=" in line) for o in outs]
    torch.manual_seed(seed)
    few = problems[:50]
    sampled = generate(model, tok, few, max_new_tokens=max_new_tokens, do_sample=True, num_return_sequences=8)
    answers = [p["answer"] for p in few for _ in range(8)]
    hits = [is_correct(o, a) for o, a in zip(sampled, answers)]
    groups_with_a_hit = sum(any(hits[8 * i : 8 * i + 8]) for i in range(len(few)))
    return {"task": task, "max_new_tokens": max_new_tokens, "problems": len(problems),
            "greedy_accuracy": sum(is_correct(o, p["answer"]) for o, p in zip(outs, problems)) / len(problems),
            "greedy_boxed_frac": sum(extract_boxed(o) is not None for o in outs) / len(outs),
            "greedy_length_mean": sum(lengths) / len(lengths), "greedy_length_max": max(lengths),
            "greedy_equations_mean": sum(lines) / len(lines),
            "solution_equations_mean": sum(len(p["solution"].splitlines()) - 1 for p in problems) / len(problems),
            "sampled_accuracy_T1": sum(hits) / len(hits),
            "sampled_boxed_frac_T1": sum(extract_boxed(o) is not None for o in sampled) / len(sampled),
            "sampled_groups_with_a_correct_answer": groups_with_a_hit / len(few)}


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_causal_lm(MODEL_NAME), load_tokenizer(MODEL_NAME)
    out = [check(model, tok, task, budget) for task, budget in BUDGETS.items()]
    path = REPO / "benchmarks" / "results" / "long_chain_check.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
