"""``prpo-fit``: the LightningCLI entry point (fit / validate / test).

Components are injected by ``class_path``/``init_args``::

    prpo-fit fit --config configs/demo.yaml
    prpo-fit fit --config configs/prpo.yaml --model.prm.init_args.batch_size 8

Resuming: checkpoints of a ``ModelCheckpoint`` without a ``dirpath`` go to ``<save_dir>/<name>/checkpoints`` of the
first logger (``<default_root_dir>/checkpoints`` without a logger), one folder shared by every ``version_N`` of the
run, so that rerunning the same command with ``--ckpt_path last`` (a requeued job) finds ``last.ckpt``. When there is
no checkpoint yet (the job's first start), ``--ckpt_path last`` warns and starts at step 0; it raises when the run
can never resume (no ``ModelCheckpoint`` with ``save_last``) or when the folder holds checkpoints but no ``last``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from prpo_lightning.callbacks.progress import StepProgressBar
from prpo_lightning.checkpoint import AtomicCheckpointIO
from prpo_lightning.module import PRPOModule

#: Files that a run writes before it has done anything (a failed run with only these leaves no ``version_N``).
SETUP_FILES = frozenset({"config.yaml", "hparams.yaml"})


#: Messages (regular expressions matched at the start) of warnings that libraries repeat at every evaluation or
#: save: each is shown the first time only.
ONCE_WARNINGS = (
    r"`past_key_values` is deprecated",  # transformers' FutureWarning, at every generate call
)

#: Third-party warnings that say nothing about a run, hidden by exact message, category and module (never a whole
#: category): ``(message regex, category, module regex)``.
THIRD_PARTY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # torch 2.13 deprecates LeafSpec; Lightning 2.6's own _pytree helper still builds one when moving a batch
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)

#: Third-party log records that say nothing about a run, hidden by logger name and message start.
THIRD_PARTY_LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    # Lightning's advertisement for litlogger / litmodels at every fit (logged through rank_zero_info)
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud",),
    "lightning.fabric.utilities.rank_zero": ("💡 Tip: For seamless cloud",),
    "lightning_utilities.core.rank_zero": ("💡 Tip: For seamless cloud",),
    # DeepSpeed's accelerator detection on a machine without a GPU (transformers imports DeepSpeed when installed)
    "DeepSpeed": ("Setting accelerator to CPU.",),
}


class _ShowOnce:
    """``warnings.showwarning`` replacement that shows a warning matching one of ``patterns`` the first time only.

    Python's ``once`` action is not enough: its registry is cleared whenever the filters change, which every
    ``warnings.catch_warnings`` block in a library does.
    """

    def __init__(self, patterns: tuple[str, ...], show: Any) -> None:
        self.patterns = [re.compile(p) for p in patterns]
        self.show = show
        self.seen: set[str] = set()

    def __call__(self, message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
        text = str(message)
        pattern = next((p.pattern for p in self.patterns if p.match(text)), None)
        if pattern is not None:
            if pattern in self.seen:
                return
            self.seen.add(pattern)
        self.show(message, category, filename, lineno, file, line)


class _DropMessages(logging.Filter):
    """Logging filter dropping the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_third_party_notices() -> None:
    """Hide the third-party notices of :data:`THIRD_PARTY_WARNINGS` and :data:`THIRD_PARTY_LOG_MESSAGES`, each
    selected by its exact message; every other warning and log record is untouched. Idempotent."""
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefixes in THIRD_PARTY_LOG_MESSAGES.items():
        logger = logging.getLogger(name)  # the library's logger (created now if it is not imported yet)
        if not any(isinstance(f, _DropMessages) and f.prefixes == prefixes for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


def quiet_repeated_warnings() -> None:
    """Show each known repetitive warning at most once per process, selected by its message only.

    Lightning's manual-optimisation ``ModelCheckpoint`` warning (13 lines at every save) is not shown at all:
    :class:`PRPOModule` saves the weights *after* the step on purpose (that is what exact resume needs). The
    warnings of :data:`ONCE_WARNINGS` are shown the first time. Every other warning is untouched.
    """
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
    if not isinstance(warnings.showwarning, _ShowOnce):
        warnings.showwarning = _ShowOnce(ONCE_WARNINGS, warnings.showwarning)


def checkpoint_root(trainer: L.Trainer) -> str:
    """The version-independent checkpoint folder: ``<save_dir>/<name>/checkpoints`` of the first logger, or
    ``<default_root_dir>/checkpoints``."""
    logger = trainer.loggers[0] if trainer.loggers else None
    save_dir = getattr(logger, "save_dir", None) if logger is not None else None
    if save_dir is None:
        return os.path.join(trainer.default_root_dir, "checkpoints")
    name = getattr(logger, "name", None)
    return os.path.join(save_dir, str(name), "checkpoints") if name else os.path.join(save_dir, "checkpoints")


def remove_empty_log_dir(trainer: L.Trainer) -> None:
    """Delete this run's ``version_N`` log folder when it holds nothing but :data:`SETUP_FILES` and empty files
    (a run that failed before producing anything). Rank zero only."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    log_dir = getattr(trainer.loggers[0], "log_dir", None)
    if not log_dir or not os.path.isdir(log_dir):
        return
    files = [p for p in Path(log_dir).rglob("*") if p.is_file()]
    if all(p.name in SETUP_FILES or p.stat().st_size == 0 for p in files):
        shutil.rmtree(log_dir, ignore_errors=True)


class PRPOCLI(LightningCLI):
    """LightningCLI with PRPOModule as the model and any LightningDataModule subclass as data.

    On top of Lightning's CLI: checkpoints are written atomically
    (:class:`~prpo_lightning.checkpoint.AtomicCheckpointIO`, unless the config installs another ``CheckpointIO``);
    ``ModelCheckpoint`` callbacks without a ``dirpath`` save to :func:`checkpoint_root`; ``--ckpt_path last`` is
    checked (see the module docstring); Lightning's default progress bar is replaced by :class:`StepProgressBar`;
    repetitive warnings are shown once (:func:`quiet_repeated_warnings`) and a few third-party notices not at all
    (:func:`quiet_third_party_notices`); a run that fails before producing
    anything removes its empty ``version_N`` folder.
    """

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: make it crash-safe
            strategy.checkpoint_io = AtomicCheckpointIO()
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.realpath(os.path.expanduser(checkpoint_root(trainer)))
        callbacks = trainer.callbacks
        for i, callback in enumerate(callbacks):  # Lightning's default bar (TQDM or Rich): count steps instead
            if type(callback) in (TQDMProgressBar, RichProgressBar) and not self._bar_configured(type(callback)):
                callbacks[i] = StepProgressBar()  # every step (RL steps take seconds; Lightning may pick 100)
        return trainer

    def _bar_configured(self, bar_type: type[ProgressBar]) -> bool:
        """Whether the config names this progress bar class itself (then it is kept)."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        listed = config.get("trainer.callbacks") or []
        return any(str(getattr(c, "class_path", "")).endswith("." + bar_type.__name__) for c in listed)

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` (see the module docstring)."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = resolve_last_checkpoint(self.trainer)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_empty_log_dir(self.trainer)
            raise


def resolve_last_checkpoint(trainer: L.Trainer) -> str | None:
    """What ``--ckpt_path last`` means for ``trainer``: ``"last"`` when a ``last*.ckpt`` exists (Lightning then
    loads the newest), None with a warning when no checkpoint exists yet.

    Raises:
        ValueError: when no ``ModelCheckpoint`` saves ``last.ckpt`` (the run could never resume), or when the
            checkpoint folder holds checkpoints but none named ``last``.
    """
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    if not any(c.save_last for c in callbacks):
        raise ValueError(
            "--ckpt_path last resumes from last.ckpt, but no ModelCheckpoint callback saves one, so this run could "
            "never resume. Fix: add lightning.pytorch.callbacks.ModelCheckpoint with save_last: true (and "
            "every_n_train_steps) to trainer.callbacks, or pass --ckpt_path <file>."
        )
    dirs = sorted({str(c.dirpath) for c in callbacks if c.dirpath is not None})
    found = {p for c in callbacks for p in c._find_last_checkpoints(trainer)}
    if found:
        return "last"
    others = [p for d in dirs if os.path.isdir(d) for p in sorted(os.listdir(d)) if p.endswith(".ckpt")]
    if others:
        raise ValueError(
            f"--ckpt_path last found no last.ckpt in {', '.join(dirs)}, which holds other checkpoints "
            f"({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}). Fix: pass the one to resume from as "
            "--ckpt_path <file>."
        )
    rank_zero_warn(
        f"[prpo] --ckpt_path last: no checkpoint in {', '.join(dirs)} yet, so training STARTS AT STEP 0. This is "
        "expected on the first start of a (requeued) job; otherwise check trainer.logger's save_dir/name or the "
        "ModelCheckpoint dirpath, which must be the same as in the run you want to resume."
    )
    return None


def cli_main(args: ArgsType = None, run: bool = True) -> PRPOCLI:
    """Build (and by default run) the CLI.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``); a list or dict for programmatic use.
        run: run the subcommand; with False, only parse and instantiate.
    """
    import components  # noqa: F401  (lets configs use short class names of the bundled components)

    quiet_repeated_warnings()
    quiet_third_party_notices()
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
