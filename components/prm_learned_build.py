"""Rebuild the shipped learned demo PRM (``components/prm_models/arith-prm-tiny``) from scratch, offline.

1. **Step data.** Completions sampled (T = 1) from the warm-started demo policy ``prpo-demo/arith-qwen2-tiny`` on
   training-split problems, split into steps at line ends (as ``DelimiterSegmenter(["\\n"])`` splits them: the
   demo tokenizer is character-level), each step labelled with the score of the exact checker of
   :class:`~components.equation_check.EquationCheckPRM` (the fraction of the step's equations that are true; 0.5
   for a step without an equation, such as the ``\\boxed{}`` line). Held-out steps come the same way from the
   replication's 200 held-out problems (the ``"eval"`` hash bucket, never trained on).
2. **Model.** :class:`~components.prm_qwen.Qwen2ForProcessRewardModel` with the policy's config; its decoder is
   initialised from the policy's weights, its head at random; the tokenizer is the policy's plus ``<step>``.
3. **Training.** AdamW, cross-entropy of ``softmax(logits at <step>)`` against the (soft) labels, a fixed number
   of steps or a wall-clock budget, whichever ends first; one thread by default, seeded.
4. **Measure and save.** Step accuracy on the held-out steps that state an equation (score ≥ 0.5 read as
   "correct", the label is the checker's), with the base rate and the accuracy on correct and on wrong steps, are
   written to ``prm_train.json`` beside the weights.

Usage (about 10 CPU minutes on one thread: 5 to sample and label, 5 to train)::

    python -m components.prm_learned_build                    # writes components/prm_models/arith-prm-tiny
    python -m components.prm_learned_build --check            # true vs off-by-one worked solutions, shipped PRM
    python -m components.prm_learned_build --out /tmp/prm --train-problems 64 --max-steps 5   # a quick check
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from components.equation_check import EquationCheckPRM
from components.prm_learned import DEFAULT_DIR, STEP_TAG, prm_text
from components.prm_qwen import Qwen2ForProcessRewardModel

Example = tuple[str, list[str], list[float]]  # (problem, steps, labels)


def split_steps(completion: str) -> list[str]:
    """Steps of a completion: one per line, each keeping its ``\\n`` (the demo's ``DelimiterSegmenter``)."""
    return completion.splitlines(keepends=True)


def step_examples(policy: Any, tok: Any, problems: list[dict], samples: int, seed: int) -> list[Example]:
    """Sampled completions of ``problems`` with the exact checker's step labels (completions without steps dropped)."""
    from prpo_lightning.demo.policy import generate

    torch.manual_seed(seed)
    outs = generate(policy, tok, problems, max_new_tokens=64, do_sample=True, num_return_sequences=samples)
    checker = EquationCheckPRM()
    examples = []
    for k, text in enumerate(outs):
        steps = split_steps(text)
        if steps:
            examples.append((problems[k // samples]["problem"], steps, checker.score_steps(steps)))
    return examples


def encode(tok: Any, tag_id: int, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids (b, N)``, ``attention_mask (b, N)`` and ``labels (b, N)`` (−1 off the tags)."""
    rows, labs = [], []
    for problem, steps, labels in examples:
        ids = tok(prm_text(problem, steps), add_special_tokens=False)["input_ids"]
        pos = [j for j, t in enumerate(ids) if t == tag_id]
        if len(pos) != len(labels):
            raise ValueError(f"{len(pos)} {STEP_TAG} tags for {len(labels)} steps")
        lab = [-1.0] * len(ids)
        for j, y in zip(pos, labels):
            lab[j] = y
        rows.append(ids)
        labs.append(lab)
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    labels = torch.full((len(rows), n), -1.0)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(r)] = torch.tensor(lab)
    return ids, mask, labels


def soft_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``softmax(logits (b, N, 2))`` against soft labels ``(b, N)`` at positions ≥ 0."""
    at = labels >= 0
    logp = torch.log_softmax(logits[at].float(), dim=-1)  # (m, 2)
    y = labels[at]
    return -(y * logp[:, 1] + (1 - y) * logp[:, 0]).mean()


@torch.no_grad()
def step_accuracy(model: Any, tok: Any, tag_id: int, examples: list[Example], batch: int = 64) -> dict[str, float]:
    """Accuracy of ``P(correct) ≥ 0.5`` against the checker on the steps that state an equation (label 0 or 1),
    the base rate of correct steps, the accuracy on each class, and the mean |P − 0.5| on steps without one."""
    model.eval()
    preds, golds, neutral = [], [], []
    for k in range(0, len(examples), batch):
        ids, mask, labels = encode(tok, tag_id, examples[k : k + batch])
        probs = torch.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)[..., 1]
        at = labels >= 0
        for p, y in zip(probs[at].tolist(), labels[at].tolist()):
            if y in (0.0, 1.0):
                preds.append(p >= 0.5)
                golds.append(y == 1.0)
            elif y == 0.5:
                neutral.append(abs(p - 0.5))
    n = len(golds)
    pos = [p for p, g in zip(preds, golds) if g]
    neg = [not p for p, g in zip(preds, golds) if not g]

    def frac(xs: list[bool]) -> float | None:  # None (JSON null) when there is nothing to count
        return sum(xs) / len(xs) if xs else None

    return {"steps": n, "accuracy": frac([p == g for p, g in zip(preds, golds)]), "base_rate_correct": frac(golds),
            "accuracy_on_correct_steps": frac(pos), "accuracy_on_wrong_steps": frac(neg),
            "steps_without_equation": len(neutral), "mean_abs_dev_from_0.5_without_equation":
                sum(neutral) / max(len(neutral), 1)}


def build(out: Path, train_problems: int = 3000, samples: int = 4, eval_samples: int = 4, max_steps: int = 1500,
          max_seconds: float = 1800.0, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
          held_out_problems: int = 200) -> dict[str, Any]:
    """Generate step data, train, measure held-out step accuracy, save to ``out``; return the metrics."""
    from transformers import AutoModelForCausalLM

    from prpo_lightning.demo.arithmetic import generate_problems
    from prpo_lightning.demo.policy import MODEL_NAME, build_tokenizer
    from prpo_lightning.runtime.models import resolve_model_path

    t0 = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    policy_dir = resolve_model_path(MODEL_NAME)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    gen_tok = build_tokenizer()
    train = step_examples(policy, gen_tok, generate_problems(seed + 2026, train_problems, "train"), samples, seed)
    held = step_examples(policy, gen_tok, generate_problems(1234, held_out_problems, "eval"), eval_samples,
                        seed + 1)
    data_seconds = time.perf_counter() - t0
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [STEP_TAG]})
    tag_id = tok.convert_tokens_to_ids(STEP_TAG)
    if tag_id >= policy.config.vocab_size:
        raise ValueError(f"{STEP_TAG} got id {tag_id}, beyond the policy's {policy.config.vocab_size} embeddings")
    model = Qwen2ForProcessRewardModel(policy.config)
    missing, unexpected = model.load_state_dict(policy.state_dict(), strict=False)
    if any(not k.startswith("score.") for k in missing):
        raise RuntimeError(f"decoder weights not initialised from the policy: {missing}")
    del policy
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    step, t_train, loss = 0, time.perf_counter(), float("nan")
    while step < max_steps and time.perf_counter() - t_train < max_seconds:
        ids, mask, labels = encode(tok, tag_id, rng.sample(train, batch_size))
        batch_loss = soft_ce(model(input_ids=ids, attention_mask=mask).logits, labels)
        opt.zero_grad(set_to_none=True)
        batch_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss = float(batch_loss.detach())
    train_seconds = time.perf_counter() - t_train
    metrics = {
        "model": "arith-prm-tiny", "init": MODEL_NAME, "params": sum(p.numel() for p in model.parameters()),
        "data": {"train_problems": train_problems, "samples_per_problem": samples, "train_completions": len(train),
                 "train_steps": sum(len(x[1]) for x in train), "held_out_problems": held_out_problems,
                 "held_out_samples_per_problem": eval_samples, "held_out_completions": len(held),
                 "labels": "EquationCheckPRM.score_steps of each line", "seconds": round(data_seconds, 1)},
        "train": {"steps": step, "batch_size": batch_size, "lr": lr, "seed": seed, "final_loss": round(loss, 4),
                  "seconds": round(train_seconds, 1), "max_steps": max_steps, "max_seconds": max_seconds,
                  "torch_threads": torch.get_num_threads()},
        "held_out": step_accuracy(model, tok, tag_id, held),
        "train_fit": step_accuracy(model, tok, tag_id, train[:500]),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "prm_train.json").write_text(json.dumps(metrics, indent=1) + "\n")
    metrics["total_seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


def off_by_one(line: str) -> str:
    """``"a op b = c"`` → ``"a op b = c+1"`` (the line unchanged if it states no result)."""
    m = re.match(r"(.*= )(\d+)(\n?)$", line)
    return f"{m.group(1)}{int(m.group(2)) + 1}{m.group(3)}" if m else line


def check_true_against_off_by_one(prm: Any, n: int = 100) -> dict[str, float]:
    """Score the worked solutions of the first ``n`` held-out problems and the same solutions with every result off
    by one: how often a true equation scores above its off-by-one twin, and the accuracy (threshold 0.5) on each."""
    from prpo_lightning.demo.arithmetic import generate_problems

    problems = generate_problems(1234, n, "eval")
    good = [split_steps(p["solution"]) for p in problems]
    bad = [[off_by_one(line) for line in steps] for steps in good]
    texts = [p["problem"] for p in problems]
    sg, sb = prm.score_texts(texts, good), prm.score_texts(texts, bad)
    pairs = [(x, y) for rg, rb in zip(sg, sb) for x, y in zip(rg[:-1], rb[:-1])]  # equations only, not \boxed{}
    return {"equations": len(pairs), "true_above_off_by_one": sum(x > y for x, y in pairs) / len(pairs),
            "accuracy_on_true": sum(x >= 0.5 for x, _ in pairs) / len(pairs),
            "accuracy_on_off_by_one": sum(y < 0.5 for _, y in pairs) / len(pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--train-problems", type=int, default=3000)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--max-seconds", type=float, default=1800.0,
                    help="wall-clock guard of the training loop (reproducible only if --max-steps ends it)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", action="store_true",
                    help="only score true against off-by-one worked solutions with the PRM in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        from components.prm_learned import LearnedArithPRM

        prm = LearnedArithPRM(str(args.out))
        prm.setup("cpu")
        print(json.dumps(check_true_against_off_by_one(prm), indent=1))
        return
    print(json.dumps(build(args.out, args.train_problems, args.samples, max_steps=args.max_steps,
                           max_seconds=args.max_seconds, lr=args.lr), indent=1))


if __name__ == "__main__":
    main()
