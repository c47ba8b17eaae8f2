"""Shared test setup: offline hub, few threads, tests/ importable for helpers, and deprecated calls from project
code turned into test failures.

A ``DeprecationWarning`` or ``FutureWarning`` fails the test when the call that triggered it was made by the
project's own code (``prpo_lightning/``, ``components/``, ``benchmarks/``). The call site is found from the call
stack, not from the frame the warning is attributed to: transformers attributes its ``past_key_values`` warning to
``torch.nn.Module.__call__`` and its ``gradient_checkpointing_enable`` warning to its own ``modeling_utils.py``.
Walking out from the code that issued the warning, frames of that same package and pure call plumbing
(``torch.nn.Module.__call__``, ``functools``/``contextlib`` wrappers, ``importlib``) are skipped; the first other
frame is the caller. If it lies in the project, the warning is raised at the call site as an error (and, should a
library swallow that error, the test phase fails afterwards). Deprecations that a third-party library triggers in
another third-party library stay warnings in pytest's summary. ``pytest.warns`` still records warnings normally, so
tests of the project's own deprecation messages keep working.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
PROJECT_DIRS = tuple(str(REPO / name) + os.sep for name in ("prpo_lightning", "components", "benchmarks"))
GUARDED_CATEGORIES = (DeprecationWarning, FutureWarning)
_PLUMBING_PACKAGES = frozenset({"warnings", "functools", "contextlib", "importlib"})
_PLUMBING_MODULES = frozenset({"torch.nn.modules.module", "torch.utils._contextlib"})


def _package(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", "")).split(".")[0]


@functools.lru_cache(maxsize=4096)
def _is_project_file(filename: str) -> bool:
    return os.path.realpath(filename).startswith(PROJECT_DIRS)


def _is_project(frame: FrameType) -> bool:
    return _is_project_file(frame.f_code.co_filename)


def project_call_site(warn_frame: FrameType | None) -> FrameType | None:
    """The project frame that made the call a warning comes from, or None when the caller is not project code.

    Args:
        warn_frame: the innermost frame of the code that issued the warning (for a warning issued from C, the
            Python frame that called the C function).

    Returns:
        ``warn_frame`` itself when it lies in the project; else, walking outwards, the first frame that is
        neither in ``warn_frame``'s top-level package nor call plumbing, if that frame lies in the project.
    """
    if warn_frame is None:
        return None
    if _is_project(warn_frame):
        return warn_frame
    issuer = _package(warn_frame)
    frame = warn_frame.f_back
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if _package(frame) == issuer or _package(frame) in _PLUMBING_PACKAGES or module in _PLUMBING_MODULES:
            frame = frame.f_back
            continue
        return frame if _is_project(frame) else None
    return None


def _issuing_frame() -> FrameType | None:
    """The frame that issued the warning (called from ``showwarning``).

    Walking outwards, every frame up to the ``warnings`` module is a ``showwarning`` wrapper (this file's, or
    one a program installed, such as the CLI's show-once filter) and is skipped; so are the ``warnings`` frames.
    The next frame is the one that called ``warnings.warn``.
    """
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") != "warnings":
        frame = frame.f_back
    while frame is not None and frame.f_globals.get("__name__") == "warnings":
        frame = frame.f_back
    return frame


@contextlib.contextmanager
def deprecated_calls_from_project_code_fail() -> Iterator[list[str]]:
    """Within the block, a guarded warning whose call site is project code raises at that call site, and the block
    raises ``pytest.fail`` at its end if one was issued and the error was swallowed.

    It wraps ``warnings.showwarning``, so it sees every warning that the active filters let through.
    """
    found: list[str] = []
    previous = warnings.showwarning

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                    line: str | None = None) -> None:
        __tracebackhide__ = True  # the traceback ends at the deprecated call, not here
        if issubclass(category, GUARDED_CATEGORIES):
            site = project_call_site(_issuing_frame())
            if site is not None:
                where = f"{os.path.relpath(os.path.realpath(site.f_code.co_filename), REPO)}:{site.f_lineno}"
                text = (f"deprecated call in project code at {where}: {message} (replace the call; "
                        "prpo_lightning/compat.py holds the names that differ between transformers versions)")
                found.append(text)
                raise category(text)
        previous(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    try:
        yield found
    finally:
        warnings.showwarning = previous
    if found:
        pytest.fail("\n".join(found), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with deprecated_calls_from_project_code_fail():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with deprecated_calls_from_project_code_fail():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with deprecated_calls_from_project_code_fail():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[None]:
    with deprecated_calls_from_project_code_fail():
        return (yield)
