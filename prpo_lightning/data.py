"""Prompt datasets and data modules.

A training batch is a dict ``{"id": LongTensor (N,), "problem": list[str], "answer": list[str]}`` of N
prompts; the module samples G completions for each. ``id`` is the prompt (group) id.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from prpo_lightning.runtime.prompt_ids import DuplicatePromptIdError, check_unique_ids  # noqa: F401  (re-exported)


class DataFileError(ValueError):
    """A data file has a bad row; the message names the file and the 1-based line number."""


#: JSON types accepted as a gold answer (numbers become their text, as in the amc23 file).
ANSWER_TYPES = (str, int, float)


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
        DataFileError: on broken JSON, text that is not UTF-8, a missing field, an empty problem/answer, a problem
            that is not a string or an answer that is not a string or a number (null, true/false, a list or an
            object), naming file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows: list[dict[str, Any]] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataFileError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the "
                    "line). Fix: re-save the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}:{lineno}: broken JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise DataFileError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            checks = ((problem_key, (str,), "a string"), (answer_key, ANSWER_TYPES, "a string or a number"))
            for key, types, kinds in checks:
                if key not in obj:
                    raise DataFileError(f"{path}:{lineno}: missing field {key!r}")
                value = obj[key]
                if not isinstance(value, types) or isinstance(value, bool):
                    raise DataFileError(
                        f"{path}:{lineno}: field {key!r} is {json.dumps(value)[:80]} ({_json_type(value)}); it must "
                        f"be {kinds}. Fix the row (a gold answer is compared as text: write e.g. \"[1, 2]\" with "
                        "quotes)."
                    )
                if not str(value).strip():
                    raise DataFileError(f"{path}:{lineno}: empty field {key!r}")
            row = {"id": len(rows), "problem": str(obj[problem_key]), "answer": str(obj[answer_key])}
            row.update({k: obj[k] for k in keep_keys if k in obj})
            rows.append(row)
    if not rows:
        raise DataFileError(f"{path}: no rows")
    return rows


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "true/false", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


class PromptDataset(Dataset):
    """A list of problem rows (dicts with ``id``, ``problem``, ``answer``)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate problem rows into a prompt batch; extra fields become lists.

    Raises:
        DuplicatePromptIdError: two rows share an ``id`` (:func:`check_unique_ids`).
    """
    out: dict[str, Any] = {"id": torch.tensor([int(r["id"]) for r in rows], dtype=torch.long)}
    for key in rows[0]:
        if key != "id":
            out[key] = [r.get(key) for r in rows]
    check_unique_ids(out, "collate_prompts")
    return out


class ResumableDistributedSampler(DistributedSampler):
    """Seeded per-epoch shuffle, sharded over ranks, that can resume in the middle of an epoch.

    Epoch ``e`` uses the permutation ``randperm(n, seed + e)``; the tail that does not divide evenly by the
    number of ranks is dropped (each rank gets the same number of prompts); rank ``r`` takes positions
    ``r, r + R, r + 2R, …``. Ranks therefore see **disjoint prompts**, and a prompt's G rollouts are generated
    on the rank that drew it. Lightning leaves :class:`DistributedSampler` subclasses in place, so this sharding
    is used as is under DDP/DeepSpeed.

    Args:
        dataset: the prompt dataset.
        num_replicas: number of ranks (world size).
        rank: this process's global rank.
        seed: shuffle seed.
        shuffle: shuffle each epoch (False: file order).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self._skip = 0  # samples to skip once, at the start of the next iteration (mid-epoch resume)
        self._skip_epoch = -1

    def epoch_indices(self) -> list[int]:
        """This rank's dataset indices for the current epoch, in order (before any resume skip)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        return order[: self.total_size][self.rank : self.total_size : self.num_replicas]

    def skip_next(self, num_samples: int, epoch: int) -> None:
        """Skip the first ``num_samples`` of epoch ``epoch`` the next time the sampler is iterated."""
        self._skip, self._skip_epoch = int(num_samples), int(epoch)

    def __iter__(self):
        indices = self.epoch_indices()
        if self._skip and self._skip_epoch == self.epoch:
            indices = indices[self._skip :]
        self._skip, self._skip_epoch = 0, -1
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` whose position Lightning saves in checkpoints and restores on resume.

    Lightning stores ``state_dict()`` of every loader that has one under ``loops.fit_loop.combined_loader``
    and calls ``load_state_dict`` when fit resumes. The state is the epoch and the number of batches the fit
    loop has processed in it (read through ``progress``, the loop's own counter, which is exact even though
    Lightning prefetches a batch ahead); on resume the sampler skips exactly those batches, so a resumed run
    sees the same prompts in the same order as an uninterrupted one.

    Args:
        *args: as for :class:`~torch.utils.data.DataLoader`.
        progress: a callable returning ``(epoch, batches processed in that epoch)``.
        **kwargs: as for :class:`~torch.utils.data.DataLoader`; the sampler must be a
            :class:`ResumableDistributedSampler` and ``batch_size`` is per rank.
    """

    def __init__(self, *args: Any, progress: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        epoch, done = self.progress() if self.progress is not None else (self.sampler.epoch, 0)
        return {"epoch": int(epoch), "batches_done": int(done), "batch_size": int(self.batch_size or 1)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if int(state_dict.get("batch_size", self.batch_size)) != self.batch_size:
            raise ValueError(
                f"cannot resume mid-epoch: the checkpoint was written with data.batch_size "
                f"{state_dict['batch_size']}, this run uses {self.batch_size}"
            )
        done = int(state_dict["batches_done"])
        if 0 < done < len(self):
            self.sampler.skip_next(done * int(self.batch_size), int(state_dict["epoch"]))


class PromptDataModule(L.LightningDataModule):
    """Shared loader logic: seeded shuffled training prompts, ordered evaluation prompts.

    Args:
        batch_size: prompts per training step **per rank** (each gets G rollouts); the global batch is
            ``world_size × batch_size`` prompts.
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
        dataset = PromptDataset(self.train_rows)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if len(dataset) < world * self.batch_size:
            raise ValueError(
                f"{len(dataset)} training prompts cannot fill one batch of {self.batch_size} prompts on each of "
                f"{world} ranks"
            )
        sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, seed=self.seed)

        def progress() -> tuple[int, int]:
            if trainer is None:
                return sampler.epoch, 0
            loop = trainer.fit_loop
            return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate_prompts,
            progress=progress,
        )

    def extra_prompts(
        self, count: int, seed: int, exclude_ids: Collection[int] = (), shard: tuple[int, int] = (0, 1)
    ) -> dict[str, Any]:
        """Extra training prompts for dynamic sampling, collated like a training batch.

        A deterministic draw without replacement from the training rows of this rank's shard (prompt id modulo
        the number of ranks equals the rank, so two ranks never draw the same prompt) whose id is not in
        ``exclude_ids``: the first ``count`` of a permutation seeded by ``seed`` (the module derives it from the
        run seed, the step, the round and the rank, so resumed runs draw the same prompts). It does not move the
        training loader.

        Args:
            count: prompts wanted (fewer are returned when fewer rows are left).
            seed: seed of the draw.
            exclude_ids: prompt ids not to draw (those any rank trains on or drew this step).
            shard: ``(rank, world_size)``.

        Returns:
            ``{"id": LongTensor (n,), "problem": list[str], "answer": list[str], ...}`` with ``n <= count``.

        Raises:
            ValueError: if ``count`` is negative or there are no training rows.
        """
        if count < 0:
            raise ValueError(f"{type(self).__name__}.extra_prompts: count must be >= 0, got {count}")
        if not self.train_rows:
            raise ValueError(f"{type(self).__name__}.extra_prompts: no training rows (call setup first)")
        excluded = {int(i) for i in exclude_ids}
        rank, world = shard
        pool = [row for row in self.train_rows if int(row["id"]) not in excluded and int(row["id"]) % world == rank]
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(seed)))[:count].tolist()
        if not order:
            return {"id": torch.zeros(0, dtype=torch.long), "problem": [], "answer": []}
        return collate_prompts([pool[i] for i in order])

    def eval_dataloader(self) -> DataLoader:
        """Evaluation problems in file order (used by evaluation callbacks and validate/test)."""
        return DataLoader(PromptDataset(self.eval_rows), batch_size=self.eval_batch_size, collate_fn=collate_prompts)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader()


def _import_function(path: str, key: str) -> Any:
    """The function named by an import path ``package.module.function``.

    Raises:
        ValueError: naming ``key`` when the path does not name an importable callable.
    """
    import importlib

    module_name, _, attr = path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{key} = {path!r} does not name an importable function ({err})") from err
    if not callable(function):
        raise ValueError(f"{key} = {path!r} is not callable")
    return function


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
        answer_extractor: import path of the function that extracts it (default: the math verifier's own
            ``components.math_answer.extract.extract_last_boxed``, so gold and graded answers are cut alike).
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
        answer_extractor: str = "components.math_answer.extract.extract_last_boxed",
        batch_size: int = 8,
        eval_batch_size: int = 32,
        seed: int = 0,
        max_eval_samples: int | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, seed, max_eval_samples)
        self.train_path, self.eval_path = train_path, eval_path
        self.train_hub_split, self.eval_hub_split = train_hub_split, eval_hub_split
        self.problem_key, self.answer_key = problem_key, answer_key
        self.answer_from_solution, self.answer_extractor = answer_from_solution, answer_extractor

    def _load(self, path: str | None, hub_split: str | None) -> list[dict[str, Any]]:
        if path is None:
            return []
        if hub_split is None:
            return read_jsonl(path, self.problem_key, self.answer_key)
        from datasets import load_dataset  # optional dependency, hub access

        extract = _import_function(self.answer_extractor, "data.answer_extractor") if self.answer_from_solution else None
        rows = []
        for i, ex in enumerate(load_dataset(path, split=hub_split)):
            answer = ex.get(self.answer_key)
            if extract is not None:
                answer = extract(ex[self.answer_from_solution])
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
        task: named task variant of ``prpo_lightning.demo.arithmetic.TASKS`` (``"long"``: 5–8 operations).
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
        task: str = "default",
    ):
        from prpo_lightning.demo.arithmetic import task_spec

        super().__init__(batch_size, eval_batch_size, seed, max_eval_samples)
        self.num_train, self.num_eval, self.task_seed = num_train, num_eval, task_seed
        self.task, self.spec = task, task_spec(task)

    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from prpo_lightning.demo.arithmetic import make_split

        train, held_out = make_split(seed=self.task_seed, n_train=self.num_train, n_eval=self.num_eval, spec=self.spec)
        return list(train), list(held_out)

