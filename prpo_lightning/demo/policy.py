"""The builtin demo policy ``prpo-demo/arith-qwen2-tiny``: a tiny Qwen2 warm-started on worked arithmetic solutions.

The warm-started policy ships with the package (:data:`SHIPPED_DIR`, about 3.5 MB: ``model.safetensors``, the
tokenizer files, ``config.json`` and ``warm_start.json``) and is registered with
:func:`prpo_lightning.runtime.models.register_shipped_model`, so the demo starts from the same weights on every machine and
runs no supervised phase. It was made by :func:`warm_start` with :data:`SFT_DEFAULTS`, on one torch thread, by the
command ``prpo-demo-warmstart`` (:mod:`prpo_lightning.demo.warmstart`), which rebuilds it and compares the rebuild
with the shipped files. :func:`warm_start` creates

* a character-level fast tokenizer (a ``Qwen2Tokenizer`` in which every printable ASCII character is one token,
  plus one added token for ``\\boxed{``; ``</s>`` is EOS, ``<pad>`` is PAD, no BOS; it round-trips digits, operators,
  spaces, newlines and ``\\boxed{}`` exactly and reloads identically with ``AutoTokenizer.from_pretrained(dir)``);
* a tiny randomly initialised ``Qwen2ForCausalLM`` (see :data:`MODEL_SIZE`);
* a seeded supervised phase of a fixed number of steps on worked solutions of the task's TRAIN split only, in the
  exact RL prompt format (:data:`DEMO_PROMPT_TEMPLATE`), with the loss on ``solution + EOS``. The step count is fixed
  (no early stop on a dev accuracy: a discrete decision on a float metric would turn tiny CPU-dependent rounding
  into a different policy), and chosen to leave headroom for RL;

and writes ``save_pretrained`` model + tokenizer + ``warm_start.json`` (SFT settings, time and held-out accuracy).
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prpo_lightning.demo.arithmetic import DEFAULT_SPEC, Problem, TaskSpec, generate_problems, is_correct, iter_problems
from prpo_lightning.runtime.models import register_shipped_model

MODEL_NAME = "prpo-demo/arith-qwen2-tiny"

DEMO_PROMPT_TEMPLATE = "Q: {problem}\nA:\n"
"""The one prompt format of the demo: ``DEMO_PROMPT_TEMPLATE.format(problem=...)``; the completion is the worked
solution (one equation per line, then ``\\boxed{answer}``) followed by EOS. Tokenize it without special tokens
(the tokenizer adds none anyway: it has no BOS)."""

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
BOXED_TOKEN = "\\boxed{"
_ALPHABET = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 95 printable ASCII chars + "\n"

MODEL_SIZE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}
"""Size of the demo Qwen2 (about 0.8M parameters)."""

SHIPPED_DIR = Path(__file__).resolve().parent / "weights" / "arith-qwen2-tiny"
"""Where the warm-started policy ships inside the package (package data, see ``pyproject.toml``)."""

SFT_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "batch_size": 32,
    "lr": 3e-3,
    "warmup_steps": 50,
    "max_steps": 600,
    "eval_every": 100,
    "n_dev": 100,
    "n_held_out": 200,
    "target_accuracy": None,
}
"""The settings of the shipped policy: 600 steps, always (``target_accuracy`` None: no early stop). The step count is
where the former early stop (dev accuracy 0.30, checked every 100 steps) ended on the machine that built it, so the
shipped weights are those of the policy that the README's numbers were first measured with."""


# --------------------------------------------------------------------------------------------------- tokenizer
def _byte_level_char(ch: str) -> str:
    """GPT-2/Qwen byte-level alias of an ASCII character (``" "`` -> ``"Ġ"``, ``"\\n"`` -> ``"Ċ"``)."""
    b = ord(ch)
    if 33 <= b <= 126:
        return ch
    n = sum(1 for x in range(b) if not (33 <= x <= 126 or 161 <= x <= 172 or 174 <= x <= 255))
    return chr(256 + n)


def build_tokenizer() -> Any:
    """The demo's character-level fast tokenizer (PAD id 0, EOS id 1, UNK id 2; no BOS; left padding).

    It is a ``Qwen2Tokenizer`` (byte-level pipeline) whose vocabulary is the printable ASCII characters with no
    merges, plus the added token ``\\boxed{``. Being a Qwen2 tokenizer matters: transformers 5's ``AutoTokenizer``
    rebuilds the tokenizer of a ``qwen2`` checkpoint with ``Qwen2Tokenizer``'s own pre-tokenizer and decoder, so a
    generic tokenizer saved next to a Qwen2 model would not reload identically.
    """
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in _ALPHABET:
        vocab[_byte_level_char(ch)] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=UNK,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_SIZE["max_position_embeddings"],
    )
    tok.add_tokens([AddedToken(BOXED_TOKEN, normalized=False, special=False)])
    return tok


def model_config(tok: Any, seed_size: dict[str, Any] | None = None) -> Any:
    """A ``Qwen2Config`` for ``tok`` (vocab rounded up to a multiple of 64; tied embeddings)."""
    from transformers import Qwen2Config

    size = dict(MODEL_SIZE, **(seed_size or {}))
    vocab = int(math.ceil(len(tok) / 64) * 64)
    return Qwen2Config(
        vocab_size=vocab,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        **size,
    )


# --------------------------------------------------------------------------------------------------- data
def format_prompt(problem: str) -> str:
    """``DEMO_PROMPT_TEMPLATE.format(problem=problem)``."""
    return DEMO_PROMPT_TEMPLATE.format(problem=problem)


def sft_batch(tok: Any, problems: Sequence[Problem]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids/attention_mask/labels`` for ``prompt + solution + EOS`` (loss on solution + EOS)."""
    rows, labels = [], []
    for p in problems:
        prompt = tok(format_prompt(p["problem"]), add_special_tokens=False)["input_ids"]
        target = tok(p["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


@torch.no_grad()
def generate(
    model: Any,
    tok: Any,
    problems: Sequence[Problem],
    max_new_tokens: int = 80,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 256,
) -> list[str]:
    """Completions (decoded, special tokens skipped) for each problem, ``num_return_sequences`` per problem."""
    was_training = model.training
    model.eval()
    tok.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        enc = tok([format_prompt(p["problem"]) for p in chunk], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        kwargs: dict[str, Any] = {"do_sample": do_sample, "num_return_sequences": num_return_sequences}
        if do_sample:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            **kwargs,
        )
        out.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    model.train(was_training)
    return out


def accuracy(model: Any, tok: Any, problems: Sequence[Problem], max_new_tokens: int = 80) -> float:
    """Greedy accuracy: exact numeric match of the last ``\\boxed{}`` (see :func:`arithmetic.is_correct`)."""
    completions = generate(model, tok, problems, max_new_tokens=max_new_tokens)
    return sum(is_correct(c, p["answer"]) for c, p in zip(completions, problems)) / max(1, len(problems))


# --------------------------------------------------------------------------------------------------- SFT
def warm_start(
    out_dir: str | Path | None = None,
    *,
    seed: int = SFT_DEFAULTS["seed"],
    batch_size: int = SFT_DEFAULTS["batch_size"],
    lr: float = SFT_DEFAULTS["lr"],
    warmup_steps: int = SFT_DEFAULTS["warmup_steps"],
    max_steps: int = SFT_DEFAULTS["max_steps"],
    eval_every: int = SFT_DEFAULTS["eval_every"],
    n_dev: int = SFT_DEFAULTS["n_dev"],
    n_held_out: int = SFT_DEFAULTS["n_held_out"],
    target_accuracy: float | None = SFT_DEFAULTS["target_accuracy"],
    size: dict[str, Any] | None = None,
    spec: TaskSpec = DEFAULT_SPEC,
    progress: bool = True,
) -> tuple[Any, Any, dict[str, Any]]:
    """Train the demo policy from scratch with a short supervised phase; optionally save it.

    Training problems are drawn fresh from the TRAIN split every step (``iter_problems(seed, "train")``). Every
    ``eval_every`` steps the greedy accuracy on ``n_dev`` train-split problems of another seed is recorded (the dev
    history; evaluation draws no random numbers, so it does not change the training trajectory). With a
    ``target_accuracy`` (not the default) training stops once the dev accuracy reaches it. The reported held-out
    accuracy uses the first ``n_held_out`` problems of ``generate_problems(seed, n, "eval")``, never trained on.
    The result is deterministic for a given CPU, thread count and library versions; other CPUs round differently.

    Returns:
        ``(model, tokenizer, metrics)``; ``metrics`` is also written as ``warm_start.json`` when ``out_dir`` is given.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    t_start = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = model_config(tok, size)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    stream = iter_problems(seed, "train", spec)
    dev = generate_problems(seed + 10_007, n_dev, "train", spec)
    history: list[dict[str, float]] = []
    model.train()
    step = 0
    bar = tqdm(total=max_steps, desc="warm-start SFT", disable=not progress, dynamic_ncols=True)
    loss_val = float("nan")
    dev_acc = 0.0
    while step < max_steps:
        batch = sft_batch(tok, [next(stream) for _ in range(batch_size)])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        loss_val = float(loss.detach())
        bar.update(1)
        if step % eval_every == 0 or step == max_steps:
            dev_acc = accuracy(model, tok, dev)
            history.append({"step": step, "loss": round(loss_val, 4), "dev_accuracy": dev_acc,
                            "seconds": round(time.perf_counter() - t_start, 1)})
            bar.set_postfix(loss=f"{loss_val:.3f}", dev_acc=f"{dev_acc:.2f}")
            if target_accuracy is not None and dev_acc >= target_accuracy:
                break
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss_val:.3f}", dev_acc=f"{dev_acc:.2f}")
    bar.close()
    sft_seconds = time.perf_counter() - t_start
    held_out = generate_problems(seed, n_held_out, "eval", spec)
    held_acc = accuracy(model, tok, held_out)
    metrics = {
        "model": MODEL_NAME,
        "prompt_template": DEMO_PROMPT_TEMPLATE,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": cfg.vocab_size,
        "tokenizer_size": len(tok),
        "size": dict(MODEL_SIZE, **(size or {})),
        "sft": {"seed": seed, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps,
                "max_steps": max_steps, "target_accuracy": target_accuracy, "steps": step,
                "final_loss": round(loss_val, 4), "seconds": round(sft_seconds, 1),
                "torch_threads": torch.get_num_threads()},
        "dev_history": history,
        "held_out": {"n": n_held_out, "seed": seed, "greedy_accuracy": held_acc},
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "built_with": build_environment(),
    }
    model.eval()
    if out_dir is not None:
        save(model, tok, metrics, out_dir)
    return model, tok, metrics


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` where that file is absent)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_environment() -> dict[str, Any]:
    """What a warm start's weights depend on besides its settings: CPU, torch threads and library versions."""
    import transformers

    return {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def save(model: Any, tok: Any, metrics: dict[str, Any], out_dir: str | Path) -> Path:
    """``save_pretrained`` model and tokenizer into ``out_dir`` and write ``warm_start.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "warm_start.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return out


def build(out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Rebuild ``prpo-demo/arith-qwen2-tiny``: warm-start with :data:`SFT_DEFAULTS`, save to ``out_dir``, return the
    metrics (``warm_start.json``). Uses the current torch thread count (the shipped policy was built on one)."""
    return warm_start(out_dir, **SFT_DEFAULTS, progress=progress)[2]


register_shipped_model(MODEL_NAME, SHIPPED_DIR)
