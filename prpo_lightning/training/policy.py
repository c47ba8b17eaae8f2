"""Building the trained policy and its frozen reference, once, when the model is configured."""

from __future__ import annotations

import copy
from typing import Any

import torch

from prpo_lightning.config import LoRAConfig, SamplingConfig
from prpo_lightning.runtime.compat import enable_activation_checkpointing
from prpo_lightning.runtime.models import load_causal_lm
from prpo_lightning.runtime.zero3 import transformers_zero3
from prpo_lightning.training.lora import AdapterDisabledReference, apply_lora, as_lora_config


def build_policy(
    policy: str | None, policy_config: dict[str, Any] | None, dtype: str, seed: int, sampling: SamplingConfig,
    gradient_checkpointing: bool, lora: LoRAConfig | dict[str, Any] | None, zero3: dict[str, Any] | None,
    with_reference: bool,
) -> tuple[torch.nn.Module, Any]:
    """Load the policy (under ZeRO-3: partitioned) and build its frozen reference when one is planned.

    With LoRA the base is frozen and the reference is the same model with its adapters disabled (no copy); without
    it the reference is a frozen deep copy, except under ZeRO-3, where it is built from the gathered policy at fit
    start (:func:`~prpo_lightning.runtime.zero3.unpartitioned_copy`), so None is returned for it here.

    Returns:
        ``(policy, reference)``, the reference None when not planned (or deferred under ZeRO-3).

    Raises:
        ValueError: LoRA under ZeRO-3.
    """
    with transformers_zero3(zero3):  # under ZeRO-3 transformers initialises/loads the partitioned weights
        model = load_causal_lm(policy, policy_config, dtype=dtype, seed=seed, sampling=sampling)
    # from_pretrained returns eval mode; the policy trains in train mode (activation checkpointing only acts in train
    # mode, and Lightning warns about modules left in eval mode). Sampling and the no-grad log-prob passes switch to
    # eval mode and back themselves.
    model.train()
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if lora is None:
        reference = copy.deepcopy(model).eval().requires_grad_(False) if with_reference and zero3 is None else None
        return model, reference
    if zero3 is not None:
        raise ValueError("model.lora is not supported under DeepSpeed ZeRO-3: use ZeRO-2 or DDP")
    model = apply_lora(model, as_lora_config(lora), seed)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: reentrant checkpointing needs a grad input
    return model, AdapterDisabledReference(model) if with_reference else None
