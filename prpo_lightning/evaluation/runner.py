"""Running an evaluation: greedy pass@1 and sampled pass@k / mean@n over benchmark problems, on one or many ranks.

:class:`BenchmarkEvaluator` is shared by :class:`~prpo_lightning.callbacks.MathEvalCallback` (during ``fit``) and by
``PRPOModule.validation_step``/``test_step`` (``prpo-fit validate``/``test``): every rank calls :meth:`run_batch`
on its shard, then every rank calls :meth:`finalize`, which merges the ranks (deduplicating problems repeated by
``DistributedSampler`` padding), and rank zero writes the outputs.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from prpo_lightning.evaluation import report
from prpo_lightning.evaluation.metrics import (
    DedupAccuracy,
    ProblemOutcomes,
    default_ks,
    mean_accuracy,
    mean_pass_at_k,
)

BREAKDOWN_KEYS = ("subject", "level")
DEFAULT_SET = "heldout"
"""Name of an evaluation set without a ``benchmark`` field (e.g. the offline demo's held-out split)."""


@dataclass
class EvalConfig:
    """What to evaluate and where the outputs go.

    Args:
        greedy: greedy decoding, reported as ``pass@1`` (the paper's headline number).
        n_samples: n samples per problem at ``temperature``/``top_p`` for ``pass@k`` and ``mean@n`` (0: none).
        ks: the k of pass@k (each ``<= n_samples``; default: powers of two from 2, and n).
        temperature: sampling temperature for pass@k (paper: 0.7).
        top_p: nucleus threshold for pass@k (paper: 0.9).
        max_new_tokens: completion budget (None: the model's ``sampling.max_new_tokens``).
        seed_per_problem: seed each problem's samples from ``(model seed, global step, problem id)`` (one
            ``generate`` call per problem), so pass@k does not depend on the number of ranks; False: one batched
            call per batch, seeded per rank (faster, statistically equivalent). The training RNG is never touched.
        output_dir: directory for outputs (None: ``<log_dir>/eval``); each evaluation writes a sub-directory.
        write_outputs: write the JSONL/CSV/PNG/Markdown files.
        num_logged_completions: completions sent to the logger as a table (0: none).
    """

    greedy: bool = True
    n_samples: int = 0
    ks: list[int] | None = None
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int | None = None
    seed_per_problem: bool = True
    output_dir: str | None = None
    write_outputs: bool = True
    num_logged_completions: int = 8

    def __post_init__(self) -> None:
        if not self.greedy and self.n_samples <= 0:
            raise ValueError("EvalConfig needs greedy=True or n_samples > 0")
        if self.n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {self.n_samples}")
        bad = [k for k in (self.ks or []) if not 1 <= k <= self.n_samples]
        if bad:
            raise ValueError(f"every k must lie in [1, n_samples={self.n_samples}], got {bad}")

    @property
    def pass_ks(self) -> list[int]:
        """The k values reported (empty without sampling)."""
        if self.n_samples <= 0:
            return []
        return sorted(set(self.ks)) if self.ks else [k for k in default_ks(self.n_samples) if k > 1]


@dataclass
class _BenchState:
    greedy: DedupAccuracy
    sampled: ProblemOutcomes
    records: list[dict[str, Any]] = field(default_factory=list)


class BenchmarkEvaluator:
    """Accumulates graded completions per benchmark and turns them into metrics and output files.

    Args:
        benchmarks: benchmark names, identical on every rank (a name seen only by some ranks would desynchronise
            the metric all-gather; undeclared names are added on first use with a warning).
        config: what to evaluate.
        device: device of the metric states (the module's device, so NCCL can gather them).
        default_benchmark: name for batches without a ``benchmark`` field.
    """

    def __init__(self, benchmarks: Sequence[str], config: EvalConfig, device: torch.device | str = "cpu",
                 default_benchmark: str | None = None) -> None:
        if not benchmarks:
            raise ValueError("BenchmarkEvaluator needs at least one benchmark name")
        self.config = config
        self.device = torch.device(device)
        self.default_benchmark = default_benchmark or benchmarks[0]
        self.states: dict[str, _BenchState] = {}
        for name in benchmarks:
            self._state(name, declared=True)

    def _state(self, name: str, declared: bool = False) -> _BenchState:
        if name not in self.states:
            if not declared:
                rank_zero_warn(f"benchmark {name!r} was not declared to the evaluator; multi-rank runs need it declared")
            self.states[name] = _BenchState(DedupAccuracy().to(self.device), ProblemOutcomes().to(self.device))
        return self.states[name]

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def run_batch(self, module: Any, batch: dict[str, Any]) -> None:
        """Generate, grade and record one collated batch (greedy and/or n samples per problem)."""
        cfg = self.config
        if cfg.greedy:
            rollout = module.generate_and_grade(batch, greedy=True, max_new_tokens=cfg.max_new_tokens)
            self.add_rollout(batch, rollout, "greedy", 1)
        if cfg.n_samples > 0:
            rollout = module.generate_and_grade(
                batch, greedy=False, num_samples=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens, seed_per_group=cfg.seed_per_problem,
            )
            self.add_rollout(batch, rollout, "sample", cfg.n_samples)

    def add_rollout(self, batch: dict[str, Any], rollout: Any, mode: str, per_problem: int) -> None:
        """Record the graded completions of ``rollout`` for the problems of ``batch``.

        Problems absent from the rollout (prompt longer than ``model.sampling.max_prompt_length``) are recorded
        with verdict ``skipped`` and count as wrong, so the denominator is always the whole benchmark and results
        stay comparable with published numbers; :meth:`finalize` counts them (column ``skipped`` of the summary,
        metric ``<benchmark>/num_skipped``) and warns, so they are never silently scored as wrong.
        """
        n_rows = len(batch["problem"])
        by_row: dict[int, list[tuple[str, Any]]] = defaultdict(list)
        if rollout is not None:
            rows = rollout.extras.get("batch_rows") or _rows_from_group_ids(batch, rollout)
            for text, verdict, r in zip(rollout.completions, rollout.verdicts, rows):
                by_row[int(r)].append((text, verdict))
        index = batch.get("index") or [int(i) for i in batch["id"].tolist()]
        names = batch.get("benchmark") or [self.default_benchmark] * n_rows
        per_bench: dict[str, tuple[list[int], list[int], list[int]]] = defaultdict(lambda: ([], [], []))
        for r in range(n_rows):
            outs = by_row.get(r) or [("", None)] * per_problem
            correct = 0
            for s, (text, verdict) in enumerate(outs):
                ok = bool(verdict is not None and verdict.is_correct)
                correct += ok
                self._state(names[r]).records.append(self._record(batch, r, int(index[r]), mode, s, text, verdict, ok))
            ids, cs, ns = per_bench[names[r]]
            ids.append(int(index[r]))
            cs.append(correct)
            ns.append(len(outs))
        for name, (ids, cs, ns) in per_bench.items():
            st = self._state(name)
            (st.greedy if mode == "greedy" else st.sampled).update(ids, cs, ns)

    @staticmethod
    def _record(batch: dict[str, Any], r: int, index: int, mode: str, sample: int, text: str, verdict: Any, ok: bool) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "benchmark": (batch.get("benchmark") or [None] * (r + 1))[r],
            "problem_id": (batch.get("problem_id") or [None] * (r + 1))[r] or str(index),
            "index": index,
            "mode": mode,
            "sample": sample,
            "answer": batch["answer"][r],
            "extracted": getattr(verdict, "extracted", None),
            "verdict": verdict.status.value if verdict is not None else "skipped",
            "correct": ok,
            "completion": text,
        }
        for key in BREAKDOWN_KEYS:
            if key in batch and batch[key][r] is not None:
                rec[key] = batch[key][r]
        return rec

    # ------------------------------------------------------------------ results
    def finalize(self, step: int = 0, stage: str = "eval", output_dir: str | Path | None = None,
                 loggers: Sequence[Any] = (), is_global_zero: bool = True) -> dict[str, Any]:
        """Merge ranks, compute metrics, write outputs on rank zero and reset. Every rank must call it.

        Returns:
            ``{"metrics": {"<bench>/pass@1": ..., "accuracy": ..., "num_problems": ...}, "summary": rows,
            "files": {...}}``; ``accuracy`` is the headline metric of the first benchmark.
        """
        summary: list[dict[str, Any]] = []
        flat: dict[str, float] = {}
        all_records: list[dict[str, Any]] = []
        for name, st in self.states.items():
            records = _dedup_records(_gather_records(st.records))
            for rec in records:
                rec["benchmark"] = rec.get("benchmark") or name
            all_records += records
            greedy = st.greedy.compute() if self.config.greedy else None
            sampled = st.sampled.compute() if self.config.n_samples > 0 else None
            overall = self._summary_row(name, "overall", "all", records)
            if greedy is not None:  # the Metric (deduplicated over ranks) is the reported number
                overall["pass@1"] = float(greedy)
            if sampled is not None:
                counts = list(sampled.values())
                overall.update(self._sampled_metrics(counts))
                overall["problems"] = len(counts)
            summary.append(overall)
            for key in BREAKDOWN_KEYS:
                groups = sorted({rec[key] for rec in records if key in rec}, key=lambda g: (str(type(g)), g))
                summary += [self._summary_row(name, key, g, [x for x in records if x.get(key) == g]) for g in groups]
            for metric, value in overall.items():
                if metric not in report.ID_COLUMNS:
                    flat[f"{name}/{metric}"] = value
            flat[f"{name}/num_problems"] = float(overall["problems"])
            flat[f"{name}/num_skipped"] = float(overall["skipped"])
            if overall["skipped"] and is_global_zero:
                rank_zero_warn(f"[prpo] {stage} evaluation, {name}: {overall['skipped']} of {overall['problems']} "
                               "problems were skipped because their prompt is longer than "
                               "model.sampling.max_prompt_length; they count as wrong (column 'skipped')")
            st.greedy.reset()
            st.sampled.reset()
            st.records = []
        first = next(r for r in summary if r["breakdown"] == "overall")
        flat["accuracy"] = float(first[report.headline_metric([first])])
        flat["num_problems"] = float(first["problems"])
        flat["num_skipped"] = float(first["skipped"])
        files: dict[str, str] = {}
        if is_global_zero:
            title = f"[prpo] {stage} evaluation at step {step}"
            rank_zero_info(report.format_table(summary, title=title))
            sample = report.completions_sample(all_records, self.config.num_logged_completions)
            if sample and loggers:
                report.log_completions(loggers, f"{stage}/completions", sample, step)
            if self.config.write_outputs and output_dir is not None:
                files = write_outputs(Path(output_dir), step, all_records, summary, sample)
                rank_zero_info(f"[prpo] {stage} evaluation outputs: {Path(files['summary_csv']).parent}")
        return {"metrics": flat, "summary": summary, "files": files}

    def _sampled_metrics(self, counts: Sequence[tuple[int, int]]) -> dict[str, float]:
        out = {f"pass@{k}": mean_pass_at_k(counts, k) for k in self.config.pass_ks}
        out[f"mean@{self.config.n_samples}"] = mean_accuracy(counts)
        return out

    def _summary_row(self, name: str, breakdown: str, group: Any, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        greedy = {r["index"]: r["correct"] for r in records if r["mode"] == "greedy"}
        sampled: dict[int, list[bool]] = defaultdict(list)
        for r in records:
            if r["mode"] == "sample":
                sampled[r["index"]].append(r["correct"])
        row: dict[str, Any] = {"benchmark": name, "breakdown": breakdown, "group": group,
                               "problems": len(greedy) if self.config.greedy else len(sampled),
                               "skipped": len({r["index"] for r in records if r["verdict"] == "skipped"})}
        if self.config.greedy:
            row["pass@1"] = sum(greedy.values()) / len(greedy) if greedy else float("nan")
        if self.config.n_samples > 0:
            row.update(self._sampled_metrics([(len(v), sum(v)) for v in sampled.values()]))
        return row


def write_outputs(out_dir: Path, step: int, records: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]],
                  sample: Sequence[Sequence[str]]) -> dict[str, str]:
    """Write ``completions.jsonl``, ``summary.csv``, ``summary.txt``, ``breakdown.png`` and ``samples.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "completions_jsonl": report.write_jsonl(out_dir / "completions.jsonl", [{"step": step, **r} for r in records]),
        "summary_csv": report.write_csv(out_dir / "summary.csv", summary),
        "breakdown_png": report.plot_breakdown(out_dir / "breakdown.png", summary),
    }
    (out_dir / "summary.txt").write_text(report.format_table(summary) + "\n", encoding="utf-8")
    (out_dir / "samples.md").write_text(report.completions_markdown(sample) + "\n", encoding="utf-8")
    files["summary_txt"], files["samples_md"] = out_dir / "summary.txt", out_dir / "samples.md"
    return {k: str(v) for k, v in files.items()}


def _rows_from_group_ids(batch: dict[str, Any], rollout: Any) -> list[int]:
    pos = {int(i): r for r, i in enumerate(batch["id"].tolist())}
    return [pos[int(g)] for g in rollout.group_ids.tolist()]


def _gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(records)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [rec for part in gathered for rec in part]


def _dedup_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the first record of each ``(index, mode, sample)`` in rank order, as the metric does."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for rec in records:
        key = (rec["index"], rec["mode"], rec["sample"])
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return sorted(out, key=lambda r: (r["index"], r["mode"] != "greedy", r["sample"]))


def config_from(obj: Any) -> EvalConfig:
    """An :class:`EvalConfig` from a config, a dict or None (defaults)."""
    if obj is None:
        return EvalConfig()
    if isinstance(obj, EvalConfig):
        return obj
    return EvalConfig(**dataclasses.asdict(obj)) if dataclasses.is_dataclass(obj) else EvalConfig(**dict(obj))


def evaluator_for_trainer(trainer: Any, device: torch.device, stage: str) -> BenchmarkEvaluator:
    """The evaluator for ``validate``/``test``: benchmarks and :class:`EvalConfig` from the datamodule when it has
    them (:class:`~prpo_lightning.evaluation.datamodule.MathBenchmarkDataModule`), else greedy pass@1 over the
    datamodule's evaluation set, named :data:`DEFAULT_SET`."""
    dm = getattr(trainer, "datamodule", None)
    names = list(getattr(dm, "benchmark_names", None) or [DEFAULT_SET])
    return BenchmarkEvaluator(names, config_from(getattr(dm, "eval_config", None)), device, default_benchmark=names[0])


def output_dir_for(trainer: Any, config: EvalConfig, stage: str, step: int) -> Path:
    """``<output_dir or log_dir/eval>/<stage>-step<step>``."""
    root = Path(config.output_dir) if config.output_dir else Path(trainer.log_dir or trainer.default_root_dir) / "eval"
    return root / f"{stage}-step{step:06d}"
