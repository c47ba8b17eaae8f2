"""Per-step training curves written as a CSV and a PNG plot (reward and accuracy over steps)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L

from prpo_lightning.callbacks.evaluation import MathEvalCallback

DEFAULT_KEYS = (
    "train/reward/mean",
    "train/reward/std",
    "train/accuracy",
    "train/frac_zero_std_groups",
    "train/completion/length_mean",
    "train/completion/truncated_frac",
    "train/completion/no_boxed_frac",
    "train/entropy",
    "train/kl",
    "train/clip_frac",
    "train/segments/per_completion",
    "train/prm/score_mean",
    "train/prm/score_std",
    "train/loss",
    "train/advantage/outcome_abs_mean",
    "train/advantage/process_abs_mean",
    "train/advantage/process_to_outcome",
    "train/aligner/implicit_reward/token_mean",
    "train/aligner/implicit_reward/cpr_final_mean",
)


class TrainingCurves(L.Callback):
    """Record per-step training metrics; at the end write ``training_curves.csv`` and ``training_curves.png``.

    The held-out accuracy of any :class:`MathEvalCallback` in the trainer is plotted with the training
    reward and accuracy.

    Args:
        dirpath: output directory (default: the trainer's log directory).
        keys: logged metric names to record.
    """

    def __init__(self, dirpath: str | None = None, keys: tuple[str, ...] = DEFAULT_KEYS) -> None:
        self.dirpath = dirpath
        self.keys = keys
        self.rows: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # this step's own metrics: callback_metrics keeps a metric that a step did not log at its last value
        metrics = getattr(pl_module, "step_metrics", None)
        metrics = trainer.callback_metrics if metrics is None else metrics
        row = {"step": float(trainer.global_step)}
        row.update({k: float(metrics[k]) for k in self.keys if k in metrics})
        self.rows.append(row)

    def output_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero or not self.rows:
            return
        out = self.output_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        evals = [h for cb in trainer.callbacks if isinstance(cb, MathEvalCallback) for h in cb.history]
        by_step = {int(h["step"]): h["accuracy"] for h in evals}
        fields = ["step", *self.keys, "eval/accuracy"]
        with (out / "training_curves.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            steps = sorted({int(r["step"]) for r in self.rows} | set(by_step))
            rows = {int(r["step"]): r for r in self.rows}
            for s in steps:
                row = {k: rows.get(s, {}).get(k, "") for k in fields}
                row["step"] = s
                row["eval/accuracy"] = by_step.get(s, "")
                writer.writerow(row)
        self.plot(out / "training_curves.png", by_step)

    def plot(self, path: Path, eval_by_step: dict[int, float]) -> None:
        """Two panels: training reward (mean ± std) and training/held-out accuracy against optimizer step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.rows]
        fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
        mean = [r.get("train/reward/mean", float("nan")) for r in self.rows]
        std = [r.get("train/reward/std", 0.0) for r in self.rows]
        ax_r.plot(steps, mean, label="reward mean")
        ax_r.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax_r.set(xlabel="optimizer step", ylabel="outcome reward", title="Training reward")
        ax_r.legend()
        ax_a.plot(steps, [r.get("train/accuracy", float("nan")) for r in self.rows], label="train (sampled)", alpha=0.7)
        if eval_by_step:
            xs = sorted(eval_by_step)
            ax_a.plot(xs, [eval_by_step[x] for x in xs], "o-", label="held-out (greedy)")
        ax_a.set(xlabel="optimizer step", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
        ax_a.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
