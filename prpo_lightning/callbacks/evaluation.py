"""Task accuracy during ``fit``: before RL, every N optimizer steps, and after RL.

Greedy pass@1 (and, when ``n_samples > 0``, unbiased pass@k and mean@n at T 0.7 / top-p 0.9) on the datamodule's
evaluation problems or on named benchmarks (``math500``, ``amc23``, ``aime24``, JSONL paths), with per-subject and
per-level breakdowns. Every evaluation writes ``completions.jsonl``, ``summary.csv``, ``summary.txt``,
``breakdown.png`` and ``samples.md`` under ``<output_dir>/fit-step<step>/`` and logs a sample of completions as a
table. On several ranks each rank decodes a ``DistributedSampler`` shard (padded, so every rank makes the same
``generate`` calls, as ZeRO-3 needs) and the deduplicating metric counts every problem once.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from prpo_lightning.data import PromptDataset, collate_prompts
from prpo_lightning.callbacks.preemption import agree_to_stop
from prpo_lightning.evaluation.benchmarks import load_benchmark, resolve_benchmark
from prpo_lightning.evaluation.runner import DEFAULT_SET, BenchmarkEvaluator, EvalConfig, output_dir_for


class MathEvalCallback(L.Callback):
    """Evaluate task accuracy during training and write per-problem outputs.

    Results are logged as ``eval/accuracy`` (headline metric of the first benchmark) and
    ``eval/<benchmark>/<metric>`` against ``trainer.global_step``, put in ``trainer.callback_metrics`` (so
    ``ModelCheckpoint(monitor="eval/math500/pass@1")`` works) and kept in :attr:`history` as dicts with ``step``,
    ``accuracy``, ``num_problems`` and the per-benchmark metrics.

    Args:
        every_n_steps: evaluate after every N optimizer steps (0 disables periodic evaluation).
        eval_at_start: evaluate before the first RL step (the "before" number).
        eval_at_end: evaluate when fit ends (the "after" number).
        benchmarks: benchmark names or JSONL paths (None: ``trainer.datamodule``'s evaluation problems).
        max_problems: first N problems of each benchmark only (None: all).
        batch_size: prompts per generation batch (None: the datamodule's ``eval_batch_size``, else 32).
        prompt_template: prompt for every benchmark (None: the benchmark's own, else the model's).
        greedy: report greedy pass@1.
        n_samples: samples per problem for pass@k and mean@n (0: none).
        ks: k values of pass@k (default: powers of two from 2, and n).
        temperature / top_p: sampling settings for pass@k (paper: 0.7 / 0.9).
        max_new_tokens: completion budget (None: the model's ``sampling.max_new_tokens``).
        seed_per_problem: seed each problem's samples by problem id (rank-independent pass@k; see ``EvalConfig``).
        output_dir: output root (None: ``<log_dir>/eval``).
        write_outputs: write the output files.
        num_logged_completions: completions logged to the logger as a table.

    Raises:
        ValueError: if ``every_n_steps`` is negative or the sampling settings are inconsistent.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        eval_at_start: bool = True,
        eval_at_end: bool = True,
        benchmarks: list[str] | None = None,
        max_problems: int | None = None,
        batch_size: int | None = None,
        prompt_template: str | None = None,
        greedy: bool = True,
        n_samples: int = 0,
        ks: list[int] | None = None,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_new_tokens: int | None = None,
        seed_per_problem: bool = True,
        output_dir: str | None = None,
        write_outputs: bool = True,
        num_logged_completions: int = 8,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.eval_at_start = eval_at_start
        self.eval_at_end = eval_at_end
        self.benchmarks = [resolve_benchmark(b).name for b in benchmarks] if benchmarks else None
        self._benchmark_args = list(benchmarks or [])
        self.max_problems = max_problems
        self.batch_size = batch_size
        self.prompt_template = prompt_template
        self.config = EvalConfig(
            greedy=greedy, n_samples=n_samples, ks=ks, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, seed_per_problem=seed_per_problem, output_dir=output_dir, write_outputs=write_outputs,
            num_logged_completions=num_logged_completions,
        )
        self.history: list[dict[str, float]] = []
        self.last_result: dict[str, Any] | None = None
        self._last_step = -1
        self._rows: list[dict[str, Any]] | None = None

    @property
    def state_key(self) -> str:
        return f"MathEvalCallback[every_n_steps={self.every_n_steps}]"

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self._last_step = int(state_dict["last_step"])

    # ------------------------------------------------------------------ data
    def problems(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """The evaluation rows: the configured benchmarks, or the datamodule's evaluation problems."""
        if self._rows is None:
            if self._benchmark_args:
                rows: list[dict[str, Any]] = []
                for name in self._benchmark_args:
                    for r in load_benchmark(name, self.max_problems, self.prompt_template):
                        r["id"] = len(rows)
                        rows.append(r)
            else:
                dm = trainer.datamodule
                if dm is None:
                    raise ValueError("MathEvalCallback needs `benchmarks` or a datamodule with eval_dataloader()")
                loader = dm.eval_dataloader()
                base = getattr(loader.dataset, "rows", None) or [loader.dataset[i] for i in range(len(loader.dataset))]
                rows = [dict(r) for r in base[: self.max_problems]]
                for r in rows:
                    r.setdefault("index", int(r["id"]))
                    r.setdefault("benchmark", DEFAULT_SET)
                    if self.prompt_template is not None:
                        r["prompt_template"] = self.prompt_template
            self._rows = rows
        return self._rows

    def _loader(self, trainer: L.Trainer) -> DataLoader:
        dataset = PromptDataset(self.problems(trainer))
        bs = self.batch_size or getattr(trainer.datamodule, "eval_batch_size", None) or 32
        sampler = None
        if trainer.world_size > 1:  # padded shards: equal generate calls on every rank; the metric dedups
            sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=bs, sampler=sampler, collate_fn=collate_prompts)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> float | None:
        """Evaluate every configured benchmark, write outputs, log, and return the headline accuracy.

        A stop signal (SIGTERM/SIGUSR1, preemption) on any rank ends the evaluation at the next batch, on every
        rank together: nothing is recorded, None is returned, and the run stops at the end of the step (a
        checkpoint, exit 143); the resumed run redoes this evaluation first (:meth:`on_train_start`).
        """
        names = self.benchmarks or [DEFAULT_SET]
        evaluator = BenchmarkEvaluator(names, self.config, pl_module.device, default_benchmark=names[0])
        step = trainer.global_step
        loader = self._loader(trainer)
        bar = tqdm(loader, desc=f"eval @ step {step}", leave=False, disable=not trainer.is_global_zero)
        for done, batch in enumerate(bar):
            if agree_to_stop(trainer):  # every rank stops at the same batch
                bar.close()
                rank_zero_info(f"[prpo] evaluation at step {step} stopped by a signal after {done} of {len(loader)} "
                               "batches: nothing recorded; the resumed run evaluates this step first")
                return None
            evaluator.run_batch(pl_module, batch)
        out_dir = output_dir_for(trainer, self.config, "fit", step)
        result = evaluator.finalize(step=step, stage="eval", output_dir=out_dir, loggers=trainer.loggers,
                                    is_global_zero=trainer.is_global_zero)
        self.last_result = result
        metrics = {f"eval/{k}": float(v) for k, v in result["metrics"].items() if k not in ("accuracy", "num_problems")}
        acc = float(result["metrics"]["accuracy"])
        metrics["eval/accuracy"] = acc
        entry = {"step": float(step), "accuracy": acc, "num_problems": float(result["metrics"]["num_problems"])}
        entry.update({k[len("eval/"):]: v for k, v in metrics.items() if k != "eval/accuracy"})
        self.history.append(entry)
        self._last_step = step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        return acc

    @property
    def output_files(self) -> dict[str, str]:
        """Paths written by the last evaluation (rank zero)."""
        return dict(self.last_result["files"]) if self.last_result else {}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """The "before" evaluation; on resume also an evaluation that was due at this step but was stopped by a
        signal (the history has no entry for it)."""
        step = trainer.global_step
        due = self.eval_at_start or (self.every_n_steps and step > 0 and step % self.every_n_steps == 0)
        if due and not any(h["step"] == step for h in self.history):
            acc = self.evaluate(trainer, pl_module)
            if acc is not None:
                when = "before RL" if step == 0 else "at the resumed step"
                rank_zero_info(f"[prpo] held-out accuracy {when} (step {step}): {acc:.1%}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            acc = self.evaluate(trainer, pl_module)
            if acc is not None:
                rank_zero_info(f"[prpo] held-out accuracy at step {step}: {acc:.1%}")

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self.eval_at_end:
            return
        if self._last_step != trainer.global_step:
            self.evaluate(trainer, pl_module)
        before, after = self.history[0]["accuracy"], self.history[-1]["accuracy"]
        rank_zero_info(
            f"[prpo] held-out accuracy: before RL {before:.1%} -> after RL {after:.1%} "
            f"({(after - before) * 100:+.1f} points, {int(self.history[-1]['num_problems'])} problems)"
        )

