"""``AsyncRolloutsHooks``: the Trainer-side lifecycle of :class:`~prpo_lightning.rollout.async_rollouts.AsyncRollouts`.

``PRPOModule.configure_callbacks`` adds it when ``model.async_rollout.enabled``. It checkpoints the in-flight batches
(``state_dict``), lets evaluation start only once the background is idle, and ends the background thread at fit end
and when training raises (Ctrl-C, SIGTERM, an error), so no thread outlives the run.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from prpo_lightning.rollout.async_rollouts import AsyncRollouts


class AsyncRolloutsHooks(L.Callback):
    """Checkpoints, evaluation and shutdown of the module's asynchronous rollouts (``pl_module.rollouts``)."""

    def __init__(self) -> None:
        self.module: Any = None

    @property
    def rollouts(self) -> AsyncRollouts | None:
        rollouts = getattr(self.module, "rollouts", None)
        return rollouts if isinstance(rollouts, AsyncRollouts) else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.module = pl_module

    def state_dict(self) -> dict[str, Any]:
        """The in-flight batches (waits until they are sampled)."""
        return self.rollouts.state_dict() if self.rollouts is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the in-flight batches (after the module's weights and version count were restored)."""
        if state_dict and self.rollouts is not None:
            self.rollouts.load_state_dict(state_dict)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rollouts is not None:  # evaluation uses the engine: the in-flight batch is finished first
            self.rollouts.wait()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_start(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rollouts is not None:  # the last launched batches are never trained
            self.rollouts.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.rollouts is not None:
            self.rollouts.close()


__all__ = ["AsyncRolloutsHooks"]
