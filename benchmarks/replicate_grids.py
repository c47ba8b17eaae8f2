"""Method grids of ``benchmarks/replicate.py``: the main table, Hypothesis 1 (biased PRMs), the β × lr sweeps of
SPRO and of PRPO over ``ImplicitPRM``, and SPRO with its optional process cap.

Each grid maps a method name to the ``prpo-fit`` overrides that swap its components into ``configs/demo.yaml``
(after the pinned budget, so a grid's own ``--model.optim.lr`` wins). Every grid holds ``grpo``, the baseline of
the "Δ vs GRPO" column.
"""

from __future__ import annotations

import json

EQ_PRM = "components.prms.EquationCheckPRM"
ALIGNERS = "components.aligners"
#: ``configs/demo.yaml``'s ``sampling.max_new_tokens``: the budget the early-stop bias is relative to.
DEMO_MAX_NEW_TOKENS = 64

MAIN: dict[str, list[str]] = {
    "grpo": [f"--model.aligner={ALIGNERS}.GRPOAligner"],
    "prpo_rule_prm": [f"--model.aligner={ALIGNERS}.PRPOAligner", f"--model.prm={EQ_PRM}"],
    # the authors' srpo2 setting (configs/prpo_reference.yaml): triangular prior, raw-score last token
    "prpo_reference": [f"--model.aligner={ALIGNERS}.PRPOAligner", "--model.aligner.init_args.prior=triangular",
                       "--model.aligner.init_args.last_token_quirk=true", f"--model.prm={EQ_PRM}"],
    "prpo_implicit_prm": [f"--model.aligner={ALIGNERS}.PRPOAligner", "--model.prm=components.prms.ImplicitPRM"],
    "process_only": [f"--model.aligner={ALIGNERS}.ProcessOnlyAligner", f"--model.prm={EQ_PRM}"],
    "prm_avg": [f"--model.aligner={ALIGNERS}.PRMAvgAligner", f"--model.prm={EQ_PRM}"],
    "spro": [f"--model.aligner={ALIGNERS}.SPROAligner"],
    "pure": [f"--model.aligner={ALIGNERS}.PUREAligner", f"--model.prm={EQ_PRM}"],
}

#: Hypothesis 1: bias strengths of ``BiasedPRM`` over the exact rule PRM.
H1_NOISE_STD = (0.0, 0.2, 0.4)
H1_EARLY_STOP = (0.0, 0.3)
H1_ALIGNERS = {"process_only": "ProcessOnlyAligner", "prpo": "PRPOAligner"}
#: The unbiased point (σ = 0, no bonus) of each H1 aligner is the main table's run with the exact rule PRM.
H1_UNBIASED = {"process_only": "process_only", "prpo": "prpo_rule_prm"}
#: Stronger biases, one kind at a time (``BiasedPRM`` argument → strengths): noise σ, the early-stop bonus, the
#: penalty on steps in the second half of a completion and the bonus for short steps.
H1_ONE_FACTOR = {"noise_std": (0.8,), "early_stop_bonus": (1.0,), "late_step_penalty": (0.5, 1.0),
                 "short_step_bonus": (0.5, 1.0)}

#: The replication budget's learning rate (``BUDGET`` in ``replicate.py``): the highest lr of the SPRO sweep at
#: which GRPO does not lose held-out accuracy in 20 steps (docs/replication.md, "Budget").
MAIN_LR = 1e-4
#: SPRO sweep: β of the implicit reward × learning rate.
SPRO_BETAS = (0.01, 0.05, 0.2)
SPRO_LRS = (3e-5, 1e-4, 3e-4)


def biased_prm(noise_std: float, early_stop_bonus: float, seed: int = 0) -> str:
    """``--model.prm`` override: ``BiasedPRM`` over ``EquationCheckPRM`` (one fixed biased scorer per ``seed``)."""
    spec = {"class_path": "components.prms.BiasedPRM", "init_args": {
        "base": {"class_path": EQ_PRM}, "noise_std": noise_std, "early_stop_bonus": early_stop_bonus,
        "max_new_tokens": DEMO_MAX_NEW_TOKENS, "seed": seed}}
    return f"--model.prm={json.dumps(spec)}"


def biased_prm_one(kind: str, strength: float, seed: int = 0) -> str:
    """``--model.prm`` override: ``BiasedPRM`` over ``EquationCheckPRM`` with one bias ``kind`` at ``strength``."""
    spec = {"class_path": "components.prms.BiasedPRM", "init_args": {
        "base": {"class_path": EQ_PRM}, kind: strength, "max_new_tokens": DEMO_MAX_NEW_TOKENS, "seed": seed}}
    return f"--model.prm={json.dumps(spec)}"


def h1_method_name(aligner: str, kind: str, strength: float) -> str:
    """``h1_<aligner>_noise<σ>_early<c_e>`` for noise and early-stop biases (the first grid's names), else
    ``h1_<aligner>_late<c_l>`` / ``h1_<aligner>_short<c_s>``."""
    if kind == "noise_std":
        return f"h1_{aligner}_noise{strength:g}_early0"
    if kind == "early_stop_bonus":
        return f"h1_{aligner}_noise0_early{strength:g}"
    return f"h1_{aligner}_{kind.split('_')[0]}{strength:g}"


def hypothesis1() -> dict[str, list[str]]:
    """Process-only and PRPO over ``BiasedPRM`` at every (noise σ, early-stop bonus) and at the stronger one-kind
    biases of :data:`H1_ONE_FACTOR`, plus GRPO (which reads no PRM, so one row stands for every bias)."""
    grid = {"grpo": MAIN["grpo"]}
    for short, aligner in H1_ALIGNERS.items():
        for sigma in H1_NOISE_STD:
            for early in H1_EARLY_STOP:
                if sigma == 0 and early == 0:  # BiasedPRM with no bias returns the base's scores exactly
                    grid[H1_UNBIASED[short]] = MAIN[H1_UNBIASED[short]]
                    continue
                grid[f"h1_{short}_noise{sigma:g}_early{early:g}"] = [
                    f"--model.aligner={ALIGNERS}.{aligner}", biased_prm(sigma, early)]
        for kind, strengths in H1_ONE_FACTOR.items():
            for strength in strengths:
                prm = (biased_prm(strength if kind == "noise_std" else 0.0, strength if kind == "early_stop_bonus" else 0.0)
                       if kind in ("noise_std", "early_stop_bonus") else biased_prm_one(kind, strength))
                grid[h1_method_name(short, kind, strength)] = [f"--model.aligner={ALIGNERS}.{aligner}", prm]
    return grid


def spro_sweep() -> dict[str, list[str]]:
    """SPRO at every (β, lr), plus GRPO at every lr (``grpo`` at the main lr): each SPRO row is compared with
    the GRPO row of its own lr (:func:`baseline_of`)."""
    grid = {}
    for lr in SPRO_LRS:
        name = baseline_of(f"grpo_lr{lr:g}")
        grid[name] = MAIN["grpo"] if name == "grpo" else [*MAIN["grpo"], f"--model.optim.lr={lr}"]
    for beta in SPRO_BETAS:
        for lr in SPRO_LRS:
            grid[f"spro_beta{beta:g}_lr{lr:g}"] = [
                f"--model.aligner={ALIGNERS}.SPROAligner", f"--model.aligner.init_args.beta={beta}",
                f"--model.optim.lr={lr}"]
    return grid


#: The strongest biases of each kind, rerun at lr 3e-4 (three times the budget's) to see whether more pressure
#: per step brings out a collapse that 20 steps at 1e-4 do not show.
H1_HOT = {"noise_std": 0.8, "early_stop_bonus": 1.0, "late_step_penalty": 1.0, "short_step_bonus": 1.0}
H1_HOT_LR = 3e-4


def hypothesis1_hot() -> dict[str, list[str]]:
    """Process-only and PRPO at lr 3e-4: unbiased (the exact PRM) and with each bias of :data:`H1_HOT`, plus GRPO
    at that lr. Names end in ``_lr0.0003`` so that each row is paired with GRPO at 3e-4."""
    h1 = hypothesis1()
    lr = f"--model.optim.lr={H1_HOT_LR:g}"
    grid = {baseline_of(f"grpo_lr{H1_HOT_LR:g}"): [*MAIN["grpo"], lr]}
    for short in H1_ALIGNERS:
        grid[f"{H1_UNBIASED[short]}_lr{H1_HOT_LR:g}"] = [*MAIN[H1_UNBIASED[short]], lr]
        for kind, strength in H1_HOT.items():
            grid[f"{h1_method_name(short, kind, strength)}_lr{H1_HOT_LR:g}"] = [*h1[h1_method_name(short, kind, strength)], lr]
    return grid


def implicit_sweep() -> dict[str, list[str]]:
    """PRPO over ``ImplicitPRM`` at every (β, lr) of the SPRO sweep, plus GRPO at every lr."""
    grid = {name: args for name, args in spro_sweep().items() if name.startswith("grpo")}
    for beta in SPRO_BETAS:
        for lr in SPRO_LRS:
            grid[f"prpo_implicit_beta{beta:g}_lr{lr:g}"] = [
                f"--model.aligner={ALIGNERS}.PRPOAligner", "--model.prm=components.prms.ImplicitPRM",
                f"--model.prm.init_args.beta={beta}", f"--model.optim.lr={lr}"]
    return grid


#: The cap of SPRO's process term tried against the collapse (``SPROAligner(max_process_to_outcome=κ)``).
SPRO_CAP = 0.25


def spro_cap() -> dict[str, list[str]]:
    """SPRO with and without the process cap where uncapped SPRO collapsed (β ∈ {0.05, 0.2} × lr ∈ {1e-4, 3e-4}),
    GRPO at those lrs, and the control ``spro_msa0_*``: SPRO with ``msa_coef = 0``, whose advantages are GRPO's
    exactly but which logs the drift β·Σ(log π_old − log π_ref) that GRPO's own updates accumulate."""
    sweep = spro_sweep()
    grid = {name: sweep[name] for name in ("grpo", "grpo_lr0.0003")}
    for beta in (0.05, 0.2):
        for lr in (1e-4, 3e-4):
            plain = f"spro_beta{beta:g}_lr{lr:g}"
            grid[plain] = sweep[plain]
            grid[f"spro_cap{SPRO_CAP:g}_beta{beta:g}_lr{lr:g}"] = [
                *sweep[plain], f"--model.aligner.init_args.max_process_to_outcome={SPRO_CAP}"]
    for lr in (1e-4, 3e-4):  # control: GRPO's advantages (msa_coef 0) with SPRO's implicit-reward logging
        grid[f"spro_msa0_beta0.2_lr{lr:g}"] = [*sweep[f"spro_beta0.2_lr{lr:g}"], "--model.aligner.init_args.msa_coef=0.0"]
    return grid


#: Best against best (issue 28): these methods at every lr of BAB_LRS, 60 steps, lr chosen on the validation split.
BAB_METHODS = ("grpo", "prpo_rule_prm", "prpo_reference", "process_only", "pure", "prm_avg")
BAB_LRS = (1e-5, 3e-5, 1e-4, 3e-4)
#: The harder-chains grid asks whether PRPO's gain over GRPO grows with chain length: those two methods.
LONG_METHODS = ("grpo", "prpo_rule_prm")
#: The harder-chains task (``prpo_lightning.demo.arithmetic.LONG_SPEC``: 5–8 operations) needs longer completions.
LONG_TASK = ["--data.init_args.task=long", "--model.sampling.max_new_tokens=128"]


#: PRPO and process-only over the learned demo PRM (components.prms.LearnedArithPRM) instead of the exact rule.
LEARNED = {
    "prpo_learned_prm": [f"--model.aligner={ALIGNERS}.PRPOAligner", "--model.prm=components.prms.LearnedArithPRM"],
    "process_only_learned_prm": [f"--model.aligner={ALIGNERS}.ProcessOnlyAligner",
                                 "--model.prm=components.prms.LearnedArithPRM"],
}
#: The learned-PRM grid: its two methods beside GRPO and the same aligners over the exact PRM (shared with ``bab``).
LEARNED_METHODS = ("grpo", "prpo_rule_prm", "process_only", *LEARNED)


def best_vs_best(grid: str = "bab", task: list[str] | None = None, methods: tuple[str, ...] = BAB_METHODS,
                 lrs: tuple[float, ...] = BAB_LRS) -> dict[str, list[str]]:
    """``<grid>_<method>_lr<lr>`` for every method of ``methods`` and lr of ``lrs`` (lr-major, so that a
    seed-major run order finishes every method at an lr before the next lr's)."""
    return {f"{grid}_{m}_lr{lr:g}": [*(MAIN | LEARNED)[m], *(task or []), f"--model.optim.lr={lr:g}"]
            for lr in lrs for m in methods}


#: Asynchronous rollouts (issue 23): GRPO and PRPO over the exact PRM, synchronous and with ``model.async_rollout``
#: (one version stale), same budget: does one step of staleness cost held-out accuracy?
ASYNC = {**{m: MAIN[m] for m in ("grpo", "prpo_rule_prm")},
         **{f"{m}_async": [*MAIN[m], "--model.async_rollout.enabled=true"] for m in ("grpo", "prpo_rule_prm")}}


#: The settings of the best-against-best grids (defaults of ``replicate.py``'s options for them): 60 steps,
#: held-out and validation accuracy every 10 steps, a 200-problem validation split, the task variant, the lrs the
#: lr is chosen among and the held-out threshold of "steps to threshold" (the long task starts at 4%, not 42%).
GRID_SETTINGS: dict[str, dict] = {
    "bab": {"max_steps": 60, "eval_every": 10, "validation": 200, "task": "default", "threshold": 0.45,
            "lrs": BAB_LRS},
    "long": {"max_steps": 60, "eval_every": 10, "validation": 200, "task": "long", "threshold": 0.1,
             "lrs": BAB_LRS},
}
GRID_SETTINGS["learned"] = GRID_SETTINGS["bab"]  # the same runs: bab_grpo_lr3e-05 etc. are shared with ``bab``
#: The best-against-best grids' tasks, as the chain-length table names them.
TASK_LABELS = {"bab": "default (2–4 ops)", "long": "long (5–8 ops)"}
BAB_PREFIXES = ("bab_", "long_")  # run-name prefixes of the best-against-best grids


def baseline_of(method: str) -> str:
    """The GRPO row a method is compared with: ``grpo_lr<lr>`` for a method run at another lr, else ``grpo``; for a
    best-against-best run ``<grid>_<method>_lr<lr>``, GRPO of that grid at that lr (the same-lr comparison)."""
    if method.startswith(BAB_PREFIXES) and "_lr" in method:
        return f"{method.split('_', 1)[0]}_grpo_lr{float(method.rsplit('_lr', 1)[1]):g}"
    lr = method.rsplit("_lr", 1)[1] if "_lr" in method else None
    return "grpo" if lr is None or float(lr) == MAIN_LR else f"grpo_lr{float(lr):g}"


#: grid name → (methods, report block / file tag). The tag names the docs block and the plot files.
GRIDS: dict[str, tuple[dict[str, list[str]], str]] = {
    "main": (MAIN, "replication"),
    "h1": (hypothesis1(), "replication-h1"),
    "spro-sweep": (spro_sweep(), "replication-spro-sweep"),
    "implicit-sweep": (implicit_sweep(), "replication-implicit-sweep"),
    "spro-cap": (spro_cap(), "replication-spro-cap"),
    "h1-hot": (hypothesis1_hot(), "replication-h1-hot"),
    "bab": (best_vs_best("bab"), "replication-bab"),
    "long": (best_vs_best("long", LONG_TASK, LONG_METHODS), "replication-long"),
    "learned": (best_vs_best("bab", methods=LEARNED_METHODS), "replication-learned"),
    "async": (ASYNC, "replication-async"),
}
