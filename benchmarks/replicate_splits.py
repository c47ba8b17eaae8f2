"""Evaluation sets of the replication harness: the 200 held-out problems and a validation split drawn from the
training distribution, on which each method's learning rate is chosen.

* **held-out** (``arith_heldout.jsonl``): exactly the datamodule's evaluation rows,
  ``make_split(TASK_SEED, NUM_TRAIN, NUM_HELD_OUT, spec)[1]`` (the ``"eval"`` hash bucket, never trained on).
* **validation** (``arith_validation.jsonl``): ``n`` problems of the ``"train"`` hash bucket (the distribution the
  RL prompts come from) drawn by another generator seed (:data:`VALIDATION_SEED`), skipping every problem among the
  ``NUM_TRAIN`` RL training rows. So it is disjoint from the training rows by construction and from the held-out
  problems by the hash split.

Both files are written by :func:`write_eval_sets` and read by ``MathEvalCallback(benchmarks=[heldout, validation])``:
the held-out set comes first, so ``eval/accuracy`` stays the held-out accuracy, and the validation accuracy is
logged as ``eval/arith_validation/pass@1`` (:data:`VALIDATION_KEY`).
"""

from __future__ import annotations

import json
from pathlib import Path

from prpo_lightning.demo.arithmetic import generate_problems, iter_problems, make_split, task_spec, write_jsonl

#: ``configs/demo.yaml``'s ``data.init_args``: the generator seed and the sizes of the RL train and held-out sets.
TASK_SEED = 1234
NUM_TRAIN = 5000
NUM_HELD_OUT = 200
#: The generator seed of the validation split (any seed other than the task's; 0 and 10007 are the warm start's).
VALIDATION_SEED = 4242
HELDOUT_NAME, VALIDATION_NAME = "arith_heldout", "arith_validation"
VALIDATION_KEY = f"eval/{VALIDATION_NAME}/pass@1"


def validation_problems(n: int, task: str = "default", seed: int = VALIDATION_SEED) -> list[dict]:
    """``n`` train-distribution problems that are not among the ``NUM_TRAIN`` RL training rows of ``task``."""
    spec = task_spec(task)
    train = {p["problem"] for p in generate_problems(TASK_SEED, NUM_TRAIN, "train", spec)}
    out = []
    for p in iter_problems(seed, "train", spec):
        if len(out) == n:
            break
        if p["problem"] not in train:
            out.append(dict(p, id=len(out)))
    return out


def write_eval_sets(folder: Path, n_validation: int, task: str = "default") -> tuple[Path, Path]:
    """Write (or check) ``<folder>/<task>/arith_heldout.jsonl`` and ``arith_validation.jsonl``; return their paths.

    Raises:
        RuntimeError: if a file already there holds other problems (a changed generator): delete the folder.
    """
    spec = task_spec(task)
    held_out = make_split(TASK_SEED, NUM_TRAIN, NUM_HELD_OUT, spec)[1]
    sets = {HELDOUT_NAME: held_out, VALIDATION_NAME: validation_problems(n_validation, task)}
    paths = []
    for name, rows in sets.items():
        path = folder / task / f"{name}.jsonl"
        if path.exists():
            old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if old != rows:
                raise RuntimeError(f"{path} holds other problems than the generator gives now: delete {folder / task}")
        else:
            write_jsonl(rows, path)
        paths.append(path)
    return paths[0], paths[1]


def warm_start_overlap(warm_start_json: Path, n_validation: int = 200) -> dict[str, int]:
    """How many validation problems, RL training rows and held-out problems the demo policy's warm start trained on
    (its SFT drew ``steps × batch_size`` problems of ``iter_problems(seed, "train")``; ``warm_start.json``)."""
    from itertools import islice

    sft = json.loads(warm_start_json.read_text())["sft"]
    seen = {p["problem"] for p in islice(iter_problems(sft["seed"], "train"), sft["steps"] * sft["batch_size"])}
    train, held_out = make_split(TASK_SEED, NUM_TRAIN, NUM_HELD_OUT)
    return {"warm_start_problems": len(seen),
            "validation_seen": sum(p["problem"] in seen for p in validation_problems(n_validation)),
            "validation": n_validation, "train_rows_seen": sum(p["problem"] in seen for p in train),
            "train_rows": len(train), "held_out_seen": sum(p["problem"] in seen for p in held_out)}


if __name__ == "__main__":  # the warm-start overlap of the splits, for the cached demo policy
    from prpo_lightning.demo.policy import MODEL_NAME
    from prpo_lightning.runtime.models import resolve_model_path

    print(json.dumps(warm_start_overlap(Path(resolve_model_path(MODEL_NAME)) / "warm_start.json")))
