"""Cross-grid tables of issue 28, at each method's validation-chosen lr (``replicate_bab.choose_lrs``).

* **Chain length.** PRPO's gain over GRPO on the default task (``bab`` grid, 2–4 operations) and on the harder
  chains (``long`` grid, 5–8 operations): per task, the paired difference at each method's chosen lr with its 95%
  CI and paired tests, then whether the gain differs between the tasks (Welch's t on the per-seed gains: the tasks
  share seed numbers but not problems, so the gains are not paired across tasks).
* **Learned PRM.** Each aligner over the learned PRM against the same aligner over the exact PRM (paired by seed,
  each at its own chosen lr), and Hypothesis 1's symptoms at the chosen lr: held-out accuracy falling below GRPO or
  below its start, completions losing ``\\boxed{}``, lengths shrinking.
"""

from __future__ import annotations

import math

from replicate_bab import HELDOUT_KEY, choose_lrs, curve_auc, final, runs_by_config
from replicate_stats import mean_ci, paired_tests, welch_p

#: The train curves whose last steps describe a collapse, and their column titles.
SYMPTOMS = {"train/completion/no_boxed_frac": "no-`\\boxed` frac.", "train/completion/length_mean": "length (tokens)",
            "train/prm/score_mean": "PRM score"}


def chosen_runs(results: list[dict], lrs: tuple[float, ...], method: str) -> tuple[float | None, dict[int, dict]]:
    """``(chosen lr, {seed: run})`` of ``method`` at its validation-chosen lr (``(None, {})`` when it has none)."""
    lr = choose_lrs(results, lrs).get(method, {}).get("lr")
    return lr, (runs_by_config(results)[method][lr] if lr is not None else {})


def gains(results: list[dict], lrs: tuple[float, ...], method: str, baseline: str, horizon: int,
          metric: str = "final") -> dict[int, float]:
    """``{seed: method − baseline}`` of the final held-out accuracy (``metric="final"``) or of its area under the
    curve (``"auc"``), each method at its own chosen lr, over the seeds both finished."""
    value = final if metric == "final" else (lambda c: curve_auc(c, horizon))
    (_, a), (_, b) = chosen_runs(results, lrs, method), chosen_runs(results, lrs, baseline)
    return {s: value(a[s]["curves"][HELDOUT_KEY]) - value(b[s]["curves"][HELDOUT_KEY]) for s in sorted(a) if s in b}


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3f}"


def _chosen_cell(results: list[dict], lrs: tuple[float, ...], method: str) -> str:
    """``"<chosen lr>: <mean final held-out accuracy> (<n> seeds)"`` of ``method`` (— without a chosen lr)."""
    lr, runs = chosen_runs(results, lrs, method)
    accs = [final(r["curves"][HELDOUT_KEY]) for r in runs.values()]
    return "—" if lr is None else f"{lr:g}: {sum(accs) / len(accs):.1%} ({len(accs)} seeds)"


def _diff_cells(d: list[float]) -> str:
    """``Δ ± CI (n seeds) | t p | sign-flip p`` of per-seed differences ``d``."""
    if len(d) < 2:
        return f"{d[0] * 100:+.1f} pts (1 seed) | n/a | n/a" if d else "— | — | —"
    mean, half = mean_ci(d)
    _, t_p, flip_p = paired_tests(d, [0.0] * len(d))
    return f"{mean * 100:+.1f} ± {half * 100:.1f} pts ({len(d)} seeds) | {_p(t_p)} | {flip_p:.3f}"


def chain_length_lines(tasks: dict[str, tuple[list[dict], tuple[float, ...]]], horizon: int,
                       method: str = "prpo_rule_prm", baseline: str = "grpo") -> list[str]:
    """The chain-length table: ``tasks`` maps a task label to (its grid's runs, the lrs searched there)."""
    lines = [f"| task | lrs searched | {baseline} lr: final | {method} lr: final | Δ final ± 95% CI | paired t p | "
             "sign-flip p | Δ AUC ± 95% CI | paired t p | sign-flip p |", "|---|---|---|---|---|---|---|---|---|---|"]
    per_task = {}
    for label, (results, lrs) in tasks.items():
        cells = [_chosen_cell(results, lrs, m) for m in (baseline, method)]
        d_final = list(gains(results, lrs, method, baseline, horizon).values())
        d_auc = list(gains(results, lrs, method, baseline, horizon, "auc").values())
        per_task[label] = (d_final, d_auc)
        lines.append(f"| {label} | {', '.join(f'{lr:g}' for lr in lrs)} | {cells[0]} | {cells[1]} | "
                     f"{_diff_cells(d_final)} | {_diff_cells(d_auc)} |")
    labels = list(per_task)
    if len(labels) == 2 and all(len(v) >= 2 for pair in per_task.values() for v in pair):
        (f0, a0), (f1, a1) = per_task[labels[0]], per_task[labels[1]]
        lines += ["", f"Gain on {labels[1]} minus gain on {labels[0]}: final "
                  f"{(sum(f1) / len(f1) - sum(f0) / len(f0)) * 100:+.1f} pts (Welch t p = {_p(welch_p(f1, f0))}), "
                  f"AUC {(sum(a1) / len(a1) - sum(a0) / len(a0)) * 100:+.1f} pts (Welch t p = {_p(welch_p(a1, a0))})."]
    return lines


def _window_mean(curve: list[tuple[int, float]], lo: int, hi: int) -> float | None:
    """Mean of a train curve over its steps in ``[lo, hi]`` (None if it has none)."""
    xs = [v for s, v in curve if lo <= s <= hi]
    return sum(xs) / len(xs) if xs else None


def learned_prm_lines(results: list[dict], lrs: tuple[float, ...], horizon: int,
                      pairs: dict[str, str], baseline: str = "grpo", last: int = 10) -> list[str]:
    """The learned-PRM tables: ``pairs`` maps a method over the learned PRM to the same aligner over the exact PRM.

    The first table pairs each by seed, each at its own chosen lr. Then :func:`symptom_lines` at each method's
    chosen lr, and at the largest lr of ``lrs`` when it has runs."""
    lines = ["| learned-PRM method | exact-PRM method | exact lr: final | learned lr: final | Δ learned − exact ± 95% CI "
             "| paired t p | sign-flip p |", "|---|---|---|---|---|---|---|"]
    for learned, exact in pairs.items():
        cells = [_chosen_cell(results, lrs, m) for m in (exact, learned)]
        d = list(gains(results, lrs, learned, exact, horizon).values())
        lines.append(f"| {learned} | {exact} | {cells[0]} | {cells[1]} | {_diff_cells(d)} |")
    methods = [baseline, *dict.fromkeys(m for pair in pairs.items() for m in reversed(pair))]
    lines += ["", f"**Hypothesis 1's symptoms** at each method's chosen lr (held-out accuracy: mean over seeds at step 0, "
              f"the lowest of each seed's evaluations, and at step {horizon}; train columns: mean over the first {last} "
              f"steps → over the last {last}, and the seeds):", "", *symptom_lines(results, lrs, methods, horizon, baseline, last)]
    hot = max(lrs)
    if any(runs_by_config(results).get(m, {}).get(hot) for m in methods):
        lines += ["", f"The same at lr {hot:g} for every method (the largest lr searched; process-only over the exact "
                  "PRM collapsed there in the best-against-best grid):", "",
                  *symptom_lines(results, lrs, methods, horizon, baseline, last, lr=hot)]
    return lines


def symptom_lines(results: list[dict], lrs: tuple[float, ...], methods: list[str], horizon: int, baseline: str,
                  last: int, lr: float | None = None) -> list[str]:
    """A table of Hypothesis 1's symptoms of ``methods``, each at its chosen lr (``lr=None``) or all at ``lr``: the
    held-out accuracy at the start, its lowest point and its end, the final difference from ``baseline`` (paired by
    seed; the baseline at its own chosen lr, or at ``lr``) and the means of :data:`SYMPTOMS` over the first ``last``
    steps → over the last ``last`` steps."""
    by_config = runs_by_config(results)

    def runs_of(m: str) -> tuple[float | None, dict[int, dict]]:
        return chosen_runs(results, lrs, m) if lr is None else (lr, by_config.get(m, {}).get(lr, {}))

    lines = ["| method | lr | seeds | held-out start → lowest → final | Δ final vs GRPO | "
             + " | ".join(SYMPTOMS.values()) + " |", "|---|---|---|---|---|" + "---|" * len(SYMPTOMS)]
    _, base_runs = runs_of(baseline)
    for m in methods:
        m_lr, runs = runs_of(m)
        if m_lr is None or not runs:
            continue
        curves = [r["curves"] for r in runs.values()]
        start = sum(sorted(c[HELDOUT_KEY])[0][1] for c in curves) / len(curves)
        low = sum(min(v for _, v in c[HELDOUT_KEY]) for c in curves) / len(curves)
        end = sum(final(c[HELDOUT_KEY]) for c in curves) / len(curves)
        d = [final(runs[s]["curves"][HELDOUT_KEY]) - final(base_runs[s]["curves"][HELDOUT_KEY])
             for s in sorted(runs) if s in base_runs]
        vs = "—" if m == baseline or not d else f"{sum(d) / len(d) * 100:+.1f} pts"
        tails = []
        for key in SYMPTOMS:  # first `last` steps → last `last` steps
            ends = []
            for lo, hi in ((0, last), (horizon - last + 1, horizon)):
                vals = [t for c in curves if (t := _window_mean(c.get(key, []), lo, hi)) is not None]
                ends.append(f"{sum(vals) / len(vals):.2f}" if vals else "—")
            tails.append(" → ".join(ends))
        lines.append(f"| {m} | {m_lr:g} | {len(runs)} | {start:.1%} → {low:.1%} → {end:.1%} | {vs} | "
                     + " | ".join(tails) + " |")
    return lines
