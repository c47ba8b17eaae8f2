"""Prompt datasets and data modules.

A training batch is a dict ``{"id": LongTensor (N,), "problem": list[str], "answer": list[str]}`` of N
prompts; the module samples G completions for each. ``id`` is the prompt (group) id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class DataFileError(ValueError):
    """A data file has a bad row; the message names the file and the 1-based line number."""


def read_jsonl(
    path: str | Path,
    problem_key: str = "problem",
    answer_key: str = "answer",
    keep_keys: Sequence[str] = ("subject", "level", "unique_id"),
) -> list[dict[str, Any]]:
    """Read a JSONL file of problems.

    Args:
        path: the file.
        problem_key: field holding the problem text.
        answer_key: field holding the gold answer.
        keep_keys: optional fields copied when present.

    Returns:
        Rows ``{"id": line_index, "problem": str, "answer": str, ...}``.

    Raises:
        FileNotFoundError: if the file does not exist.
        DataFileError: on broken JSON, a missing field or an empty problem/answer, naming file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}:{lineno}: broken JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise DataFileError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for key in (problem_key, answer_key):
                if key not in obj:
                    raise DataFileError(f"{path}:{lineno}: missing field {key!r}")
                if not str(obj[key]).strip():
                    raise DataFileError(f"{path}:{lineno}: empty field {key!r}")
            row = {"id": len(rows), "problem": str(obj[problem_key]), "answer": str(obj[answer_key])}
            row.update({k: obj[k] for k in keep_keys if k in obj})
            rows.append(row)
    if not rows:
        raise DataFileError(f"{path}: no rows")
    return rows


class PromptDataset(Dataset):
    """A list of problem rows (dicts with ``id``, ``problem``, ``answer``)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate problem rows into a prompt batch; extra fields become lists."""
    out: dict[str, Any] = {"id": torch.tensor([int(r["id"]) for r in rows], dtype=torch.long)}
    for key in rows[0]:
        if key != "id":
            out[key] = [r.get(key) for r in rows]
    return out


class PromptDataModule(L.LightningDataModule):
    """Shared loader logic: seeded shuffled training prompts, ordered evaluation prompts.

    Args:
        batch_size: prompts per training step (each gets G rollouts).
        eval_batch_size: prompts per evaluation batch.
        seed: seed of the training-order shuffle.
        max_eval_samples: evaluate on the first N evaluation problems only (None: all).
    """

    def __init__(self, batch_size: int = 8, eval_batch_size: int = 32, seed: int = 0, max_eval_samples: int | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.max_eval_samples = max_eval_samples
        self.train_rows: list[dict[str, Any]] = []
        self.eval_rows: list[dict[str, Any]] = []

    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Return ``(train_rows, eval_rows)``; subclasses implement it."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.train_rows and not self.eval_rows:
            self.train_rows, self.eval_rows = self.load_rows()
            if self.max_eval_samples is not None:
                self.eval_rows = self.eval_rows[: self.max_eval_samples]

    def train_dataloader(self) -> DataLoader:
        if not self.train_rows:
            raise ValueError(f"{type(self).__name__} has no training rows")
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            PromptDataset(self.train_rows),
            batch_size=self.batch_size,
            shuffle=True,
            generator=gen,
            drop_last=True,
            collate_fn=collate_prompts,
        )

    def eval_dataloader(self) -> DataLoader:
        """Evaluation problems in file order (used by evaluation callbacks and validate/test)."""
        return DataLoader(PromptDataset(self.eval_rows), batch_size=self.eval_batch_size, collate_fn=collate_prompts)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader()


class JsonlMathDataModule(PromptDataModule):
    """Problems from local JSONL files or a Hugging Face dataset.

    Args:
        train_path: local JSONL with ``problem``/``answer`` fields (or a hub dataset id when
            ``train_hub_split`` is set, e.g. ``"DigitalLearningGmbH/MATH-lighteval"``).
        eval_path: local JSONL for evaluation (e.g. ``../shared/data/math500/test.jsonl``) or a hub id.
        train_hub_split: split name when ``train_path`` is a hub dataset.
        eval_hub_split: split name when ``eval_path`` is a hub dataset.
        problem_key / answer_key: field names.
        answer_from_solution: take the gold answer as the last ``\\boxed{}`` of this field instead
            (MATH train has only a ``solution`` field).
    """

    def __init__(
        self,
        train_path: str | None = None,
        eval_path: str | None = None,
        train_hub_split: str | None = None,
        eval_hub_split: str | None = None,
        problem_key: str = "problem",
        answer_key: str = "answer",
        answer_from_solution: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        seed: int = 0,
        max_eval_samples: int | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, seed, max_eval_samples)
        self.train_path, self.eval_path = train_path, eval_path
        self.train_hub_split, self.eval_hub_split = train_hub_split, eval_hub_split
        self.problem_key, self.answer_key = problem_key, answer_key
        self.answer_from_solution = answer_from_solution

    def _load(self, path: str | None, hub_split: str | None) -> list[dict[str, Any]]:
        if path is None:
            return []
        if hub_split is None:
            return read_jsonl(path, self.problem_key, self.answer_key)
        from datasets import load_dataset  # optional dependency, hub access

        rows = []
        for i, ex in enumerate(load_dataset(path, split=hub_split)):
            answer = ex.get(self.answer_key)
            if self.answer_from_solution:
                answer = last_boxed_content(ex[self.answer_from_solution])
            if not ex.get(self.problem_key) or not answer:
                continue
            rows.append({"id": i, "problem": ex[self.problem_key], "answer": answer})
        return rows

    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return self._load(self.train_path, self.train_hub_split), self._load(self.eval_path, self.eval_hub_split)


class ArithmeticDataModule(PromptDataModule):
    """The offline demo task: seeded synthetic multi-step arithmetic with a train/held-out split.

    Args:
        num_train: training problems.
        num_eval: held-out problems (disjoint from training).
        task_seed: seed of the problem generator.
        batch_size / eval_batch_size / seed: as in :class:`PromptDataModule`.
    """

    def __init__(
        self,
        num_train: int = 5000,
        num_eval: int = 200,
        task_seed: int = 1234,
        batch_size: int = 8,
        eval_batch_size: int = 100,
        seed: int = 0,
        max_eval_samples: int | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, seed, max_eval_samples)
        self.num_train, self.num_eval, self.task_seed = num_train, num_eval, task_seed

    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from prpo_lightning.demo.arithmetic import make_split

        train, held_out = make_split(seed=self.task_seed, n_train=self.num_train, n_eval=self.num_eval)
        return list(train), list(held_out)


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in trusted reference text (brace matching, any depth)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None
