"""The settings of a run against those stored in the checkpoint it loads (``--ckpt_path``).

LightningCLI replaces the YAML and command-line settings of the model with the checkpoint's hyper-parameters when
``--ckpt_path`` names a file. ``prpo-fit`` does not: the settings given now take effect, and
:func:`check_resume_settings` compares them with the checkpoint's:

- a change that would make the checkpoint unloadable, or silently change what its weights compute, is refused
  with a :class:`ResumeSettingsError` naming the key and both values: the LoRA settings ``model.lora`` (adapters
  or none), ``model.lora.r``, ``model.lora.alpha`` and ``model.lora.target_modules``, and the sizes of a
  ``model.policy_config`` architecture (:data:`SHAPE_KEYS`);
- every other difference is listed once in a warning (the values given now take effect). On ``fit`` this includes
  the optimizer's ``lr``, ``weight_decay`` and ``betas`` and the schedule's length: the restored optimizer keeps
  its Adam moments and follows the new schedule from the resumed step
  (:mod:`prpo_lightning.training.schedule`, which logs the new rate once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

#: ``model.lora`` keys whose change makes an adapter checkpoint unloadable (``r``, ``target_modules``) or rescales
#: the trained adapters (``alpha``: the update is ``(alpha / r)·B A``).
LORA_FIXED = ("r", "alpha", "target_modules")
#: ``model.policy_config`` entries that set tensor shapes: another value cannot load the checkpoint's weights.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")
_INTERNAL = ("_instantiator", "_class_path")


class ResumeSettingsError(ValueError):
    """A setting differs from the checkpoint's in a way the checkpoint cannot be loaded with."""


def checkpoint_hyperparameters(path: str) -> dict[str, Any]:
    """The ``hyper_parameters`` stored in the checkpoint file ``path`` (memory-mapped: the tensors are not read)."""
    ckpt = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    for key in _INTERNAL:
        hparams.pop(key, None)
    return hparams


def _plain(value: Any) -> Any:
    """Config objects as plain dicts/lists (dataclasses, tuples, Lightning's AttributeDict)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else k, out)
    else:
        out[prefix] = value
    return out


def _lora_value(key: str, value: Any) -> Any:
    if key == "target_modules" and isinstance(value, list):
        return sorted(value)  # PEFT matches each entry; the order does not matter
    return float(value) if key == "alpha" and value is not None else value


def check_resume_settings(current: Mapping[str, Any], stored: Mapping[str, Any], ckpt_path: str) -> list[str]:
    """Compare the module's hyper-parameters ``current`` with the checkpoint's ``stored`` ones.

    Args:
        current: the module's ``hparams`` (dicts or config dataclasses).
        stored: :func:`checkpoint_hyperparameters` of ``ckpt_path``.
        ckpt_path: the checkpoint's path (for the messages).

    Returns:
        Lines ``model.<key>: <checkpoint value> (checkpoint) -> <value> (now)``, one per difference (all take
        effect).

    Raises:
        ResumeSettingsError: the LoRA settings or the policy_config's sizes differ (see the module docstring).
    """
    now, then = _plain(dict(current)), _plain(dict(stored))
    for key in _INTERNAL:
        now.pop(key, None)
    lora_now, lora_then = now.pop("lora", None), then.pop("lora", None)
    if (lora_now is None) != (lora_then is None):
        raise ResumeSettingsError(
            f"model.lora is {lora_now!r} but the checkpoint {ckpt_path} was trained with model.lora={lora_then!r}: "
            "a LoRA checkpoint holds adapters only and a full checkpoint holds no adapters, so it cannot be loaded "
            "with other model.lora settings. Fix: set model.lora as in that run, or use a checkpoint of this setup."
        )
    if lora_now is not None:
        for key in LORA_FIXED:
            a, b = _lora_value(key, lora_then.get(key)), _lora_value(key, lora_now.get(key))
            if key in lora_then and key in lora_now and a != b:
                why = ("rescales the trained adapters (the update is (alpha / r)·B·A)" if key == "alpha"
                       else "changes the adapters' shapes or layers, so they cannot be loaded")
                raise ResumeSettingsError(
                    f"model.lora.{key} is {lora_now[key]!r} but the checkpoint {ckpt_path} was trained with "
                    f"model.lora.{key}={lora_then[key]!r}: a different {key} {why}. Fix: resume with "
                    f"model.lora.{key}={lora_then[key]!r}, or start a new run without --ckpt_path."
                )
        now["lora"], then["lora"] = {k: v for k, v in lora_now.items() if k not in LORA_FIXED}, \
            {k: v for k, v in lora_then.items() if k not in LORA_FIXED}
    flat_now, flat_then = _flatten(now, "", {}), _flatten(then, "", {})
    effective = []
    for key in sorted(set(flat_now) & set(flat_then)):
        if flat_now[key] != flat_then[key] and key.startswith("policy_config.") and key.split(".")[-1] in SHAPE_KEYS:
            raise ResumeSettingsError(
                f"model.{key} is {flat_now[key]!r} but the checkpoint {ckpt_path} was trained with "
                f"model.{key}={flat_then[key]!r}: its weights have other shapes and cannot be loaded. Fix: use the "
                "checkpoint's model.policy_config, or start a new run without --ckpt_path."
            )
        if flat_now[key] != flat_then[key]:
            effective.append(f"model.{key}: {flat_then[key]!r} (checkpoint) -> {flat_now[key]!r} (now)")
    return effective


def describe_differences(ckpt_path: str, effective: list[str]) -> str | None:
    """One warning text for :func:`check_resume_settings`'s list, or None when nothing differs."""
    if not effective:
        return None
    return (f"[prpo] --ckpt_path {ckpt_path}: {len(effective)} setting(s) differ from the checkpoint's; the values "
            "given now (YAML / command line) take effect:\n  " + "\n  ".join(effective))
