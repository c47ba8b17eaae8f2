"""Best against best (issue 28): each method at its own learning rate, chosen on the validation split.

The grids ``bab`` (the default task) and ``long`` (5–8-operation chains) run every method of
:data:`replicate_grids.BAB_METHODS` at every lr of :data:`replicate_grids.BAB_LRS` under the names
``<grid>_<method>_lr<lr>``. This module turns their runs into three tables:

* **lr selection.** For each method and lr: the mean over seeds of the *final* validation accuracy
  (``eval/arith_validation/pass@1`` at the last step; 200 train-distribution problems, never the held-out ones).
  The means are taken over the seeds that finished at *every* lr of the method, so each lr is judged on the same
  seeds. The chosen lr is the one with the highest mean; a tie goes to the smaller lr.
* **best against best.** Held-out accuracy at each method's chosen lr, paired by seed with GRPO at GRPO's own chosen
  lr (mean paired difference, paired t p, exact sign-flip p: ``replicate_stats.paired_tests``).
* **training efficiency.** The area under the held-out accuracy curve, normalised by the horizon
  (:func:`curve_auc`: the mean accuracy over training, in accuracy units), paired the same way, and the steps to a
  held-out accuracy threshold (:func:`steps_to`).
"""

from __future__ import annotations

import math

from replicate_splits import VALIDATION_KEY
from replicate_stats import paired_tests

HELDOUT_KEY = "eval/accuracy"
BASELINE = "grpo"


def split_name(method: str) -> tuple[str, str, float]:
    """``"bab_prpo_rule_prm_lr0.0001"`` → ``("bab", "prpo_rule_prm", 1e-4)``.

    Raises:
        ValueError: if the name is not ``<grid>_<method>_lr<lr>``.
    """
    head, sep, lr = method.rpartition("_lr")
    grid, _, base = head.partition("_")
    if not sep or not base:
        raise ValueError(f"{method!r} is not a best-against-best run name <grid>_<method>_lr<lr>")
    return grid, base, float(lr)


def curve_auc(curve: list[tuple[int, float]], horizon: int) -> float:
    """Area under a step → accuracy curve from step 0 to ``horizon`` (trapezoids between the evaluations), divided
    by ``horizon``: the mean accuracy over training.

    Raises:
        ValueError: if the curve does not start at step 0 and end at ``horizon`` (the area would be a guess).
    """
    pts = sorted(curve)
    if not pts or pts[0][0] != 0 or pts[-1][0] != horizon:
        steps = [s for s, _ in pts]
        raise ValueError(f"the curve must be evaluated at step 0 and at step {horizon}, got steps {steps}")
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pts, pts[1:]))
    return area / horizon


def steps_to(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """The first evaluated step whose accuracy is at least ``threshold`` (None if none is)."""
    return next((s for s, v in sorted(curve) if v >= threshold), None)


def final(curve: list[tuple[int, float]]) -> float:
    """The value at the last evaluated step."""
    return sorted(curve)[-1][1]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


def runs_by_config(results: list[dict]) -> dict[str, dict[float, dict[int, dict]]]:
    """``{method: {lr: {seed: result}}}`` of the best-against-best runs among ``results``."""
    out: dict[str, dict[float, dict[int, dict]]] = {}
    for r in results:
        _, base, lr = split_name(r["method"])
        out.setdefault(base, {}).setdefault(lr, {})[r["seed"]] = r
    return out


def choose_lrs(results: list[dict], lrs: tuple[float, ...]) -> dict[str, dict]:
    """Each method's lr by mean final validation accuracy over the seeds finished at every lr of ``lrs``.

    Returns:
        ``{method: {"lr": chosen or None, "seeds": [common seeds], "by_lr": {lr: mean or None}, "missing": [lrs
        without runs]}}``. ``lr`` is None when no seed finished at every lr.
    """
    out = {}
    for base, by_lr in runs_by_config(results).items():
        missing = [lr for lr in lrs if not by_lr.get(lr)]
        present = [lr for lr in lrs if by_lr.get(lr)]
        seeds = sorted(set.intersection(*(set(by_lr[lr]) for lr in present))) if present else []
        means = {lr: _mean([final(by_lr[lr][s]["curves"][VALIDATION_KEY]) for s in seeds]) if seeds else None
                 for lr in present}
        chosen = None
        if seeds:
            best = max(means.values())
            chosen = min(lr for lr, m in means.items() if m == best)  # a tie goes to the smaller lr
        out[base] = {"lr": chosen, "seeds": seeds, "by_lr": means, "missing": missing}
    return out


def best_against_best(results: list[dict], lrs: tuple[float, ...], horizon: int, threshold: float) -> dict[str, dict]:
    """Held-out final accuracy, AUC and steps to ``threshold`` at each method's chosen lr, paired by seed with GRPO
    at GRPO's chosen lr.

    Returns:
        ``{method: row}``; a row holds ``lr``, ``seeds``, ``final_mean``/``final_std``, ``auc_mean``/``auc_std``,
        ``steps_to_threshold`` (per seed), ``val_mean`` (the selection statistic) and, for methods other than GRPO
        with at least two seeds paired, ``vs_grpo`` and ``auc_vs_grpo`` as ``(mean difference, t p or None,
        sign-flip p, paired seeds)``.
    """
    choice = choose_lrs(results, lrs)
    by_config = runs_by_config(results)
    grpo_lr = choice.get(BASELINE, {}).get("lr")
    grpo = by_config.get(BASELINE, {}).get(grpo_lr, {}) if grpo_lr is not None else {}
    table = {}
    for base, pick in choice.items():
        if pick["lr"] is None:
            continue
        runs = by_config[base][pick["lr"]]
        seeds = sorted(runs)
        finals = [final(runs[s]["curves"][HELDOUT_KEY]) for s in seeds]
        aucs = [curve_auc(runs[s]["curves"][HELDOUT_KEY], horizon) for s in seeds]
        row = {"lr": pick["lr"], "seeds": seeds, "val_mean": pick["by_lr"][pick["lr"]],
               "final_mean": _mean(finals), "final_std": _std(finals), "auc_mean": _mean(aucs), "auc_std": _std(aucs),
               "steps_to_threshold": [steps_to(runs[s]["curves"][HELDOUT_KEY], threshold) for s in seeds],
               "missing_lrs": pick["missing"]}
        paired = [s for s in seeds if s in grpo]
        if base != BASELINE and len(paired) >= 2:
            for key, fn in (("vs_grpo", final), ("auc_vs_grpo", lambda c: curve_auc(c, horizon))):
                mean, t_p, flip_p = paired_tests([fn(runs[s]["curves"][HELDOUT_KEY]) for s in paired],
                                                 [fn(grpo[s]["curves"][HELDOUT_KEY]) for s in paired])
                row[key] = (mean, None if math.isnan(t_p) else t_p, flip_p, paired)
            row["grpo_lr"] = grpo_lr
        table[base] = row
    return table


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3f}"


def _sd(r: dict, key: str) -> str:
    return f" ± {r[key]:.1%}" if len(r["seeds"]) > 1 else " (1 seed)"


def _lr(r: dict) -> str:
    """The chosen lr, starred when some lrs of the method have no run yet (the choice may still change)."""
    return f"{r['lr']:g}" + ("*" if r["missing_lrs"] else "")


def report_lines(results: list[dict], lrs: tuple[float, ...], horizon: int, threshold: float,
                 n_expected: int) -> list[str]:
    """The markdown of the lr-selection, best-against-best and AUC tables (marked partial where runs are missing);
    ``n_expected``: the runs of the whole grid (methods × lrs × seeds)."""
    choice = choose_lrs(results, lrs)
    table = best_against_best(results, lrs, horizon, threshold)
    by_config = runs_by_config(results)
    n_done = sum(len(seeds) for by_lr in by_config.values() for seeds in by_lr.values())
    lines = [f"Runs finished: **{n_done} of {n_expected}**" + (" (partial: the tables below use the finished runs only;"
                                                               " a chosen lr marked * was chosen before every lr of "
                                                               "its method had a run)" if n_done < n_expected else "")
             + ".", "",
             "**lr selection** (mean final validation accuracy over the seeds finished at every lr; chosen lr in "
             "bold):",
             "", "| method | seeds | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|---|" + "---|" * len(lrs)]
    for base, pick in sorted(choice.items()):
        cells = []
        for lr in lrs:
            m = pick["by_lr"].get(lr)
            n = len(by_config[base].get(lr, {}))
            cell = "—" if m is None else f"{m:.1%} ({n})"
            cells.append(f"**{cell}**" if lr == pick["lr"] else cell)
        lines.append(f"| {base} | {', '.join(map(str, pick['seeds'])) or '—'} | " + " | ".join(cells) + " |")
    lines += ["", "(In brackets: the seeds finished at that lr; the mean uses only the seeds in the second column.)",
              "", f"**Best against best** (held-out accuracy at step {horizon}, 200 problems; each method at its chosen "
              "lr, paired by seed with GRPO at GRPO's chosen lr):", "",
              "| method | chosen lr | seeds | final held-out acc. mean ± std | Δ vs GRPO | paired t p | sign-flip p "
              "|", "|---|---|---|---|---|---|---|"]
    for base, r in sorted(table.items()):
        vs = r.get("vs_grpo")
        lines.append(f"| {base} | {_lr(r)} | {len(r['seeds'])} | {r['final_mean']:.1%}{_sd(r, 'final_std')} | "
                     + (f"{vs[0] * 100:+.1f} pts ({len(vs[3])} seeds) | {_p(vs[1])} | {vs[2]:.3f} |" if vs
                        else "— | — | — |"))
    lines += ["", f"**Training efficiency** (area under the held-out accuracy curve over steps 0–{horizon} ÷ "
              f"{horizon}, i.e. the mean accuracy over training; steps to {threshold:.0%} held-out accuracy per seed, "
              "— if never):", "", "| method | chosen lr | AUC mean ± std | Δ AUC vs GRPO | paired t p | sign-flip p "
              f"| steps to {threshold:.0%} |", "|---|---|---|---|---|---|---|"]
    for base, r in sorted(table.items()):
        vs = r.get("auc_vs_grpo")
        hits = ", ".join("—" if h is None else str(h) for h in r["steps_to_threshold"])
        lines.append(f"| {base} | {_lr(r)} | {r['auc_mean']:.1%}{_sd(r, 'auc_std')} | "
                     + (f"{vs[0] * 100:+.1f} pts | {_p(vs[1])} | {vs[2]:.3f}" if vs else "— | — | —")
                     + f" | {hits} |")
    return lines
