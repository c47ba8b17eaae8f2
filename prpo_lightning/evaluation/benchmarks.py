"""A small registry of math evaluation benchmarks (MATH500, AMC23, AIME24) and a loader for them.

Each benchmark resolves to a local JSONL file or a Hugging Face dataset:

* local: ``$PRPO_DATA_DIR/<name>/test.jsonl`` when ``PRPO_DATA_DIR`` is set, otherwise
  ``../shared/data/<name>/test.jsonl`` relative to the working directory (the layout of the project's data
  checkout); when that file does not exist the hub dataset is used;
* hub: ``HuggingFaceH4/MATH-500`` (split ``test``), ``math-ai/amc23`` (``test``), ``math-ai/aime24`` (``test``),
  loaded with ``datasets.load_dataset``.

A benchmark can also be given as a path to any JSONL file with ``problem`` and ``answer`` fields.

Prompts follow the PRPO authors' evaluation scripts: MATH500 uses the training prompt (the model's
``prompt_template``, whose default is :data:`PAPER_PROMPT`); AMC/AIME add
"Do not repeat any sentences in the answer, and keep only one \\boxed{} tag which contains the final answer."
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from prpo_lightning.data import DataFileError, read_jsonl

PAPER_PROMPT = "{problem}\nLet's think step by step and put the final answer in the \\boxed{{}} tag."
"""The training and MATH500 prompt of the PRPO authors (wrapped by the model's chat template)."""

PAPER_COMPETITION_PROMPT = (
    "{problem}\nLet's think step by step and put the final answer in the \\boxed{{}} tag. "
    "Do not repeat any sentences in the answer, and keep only one \\boxed{{}} tag which contains the final answer."
)
"""The AMC/AIME prompt of the PRPO authors (``amc2023.py``, ``aime2024.py``)."""

DATA_DIR_ENV = "PRPO_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's problems come from and how they are read.

    Attributes:
        name: short name used in metric keys and file names (``math500``).
        local_name: directory name under the data directory (``<data_dir>/<local_name>/test.jsonl``).
        hub_id: Hugging Face dataset id used when no local file exists.
        hub_split: split of ``hub_id``.
        problem_key: field holding the problem text.
        answer_key: field holding the gold answer.
        id_key: field holding a stable problem id, if any (MATH500's ``unique_id``).
        keep_keys: optional fields carried into every row (breakdowns use ``subject`` and ``level``).
        prompt_template: the benchmark's prompt (None: the model's ``prompt_template``).
        path: an explicit local file (overrides the data-directory lookup).
    """

    name: str
    local_name: str | None = None
    hub_id: str | None = None
    hub_split: str = "test"
    problem_key: str = "problem"
    answer_key: str = "answer"
    id_key: str | None = None
    keep_keys: tuple[str, ...] = ("subject", "level", "unique_id")
    prompt_template: str | None = None
    path: str | None = None


BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add ``spec`` to the registry under ``spec.name``.

    Raises:
        ValueError: if the name is already registered.
    """
    if spec.name in BENCHMARKS:
        raise ValueError(f"benchmark {spec.name!r} is already registered")
    BENCHMARKS[spec.name] = spec
    return spec


register_benchmark(BenchmarkSpec(
    "math500", local_name="math500", hub_id="HuggingFaceH4/MATH-500", id_key="unique_id",
))  # prompt: the model's ``prompt_template``, whose default is PAPER_PROMPT
register_benchmark(BenchmarkSpec(
    "amc23", local_name="amc23", hub_id="math-ai/amc23", prompt_template=PAPER_COMPETITION_PROMPT,
))
register_benchmark(BenchmarkSpec(
    "aime24", local_name="aime24", hub_id="math-ai/aime24", prompt_template=PAPER_COMPETITION_PROMPT,
))


def data_dir() -> Path:
    """The local benchmark directory: ``$PRPO_DATA_DIR`` or ``../shared/data`` (relative to the working directory)."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def resolve_benchmark(name_or_path: str) -> BenchmarkSpec:
    """Return the spec of a registered benchmark name, or a spec reading a local JSONL path.

    Raises:
        ValueError: if ``name_or_path`` is neither a registered name nor an existing ``.jsonl`` file.
    """
    if name_or_path in BENCHMARKS:
        return BENCHMARKS[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".jsonl" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"benchmark file {path} does not exist")
        name = path.parent.name if path.stem in ("test", "train", "validation", "val") else path.stem
        return BenchmarkSpec(name=name or path.stem, path=str(path))
    raise ValueError(f"unknown benchmark {name_or_path!r}: use one of {sorted(BENCHMARKS)} or a path to a JSONL file")


def local_path(spec: BenchmarkSpec) -> Path | None:
    """The local file of ``spec`` if it exists (an explicit ``path`` always counts, existing or not)."""
    if spec.path is not None:
        return Path(spec.path)
    if spec.local_name is None:
        return None
    candidate = data_dir() / spec.local_name / "test.jsonl"
    return candidate if candidate.exists() else None


def normalize_gold(answer: Any) -> str:
    """Gold answer as a string: integral floats lose their ``.0`` (AMC23 stores ``27.0``), and integers their
    leading zeros (AIME stores ``025``)."""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    text = str(answer).strip()
    if re.fullmatch(r"0\d+", text):
        return str(int(text))
    if re.fullmatch(r"-?\d+\.0+", text):
        return text.split(".")[0]
    return text


def _finish_rows(spec: BenchmarkSpec, rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        r = dict(row)
        r["id"] = i
        r["index"] = i
        r["benchmark"] = spec.name
        r["answer"] = normalize_gold(r["answer"])
        if spec.id_key and r.get(spec.id_key) not in (None, ""):
            r["problem_id"] = str(r[spec.id_key])
        else:
            r["problem_id"] = f"{spec.name}/{i}"
        r["prompt_template"] = spec.prompt_template
        out.append(r)
    if not out:
        raise DataFileError(f"{source}: no rows")
    return out


def load_benchmark(spec: BenchmarkSpec | str, max_problems: int | None = None, prompt_template: str | None = None) -> list[dict[str, Any]]:
    """Read a benchmark's problems.

    Args:
        spec: a spec, a registered name or a JSONL path.
        max_problems: keep the first N problems only.
        prompt_template: override the benchmark's prompt for every row (None: keep the benchmark's own).

    Returns:
        Rows ``{"id", "index", "benchmark", "problem_id", "problem", "answer", "prompt_template", ...}`` where
        ``id == index`` is the row's position in the full file, stable across ranks, and ``problem_id`` is the
        dataset's own id (``unique_id``) or ``"<name>/<index>"``. Optional ``subject``/``level`` are kept.

    Raises:
        DataFileError: on a broken local row (broken JSON, missing or empty field), naming the file and line.
        FileNotFoundError: if an explicit path does not exist.
        ValueError: if the benchmark has neither a local file nor a hub id.
    """
    if isinstance(spec, str):
        spec = resolve_benchmark(spec)
    if prompt_template is not None:
        spec = replace(spec, prompt_template=prompt_template)
    keep = tuple(dict.fromkeys(spec.keep_keys + ((spec.id_key,) if spec.id_key else ())))
    path = local_path(spec)
    if path is not None:
        rows = read_jsonl(path, spec.problem_key, spec.answer_key, keep_keys=keep)
        source = str(path)
    elif spec.hub_id is not None:
        missing = _missing_local_file(spec)
        rank_zero_warn(f"benchmark {spec.name!r}: {missing}; loading {spec.hub_id} from the Hugging Face hub")
        try:
            rows = _load_hub(spec, keep)
        except DataFileError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with where the local file was looked for
            raise RuntimeError(f"benchmark {spec.name!r}: {missing}, and loading {spec.hub_id} from the hub failed: "
                               f"{type(err).__name__}: {err}") from err
        source = f"{spec.hub_id}[{spec.hub_split}]"
    else:
        raise ValueError(f"benchmark {spec.name!r} has no hub id and {_missing_local_file(spec)}")
    rows = _finish_rows(spec, rows, source)
    return rows[:max_problems] if max_problems is not None else rows


def _missing_local_file(spec: BenchmarkSpec) -> str:
    """Where the local file was looked for, which setting chose that directory, and how to change it."""
    candidate = (data_dir() / (spec.local_name or spec.name) / "test.jsonl").resolve()
    if os.environ.get(DATA_DIR_ENV):
        origin = f"directory from ${DATA_DIR_ENV}={os.environ[DATA_DIR_ENV]}; point it"
    else:
        origin = f"the default {DEFAULT_DATA_DIR}, relative to the working directory; set ${DATA_DIR_ENV}"
    return f"no local file {candidate} ({origin} to the directory holding <benchmark>/test.jsonl)"


def _load_hub(spec: BenchmarkSpec, keep: tuple[str, ...]) -> list[dict[str, Any]]:
    from datasets import load_dataset  # optional dependency, needs hub access

    rows = []
    for i, ex in enumerate(load_dataset(spec.hub_id, split=spec.hub_split)):
        where = f"{spec.hub_id}[{spec.hub_split}] row {i}"
        for key in (spec.problem_key, spec.answer_key):
            if key not in ex:
                raise DataFileError(f"{where}: missing field {key!r}")
            if ex[key] is None or not str(ex[key]).strip():
                raise DataFileError(f"{where}: empty field {key!r}")
        row = {"id": i, "problem": str(ex[spec.problem_key]), "answer": ex[spec.answer_key]}
        row.update({k: ex[k] for k in keep if k in ex})
        rows.append(row)
    return rows
