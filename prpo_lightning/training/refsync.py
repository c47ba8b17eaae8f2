"""Reference-model sync (TRL's ``sync_ref_model``, ``ref_model_mixup_alpha``, ``ref_model_sync_steps``).

Every ``ref_model_sync_steps`` optimizer steps (after optimizer steps k, 2k, 3k, ... counted from the start of
training, as TRL's ``SyncRefModelCallback`` fires at ``global_step % ref_model_sync_steps == 0``; a batch skipped
without an update, which advances our ``global_step``, is not counted, and with ``ppo_epochs`` or mini-batches every
optimizer step of a batch is) each reference parameter
becomes ``α·θ + (1 − α)·θ_ref`` (in place: ``θ_ref.mul_(1 − α).add_(θ, alpha=α)``, TRL's formula). ``α = 1``
copies the policy; ``α = 0`` leaves the reference as it is.

Under ZeRO-3 the policy's parameters are partitioned and the reference is a full copy
(:func:`~prpo_lightning.runtime.zero3.unpartitioned_copy`): each policy parameter is gathered in turn (every rank takes
part) and mixed into the reference on every rank. A synced reference is no longer the initial policy, so it is
saved in checkpoints (``prpo_ref_sync``) with the optimizer-step count, and restored on resume.
"""

from __future__ import annotations

from typing import Any

import torch

from prpo_lightning.config import RefSyncConfig
from prpo_lightning.runtime.zero3 import apply_gathered





@torch.no_grad()
def mix_into_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> None:
    """``θ_ref ← α·θ + (1 − α)·θ_ref`` for every parameter, matched by name.

    ZeRO-3-partitioned policy parameters are gathered one at a time (a collective: every rank must call this).

    Raises:
        ValueError: when a policy parameter has no reference parameter of the same name and shape.
    """
    apply_gathered(policy, reference, lambda ref, full: ref.mul_(1.0 - alpha).add_(full, alpha=alpha), "ref_sync")


class ReferenceSync:
    """Counts optimizer steps and mixes the policy into the reference when a sync is due.

    Args:
        config: the ``model.ref_sync`` settings.
    """

    def __init__(self, config: RefSyncConfig) -> None:
        self.config = config
        self.optimizer_steps = 0
        self._pending: dict[str, torch.Tensor] | None = None  # a checkpoint's reference, before the reference exists

    @property
    def enabled(self) -> bool:
        return self.config.sync_ref_model

    def after_optimizer_step(self, policy: torch.nn.Module, reference: torch.nn.Module | None) -> bool:
        """Count one optimizer step; mix when ``optimizer_steps % ref_model_sync_steps == 0``.

        Returns:
            Whether the reference was synced.

        Raises:
            RuntimeError: when a sync is due and there is no reference model.
        """
        self.optimizer_steps += 1
        if not self.enabled or self.optimizer_steps % self.config.ref_model_sync_steps != 0:
            return False
        if reference is None:
            raise RuntimeError("ref_sync: a sync is due but the module has no reference model; set loss.kl_coef > 0 "
                               "or turn model.ref_sync.sync_ref_model off")
        mix_into_reference(policy, reference, float(self.config.ref_model_mixup_alpha))
        return True

    def state_dict(self, reference: torch.nn.Module | None) -> dict[str, Any]:
        """The step count and, when syncing is on, the reference's parameters (on the CPU)."""
        state: dict[str, Any] = {"optimizer_steps": self.optimizer_steps}
        if self.enabled and reference is not None:
            state["reference"] = {k: v.detach().cpu().clone() for k, v in reference.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any], reference: torch.nn.Module | None) -> None:
        """Restore the step count and the reference (now, or when :meth:`apply_pending` gets the reference)."""
        self.optimizer_steps = int(state["optimizer_steps"])
        self._pending = state.get("reference")
        if reference is not None:
            self.apply_pending(reference)

    @torch.no_grad()
    def apply_pending(self, reference: torch.nn.Module | None) -> None:
        """Load a checkpoint's reference into ``reference`` once it exists (under ZeRO-3: at fit start).

        Raises:
            ValueError: when the saved reference's keys differ from the model's.
        """
        if self._pending is None or reference is None:
            return
        own = reference.state_dict()
        if own.keys() != self._pending.keys():
            missing = sorted(set(own) ^ set(self._pending))[:5]
            raise ValueError(f"ref_sync: the checkpoint's reference model does not match this policy (keys {missing})")
        for key, value in self._pending.items():
            own[key].copy_(value)
        self._pending = None
