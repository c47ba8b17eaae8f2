"""Loading policies and tokenizers: Hugging Face names/paths, configs for tests, and builtin cached models.

Builtin models are built by project code on first use and cached under the user's cache directory, the
way a hub model is cached, so configs can name them like any Hugging Face id (e.g. the offline demo's
``prpo-demo/arith-qwen2-tiny``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BuiltinBuilder = Callable[[Path], None]
_BUILTIN_MODELS: dict[str, BuiltinBuilder] = {}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """The project's cache root: ``$PRPO_CACHE`` or ``$XDG_CACHE_HOME/prpo_lightning`` or ``~/.cache/prpo_lightning``."""
    if os.environ.get("PRPO_CACHE"):
        return Path(os.environ["PRPO_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "prpo_lightning"


def register_builtin_model(name: str) -> Callable[[BuiltinBuilder], BuiltinBuilder]:
    """Decorator registering ``builder(out_dir)`` that writes a ``save_pretrained`` directory for ``name``.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def wrap(builder: BuiltinBuilder) -> BuiltinBuilder:
        if name in _BUILTIN_MODELS:
            raise ValueError(f"builtin model {name!r} is already registered")
        _BUILTIN_MODELS[name] = builder
        return builder

    return wrap


def builtin_model_names() -> list[str]:
    """Names of all registered builtin models."""
    _import_builtin_providers()
    return sorted(_BUILTIN_MODELS)


def _import_builtin_providers() -> None:
    import importlib

    importlib.import_module("prpo_lightning.demo")


def resolve_model_path(name_or_path: str) -> str:
    """Return a loadable path: builtin names are built once and cached; anything else is returned unchanged.

    The cache write is atomic (build into a temporary directory, then rename), so an interrupted build never
    leaves a half-written model behind.
    """
    _import_builtin_providers()
    if name_or_path not in _BUILTIN_MODELS:
        return name_or_path
    target = cache_dir() / "models" / name_or_path.replace("/", "--")
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    _BUILTIN_MODELS[name_or_path](tmp)
    if not (tmp / "config.json").exists():
        raise RuntimeError(f"builder for {name_or_path!r} did not write a model to {tmp}")
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():  # another process did not win the race: a real failure
            raise
    return str(target)


def torch_dtype(name: str) -> torch.dtype:
    """Map ``"float32"``/``"bfloat16"``/``"float16"`` to a torch dtype.

    Raises:
        ValueError: for any other name.
    """
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_tokenizer(name_or_path: str) -> Any:
    """Load a tokenizer with ``AutoTokenizer`` and make sure it has a pad token (EOS is reused)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token; set one")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    seed: int | None = None,
) -> torch.nn.Module:
    """Load a causal LM from a name/path, or build a randomly initialised one from a config dict.

    Args:
        name_or_path: Hugging Face id, local directory or builtin name.
        config: a config dict with ``model_type`` (e.g. ``{"model_type": "qwen2", "hidden_size": 64, ...}``),
            used when ``name_or_path`` is None (tests, tiny models).
        dtype: parameter dtype name.
        seed: torch seed for random initialisation from ``config``.

    Raises:
        ValueError: if neither or both of ``name_or_path`` and ``config`` are given.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (name_or_path is None) == (config is None):
        raise ValueError("give exactly one of a model name/path or a model config")
    if name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=torch_dtype(dtype))
    cfg = dict(config or {})
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("a model config needs a 'model_type' entry, e.g. 'qwen2'")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config)
    return model.to(torch_dtype(dtype))
