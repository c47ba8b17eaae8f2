"""Calls into ``transformers`` whose names change across the versions the project supports.

transformers 5.24 renames two things it still accepts with a ``FutureWarning``:

* the KV cache argument and output field ``past_key_values`` → ``cache`` (the old name goes in 5.40);
* ``gradient_checkpointing_enable()`` → ``activation_checkpointing_enable()`` (the old name goes in v6).

Older releases (5.17 on the GPU machines, 5.19 with vLLM) know only the old names. Each helper here detects,
from the model's own signature or attributes, which name the installed code understands and uses that one, so
the same project code runs on all of them without a deprecation warning. Detection is by inspection, never by
catching an error, so a real error inside the call always propagates.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch

NEW_CACHE_NAME = "cache"
OLD_CACHE_NAME = "past_key_values"


@functools.lru_cache(maxsize=None)
def _library_cache_name() -> str:
    """The cache argument name of the installed transformers' generation API (detected once)."""
    from transformers import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return NEW_CACHE_NAME if NEW_CACHE_NAME in params else OLD_CACHE_NAME


@functools.lru_cache(maxsize=None)
def _forward_cache_name(forward_owner: type) -> str | None:
    """The cache argument named in ``forward_owner.forward``'s signature, or None when it names neither."""
    params = inspect.signature(forward_owner.forward).parameters  # follows functools.wraps to the real signature
    for name in (NEW_CACHE_NAME, OLD_CACHE_NAME):
        if name in params:
            return name
    return None


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which ``model``'s forward takes a KV cache: ``"cache"`` or ``"past_key_values"``.

    A forward that names one of them in its signature decides (checked once per model class; remote-code models
    may still use the old name on a new transformers). A forward that takes only ``**kwargs`` (a wrapper passing
    them on to a Hugging Face model) gets the installed transformers' name.

    Args:
        model: a causal LM, or a wrapper that forwards its keyword arguments to one.
    """
    return _forward_cache_name(type(model)) or _library_cache_name()


def output_cache(output: Any) -> Any:
    """The KV cache a model returned: ``output.cache`` where the output class declares that field (transformers
    5.24 on), else ``output.past_key_values``; None when the model returned none.

    Args:
        output: a Hugging Face ``ModelOutput`` (a dataclass).

    Raises:
        TypeError: ``output`` is not a dataclass model output (a tuple, say: call the model with
            ``return_dict=True``).
    """
    if not dataclasses.is_dataclass(output):
        raise TypeError(
            f"output_cache: expected a Hugging Face ModelOutput, got {type(output).__name__}; call the model with "
            "return_dict=True."
        )
    names = {field.name for field in dataclasses.fields(output)}
    return output.cache if NEW_CACHE_NAME in names else output.past_key_values


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation (gradient) checkpointing with the library's defaults.

    Calls ``activation_checkpointing_enable()`` where the model has it (transformers 5.24 on) and the older
    ``gradient_checkpointing_enable()`` otherwise.

    Args:
        model: a Hugging Face ``PreTrainedModel``.

    Raises:
        TypeError: the model has neither method (not a Hugging Face model).
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    else:
        raise TypeError(
            f"{type(model).__name__} has neither activation_checkpointing_enable nor gradient_checkpointing_enable: "
            "activation checkpointing needs a Hugging Face PreTrainedModel; set model.gradient_checkpointing to false."
        )
