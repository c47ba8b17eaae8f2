"""Test helpers: a character-level tokenizer, tiny Qwen2 configs (no hub access) and ``prpo-fit`` in a child process."""

from __future__ import annotations

import os
import string
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHARS = string.digits + string.ascii_letters + " \n+-*/=()[]{}\\.,:;?!'$^_<>|%"


def build_char_tokenizer(out_dir: Path) -> str:
    """Write a character-level fast tokenizer (with EOS/PAD) to ``out_dir`` and return its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return str(out_dir)


def tiny_qwen2_config(vocab_size: int = 128, hidden: int = 32, layers: int = 2) -> dict:
    """A tiny random Qwen2 config dict for ``PRPOModule(policy_config=...)``."""
    return {
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,  # room for the default 2048-token prompt + 2048-token completion
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 1,
    }


def prpo_fit(args: list[str], timeout_s: float = 400) -> subprocess.CompletedProcess:
    """``prpo-fit <args>`` in a child process (one thread, offline, ``tests/`` importable), its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from prpo_lightning.cli import main; sys.argv[0] = 'prpo-fit'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=timeout_s)
