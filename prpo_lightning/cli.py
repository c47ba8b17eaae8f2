"""``prpo-fit``: the LightningCLI entry point (fit / validate / test).

Components are injected by ``class_path``/``init_args``::

    prpo-fit fit --config configs/demo.yaml
    prpo-fit fit --config configs/prpo.yaml --model.prm.init_args.batch_size 8

Resuming: checkpoints of a ``ModelCheckpoint`` without a ``dirpath`` go to ``<save_dir>/<name>/checkpoints`` of the
first logger (``<default_root_dir>/checkpoints`` without a logger), one folder shared by every ``version_N`` of the
run, so that rerunning the same command with ``--ckpt_path last`` (a requeued job) finds ``last.ckpt``. When there is
no checkpoint yet (the job's first start), ``--ckpt_path last`` warns and starts at step 0; it raises when the run
can never resume (no ``ModelCheckpoint`` with ``save_last``) or when the folder holds checkpoints but no ``last``.

Unlike LightningCLI, ``--ckpt_path FILE`` does not replace the YAML and command-line settings with the checkpoint's
hyper-parameters: the given values take effect, differences are listed in one warning, and a LoRA change that the
checkpoint cannot be loaded with is refused by name (:mod:`prpo_lightning.runtime.resume_check`). Every checkpoint file is
checked against its checksums before it is loaded (:func:`~prpo_lightning.runtime.checkpoint.verify_checkpoint`). A ``fit``
run locks its checkpoint folders (:mod:`prpo_lightning.runtime.run_lock`) and claims its ``version_N`` log folder atomically.
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

from prpo_lightning.callbacks.batch_checks import BatchChecks
from prpo_lightning.callbacks.preemption import PREEMPTED_EXIT_CODE, PreemptionCheckpoint
from prpo_lightning.callbacks.progress import StepProgressBar
from prpo_lightning.runtime.checkpoint import AtomicCheckpointIO, verify_checkpoint
from prpo_lightning.module import PRPOModule
from prpo_lightning.runtime.resume_check import check_resume_settings, checkpoint_hyperparameters, describe_differences
from prpo_lightning.runtime.run_lock import RunLock, claim_log_version

_RUN_STARTED = False  # set when a subcommand starts running (see main)

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
    (:class:`~prpo_lightning.runtime.checkpoint.AtomicCheckpointIO`, unless the config installs another ``CheckpointIO``);
    ``ModelCheckpoint`` callbacks without a ``dirpath`` save to :func:`checkpoint_root`; every batch is checked for
    repeated prompt ids (:class:`~prpo_lightning.callbacks.BatchChecks`); ``--ckpt_path last`` is
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
        if not any(isinstance(c, BatchChecks) for c in callbacks):
            callbacks.insert(0, BatchChecks())  # repeated prompt ids in a batch, from any data module
        if not any(isinstance(c, PreemptionCheckpoint) for c in callbacks):
            callbacks.append(PreemptionCheckpoint())  # SIGTERM/SIGUSR1: save last.ckpt, exit 143
        return trainer

    def _bar_configured(self, bar_type: type[ProgressBar]) -> bool:
        """Whether the config names this progress bar class itself (then it is kept)."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        listed = config.get("trainer.callbacks") or []
        return any(str(getattr(c, "class_path", "")).endswith("." + bar_type.__name__) for c in listed)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI loads the checkpoint's hyper-parameters over the parsed config here; ``prpo-fit`` keeps the
        config as given and only checks the file (the settings are compared once the model exists)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            verify_checkpoint(ckpt_path)  # before any model loads: a damaged file is refused at once

    def before_fit(self) -> None:
        """Lock the checkpoint folders, resolve ``--ckpt_path last`` (see the module docstring), compare settings."""
        config = self.config_init[self.subcommand]
        if self.trainer.is_global_zero:
            for folder in sorted({str(c.dirpath) for c in self.trainer.checkpoint_callbacks
                                  if isinstance(c, ModelCheckpoint) and c.dirpath is not None}):
                lock = RunLock(folder)
                lock.acquire()
                self._locks.append(lock)
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = resolve_last_checkpoint(self.trainer)
        self._compare_with_checkpoint(config.get("ckpt_path"))

    def before_validate(self) -> None:
        self._compare_with_checkpoint(self.config_init[self.subcommand].get("ckpt_path"))

    def before_test(self) -> None:
        self._compare_with_checkpoint(self.config_init[self.subcommand].get("ckpt_path"))

    def _compare_with_checkpoint(self, ckpt_path: str | None) -> None:
        """Refuse LoRA settings the checkpoint cannot be loaded with; warn once about every other difference."""
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return
        verify_checkpoint(ckpt_path)
        message = describe_differences(ckpt_path, check_resume_settings(
            self.model.hparams, checkpoint_hyperparameters(ckpt_path), ckpt_path))
        if message:
            rank_zero_warn(message)

    def _run_subcommand(self, subcommand: str) -> None:
        global _RUN_STARTED
        _RUN_STARTED = True  # from here on a ValueError is a failure of the run, not of the config (see main)
        self._locks: list[RunLock] = []
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:  # two runs started together must not share a version_N
                claim_log_version(logger)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_empty_log_dir(self.trainer)
            raise
        finally:
            for lock in self._locks:
                lock.release()


def resolve_last_checkpoint(trainer: L.Trainer) -> str | None:
    """What ``--ckpt_path last`` means for ``trainer``: the newest ``last*.ckpt`` (by modification time, as
    Lightning picks it) when one exists, None with a warning when no checkpoint exists yet.

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
        return max(found, key=os.path.getmtime)
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
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help shows the field docstrings of config.py
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


#: Errors whose message names the setting or file and the fix: ``prpo-fit`` prints the message as its first line
#: (``prpo-fit: error: ...``) instead of a traceback that ends with it, and exits with status 2. A ``ValueError``
#: or ``FileNotFoundError`` counts as one while the config is parsed and the classes are built (before the
#: subcommand runs); the named errors below count at any time.
NAMED_ERRORS: tuple[type[BaseException], ...] = ()


def _named_errors() -> tuple[type[BaseException], ...]:
    from prpo_lightning.runtime.checkpoint import CheckpointDamagedError
    from prpo_lightning.data import DataFileError
    from prpo_lightning.runtime.prompt_ids import DuplicatePromptIdError
    from prpo_lightning.runtime.resume_check import ResumeSettingsError
    from prpo_lightning.runtime.run_lock import CheckpointFolderLockedError

    return NAMED_ERRORS + (CheckpointDamagedError, CheckpointFolderLockedError, DataFileError, DuplicatePromptIdError,
                           ResumeSettingsError)


def main() -> None:
    """Console-script entry point ``prpo-fit``: runs the CLI and exits with status 0 on success.

    A configuration or input error (see :data:`NAMED_ERRORS`) prints ``prpo-fit: error: <message>`` first and exits
    with status 2; set ``PRPO_TRACEBACK=1`` to see its traceback too. A run stopped by SIGTERM or SIGUSR1 saves
    ``last.ckpt`` (:class:`~prpo_lightning.callbacks.preemption.PreemptionCheckpoint`) and exits with status 143, so
    a scheduler knows the job did not finish. Any other exception keeps its traceback.
    """
    import sys
    import traceback

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        cli_main()
    except SIGTERMException:
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a named configuration/input error
        config_phase = not _RUN_STARTED and isinstance(err, (ValueError, FileNotFoundError))
        if not (config_phase or isinstance(err, _named_errors())):
            raise
        sys.stderr.write(f"prpo-fit: error: {err}\n")
        if os.environ.get("PRPO_TRACEBACK") == "1":
            traceback.print_exc()
        else:
            sys.stderr.write(f"({type(err).__name__}; set PRPO_TRACEBACK=1 for the traceback)\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
