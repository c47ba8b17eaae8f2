"""``prpo-demo-warmstart``: rebuild the shipped demo policy and compare the rebuild with the shipped files.

The demo loads the warm-started policy that ships with the package (:data:`~prpo_lightning.demo.policy.SHIPPED_DIR`);
this command reruns the supervised phase that made it (:func:`~prpo_lightning.demo.policy.warm_start` with
:data:`~prpo_lightning.demo.policy.SFT_DEFAULTS`, one torch thread by default, as the shipped policy was built) and
compares the two directories::

    prpo-demo-warmstart --out /tmp/rebuilt            # about 3 minutes on one core
    prpo-demo-warmstart --compare-only /tmp/rebuilt   # compare an existing directory again

What "matches" means (:func:`compare`):

* ``identical``: same config, same tokenizer files, and every weight tensor bit-for-bit equal (max abs diff 0). This
  is what a rebuild gives on the CPU model, thread count and library versions that built the shipped policy
  (``built_with`` in its ``warm_start.json``).
* ``equivalent``: same config and tokenizer, weights differ, but the greedy accuracy on the 200 held-out problems
  of ``warm_start.json`` is within :data:`EQUIVALENT_POINTS` points. Another CPU (other SIMD kernels, other
  summation order) or another thread count rounds differently; 600 optimizer steps amplify the differences, so
  the weights differ and the accuracy can too.
* ``different``: anything else. The exit status is 0 for ``identical`` and ``equivalent``, 1 for ``different``.

The demo never uses a rebuild: it always loads the shipped files, which is what makes its start the same on every
machine. ``--write-shipped`` replaces the shipped files with the rebuild (for maintainers who change the SFT).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

EQUIVALENT_POINTS = 1.0
"""Largest held-out accuracy difference (percentage points, 2 of 200 problems) for a rebuild to be ``equivalent``."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors in {directory}: is it a save_pretrained directory?")
    return tensors


def _held_out(directory: Path) -> tuple[float, list[str]]:
    """Greedy held-out accuracy and completions of the policy in ``directory`` on its ``warm_start.json`` problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prpo_lightning.demo import policy
    from prpo_lightning.demo.arithmetic import generate_problems, is_correct

    meta = json.loads((directory / "warm_start.json").read_text(encoding="utf-8"))["held_out"]
    problems = generate_problems(int(meta["seed"]), int(meta["n"]), "eval")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    completions = policy.generate(model, tok, problems)
    correct = sum(is_correct(c, p["answer"]) for c, p in zip(completions, problems))
    return correct / max(1, len(problems)), completions


def compare(rebuilt: Path, shipped: Path) -> dict[str, Any]:
    """Compare a rebuilt policy directory with the shipped one (see the module docstring for the verdicts).

    Returns:
        ``verdict`` (``identical``/``equivalent``/``different``), ``config_equal``, ``tokenizer_equal``,
        ``max_abs_weight_diff``, ``identical_tensors``/``tensors``, the held-out greedy accuracy of each
        (``accuracy_rebuilt``/``accuracy_shipped``, fractions), ``same_greedy_completions`` (fraction of held-out
        problems with the same greedy completion) and the ``built_with`` records of both.
    """
    rebuilt, shipped = Path(rebuilt), Path(shipped)
    config_equal = (json.loads((rebuilt / "config.json").read_text(encoding="utf-8"))
                    == json.loads((shipped / "config.json").read_text(encoding="utf-8")))
    tokenizer_equal = all((rebuilt / f).read_bytes() == (shipped / f).read_bytes() for f in TOKENIZER_FILES)
    a, b = _tensors(rebuilt), _tensors(shipped)
    if set(a) != set(b):
        raise ValueError(f"{rebuilt} and {shipped} hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].shape == b[k].shape else float("inf")
             for k in a}
    acc_rebuilt, out_rebuilt = _held_out(rebuilt)
    acc_shipped, out_shipped = _held_out(shipped)
    max_diff = max(diffs.values())
    same_setup = config_equal and tokenizer_equal
    if same_setup and max_diff == 0.0:
        verdict = "identical"
    elif same_setup and abs(acc_rebuilt - acc_shipped) * 100 <= EQUIVALENT_POINTS + 1e-9:
        verdict = "equivalent"
    else:
        verdict = "different"

    def built_with(d: Path) -> Any:
        return json.loads((d / "warm_start.json").read_text(encoding="utf-8")).get("built_with")

    return {
        "verdict": verdict, "config_equal": config_equal, "tokenizer_equal": tokenizer_equal,
        "max_abs_weight_diff": max_diff, "identical_tensors": sum(d == 0.0 for d in diffs.values()),
        "tensors": len(diffs), "accuracy_rebuilt": acc_rebuilt, "accuracy_shipped": acc_shipped,
        "same_greedy_completions": sum(x == y for x, y in zip(out_rebuilt, out_shipped)) / max(1, len(out_shipped)),
        "built_with_rebuilt": built_with(rebuilt), "built_with_shipped": built_with(shipped),
    }


def report(result: dict[str, Any]) -> str:
    """The comparison as a few lines of text."""
    lines = [
        f"[prpo] rebuilt vs shipped demo policy: {result['verdict'].upper()}",
        f"  config equal: {result['config_equal']}, tokenizer files equal: {result['tokenizer_equal']}",
        f"  weights: {result['identical_tensors']}/{result['tensors']} tensors bit-identical, "
        f"max abs diff {result['max_abs_weight_diff']:.3g}",
        f"  held-out greedy accuracy: rebuilt {result['accuracy_rebuilt'] * 100:.1f}%, "
        f"shipped {result['accuracy_shipped'] * 100:.1f}%; same greedy completion on "
        f"{result['same_greedy_completions'] * 100:.1f}% of the problems",
        f"  built with: rebuilt {result['built_with_rebuilt']}",
        f"              shipped {result['built_with_shipped']}",
    ]
    if result["verdict"] != "identical":
        lines.append("  (a rebuild is bit-identical only on the CPU model, thread count and library versions of the "
                     "shipped build; the demo always loads the shipped files)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prpo-demo-warmstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the rebuilt policy (default: a temporary folder, removed afterwards)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the rebuild (shipped: 1)")
    parser.add_argument("--compare-only", type=Path, default=None, metavar="DIR",
                        help="do not rebuild: compare DIR with the shipped policy")
    parser.add_argument("--shipped", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write-shipped", action="store_true",
                        help="replace the shipped policy files with the rebuild (maintainers only)")
    parser.add_argument("--no-progress", action="store_true", help="no SFT progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: rebuild (unless ``--compare-only``), compare, print; exit 0 when it matches."""
    from transformers.utils import logging as hf_logging

    from prpo_lightning.cli import quiet_third_party_notices
    from prpo_lightning.demo import policy

    args = parse_args(argv)
    quiet_third_party_notices()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the tiny model loads and saves in milliseconds: no per-file bars
    try:
        return _run(args, policy)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run(args: argparse.Namespace, policy: Any) -> int:
    shipped = args.shipped or policy.SHIPPED_DIR
    tmp = None
    if args.compare_only is not None:
        rebuilt = args.compare_only
    else:
        torch.set_num_threads(args.threads)
        if args.out is None:
            tmp = tempfile.mkdtemp(prefix="prpo-demo-warmstart-")
        rebuilt = Path(args.out or tmp)
        metrics = policy.build(rebuilt, progress=not args.no_progress)
        print(f"[prpo] rebuilt {policy.MODEL_NAME} in {metrics['total_seconds']:.0f} s "
              f"({metrics['sft']['steps']} SFT steps, {args.threads} thread(s)) into {rebuilt}")
    try:
        if args.write_shipped:
            shipped.mkdir(parents=True, exist_ok=True)
            for file in rebuilt.iterdir():
                shutil.copy2(file, shipped / file.name)
            print(f"[prpo] wrote the rebuild over the shipped policy in {shipped}")
            return 0
        result = compare(rebuilt, shipped)
        print(report(result))
        return 0 if result["verdict"] in ("identical", "equivalent") else 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def console_main() -> None:
    """``prpo-demo-warmstart`` entry point (exit status of :func:`main`)."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
