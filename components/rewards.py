"""Reward composition: weighted lists of verifiers, plain Python reward functions and a ``\\boxed{}`` format reward.

* :class:`WeightedVerifiers` sums the rewards of several verifiers with ``reward_weights`` (TRL's
  ``reward_funcs`` + ``reward_weights``). ``model.verifier: [...]`` with ``model.reward_weights`` builds one.
  The verdict's **status comes from the first verifier** (it gates ``accuracy`` and the evaluation metrics);
  the reward is ``Σ_k w_k · reward_k``.
* :class:`CallableReward` wraps ``f(completion: str, answer: str, **row) -> float`` (or an ``async def``),
  imported by dotted path, as an :class:`~prpo_lightning.scoring.verifier.OutcomeVerifier`. ``row`` holds the row's
  other fields (:data:`~prpo_lightning.batch.ROW_FIELDS`: ``problem``, ``id``, ``truncated``, ``num_tokens``).
  ``workers: N`` calls rows in N threads; an async function's rows are awaited concurrently.
* :class:`BoxedFormatReward` rewards a completion that contains a complete ``\\boxed{...}`` answer.

Example (YAML)::

    model:
      verifier:
        - class_path: components.verifiers.SympyMathVerifier
        - class_path: components.verifiers.BoxedFormatReward
        - class_path: components.verifiers.CallableReward
          init_args: {function: my_pkg.rewards:brevity}
      reward_weights: [1.0, 0.1, 0.05]
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from components.math_answer.extract import extract_last_boxed
from prpo_lightning.scoring.deadline import parallel_map, run_coroutines
from prpo_lightning.scoring.combined import WeightedVerifiers, combine_verifiers
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus

__all__ = ["BoxedFormatReward", "CallableReward", "RewardFunctionError", "import_function"]
# WeightedVerifiers and combine_verifiers (prpo_lightning.scoring.combined) stay importable from here


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something that is not a finite number; the message names it."""


def import_function(path: str) -> Callable[..., Any]:
    """Import a callable by dotted path, ``"pkg.module:name"`` or ``"pkg.module.name"``.

    Raises:
        ValueError: when the module cannot be imported, has no such attribute, or the attribute is not callable.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"CallableReward: function must be 'package.module:name' (or 'package.module.name'), "
                         f"got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"CallableReward: cannot import module {module_name!r} of function {path!r}: {err}; "
                         "make it importable (installed, or on PYTHONPATH)") from err
    function = getattr(module, attr, None)
    if function is None or not callable(function):
        found = "nothing" if function is None else f"a {type(function).__name__}"
        raise ValueError(f"CallableReward: {module_name!r} has {found} named {attr!r}; function must name a "
                         "callable f(completion, answer, **row) -> float")
    return function


class CallableReward(OutcomeVerifier):
    """A plain reward function ``f(completion: str, answer: str, **row) -> float`` as an outcome verifier.

    ``row`` holds the row's other fields: ``problem``, ``id`` (prompt id), ``truncated`` and ``num_tokens``, so
    the function must accept them (``**row`` or ``**kwargs``). Called with ``row`` empty only through
    :meth:`verify_batch`, which has no rows. The verdict is ``CORRECT`` when the value is
    ``>= correct_threshold``, else ``INCORRECT`` (the status only matters when this is the first, or only,
    verifier: it gates ``accuracy``).

    Rows are called one at a time by default. A slow function (a remote judge, a sandbox) can run ``workers`` rows
    at once in daemon threads (:func:`~prpo_lightning.scoring.deadline.parallel_map`; it must be thread-safe); an
    ``async def`` function's rows are awaited concurrently (at most ``workers`` at a time; default: all). Either way
    the rewards come back in row order, the same numbers as one at a time. ``model.component_timeout_s`` bounds
    the whole batch.

    Args:
        function: dotted path of the function, ``"my_pkg.rewards:fn"`` (imported at construction).
        correct_threshold: values at or above it count as correct.
        workers: rows called at once (null: 1 for a plain function, all for an async one).

    Raises:
        ValueError: when the function cannot be imported (see :func:`import_function`), or ``workers`` < 1.
        RewardFunctionError: (from grading) when the function raises or returns something other than a finite
            real number; the message names the function and the row.
    """

    def __init__(self, function: str, correct_threshold: float = 1.0, workers: int | None = None) -> None:
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            raise ValueError(f"CallableReward: workers must be null or an integer >= 1; got {workers!r} (rows "
                             "of a batch called at once)")
        self.function_path = function
        self.correct_threshold = float(correct_threshold)
        self.workers = workers
        self._function = import_function(function)

    @property
    def name(self) -> str:
        """The function's name (its metric key)."""
        return self.function_path.replace(":", ".").rpartition(".")[2]

    @property
    def reward_name(self) -> str:
        """The key of this reward in ``reward/<name>/mean`` when combined with other verifiers."""
        return self.name

    def verify(self, completion: str, gold: str) -> Verdict:
        return self.verify_batch([completion], [gold], [{}])[0]

    def verify_batch(
        self, completions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]] | None = None
    ) -> list[Verdict]:
        """Call the function once per row (with the row's fields as keyword arguments), ``workers`` at a time.

        Raises:
            ValueError: if the sequences differ in length.
            RewardFunctionError: the function raised (``SystemExit`` included) or returned a non-number (NaN and
                ±inf included).
        """
        rows = [{}] * len(completions) if rows is None else rows
        if not len(completions) == len(golds) == len(rows):
            raise ValueError(f"CallableReward got {len(completions)} completions, {len(golds)} gold answers and "
                             f"{len(rows)} rows")
        if inspect.iscoroutinefunction(self._function):
            values = run_coroutines([functools.partial(self._function, c, g, **r)
                                     for c, g, r in zip(completions, golds, rows)], self.workers)
            return [self._verdict(i, None, r, v) if isinstance(v, BaseException) else self._verdict(i, v, r)
                    for i, (v, r) in enumerate(zip(values, rows))]
        return parallel_map(lambda i: self._one(i, completions[i], golds[i], rows[i]), len(completions),
                            self.workers or 1)

    def _one(self, index: int, completion: str, gold: str, row: Mapping[str, Any]) -> Verdict:
        try:
            value = self._function(completion, gold, **row)
        except BaseException as err:  # noqa: BLE001 - SystemExit and exceptions get the function's name
            return self._verdict(index, None, row, err)
        return self._verdict(index, value, row)

    def _verdict(self, index: int, value: Any, row: Mapping[str, Any], error: BaseException | None = None) -> Verdict:
        """The verdict of one row's value, or the named error for what the function raised."""
        try:
            if error is not None:
                raise error
        except SystemExit as err:  # sys.exit() / exit() in the function: it must not end the run without a word
            raise RewardFunctionError(f"reward function {self.function_path} called sys.exit({err.code!r}) on row "
                                      f"{index}; a reward function must return a float (raise an exception to stop "
                                      "training)") from err
        except Exception as err:  # noqa: BLE001 - re-raised with the function's name
            raise RewardFunctionError(f"reward function {self.function_path} raised {type(err).__name__} on row "
                                      f"{index}: {err}; it is called as f(completion, answer, "
                                      f"{', '.join(f'{k}=...' for k in row)}) and must return a float") from err
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise RewardFunctionError(f"reward function {self.function_path} returned {value!r} "
                                      f"({type(value).__name__}) on row {index}: it must return a finite float")
        reward = float(value)
        status = VerdictStatus.CORRECT if reward >= self.correct_threshold else VerdictStatus.INCORRECT
        return Verdict(status=status, reward=reward)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_function"] = None  # re-imported on unpickling (a lambda or closure would not pickle)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._function = import_function(self.function_path)

    def __repr__(self) -> str:
        return f"CallableReward(function={self.function_path!r}, correct_threshold={self.correct_threshold})"


class BoxedFormatReward(OutcomeVerifier):
    """Format reward: ``present_reward`` when the completion holds a complete ``\\boxed{...}``/``\\fbox{...}``
    (the math verifier's own extraction, :func:`~components.math_answer.extract.extract_last_boxed`), else
    ``missing_reward``. The gold answer is not read.

    The verdict is ``CORRECT`` (format present, ``extracted`` = the boxed content) or ``UNPARSABLE`` (missing):
    put it after the answer verifier in a list, unless ``accuracy`` should mean the format rate.

    Args:
        present_reward: reward with a boxed answer.
        missing_reward: reward without one.
    """

    def __init__(self, present_reward: float = 1.0, missing_reward: float = 0.0) -> None:
        for key, value in (("present_reward", present_reward), ("missing_reward", missing_reward)):
            if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise ValueError(f"BoxedFormatReward: {key} must be a finite number, got {value!r}")
        self.present_reward = float(present_reward)
        self.missing_reward = float(missing_reward)

    def verify(self, completion: str, gold: str) -> Verdict:
        boxed = extract_last_boxed(str(completion))
        if boxed is None:
            return Verdict(status=VerdictStatus.UNPARSABLE, reward=self.missing_reward)
        return Verdict(status=VerdictStatus.CORRECT, reward=self.present_reward, extracted=boxed[:1000])

    def __repr__(self) -> str:
        return f"BoxedFormatReward(present_reward={self.present_reward}, missing_reward={self.missing_reward})"
