"""Building models under DeepSpeed ZeRO-3, where every parameter is partitioned across ranks.

Lightning's ``DeepSpeedStrategy`` runs ``configure_model`` inside ``deepspeed.zero.Init``: each parameter is
partitioned into an empty placeholder as soon as its module is built. Two things then break without help:

- transformers initialises (``from_config``) or loads (``from_pretrained``) weights by indexing the full tensors,
  which fails on the placeholders (``IndexError: index 0 is out of bounds for dimension 0 with size 0`` in
  ``_init_weights``). transformers has its own ZeRO-3 path that gathers each module before it initialises or
  loads it, but it takes that path only while a ``HfDeepSpeedConfig`` is registered: :func:`transformers_zero3`
  registers one for the duration of the build.
- the frozen reference model cannot be a ``deepcopy`` of the partitioned policy (it would copy the empty
  placeholders). It is a plain, unpartitioned module on every rank, filled by :func:`unpartitioned_copy` one
  gathered parameter at a time, outside ``zero.Init`` (from ``on_fit_start``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


def zero3_config(trainer: Any) -> dict[str, Any] | None:
    """The DeepSpeed config dict of ``trainer``'s strategy when it runs ZeRO stage 3, else None."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if not getattr(strategy, "zero_stage_3", False):
        return None
    return strategy.config


@contextlib.contextmanager
def transformers_zero3(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Within the block, transformers builds and loads models the ZeRO-3 way (does nothing for ``None``).

    Args:
        ds_config: the strategy's DeepSpeed config (:func:`zero3_config`).
    """
    if ds_config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    registered = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: hold it for the block
    try:
        yield
    finally:
        del registered
        unset_hf_deepspeed_config()


@torch.no_grad()
def apply_gathered(
    source: torch.nn.Module, target: torch.nn.Module, update: Callable[[Tensor, Tensor], Any], what: str
) -> None:
    """``update(target_param, full_source_param)`` for every parameter of ``source``, matched by name and shape.

    A ZeRO-3-partitioned source parameter is gathered for its update, one at a time, so the extra memory stays at
    one parameter (a collective: every rank must call this, in the same order); a plain one is used as it is.

    Args:
        source: the policy (partitioned or not).
        target: a full module with the same parameter names (the reference).
        update: writes into the target parameter in place; the source tensor is on the target's device and dtype.
        what: names the caller in the error.

    Raises:
        ValueError: a source parameter has no target parameter of the same name and shape.
    """
    targets = dict(target.named_parameters(remove_duplicate=False))
    for name, param in source.named_parameters():
        into = targets.get(name)
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if into is None or tuple(into.shape) != shape:
            raise ValueError(f"{what}: parameter {name!r} {shape} has no parameter of that name and shape in the "
                             "target; it must be built from the policy's config (a plain transformers model)")
        if hasattr(param, "ds_id"):  # a ZeRO-3 parameter: its .data is a shard
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                update(into, param.data.to(into.device, into.dtype))
        else:
            update(into, param.data.to(into.device, into.dtype))


def unpartitioned_copy(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A frozen, full (unpartitioned) copy of a ZeRO-3-partitioned Hugging Face model on ``device``.

    The copy is built from ``model.config`` without random initialisation, then each parameter is gathered
    (``deepspeed.zero.GatheredParameters``, every rank takes part) and copied in, one at a time, so the extra memory
    stays at one parameter. Buffers (e.g. rotary frequencies) are computed by the constructor.

    Args:
        model: the partitioned policy (its parameters carry ``ds_shape``).
        device: where the copy lives.

    Raises:
        ValueError: the copy's parameter names or shapes differ from the policy's.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    dtype = next(model.parameters()).dtype
    with torch.device(device), no_init_weights():
        copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    apply_gathered(model, copy, lambda target, full: target.copy_(full), "reference copy under ZeRO-3")
    copy.tie_weights()
    copy.eval().requires_grad_(False)
    return copy
