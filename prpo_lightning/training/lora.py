"""LoRA adapters via PEFT (``model.lora``): only the adapters train, the reference is the base, exports merge.

With ``model.lora`` set, :class:`~prpo_lightning.module.PRPOModule` wraps the policy with
:func:`apply_lora` (PEFT's ``get_peft_model``): every base weight is frozen and the optimizer receives only the
adapter matrices ``A`` (r × in) and ``B`` (out × r). The adapted layer computes ``W x + (α / r)·B A x``.

- **Reference model.** The base is the reference: :class:`AdapterDisabledReference` runs the *same* policy
  with its adapters disabled (``disable_adapter()``), so no second copy of the weights is made.
- **Checkpoints** hold the adapter tensors only (:func:`trainable_state_keys`); the frozen base is reloaded
  from ``model.policy`` (or ``model.policy_config`` and ``model.seed``) when the model is configured.
- **Export and rollout engines** get merged weights ``W + (α / r)·B A`` under the base model's parameter names
  (:func:`merged_weights`, :func:`merged_model`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.config import LoRAConfig

PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM's prefix in front of the base model's parameter names





def as_lora_config(value: LoRAConfig | dict[str, Any] | None) -> LoRAConfig | None:
    """A ``LoRAConfig`` from a config object or its dict form (checkpoint hyper-parameters), or None."""
    if value is None or isinstance(value, LoRAConfig):
        return value
    return LoRAConfig(**dict(value))


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT-wrapped model."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def apply_lora(model: torch.nn.Module, config: LoRAConfig, seed: int) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; base weights are frozen, the adapters are trainable.

    ``A`` is initialised from ``seed`` (PEFT's Kaiming init, drawn inside a forked RNG so the global RNG is left
    as it was) and ``B`` is zero, so the wrapped model starts equal to the base.

    Raises:
        ImportError: PEFT is not installed (``pip install prpo-lightning[lora]``).
        ValueError: an entry of ``target_modules`` matches no module of the model (:func:`check_target_modules`).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("model.lora needs PEFT: pip install 'prpo-lightning[lora]'") from err
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    check_target_modules(model, targets)
    peft_config = LoraConfig(r=int(config.r), lora_alpha=float(config.alpha), lora_dropout=float(config.dropout),
                             target_modules=targets, task_type="CAUSAL_LM", bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config)


def check_target_modules(model: torch.nn.Module, targets: list[str] | str) -> None:
    """Every entry of a ``target_modules`` list must name at least one module of ``model``.

    PEFT adapts a module when its name equals an entry or ends with ``"." + entry``, and raises only when *no*
    entry matches: a misspelt entry next to correct ones would be skipped without a word. A string is PEFT's
    ``all-linear`` or a regular expression (PEFT itself refuses one that matches nothing).

    Raises:
        ValueError: naming the entries that match nothing and the module names available to target.
    """
    if isinstance(targets, str):
        return
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if name and not list(m.children()) and any(True for _ in m.parameters(recurse=False))})
        raise ValueError(
            f"model.lora.target_modules: {unmatched} match no module of {type(model).__name__}, so they would get no "
            f"adapters. Module names available: {leaves} (an entry matches a module whose name equals it or ends "
            "with '.<entry>'). Fix the spelling, or use 'all-linear'."
        )


def trainable_state_keys(model: torch.nn.Module, prefix: str = "") -> set[str]:
    """State-dict keys (with ``prefix``) of ``model``'s trainable parameters: the adapters under LoRA."""
    return {prefix + name for name, p in model.named_parameters() if p.requires_grad}


def check_adapter_state(policy: torch.nn.Module, state_dict: dict[str, Any]) -> None:
    """Check that an adapters-only checkpoint ``state_dict`` holds exactly ``policy``'s LoRA adapters.

    Raises:
        ValueError: the checkpoint's adapters are not this model's (other ``model.lora`` settings, or a full
            checkpoint loaded into a LoRA model).
    """
    adapters, saved = trainable_state_keys(policy, "policy."), set(state_dict)
    if saved != adapters:
        missing, unexpected = sorted(adapters - saved)[:3], sorted(saved - adapters)[:3]
        raise ValueError(f"PRPOModule: the checkpoint's tensors do not match this model's LoRA adapters (missing "
                         f"{missing}, unexpected {unexpected}): resume with the model.lora settings it was trained with")


class AdapterDisabledReference:
    """The reference policy under LoRA: ``policy`` with its adapters disabled, a view sharing its weights.

    Calls run ``policy(...)`` inside ``policy.disable_adapter()``; ``eval``/``train`` act on the policy;
    ``to`` does nothing (the policy is placed by the trainer) and ``requires_grad_`` is refused because the
    base weights are already frozen.
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy

    @property
    def training(self) -> bool:
        return self.policy.training

    def eval(self) -> AdapterDisabledReference:
        self.policy.eval()
        return self

    def train(self, mode: bool = True) -> AdapterDisabledReference:
        self.policy.train(mode)
        return self

    def to(self, *args: Any, **kwargs: Any) -> AdapterDisabledReference:
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``policy(*args, **kwargs)`` with the adapters disabled (keyword arguments, the KV cache included, are
        passed on unchanged)."""
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    __call__ = forward


def _lora_layers(policy: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX): m for name, m in policy.named_modules() if isinstance(m, LoraLayer)}


def merged_weights(policy: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The merged parameters ``W + (α / r)·B A`` of a PEFT policy under the base model's names, one at a time.

    The policy is not modified; each merged tensor is computed when it is yielded, so the extra memory is one
    weight matrix. Tied weights appear under every name (``named_parameters(remove_duplicate=False)``).
    """
    layers = _lora_layers(policy)
    for name, param in policy.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        base_name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        weight = param.detach()  # (out, in) for a linear weight
        owner = base_name.rsplit(".", 1)[0]
        if base_name.endswith(".weight") and owner in layers:
            layer = layers[owner]
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)  # (out, in)
        yield base_name, weight


def merged_model(policy: torch.nn.Module) -> torch.nn.Module:
    """A plain (unwrapped) copy of a PEFT policy with the adapters merged into the base weights
    (``merge_and_unload`` on a deep copy; the policy keeps training unmerged)."""
    return copy.deepcopy(policy).merge_and_unload()


def base_model(policy: torch.nn.Module) -> torch.nn.Module:
    """The underlying Hugging Face model of a PEFT policy (its layers still wrapped), else ``policy`` itself."""
    return policy.get_base_model() if is_lora(policy) else policy
