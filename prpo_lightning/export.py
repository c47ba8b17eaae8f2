"""Export the trained policy as a Hugging Face model directory (``safetensors`` weights + tokenizer).

Three ways:

- at the end of ``fit``: add the :class:`HFExportCallback` to ``trainer.callbacks`` (under DeepSpeed ZeRO-3 it
  gathers the sharded parameters first);
- from a checkpoint: ``prpo-export CKPT OUT_DIR`` (or ``python -m prpo_lightning.export``). ``CKPT`` is a
  Lightning ``.ckpt`` file or a DeepSpeed checkpoint *directory* (ZeRO-2/3 shards; collated to fp32 with
  DeepSpeed's ``zero_to_fp32``);
- from Python: :func:`export_policy` / :func:`export_checkpoint`.

Under ``model.lora`` the adapters are merged into the base weights (``W + (α / r)·B A``) and a plain model is
written. The result loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and ``AutoTokenizer.from_pretrained(OUT_DIR)``.

A checkpoint file is checked against its checksums first (:func:`~prpo_lightning.runtime.checkpoint.verify_checkpoint`): a
damaged file, or a file that is not a checkpoint, is refused by name. Exported files get the permissions of any new
file (``0666`` less the umask, usually ``0644``), not the ``0600`` of the temporary files they are written through.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from prpo_lightning.runtime.checkpoint import CheckpointDamagedError, verify_checkpoint
from prpo_lightning.training.lora import apply_lora, as_lora_config, is_lora, merged_model
from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer, resolve_model_path, torch_dtype

POLICY_PREFIX = "policy."


def export_policy(policy: torch.nn.Module, tokenizer: Any, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Write ``policy`` (a Hugging Face ``PreTrainedModel``; a PEFT model is merged first, on a copy) and
    ``tokenizer`` to ``out_dir`` as safetensors."""
    if is_lora(policy):
        policy = merged_model(policy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        policy = policy.to(torch_dtype(dtype))
    policy.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    normal_permissions(out)
    return out


def normal_permissions(out_dir: Path) -> None:
    """Give every file in ``out_dir`` the mode of a newly created file (``0666`` less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(out_dir).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _load_lightning_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_dir():  # DeepSpeed: a directory of (ZeRO-sharded) states; collate to one fp32 file first
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            single = Path(tmp) / "collated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(single))
            return torch.load(single, map_location="cpu", weights_only=False)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verify_checkpoint(path)  # also registers the config dataclasses as safe globals (module import)
    return torch.load(path, map_location="cpu", weights_only=True)


def export_checkpoint(
    ckpt_path: str | Path, out_dir: str | Path, tokenizer: str | None = None, dtype: str | None = None
) -> Path:
    """Rebuild the policy of a ``PRPOModule`` checkpoint and export it with :func:`export_policy`.

    Args:
        ckpt_path: Lightning ``.ckpt`` file or DeepSpeed checkpoint directory.
        out_dir: output directory.
        tokenizer: tokenizer name/path (default: the one recorded in the checkpoint's hyper-parameters).
        dtype: parameter dtype of the export (default: the training dtype).

    Raises:
        CheckpointDamagedError: the file does not match its checksums or is not a checkpoint.
        ValueError: if the checkpoint holds no policy weights or no model hyper-parameters.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = _load_lightning_checkpoint(Path(ckpt_path))
    hp = ckpt.get("hyper_parameters") or {}
    state = {k[len(POLICY_PREFIX) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(POLICY_PREFIX)}
    if not state:
        raise ValueError(f"{ckpt_path}: no 'policy.*' weights in the checkpoint's state_dict")
    lora = as_lora_config(hp.get("lora"))
    if lora is not None:
        model = _rebuild_lora_policy(hp, lora, state, ckpt_path)
        tok_name = tokenizer or hp.get("tokenizer") or hp.get("policy")
        return export_policy(model, load_tokenizer(tok_name) if tok_name else None, out_dir, dtype or hp.get("dtype"))
    if hp.get("policy") is not None:
        config = AutoConfig.from_pretrained(resolve_model_path(hp["policy"]))
    elif hp.get("policy_config") is not None:
        cfg = dict(hp["policy_config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        raise ValueError(f"{ckpt_path}: the checkpoint has no model.policy / model.policy_config hyper-parameter")
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):  # the tied head may be stored once, under the embeddings
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{ckpt_path}: policy weights do not match the model: missing {missing}, unexpected {unexpected}")
    tok_name = tokenizer or hp.get("tokenizer") or hp.get("policy")
    tok = load_tokenizer(tok_name) if tok_name else None
    return export_policy(model, tok, out_dir, dtype or hp.get("dtype"))


def _rebuild_lora_policy(hp: dict[str, Any], lora: Any, adapters: dict[str, torch.Tensor], ckpt_path: Any) -> torch.nn.Module:
    """The base policy reloaded as in training (``model.policy``, or ``model.policy_config`` with ``model.seed``),
    wrapped with the checkpoint's adapters and merged (``merge_and_unload``).

    Raises:
        ValueError: the checkpoint's adapter tensors do not match the ``model.lora`` settings it records.
    """
    base = load_causal_lm(hp.get("policy"), hp.get("policy_config"), dtype=hp.get("dtype") or "float32",
                          seed=int(hp.get("seed", 0)))
    model = apply_lora(base, lora, int(hp.get("seed", 0)))
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(adapters) != expected:
        raise ValueError(f"{ckpt_path}: the checkpoint's adapter tensors do not match model.lora {lora} (missing "
                         f"{sorted(expected - set(adapters))[:3]}, unexpected {sorted(set(adapters) - expected)[:3]})")
    model.load_state_dict(adapters, strict=False)  # the base weights are the reloaded ones
    return model.merge_and_unload()


class HFExportCallback(L.Callback):
    """Write the policy as a Hugging Face directory when ``fit`` ends (rank 0 writes; under ZeRO-3 every rank
    takes part in gathering the sharded parameters).

    Args:
        dirpath: output directory (default: ``<trainer.log_dir or default_root_dir>/hf_export``).
        dtype: parameter dtype of the export (default: the training dtype).
    """

    def __init__(self, dirpath: str | None = None, dtype: str | None = None) -> None:
        self.dirpath = dirpath
        self.dtype = dtype

    def output_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "hf_export"

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        out = self.output_dir(trainer)
        policy = pl_module.policy
        if getattr(trainer.strategy, "zero_stage_3", False):
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None):
                if trainer.is_global_zero:
                    self._write(policy, pl_module.tokenizer, out)
        elif trainer.is_global_zero:
            self._write(policy, pl_module.tokenizer, out)
        trainer.strategy.barrier("hf_export")

    def _write(self, policy: torch.nn.Module, tokenizer: Any, out: Path) -> None:
        if is_lora(policy):  # a merged copy: the trained policy keeps its adapters
            policy = merged_model(policy)
        dtype = torch_dtype(self.dtype) if self.dtype else None
        state = {k: v.detach().to("cpu", dtype=dtype or v.dtype).clone() for k, v in policy.state_dict().items()}
        out.mkdir(parents=True, exist_ok=True)
        policy.save_pretrained(out, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        normal_permissions(out)


def main(argv: Sequence[str] | None = None) -> None:
    """``prpo-export CKPT OUT_DIR [--tokenizer T] [--dtype D]``."""
    parser = argparse.ArgumentParser(prog="prpo-export", description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="Lightning .ckpt file or DeepSpeed checkpoint directory")
    parser.add_argument("out_dir", help="output Hugging Face model directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name/path (default: from the checkpoint)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out_dir, args.tokenizer, args.dtype)
    except (CheckpointDamagedError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))  # the message first, exit status 2
    print(f"exported the policy to {out}")


if __name__ == "__main__":
    main()
