"""Grid-specific plots of ``benchmarks/replicate.py``: SPRO's collapse mechanism and the Hypothesis-1 summary.

* ``replication-spro-sweep_mechanism.png``: per optimizer step, for every (β, lr) of the SPRO sweep, the implicit
  process reward (β·Σ δ at the last token), the size of the process term against the outcome term, training
  accuracy, completion length and the fraction of completions without ``\\boxed{}`` (mean over seeds, min–max
  band), and one point per run: its peak process/outcome ratio against its final accuracy minus GRPO's.
* ``replication-implicit-sweep_mechanism.png``: the same for PRPO over ``ImplicitPRM``, whose implicit reward is
  shown as the spread of its step scores ``σ(β·Σ_step δ)``.
* ``replication-h1-hot_summary.png``: the same at lr 3e-4 for the strongest bias of each kind.
* ``replication-spro-cap_drift.png``: at β = 0.2, the drift β·Σ δ, the process/outcome ratio and held-out
  accuracy over steps for GRPO (``msa_coef = 0``: drift logged, advantages GRPO's), SPRO and capped SPRO.
* ``replication-h1_summary.png``: final held-out accuracy, completion length and no-``\\boxed`` fraction against
  the strength of each kind of PRM bias (noise, early-stop bonus, late-step penalty, short-step bonus), for
  process-only and PRPO, with GRPO as a band.

Each run's curves come from its ``result.json`` (``replicate.read_curves``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from replicate_stats import mean_ci

Result = dict


def band(ax, runs: list[Result], key: str, spread: str = "ci", **style) -> None:
    """Mean over seeds of ``key`` at every step that all runs logged, with its 95% CI (``spread="ci"``) or the
    seeds' min–max range (``"range"``) as a band."""
    steps = sorted({s for r in runs for s, _ in r["curves"].get(key, [])})
    xs, ms, los, his = [], [], [], []
    for s in steps:
        vals = [v for r in runs for st, v in r["curves"].get(key, []) if st == s]
        if len(vals) == len(runs):
            m, h = mean_ci(vals)
            lo, hi = (m - h, m + h) if spread == "ci" else (min(vals), max(vals))
            xs.append(s), ms.append(m), los.append(lo), his.append(hi)
    if xs:
        line, = ax.plot(xs, ms, **style)
        ax.fill_between(xs, los, his, alpha=0.12, color=line.get_color())


def save(fig, path: Path) -> Path:
    """Lay out, write (110 dpi) and close ``fig``; return ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def by_method_of(results: list[Result]) -> dict[str, list[Result]]:
    """``{method: [its runs]}``."""
    out: dict[str, list[Result]] = {}
    for r in results:
        out.setdefault(r["method"], []).append(r)
    return out


#: sweep method prefix → (its implicit-reward metric, the axis label, the panel title, the figure's name)
SWEEPS = {
    "spro": ("train/aligner/implicit_reward/cpr_final_mean", "β·Σ(log π_old − log π_ref) per completion",
             "Implicit process reward at the last token", "SPRO"),
    "prpo_implicit": ("train/prm/score_std", "std of the step scores σ(β·Σ_step δ)",
                      "Spread of the implicit PRM's step scores", "PRPO over ImplicitPRM"),
}


def spro_mechanism(results: list[Result], static: Path, tag: str) -> Path | None:
    """SPRO sweep: :func:`sweep_mechanism` of the ``spro_beta<β>_lr<lr>`` methods."""
    return sweep_mechanism(results, static, tag, "spro")


def implicit_mechanism(results: list[Result], static: Path, tag: str) -> Path | None:
    """Implicit-PRM sweep: :func:`sweep_mechanism` of the ``prpo_implicit_beta<β>_lr<lr>`` methods."""
    return sweep_mechanism(results, static, tag, "prpo_implicit")


def sweep_mechanism(results: list[Result], static: Path, tag: str, prefix: str) -> Path | None:
    """Five panels over optimizer steps for every ``<prefix>_beta<β>_lr<lr>`` method (colour = β, line style = lr)
    and one point per run (peak process/outcome ratio against the accuracy gap to GRPO)."""
    import matplotlib.pyplot as plt

    pattern = re.compile(re.escape(prefix) + r"_beta([\d.e-]+)_lr([\d.e-]+)")
    runs = {m: rs for m, rs in by_method_of(results).items() if pattern.fullmatch(m)}
    if not runs:
        return None
    implicit_key, implicit_label, implicit_title, name = SWEEPS[prefix]
    parsed = {m: tuple(float(x) for x in pattern.fullmatch(m).groups()) for m in runs}
    betas = sorted({b for b, _ in parsed.values()})
    lrs = sorted({lr for _, lr in parsed.values()})
    colours = dict(zip(betas, ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")))
    styles = dict(zip(lrs, (":", "--", "-", "-.")))
    panels = [
        (implicit_key, implicit_label, implicit_title),
        ("train/advantage/process_to_outcome", "mean |process| / mean |outcome|", "Process term against outcome term"),
        ("train/accuracy", "fraction correct", "Training accuracy (sampled)"),
        ("train/completion/length_mean", "tokens", "Completion length (sampled)"),
        ("train/completion/no_boxed_frac", "fraction", "Completions without \\boxed{}"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    for ax, (key, ylabel, title) in zip(axes.flat, panels):
        for m in sorted(runs, key=lambda k: parsed[k]):
            beta, lr = parsed[m]
            band(ax, runs[m], key, spread="range", color=colours[beta], linestyle=styles[lr],
                  label=f"β={beta:g}, lr={lr:g}")
        ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    axes[0, 1].set(yscale="log", ylim=(1e-4, None))  # step 1: ~1e-8, the rounding of two separate passes
    axes[0, 0].legend(fontsize=7, ncol=3)
    _ratio_scatter(axes[1, 2], by_method_of(results), runs, parsed, colours, lr_markers=dict(zip(lrs, "^os")))
    fig.suptitle(f"{name} sweep: mean over seeds, band from the lowest to the highest seed (colour: β, line: lr)")
    return save(fig, static / f"{tag}_mechanism.png")


def _ratio_scatter(ax, by_method: dict[str, list[Result]], runs: dict[str, list[Result]],
                   parsed: dict[str, tuple[float, float]], colours: dict[float, str], lr_markers: dict[float, str]) -> None:
    """One point per SPRO run: the peak process/outcome ratio against its final held-out accuracy minus that of
    GRPO with the same seed and lr (``replicate_grids.baseline_of``)."""
    from replicate_grids import baseline_of

    for m, rs in runs.items():
        beta, lr = parsed[m]
        grpo = {r["seed"]: r["curves"]["eval/accuracy"][-1][1] for r in by_method.get(baseline_of(m), [])}
        points = [(max(v for _, v in r["curves"]["train/advantage/process_to_outcome"]),
                   100 * (r["curves"]["eval/accuracy"][-1][1] - grpo[r["seed"]]))
                  for r in rs if r["seed"] in grpo and r["curves"].get("train/advantage/process_to_outcome")]
        if points:
            ax.scatter([x for x, _ in points], [y for _, y in points], color=colours[beta], marker=lr_markers[lr],
                       label=f"β={beta:g}, lr={lr:g}", alpha=0.8)
    ax.axvline(1.0, color="grey", linewidth=1, linestyle=":")
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set(xscale="log", xlabel="peak mean |process| / mean |outcome| over the run",
           ylabel="final held-out acc. − GRPO (same seed, lr), points", title="Peak ratio against the outcome")
    ax.legend(fontsize=6, ncol=2)


def spro_cap_drift(results: list[Result], static: Path, tag: str) -> Path | None:
    """Drift and process/outcome ratio over steps at β = 0.2: GRPO's own drift (``spro_msa0_*``, SPRO's logging with
    GRPO's advantages), SPRO, and SPRO with its process cap; one column per lr."""
    import matplotlib.pyplot as plt

    by_method = by_method_of(results)
    variants = {"spro_msa0": ("GRPO (msa_coef 0: drift only)", "tab:grey"), "spro": ("SPRO", "tab:red"),
                "spro_cap0.25": ("SPRO, process capped at 0.25 x outcome", "tab:blue")}
    lrs = sorted({float(m.rsplit("_lr", 1)[1]) for m in by_method if m.startswith("spro_msa0_beta0.2_lr")})
    if not lrs:
        return None
    panels = [("train/aligner/implicit_reward/cpr_final_mean", "β·Σ(log π_old − log π_ref), β = 0.2"),
              ("train/advantage/process_to_outcome", "mean |process| / mean |outcome|"),
              ("eval/accuracy", "held-out accuracy")]
    fig, axes = plt.subplots(len(panels), len(lrs), figsize=(6 * len(lrs), 11), squeeze=False)
    for c, lr in enumerate(lrs):
        for r, (key, ylabel) in enumerate(panels):
            ax = axes[r, c]
            for prefix, (label, colour) in variants.items():
                runs = by_method.get(f"{prefix}_beta0.2_lr{lr:g}", [])
                if runs:
                    band(ax, runs, key, spread="range", color=colour, label=label)
            ax.set(xlabel="optimizer step", ylabel=ylabel, title=f"lr {lr:g}")
            if key != "eval/accuracy":
                ax.set_yscale("symlog", linthresh=1e-3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("SPRO at β = 0.2: the drift it feeds on, with and without the cap (mean over seeds, min–max band)")
    return save(fig, static / f"{tag}_drift.png")


#: Hypothesis-1 bias kinds: name pattern → (kind, the strength's group index); the noise/early-stop combinations
#: (both non-zero) are in the table only.
H1_KINDS = ("noise σ", "early-stop bonus", "late-step penalty", "short-step bonus")


def h1_points(by_method: dict[str, list[Result]]) -> dict[tuple[str, str], list[tuple[float, list[Result]]]]:
    """``{(aligner, kind): [(strength, runs), ...]}`` of the one-kind H1 methods; the main table's exact-PRM runs
    (``process_only``, ``prpo_rule_prm``) are every kind's strength-0 point."""
    grid = re.compile(r"h1_(process_only|prpo)_noise([\d.]+)_early([\d.]+)")
    one = re.compile(r"h1_(process_only|prpo)_(late|short)([\d.]+)")
    out: dict[tuple[str, str], list[tuple[float, list[Result]]]] = {}
    for m, rs in by_method.items():
        if m in ("process_only", "prpo_rule_prm"):
            for kind in H1_KINDS:
                out.setdefault(("prpo" if m == "prpo_rule_prm" else m, kind), []).append((0.0, rs))
        elif hit := grid.fullmatch(m):
            sigma, early = float(hit[2]), float(hit[3])
            if early == 0 or sigma == 0:
                kind, strength = ("noise σ", sigma) if early == 0 else ("early-stop bonus", early)
                out.setdefault((hit[1], kind), []).append((strength, rs))
        elif hit := one.fullmatch(m):
            kind = "late-step penalty" if hit[2] == "late" else "short-step bonus"
            out.setdefault((hit[1], kind), []).append((float(hit[3]), rs))
    return out


def h1_hot_summary(results: list[Result], static: Path, tag: str) -> Path | None:
    """:func:`h1_summary` of the ``h1-hot`` grid: its methods (and GRPO) carry the suffix ``_lr0.0003``."""
    suffix = "_lr0.0003"
    renamed = [dict(r, method=r["method"].removesuffix(suffix)) for r in results if r["method"].endswith(suffix)]
    return h1_summary(renamed, static, tag, title_note=" at lr 3e-4")


def h1_summary(results: list[Result], static: Path, tag: str, title_note: str = "") -> Path | None:
    """One column per bias kind (strength on x): final held-out accuracy, completion length and no-``\\boxed``
    fraction, for process-only and PRPO, with GRPO (which reads no PRM) as a grey band; mean and 95% CI."""
    import matplotlib.pyplot as plt

    by_method = by_method_of(results)
    by_method.setdefault("grpo", by_method.get("grpo_lr0.0003", []))  # h1-hot: GRPO at the grid's lr
    points = h1_points(by_method)
    if not any(s > 0 for pts in points.values() for s, _ in pts):
        return None
    rows = [("eval/accuracy", "held-out accuracy"), ("train/completion/length_mean", "completion length"),
            ("train/completion/no_boxed_frac", "no-\\boxed fraction")]
    fig, axes = plt.subplots(len(rows), len(H1_KINDS), figsize=(18, 10), squeeze=False)
    for r, (key, ylabel) in enumerate(rows):
        def final(rs: list[Result], key: str = key) -> list[float]:
            return [x["curves"][key][-1][1] for x in rs if x["curves"].get(key)]

        for c, kind in enumerate(H1_KINDS):
            ax = axes[r, c]
            for aligner in ("process_only", "prpo"):
                pts = sorted(points.get((aligner, kind), []), key=lambda p: p[0])
                stats = [mean_ci(final(rs)) for _, rs in pts]
                if pts:
                    ax.errorbar([s for s, _ in pts], [m for m, _ in stats], yerr=[h for _, h in stats], capsize=3,
                                marker="o" if aligner == "prpo" else "s", linestyle="-" if aligner == "prpo" else "--",
                                label="PRPO" if aligner == "prpo" else "process-only")
            if "grpo" in by_method and final(by_method["grpo"]):
                m, h = mean_ci(final(by_method["grpo"]))
                ax.axhspan(m - h, m + h, color="grey", alpha=0.2, label="GRPO, 95% CI")
                ax.axhline(m, color="grey", linewidth=1)
            ax.set(xlabel=f"PRM {kind}", ylabel=f"final {ylabel}")
            if r == 0:
                ax.set_title(f"BiasedPRM: {kind}")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Hypothesis 1{title_note}: final values (step 20) against the PRM's bias, mean and 95% CI over seeds")
    return save(fig, static / f"{tag}_summary.png")


def best_curves(results: list[Result], static: Path, tag: str) -> Path:
    """Best against best: held-out and validation accuracy over steps of every method at its chosen lr (mean and
    95% CI over seeds; ``replicate_bab.choose_lrs``)."""
    import matplotlib.pyplot as plt
    from replicate_bab import HELDOUT_KEY, choose_lrs, runs_by_config
    from replicate_grids import BAB_LRS
    from replicate_splits import VALIDATION_KEY

    choice, by_config = choose_lrs(results, BAB_LRS), runs_by_config(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for base, pick in sorted(choice.items()):
        if pick["lr"] is None:
            continue
        runs = list(by_config[base][pick["lr"]].values())
        label = f"{base} (lr {pick['lr']:g}, {len(runs)} seeds)"
        band(axes[0], runs, HELDOUT_KEY, label=label)
        band(axes[1], runs, VALIDATION_KEY, label=label)
    axes[0].set(xlabel="optimizer step", ylabel="accuracy (greedy)", title="Held-out (200 problems), at the chosen lr")
    axes[1].set(xlabel="optimizer step", title="Validation (200 train-distribution problems): chooses the lr")
    axes[0].legend(fontsize=7)
    return save(fig, static / f"{tag}_best.png")


#: report tag → its extra plot (written next to the tag's accuracy and collapse plots).
EXTRA_PLOTS: dict[str, Callable[[list[Result], Path, str], Path | None]] = {
    "replication-spro-sweep": spro_mechanism,
    "replication-implicit-sweep": implicit_mechanism,
    "replication-h1": h1_summary,
    "replication-spro-cap": spro_cap_drift,
    "replication-h1-hot": h1_hot_summary,
    "replication-bab": best_curves,
    "replication-long": best_curves,
    "replication-learned": best_curves,
}


def extra_plots(results: list[Result], static: Path, tag: str) -> Path | None:
    """Draw the grid's extra plot, if it has one; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    fn = EXTRA_PLOTS.get(tag)
    return fn(results, static, tag) if fn else None
