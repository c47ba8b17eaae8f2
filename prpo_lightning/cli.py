"""``prpo-fit``: the LightningCLI entry point (fit / validate / test).

Components are injected by ``class_path``/``init_args``::

    prpo-fit fit --config configs/demo.yaml
    prpo-fit fit --config configs/prpo.yaml --model.prm.init_args.batch_size 8
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import ArgsType, LightningCLI

from prpo_lightning.module import PRPOModule


class PRPOCLI(LightningCLI):
    """LightningCLI with PRPOModule as the model and any LightningDataModule subclass as data."""


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


if __name__ == "__main__":
    cli_main()
