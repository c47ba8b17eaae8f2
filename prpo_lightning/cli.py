"""``prpo-fit``: the LightningCLI entry point (fit / validate / test).

Components are injected by ``class_path``/``init_args``::

    prpo-fit fit --config configs/demo.yaml
    prpo-fit fit --config configs/prpo.yaml --model.prm.init_args.batch_size 8
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from prpo_lightning.checkpoint import AtomicCheckpointIO
from prpo_lightning.module import PRPOModule


class PRPOCLI(LightningCLI):
    """LightningCLI with PRPOModule as the model and any LightningDataModule subclass as data.

    Checkpoints are written atomically (:class:`~prpo_lightning.checkpoint.AtomicCheckpointIO`) unless the
    config installs another ``CheckpointIO`` plugin. Resume with ``prpo-fit fit --config ... --ckpt_path last``.
    """

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: make it crash-safe
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def cli_main(args: ArgsType = None, run: bool = True) -> PRPOCLI:
    """Build (and by default run) the CLI.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``); a list or dict for programmatic use.
        run: run the subcommand; with False, only parse and instantiate.
    """
    import components  # noqa: F401  (lets configs use short class names of the bundled components)

    return PRPOCLI(
        PRPOModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """Console-script entry point ``prpo-fit``: runs the CLI and exits with status 0 on success."""
    cli_main()


if __name__ == "__main__":
    main()
