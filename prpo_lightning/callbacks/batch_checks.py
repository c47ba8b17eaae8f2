"""Checks of every prompt batch, whatever data module made it (``prpo-fit`` installs :class:`BatchChecks`)."""

from __future__ import annotations

from typing import Any

import lightning as L

from prpo_lightning.runtime.prompt_ids import check_unique_ids


class BatchChecks(L.Callback):
    """Refuse a training, validation or test batch whose prompt ids repeat
    (:func:`~prpo_lightning.runtime.prompt_ids.check_unique_ids`): the ids are the group ids of the G completions, so two
    prompts with one id would be pooled into one group."""

    def _check(self, trainer: L.Trainer, batch: Any, batch_idx: int, kind: str) -> None:
        source = type(trainer.datamodule).__name__ if trainer.datamodule is not None else "the dataloader"
        check_unique_ids(batch, f"{kind} batch {batch_idx} of {source}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._check(trainer, batch, batch_idx, "training")

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._check(trainer, batch, batch_idx, "validation")

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._check(trainer, batch, batch_idx, "test")
