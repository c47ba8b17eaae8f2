"""Fault policy for user components: every scoring call runs through :func:`guarded_call`.

A PRM failure can be skipped (``model.on_prm_error: skip``, counted under ``train/faults/prm_errors``); a verifier
that raises instead of returning a verdict is a bug and stops training. Per-sample verifier problems are reported
in the verdict (timeouts → UNPARSABLE, counted under ``verifier/timeouts``).

Programming errors in a component (:data:`PROGRAMMING_ERRORS`, or a return value of the wrong type) always stop
training with a :class:`ComponentError` naming the component, whatever ``on_prm_error`` says: skipping them would
silently train without the component.

What a skipped batch does to the step is decided in :mod:`prpo_lightning.training.outcome`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prpo_lightning.batch import ComponentContractError

T = TypeVar("T")

#: Exceptions that mean the component's code is wrong, not that a service is down: never skipped.
PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (TypeError, AttributeError, NameError, ImportError,
                                                       NotImplementedError)


class ComponentError(ComponentContractError):
    """A user component has a programming error or returned the wrong type; the message names the component,
    the rule it broke and the fix. Never skipped, whatever ``model.on_prm_error`` says. A
    :class:`~prpo_lightning.batch.ComponentContractError` (hence a ``TypeError``), so one ``except`` catches every
    broken component contract."""


class PRMError(RuntimeError):
    """A process reward model raised (or timed out) while scoring a batch; the message names the PRM."""


class VerifierError(RuntimeError):
    """An outcome verifier raised instead of returning a verdict; the message names the verifier.

    Verifiers report per-sample problems in the verdict (``timed_out`` → UNPARSABLE, counted under
    ``verifier/timeouts``; ``error`` → counted under ``verifier/errors``); an exception is a bug and stops training.
    """


def _programming_error(kind: str, component: Any, method: str, err: BaseException) -> ComponentError:
    name = type(component).__name__
    return ComponentError(
        f"{kind} {name}.{method} raised {type(err).__name__}: {err}. This is a programming error in the {kind} "
        f"({', '.join(e.__name__ for e in PROGRAMMING_ERRORS)} are never skipped, whatever model.on_prm_error "
        f"says); fix {name}.{method} (the traceback above points to the line)."
    )


def guarded_call(kind: str, component: Any, method: str, call: Callable[[], T], size: int) -> T:
    """Run one component call under the fault policy: a programming error becomes a :class:`ComponentError`, any
    other exception a :class:`PRMError` (``kind`` ``"PRM"``: skippable under ``on_prm_error: skip``) or a
    :class:`VerifierError` (any other kind: a bug, never skipped); each names the component and the method.

    Args:
        kind: ``"PRM"``, ``"verifier"``, ``"segmenter"`` or ``"aligner"`` (for the message and the error type).
        component: the component (its class name is reported).
        method: the method being called (for the message).
        call: the call itself.
        size: completions in the call (for the message).
    """
    name = type(component).__name__
    try:
        return call()
    except PROGRAMMING_ERRORS as err:
        raise _programming_error(kind, component, method, err) from err
    except ComponentContractError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the component's name
        error = PRMError if kind == "PRM" else VerifierError
        raise error(f"{kind} {name} failed on {size} completions: {type(err).__name__}: {err}") from err
