"""Several outcome verifiers as one: rewards summed with weights (``model.verifier`` as a list, ``model.reward_weights``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict


def _component_key(verifier: OutcomeVerifier) -> str:
    """A verifier's name in the metrics: its ``reward_name`` (a reward function's name), else its class."""
    return getattr(verifier, "reward_name", None) or type(verifier).__name__


class WeightedVerifiers(OutcomeVerifier):
    """Several verifiers, their rewards summed with weights: ``reward_i = Σ_k w_k · reward_{k,i}``.

    The verdict's ``status``, ``extracted`` and ``timed_out`` are the **first** verifier's, so the first one
    gates ``accuracy`` and evaluation; ``error`` joins every verifier's errors, each prefixed with its name. Each
    verifier's own :meth:`batch_metrics` are kept, and the mean reward of each verifier is logged as
    ``reward/<name>/mean`` (``name``: the class, or the function of a :class:`CallableReward`; a repeated name
    gets ``_<position>``).

    Args:
        verifiers: one or more outcome verifiers.
        reward_weights: one finite weight per verifier (None: all 1.0, as TRL).

    Raises:
        ValueError: for an empty list, a non-verifier item, or ``reward_weights`` of the wrong length or with a
            non-finite weight.
    """

    def __init__(self, verifiers: Sequence[OutcomeVerifier], reward_weights: Sequence[float] | None = None) -> None:
        verifiers = list(verifiers)
        if not verifiers:
            raise ValueError("WeightedVerifiers: verifiers is empty; give at least one OutcomeVerifier")
        for k, verifier in enumerate(verifiers):
            if not isinstance(verifier, OutcomeVerifier):
                raise ValueError(f"WeightedVerifiers: verifiers[{k}] is a {type(verifier).__name__}, not a "
                                 "prpo_lightning.scoring.verifier.OutcomeVerifier")
        weights = [1.0] * len(verifiers) if reward_weights is None else list(reward_weights)
        if len(weights) != len(verifiers):
            raise ValueError(f"reward_weights has {len(weights)} weights for {len(verifiers)} verifiers: give one "
                             "weight per verifier, in the same order")
        for k, weight in enumerate(weights):
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
                raise ValueError(f"reward_weights[{k}] must be a finite number, got {weight!r}")
        self.verifiers = verifiers
        self.reward_weights = [float(w) for w in weights]
        keys = [_component_key(v) for v in verifiers]
        self.keys = [key if keys.count(key) == 1 else f"{key}_{k}" for k, key in enumerate(keys)]
        self._last_verdicts: list[list[Verdict]] | None = None  # per verifier, of the last graded batch

    def verify(self, completion: str, gold: str) -> Verdict:
        return self.verify_batch([completion], [gold], [{}])[0]

    def verify_batch(
        self, completions: Sequence[str], golds: Sequence[str], rows: Sequence[Mapping[str, Any]] | None = None
    ) -> list[Verdict]:
        return self._combine([v.verify_batch(completions, golds, rows) for v in self.verifiers], len(completions))

    def _combine(self, per_verifier: list[list[Verdict]], size: int) -> list[Verdict]:
        for key, verdicts in zip(self.keys, per_verifier):
            if not isinstance(verdicts, list) or len(verdicts) != size:
                raise ValueError(f"WeightedVerifiers: verifier {key} returned {len(verdicts)} verdicts for {size} "
                                 "completions")
        self._last_verdicts = per_verifier
        combined = []
        for i in range(size):
            first = per_verifier[0][i]
            reward = math.fsum(w * verdicts[i].reward for w, verdicts in zip(self.reward_weights, per_verifier))
            errors = [f"{key}: {verdicts[i].error}" for key, verdicts in zip(self.keys, per_verifier)
                      if verdicts[i].error is not None]
            combined.append(Verdict(status=first.status, reward=reward, extracted=first.extracted,
                                    timed_out=first.timed_out, error="; ".join(errors) or None))
        return combined

    def batch_metrics(self, completions: Sequence[str], verdicts: Sequence[Verdict]) -> dict[str, float]:
        """Every verifier's own metrics on its own verdicts of the last graded batch (on the combined ``verdicts``
        when that batch is not this one), plus ``reward/<name>/mean`` of each."""
        metrics: dict[str, float] = {}
        own = self._last_verdicts
        fresh = own is not None and all(len(v) == len(verdicts) for v in own)
        for k, verifier in enumerate(self.verifiers):
            metrics.update(verifier.batch_metrics(completions, own[k] if fresh else verdicts))
        if fresh:
            for key, mine in zip(self.keys, own):
                metrics[f"reward/{key}/mean"] = math.fsum(v.reward for v in mine) / max(len(mine), 1)
        return metrics

    def close(self) -> None:
        """Close every verifier that has a ``close`` (e.g. the math verifier's worker pool)."""
        for verifier in self.verifiers:
            if hasattr(verifier, "close"):
                verifier.close()

    def __repr__(self) -> str:
        return f"WeightedVerifiers(verifiers={self.verifiers!r}, reward_weights={self.reward_weights})"


def combine_verifiers(
    verifier: OutcomeVerifier | Sequence[OutcomeVerifier], reward_weights: Sequence[float] | None
) -> OutcomeVerifier:
    """``model.verifier`` (one verifier or a list) and ``model.reward_weights`` → the module's verifier: a lone
    verifier without weights is used as it is, anything else is combined into :class:`WeightedVerifiers`.

    Raises:
        ValueError: naming ``model.verifier``/``model.reward_weights`` for an empty list or mismatched lengths.
    """
    if not isinstance(verifier, (list, tuple)) and reward_weights is None:
        return verifier
    verifiers = list(verifier) if isinstance(verifier, (list, tuple)) else [verifier]
    if not verifiers:
        raise ValueError("model.verifier is an empty list: give one verifier or a list of them")
    if reward_weights is not None and len(reward_weights) != len(verifiers):
        raise ValueError(f"model.reward_weights has {len(reward_weights)} weights for {len(verifiers)} verifier(s) in "
                         "model.verifier: give one weight per verifier, in the same order")
    try:
        return WeightedVerifiers(verifiers, reward_weights)
    except ValueError as err:
        raise ValueError(f"model.verifier/model.reward_weights: {err}") from err
