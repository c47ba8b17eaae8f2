"""Benchmark: ``SympyMathVerifier`` against math-verify on the same inputs.

Inputs are the pair table ``tests/data/verifier_pairs.jsonl`` (gold, candidate, equivalent), the 500 MATH500 gold
answers checked against themselves, and the two parts of the hard table (``tests/data/verifier_hard_dev.jsonl``, used
while fixing the verifier, and ``tests/data/verifier_hard_heldout.jsonl``, written first and never used while fixing)
and of the answer-forms table of issue 26 (``tests/data/verifier_forms_{dev,heldout}.jsonl``: named values,
inequalities, sets, units and words, letters/sentences/times/matrix arithmetic/trig, policies), each reported
separately. Rows with a ``problem`` pass it to ours through ``verify_batch(..., problems=...)`` (math-verify has no use
for it); rows with a ``completion`` grade that whole response instead of the boxed candidate. Every candidate is wrapped in the same typical completion text. Reported per
verifier: precision and recall on the pair table, MATH500 self-agreement, throughput (answers/s) and per-answer
latency p50/p99. Ours is timed twice: one ``verify()`` call at a time (latency and sequential throughput) and one
``verify_batch()`` over everything (its parallel throughput). Worker start-up is paid before timing starts and
reported separately. math-verify runs in-process on the main thread with its default settings.

Run from the repository root::

    python benchmarks/verifier.py            # writes benchmarks/results/verifier.{json,md}
    python benchmarks/verifier.py --show-errors
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.verifiers import SympyMathVerifier  # noqa: E402

PAIRS = ROOT / "tests" / "data" / "verifier_pairs.jsonl"
HARD_PARTS = {
    "hard dev": ROOT / "tests" / "data" / "verifier_hard_dev.jsonl",
    "hard held-out": ROOT / "tests" / "data" / "verifier_hard_heldout.jsonl",
    "forms dev": ROOT / "tests" / "data" / "verifier_forms_dev.jsonl",
    "forms held-out": ROOT / "tests" / "data" / "verifier_forms_heldout.jsonl",
}
MATH500 = ROOT.parent / "shared" / "data" / "math500" / "test.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATE = "Let me work through this step by step.\n\nPutting it together, the final answer is $\\boxed{{{}}}$."


def load_inputs() -> tuple[list[dict], list[str]]:
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    golds = []
    if MATH500.exists():
        golds = [json.loads(line)["answer"] for line in MATH500.read_text().splitlines() if line.strip()]
    return pairs, golds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def score(predictions: list[bool], labels: list[bool]) -> dict[str, float]:
    tp = sum(p and y for p, y in zip(predictions, labels))
    fp = sum(p and not y for p, y in zip(predictions, labels))
    fn = sum(not p and y for p, y in zip(predictions, labels))
    return {
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
    }


def run_ours(items: list[tuple[str, str]], timeout: float, workers: int) -> dict:
    verifier = SympyMathVerifier(timeout_seconds=timeout, num_workers=workers)
    start = time.perf_counter()
    verifier.verify("\\boxed{\\sqrt{2}}", "\\sqrt{2}+0")  # starts the workers
    startup = time.perf_counter() - start
    latencies, predictions = [], []
    start = time.perf_counter()
    for completion, gold in items:
        t0 = time.perf_counter()
        verdict = verifier.verify(completion, gold)
        latencies.append(time.perf_counter() - t0)
        predictions.append(verdict.is_correct)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    batch = verifier.verify_batch([c for c, _ in items], [g for _, g in items])
    batched = time.perf_counter() - start
    stats = verifier.stats()
    verifier.close()
    if [v.is_correct for v in batch] != predictions:
        print("warning: batch and sequential verdicts differ", file=sys.stderr)
    return {
        "predictions": predictions,
        "latencies": latencies,
        "seconds_sequential": sequential,
        "seconds_batch": batched,
        "startup_seconds": startup,
        "stats": stats,
    }


def run_math_verify(items: list[tuple[str, str]]) -> dict:
    from math_verify import parse, verify

    parse("$\\frac{1}{2}$")  # first-use imports
    latencies, predictions = [], []
    start = time.perf_counter()
    for completion, gold in items:
        t0 = time.perf_counter()
        try:
            ok = bool(verify(parse("$" + gold + "$"), parse(completion)))
        except Exception:  # noqa: BLE001 - counted as not verified, like its own raise_on_error=False
            ok = False
        latencies.append(time.perf_counter() - t0)
        predictions.append(ok)
    return {"predictions": predictions, "latencies": latencies, "seconds_sequential": time.perf_counter() - start}


def summarise(name: str, run: dict, pairs: list[dict], n_golds: int) -> dict:
    n_pairs = len(pairs)
    preds = run["predictions"]
    table = score(preds[:n_pairs], [p["equivalent"] for p in pairs])
    total = len(preds)
    out = {
        "verifier": name,
        **table,
        "math500_self_correct": sum(preds[n_pairs:]),
        "math500_total": n_golds,
        "answers": total,
        "throughput_sequential": total / run["seconds_sequential"],
        "latency_p50_ms": 1000 * statistics.median(run["latencies"]),
        "latency_p99_ms": 1000 * percentile(run["latencies"], 99),
    }
    if "seconds_batch" in run:
        out["throughput_batch"] = total / run["seconds_batch"]
        out["startup_seconds"] = run["startup_seconds"]
        out["stats"] = run["stats"]
    return out


def run_hard_parts(timeout: float, workers: int) -> list[dict]:
    """Precision, recall and pairs/s of both verifiers on each part of the hard table."""
    rows = []
    for part, path in HARD_PARTS.items():
        pairs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        items = [(p.get("completion") or TEMPLATE.format(p["candidate"]), p["gold"]) for p in pairs]
        problems = [p.get("problem") for p in pairs]
        labels = [p["equivalent"] for p in pairs]
        verifier = SympyMathVerifier(timeout_seconds=timeout, num_workers=workers)
        verifier.verify("\\boxed{\\sqrt{2}}", "\\sqrt{2}+0")  # starts the workers before timing
        start = time.perf_counter()
        batch = verifier.verify_batch([c for c, _ in items], [g for _, g in items], problems=problems)
        ours = [v.is_correct for v in batch]
        ours_seconds = time.perf_counter() - start
        verifier.close()
        theirs = run_math_verify(items)
        for name, preds, seconds in (
            ("SympyMathVerifier (ours)", ours, ours_seconds),
            ("math-verify", theirs["predictions"], theirs["seconds_sequential"]),
        ):
            errors = [
                f"{'FP' if pred else 'FN'} [{p['category']}] {p['gold'][:60]!r} vs {p['candidate'][:60]!r}"
                for pred, p in zip(preds, pairs)
                if pred != p["equivalent"]
            ]
            rows.append({"part": part, "verifier": name, "pairs": len(pairs), "equivalent": sum(labels),
                         **score(preds, labels), "pairs_per_second": len(pairs) / seconds, "errors": errors})
    return rows


def hard_table_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| part | verifier | pairs | precision | recall | pairs/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['part']} | {r['verifier']} | {r['pairs']} | {100 * r['precision']:.1f}% ({r['false_positives']} FP) "
            f"| {100 * r['recall']:.1f}% ({r['false_negatives']} FN) | {r['pairs_per_second']:.0f} |"
        )
    return lines


def ratio_lines(hard: list[dict]) -> list[str]:
    """Our pairs/s over math-verify's on each part of the hard and forms tables."""
    rate = {(r["part"], r["verifier"].startswith("Sympy")): r["pairs_per_second"] for r in hard}
    parts = [r["part"] for r in hard if r["verifier"].startswith("Sympy")]
    cells = ", ".join(f"{part} {rate[(part, True)] / rate[(part, False)]:.1f}x" for part in parts)
    return [f"Throughput ratio ours / math-verify (pairs/s): {cells}."]


def write_markdown(path: Path, results: list[dict], meta: dict, hard: list[dict]) -> None:
    lines = [
        "# Verifier benchmark: SympyMathVerifier vs math-verify",
        "",
        f"Inputs: {meta['pairs']} pairs from `tests/data/verifier_pairs.jsonl` ({meta['equivalent']} equivalent, "
        f"{meta['pairs'] - meta['equivalent']} non-equivalent) + {meta['golds']} MATH500 golds checked against "
        "themselves; every candidate wrapped in the same completion text.",
        f"Machine: {meta['machine']}, Python {meta['python']}. Ours: {meta['workers']} worker processes, "
        f"{meta['timeout']} s timeout.",
        "",
        "| verifier | precision | recall | MATH500 self | answers/s (sequential) | answers/s (batch) "
        "| p50 latency ms | p99 latency ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        batch = f"{r['throughput_batch']:.0f}" if "throughput_batch" in r else "n/a"
        lines.append(
            f"| {r['verifier']} | {100 * r['precision']:.2f}% ({r['false_positives']} FP) | "
            f"{100 * r['recall']:.2f}% ({r['false_negatives']} FN) | {r['math500_self_correct']}/{r['math500_total']} "
            f"| {r['throughput_sequential']:.0f} | {batch} | {r['latency_p50_ms']:.3f} | {r['latency_p99_ms']:.2f} |"
        )
    ours = results[0]
    lines += [
        "",
        "## Hard answer forms (dev and held-out parts)",
        "",
        "Hand-labelled pairs of hard forms (equations and named values, repeating decimals, percent, logs with a "
        "base, scaled/identity/array matrices, set-builder and 'or'/'≠' sets, bases as words, units and text, "
        "`\\over`/thousands/e-notation/`\\mp`, rounded decimals against exact values, control characters, "
        "answers over 2000 characters), each with a one-line `why`. The held-out part was written before any fix "
        "and never used while fixing. Our default policies; pairs/s is one `verify_batch()` call for ours (2 "
        "workers) and sequential in-process calls for math-verify.",
        "",
        *hard_table_lines([r for r in hard if r["part"].startswith("hard")]),
        "",
        "Caveats: both parts were labelled by the same author who then fixed the verifier; the held-out part is "
        "independent of the fixes (its failures were never looked at), not of the author's reading of the issue's "
        "categories. math-verify's pairs/s on these parts is dominated by its own parse timeouts on the answers over "
        "2000 characters. Issue 26 made a percent match its bare number only when the problem asks for a percent: "
        "the two rows of each part that pair a bare number with its percent carry that problem text.",
        "",
        "## Answer forms from the wider ecosystem (issue 26: dev and held-out parts)",
        "",
        "Hand-labelled pairs written for issue 26 from MATH/AMC/AIME/olympiad/GSM8K problem types: named values "
        "(named tuples, segments, angles, ratios, `f(x)=` vs `y=`), inequalities (ASCII, rearranged, other letters, "
        "absolute values, exclusions), sets (merging unions, differences, complements, set-builder, `\\pm`, solution "
        "lists), units/currency/words, answer letters with option text, sentences, times of day, matrix arithmetic, "
        "trig identities, and the policies (several boxes, rounding, list order, percent; rows carry the problem text "
        "or a whole completion where a policy needs it). Over a third of the pairs are near misses that must be "
        "rejected. The held-out part was written and committed before any fix and its failures were not looked at "
        "while fixing. Our default policies; math-verify gets the same completion and gold (it has no use for the "
        "problem text).",
        "",
        *hard_table_lines([r for r in hard if r["part"].startswith("forms")]),
        "",
        *ratio_lines(hard),
    ]
    lines += [
        "",
        f"Ours: worker start-up {ours['startup_seconds']:.2f} s (paid once, before timing); over both timed passes "
        f"{ours['stats']['symbolic']} of {ours['stats']['total']} answers needed a sympy worker (the rest were "
        f"decided in-process), {ours['stats']['timeouts']} timed out, {ours['stats']['errors']} errors.",
        "",
        "Caveats: the pair table was written alongside this verifier and its misses were fixed as they were found, so "
        "our score on it is an upper bound, while math-verify runs out of the box (default `parse`/`verify`, gold "
        "wrapped in `$...$`). math-verify's false positives here are the relative-precision cases from its tracker "
        "(issue 14) and a 6-decimal rounding match; its false negatives are inequality-for-interval answers, a "
        "factored complex number and `14.0 - 1.0i`. Throughput and latency come from one run on a shared 2-core "
        "machine and move by tens of percent between runs; sequential mode calls `verify()` once per answer, batch "
        "mode is one `verify_batch()` call using both workers.",
        "",
        "Reproduce from the repository root (needs `math-verify`, installed by the `dev` extra):",
        "",
        "```",
        "python benchmarks/verifier.py",
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--show-errors", action="store_true", help="print the pairs each verifier gets wrong")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results")
    args = parser.parse_args()
    pairs, golds = load_inputs()
    items = [(TEMPLATE.format(p["candidate"]), p["gold"]) for p in pairs]
    items += [(TEMPLATE.format(g), g) for g in golds]
    hard = run_hard_parts(args.timeout, args.workers)
    ours = run_ours(items, args.timeout, args.workers)
    theirs = run_math_verify(items)
    results = [
        summarise("SympyMathVerifier (ours)", ours, pairs, len(golds)),
        summarise("math-verify", theirs, pairs, len(golds)),
    ]
    if args.show_errors:
        for name, run in (("ours", ours), ("math-verify", theirs)):
            for p, pred in zip(pairs, run["predictions"]):
                if pred != p["equivalent"]:
                    print(f"[{name}] {'FP' if pred else 'FN'} {p['category']}: {p['gold']!r} vs {p['candidate']!r}")
            for g, pred in zip(golds, run["predictions"][len(pairs) :]):
                if not pred:
                    print(f"[{name}] MATH500 self-check failed: {g!r}")
        for row in hard:
            if "held-out" not in row["part"]:  # held-out errors are not shown: they must not guide fixes
                for error in row["errors"]:
                    print(f"[{row['verifier']}] {row['part']}: {error}")
    meta = {
        "pairs": len(pairs),
        "equivalent": sum(p["equivalent"] for p in pairs),
        "golds": len(golds),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "python": platform.python_version(),
        "workers": args.workers,
        "timeout": args.timeout,
    }
    for r in results:
        print(json.dumps(r))
    print("\n".join(hard_table_lines(hard)))
    print("\n".join(ratio_lines(hard)))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        record = {"meta": meta, "results": results, "hard": hard}
        (RESULTS / "verifier.json").write_text(json.dumps(record, indent=2) + "\n")
        write_markdown(RESULTS / "verifier.md", results, meta, hard)
        print(f"wrote {RESULTS / 'verifier.json'} and {RESULTS / 'verifier.md'}")


if __name__ == "__main__":
    main()
