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
from collections.abc import Iterator
from typing import Any

import torch


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
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    dtype = next(model.parameters()).dtype
    with torch.device(device), no_init_weights():
        copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    own = dict(copy.named_parameters(remove_duplicate=False))
    for name, param in model.named_parameters():
        target = own.get(name)
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if target is None or tuple(target.shape) != shape:
            raise ValueError(f"reference copy under ZeRO-3: parameter {name!r} {shape} has no match in a model "
                             f"built from the policy's config; the policy must be a plain transformers model")
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            target.data.copy_(param.data)
    copy.tie_weights()
    copy.eval().requires_grad_(False)
    return copy
