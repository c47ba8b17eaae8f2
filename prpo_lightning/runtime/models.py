"""Loading policies and tokenizers: Hugging Face names/paths, configs for tests, and builtin cached models.

Builtin models have a name like a Hugging Face id, so configs name them like any hub model. A builtin is either
*shipped*: a ``save_pretrained`` directory inside the installed package, loaded from there as it is (the offline
demo's ``prpo-demo/arith-qwen2-tiny``, :func:`register_shipped_model`); or *built*: made by project code on first
use and cached under the user's cache directory, the way a hub model is cached (:func:`register_builtin_model`).
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

BuiltinBuilder = Callable[[Path], None]
_BUILTIN_MODELS: dict[str, BuiltinBuilder] = {}
_SHIPPED_MODELS: dict[str, Path] = {}

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
        if name in _BUILTIN_MODELS or name in _SHIPPED_MODELS:
            raise ValueError(f"builtin model {name!r} is already registered")
        _BUILTIN_MODELS[name] = builder
        return builder

    return wrap


def register_shipped_model(name: str, directory: Path) -> None:
    """Register ``name`` as a ``save_pretrained`` directory that ships inside the installed package.

    It is loaded from ``directory`` as it is: nothing is built, copied or cached.

    Raises:
        ValueError: if ``name`` is already registered.
    """
    if name in _BUILTIN_MODELS or name in _SHIPPED_MODELS:
        raise ValueError(f"builtin model {name!r} is already registered")
    _SHIPPED_MODELS[name] = Path(directory)


def builtin_model_names() -> list[str]:
    """Names of all registered builtin models, shipped and built."""
    _import_builtin_providers()
    return sorted({*_BUILTIN_MODELS, *_SHIPPED_MODELS})


def _import_builtin_providers() -> None:
    import importlib

    importlib.import_module("prpo_lightning.demo")


def check_builtin_name(name_or_path: str, key: str = "model.policy") -> None:
    """Refuse a misspelt builtin name before anything is loaded (it would otherwise go to the model hub).

    A name is taken for a builtin when it is in a builtin's namespace (``prpo-demo/...``), or when it is very
    close to a builtin name and is not a local path.

    Args:
        name_or_path: the configured name or path.
        key: the config key, for the message.

    Raises:
        ValueError: "unknown builtin ..., did you mean ...", listing the builtins.
    """
    names = builtin_model_names()
    if name_or_path in names or Path(name_or_path).exists():
        return
    namespaces = {n.split("/", 1)[0] for n in names if "/" in n}
    close = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.8)
    if name_or_path.split("/", 1)[0] in namespaces or close:
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{key}: unknown builtin model {name_or_path!r}; {hint}The builtins are {names}")


def resolve_model_path(name_or_path: str) -> str:
    """Return a loadable path: a shipped builtin's package directory; a built builtin, built once and cached;
    anything else unchanged.

    The cache write is atomic (build into a temporary directory, then rename), so an interrupted build never
    leaves a half-written model behind.

    Raises:
        ValueError: for a misspelt builtin name (:func:`check_builtin_name`).
        FileNotFoundError: a shipped builtin's files are missing from the installed package.
    """
    _import_builtin_providers()
    if name_or_path in _SHIPPED_MODELS:
        shipped = _SHIPPED_MODELS[name_or_path]
        if not (shipped / "config.json").exists() or not any(shipped.glob("*.safetensors")):
            raise FileNotFoundError(
                f"the builtin model {name_or_path!r} ships with the package in {shipped}, but its files are missing "
                "there (an install without package data?). Fix: reinstall prpo-lightning "
                "(pip install -c constraints.txt -e .), or a git checkout of the full repository."
            )
        return str(shipped)
    if name_or_path not in _BUILTIN_MODELS:
        check_builtin_name(name_or_path)
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


@contextlib.contextmanager
def _no_loading_bar(quiet: bool) -> Iterator[None]:
    """Hide transformers' "Loading weights" progress bar inside the block when ``quiet`` (restored after)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


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


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_context(hf_config: Any, sampling: Any, model_name: str) -> None:
    """Check that the longest prompt plus the completion budget fits the policy's context window.

    The window is the config's ``max_position_embeddings`` (or ``n_positions``, ``max_sequence_length``,
    ``seq_length``); a config with none of them is not checked.

    Args:
        hf_config: the policy's ``PretrainedConfig``.
        sampling: a :class:`~prpo_lightning.config.SamplingConfig`.
        model_name: the policy's name, for the message.

    Raises:
        ValueError: naming both sampling keys, their sum and the window.
    """
    window = next((getattr(hf_config, k) for k in _CONTEXT_KEYS if getattr(hf_config, k, None)), None)
    need = sampling.max_prompt_length + sampling.max_new_tokens
    if window is not None and need > int(window):
        raise ValueError(f"model.sampling.max_prompt_length ({sampling.max_prompt_length}) + "
                         f"model.sampling.max_new_tokens ({sampling.max_new_tokens}) = {need} tokens exceed the context "
                         f"window of the policy {model_name} ({window} positions): lower them so that their sum is <= "
                         f"{window}")


def load_causal_lm(
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    seed: int | None = None,
    sampling: Any = None,
) -> torch.nn.Module:
    """Load a causal LM from a name/path, or build a randomly initialised one from a config dict.

    Args:
        name_or_path: Hugging Face id, local directory or builtin name.
        config: a config dict with ``model_type`` (e.g. ``{"model_type": "qwen2", "hidden_size": 64, ...}``),
            used when ``name_or_path`` is None (tests, tiny models).
        dtype: parameter dtype name.
        seed: torch seed for random initialisation from ``config``.
        sampling: a :class:`~prpo_lightning.config.SamplingConfig` whose lengths are checked against the model's
            context window (:func:`check_context`) before the weights load.

    Raises:
        ValueError: if neither or both of ``name_or_path`` and ``config`` are given, or the sampling lengths do not
            fit the context window.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (name_or_path is None) == (config is None):
        raise ValueError("give exactly one of a model name/path or a model config")
    if name_or_path is not None:
        path = resolve_model_path(name_or_path)
        if sampling is not None:
            check_context(AutoConfig.from_pretrained(path), sampling, name_or_path)
        with _no_loading_bar(name_or_path in _SHIPPED_MODELS):  # a shipped builtin loads in milliseconds
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    cfg = dict(config or {})
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("a model config needs a 'model_type' entry, e.g. 'qwen2'")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    if sampling is not None:
        check_context(hf_config, sampling, "from model.policy_config")
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config)
    return model.to(torch_dtype(dtype))
