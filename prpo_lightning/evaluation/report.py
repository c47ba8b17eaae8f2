"""Evaluation outputs: per-completion JSONL, a summary table (terminal and CSV), a bar chart by subject and
level (PNG), and a sample of completions for the experiment logger.

A *summary row* is a dict ``{"benchmark", "breakdown", "group", "problems", "skipped", <metric>: value, ...}`` where
``breakdown`` is ``overall``, ``subject`` or ``level``, ``skipped`` counts the problems whose prompt was longer than
``model.sampling.max_prompt_length`` (never generated; they stay in ``problems`` and count as wrong) and the metrics
are ``pass@1`` (greedy), ``pass@k`` (unbiased, from n samples) and ``mean@n``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

ID_COLUMNS = ("benchmark", "breakdown", "group", "problems", "skipped")
COMPLETION_COLUMNS = ("benchmark", "problem_id", "mode", "sample", "answer", "extracted", "verdict", "completion")


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metric names present in summary rows, in first-seen order."""
    cols: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in ID_COLUMNS:
                cols[key] = None
    return list(cols)


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write one JSON object per line (one per evaluated completion)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write summary rows as CSV with columns ``benchmark, breakdown, group, problems, skipped, <metrics>``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [*ID_COLUMNS, *metric_columns(rows)]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in fields})
    return path


def _csv_value(v: Any) -> Any:
    return f"{v:.6f}" if isinstance(v, float) else v


def format_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Render summary rows as an aligned plain-text table (counts as integers, metrics in percent)."""
    metrics = metric_columns(rows)
    header = ["benchmark", "group", "problems", "skipped", *metrics]
    body = []
    for row in rows:
        group = "all" if row["breakdown"] == "overall" else f"{row['breakdown']}={row['group']}"
        cells = [str(row["benchmark"]), group, str(row["problems"]), str(row.get("skipped", 0))]
        cells += [_pct(row.get(m)) for m in metrics]
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    align = ["<", "<"] + [">"] * (len(header) - 2)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *(line(r) for r in body)]
    if title:
        out.insert(0, title)
    return "\n".join(out)


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * float(v):.1f}"


def plot_breakdown(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Bar chart of the headline metric (greedy pass@1, else mean@n) by subject and by level, per benchmark.

    Benchmarks without subject/level fields get one bar for the whole benchmark.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = headline_metric(rows)
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    panels: list[tuple[str, list[dict[str, Any]]]] = []
    for bench in benches:
        for kind in ("subject", "level"):
            sel = [r for r in rows if r["benchmark"] == bench and r["breakdown"] == kind]
            if sel:
                panels.append((f"{bench}: {metric} by {kind}", sel))
    overall = [r for r in rows if r["breakdown"] == "overall"]
    panels.append((f"{metric} by benchmark", overall))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 4.2 * len(panels)), 4.2), squeeze=False)
    for ax, (title, sel) in zip(axes[0], panels):
        labels = [str(r["benchmark"] if r["breakdown"] == "overall" else r["group"]) for r in sel]
        values = [100 * _finite(r.get(metric)) for r in sel]
        bars = ax.bar(range(len(sel)), values, color="tab:blue")
        for bar, r in zip(bars, sel):
            ax.annotate(f"n={r['problems']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(sel)), labels, rotation=35, ha="right", fontsize=8)
        ax.set(title=title, ylabel=f"{metric} (%)", ylim=(0, 105))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(v: Any) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def headline_metric(rows: Sequence[dict[str, Any]]) -> str:
    """``pass@1`` when greedy results exist, otherwise the ``mean@n`` column."""
    cols = metric_columns(rows)
    if "pass@1" in cols:
        return "pass@1"
    means = [c for c in cols if c.startswith("mean@")]
    return means[0] if means else cols[0]


def completions_sample(records: Sequence[dict[str, Any]], n: int) -> list[list[str]]:
    """The first ``n`` completions as table rows (columns :data:`COMPLETION_COLUMNS`), greedy ones first."""
    ordered = sorted(records, key=lambda r: (r.get("mode") != "greedy", r.get("sample", 0)))
    return [[_cell(rec.get(c)) for c in COMPLETION_COLUMNS] for rec in ordered[:n]]


def _cell(v: Any) -> str:
    return "" if v is None else str(v)


def completions_markdown(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of completion rows (pipes and newlines escaped)."""

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", "<br>")

    out = ["| " + " | ".join(COMPLETION_COLUMNS) + " |", "|" + "---|" * len(COMPLETION_COLUMNS)]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def log_completions(loggers: Sequence[Any], key: str, rows: Sequence[Sequence[str]], step: int) -> list[str]:
    """Send a completions table to each logger; returns how each logger received it.

    ``WandbLogger`` (and any logger with ``log_table``) gets a real table; ``TensorBoardLogger`` gets Markdown text
    (``add_text``); loggers with ``log_text`` get text. Others (``CSVLogger``) have no table support: the Markdown
    file written next to the summary (``samples.md``) is the table, recorded as ``"<Logger>: none (samples.md)"``
    (no console warning: that file is always written, so the note would only repeat at every evaluation).
    """
    how = []
    md = completions_markdown(rows)
    for logger in loggers:
        name = type(logger).__name__
        try:
            if hasattr(logger, "log_table"):
                logger.log_table(key=key, columns=list(COMPLETION_COLUMNS), data=[list(r) for r in rows], step=step)
                how.append(f"{name}: table")
            elif hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text(key, md, global_step=step)
                how.append(f"{name}: markdown text")
            elif hasattr(logger, "log_text"):
                logger.log_text(key=key, columns=list(COMPLETION_COLUMNS), data=[list(r) for r in rows], step=step)
                how.append(f"{name}: text")
            else:
                how.append(f"{name}: none (samples.md)")
        except Exception as err:  # a logging backend must never abort the evaluation
            rank_zero_warn(f"logging the completions table to {name} failed: {err!r}")
            how.append(f"{name}: failed")
    return how
