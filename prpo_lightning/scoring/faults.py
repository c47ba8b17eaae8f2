"""The errors of the fault policy for user components (every scoring call runs through
:func:`~prpo_lightning.scoring.pipeline.guarded_call`).

A PRM failure can be skipped (``model.on_prm_error: skip``, counted under ``train/faults/prm_errors``); a verifier
that raises instead of returning a verdict is a bug and stops training. Per-sample verifier problems are reported
in the verdict (timeouts → UNPARSABLE, counted under ``verifier/timeouts``).

Programming errors in a component (:data:`PROGRAMMING_ERRORS`, or a return value of the wrong type) always stop
training with a :class:`ComponentError` naming the component, whatever ``on_prm_error`` says: skipping them would
silently train without the component.

What a skipped batch does to the step is decided in :mod:`prpo_lightning.training.outcome`.
"""

from __future__ import annotations

from prpo_lightning.batch import ComponentContractError

#: Exceptions that mean the component's code is wrong, not that a service is down: never skipped.
PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (TypeError, AttributeError, NameError, ImportError,
                                                       NotImplementedError)


class ComponentError(ComponentContractError):
    """A user component has a programming error or returned the wrong type; the message names the component,
    the rule it broke and the fix. Never skipped, whatever ``model.on_prm_error`` says. A
    :class:`~prpo_lightning.batch.ComponentContractError` (hence a ``TypeError``), so one ``except`` catches every
    broken component contract."""


class ComponentTimeoutError(RuntimeError):
    """A component call did not return within ``model.component_timeout_s``; the message names the call, the
    limit and the setting. Raised inside the call's guard, so it follows the component's error policy: a PRM's
    becomes a :class:`PRMError` (skipped under ``on_prm_error: skip``), a verifier's a :class:`VerifierError`.

    Attributes:
        what: the call (``"PRM MyPRM.score on 16 completions"``).
        seconds: the limit.
        setting: the key that sets it.
    """

    def __init__(self, message: str, what: str = "", seconds: float = 0.0, setting: str = "") -> None:
        super().__init__(message)
        self.what, self.seconds, self.setting = what, seconds, setting


class PRMError(RuntimeError):
    """A process reward model raised (or timed out) while scoring a batch; the message names the PRM."""


class VerifierError(RuntimeError):
    """An outcome verifier raised instead of returning a verdict; the message names the verifier.

    Verifiers report per-sample problems in the verdict (``timed_out`` → UNPARSABLE, counted under
    ``verifier/timeouts``; ``error`` → counted under ``verifier/errors``); an exception is a bug and stops training.
    """
