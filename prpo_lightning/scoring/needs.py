"""What a scoring component needs from the framework: one frozen value per component, checked when it is declared.

The four scoring bases (:class:`~prpo_lightning.scoring.verifier.OutcomeVerifier`,
:class:`~prpo_lightning.scoring.segmenter.Segmenter`, :class:`~prpo_lightning.scoring.prm.ProcessRewardModel`,
:class:`~prpo_lightning.scoring.aligner.AdvantageAligner`) expose ``needs``, a :class:`ComponentNeeds`, as the rollout
engines expose :class:`~prpo_lightning.rollout.engine.EngineCapabilities`. The framework plans its forward passes
from them once (:func:`~prpo_lightning.training.plan.plan_passes`) and lets each component read only the inputs it
declared (:func:`~prpo_lightning.batch.declared_inputs_view`).

A component declares them as a class attribute::

    class MyPRM(ProcessRewardModel):
        needs = ComponentNeeds(reference_logprobs=True)

or, where they depend on constructor arguments, by assigning ``self.needs`` in ``__init__``. The boolean class
attributes used before (``requires_reference``, ``requires_rollout_logprobs``, ``requires_entropies``,
``uses_process_scores``, ``group_relative``) are still read once, when the class is created, and turned into
``needs``; any other ``requires_*``/``uses_*`` attribute, or a need the role cannot use, is refused with an error
naming the valid ones, so a misspelt need can no longer read as False.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class ComponentNeeds:
    """Inputs a scoring component reads beyond the sampled completions, and how its output may be used."""

    reference_logprobs: bool = False
    """Reads ``batch.ref_logprobs`` (and ``old_logprobs``): the framework keeps a frozen reference model."""
    rollout_logprobs: bool = False
    """Reads ``batch.old_logprobs``/``entropies``: a separate no-grad pass computes them even on-policy."""
    entropies: bool = False
    """A segmenter that reads ``batch.entropies`` (recorded while sampling, or by the trainer's pass)."""
    process_scores: bool = False
    """An aligner that reads PRM step scores: the framework segments and scores only when this is set."""
    group_relative: bool = False
    """An aligner whose advantages are relative to the prompt's group (a lone completion gets 0): G must be >= 2."""


#: The needs each role may declare.
ROLE_NEEDS: dict[str, tuple[str, ...]] = {
    "verifier": (),
    "segmenter": ("entropies",),
    "prm": ("reference_logprobs", "rollout_logprobs"),
    "aligner": ("reference_logprobs", "rollout_logprobs", "process_scores", "group_relative"),
}
#: The boolean class attributes of the earlier API and the need each one declares.
LEGACY_FLAGS: dict[str, str] = {
    "requires_reference": "reference_logprobs",
    "requires_rollout_logprobs": "rollout_logprobs",
    "requires_entropies": "entropies",
    "uses_process_scores": "process_scores",
    "group_relative": "group_relative",
}
_FLAG_LIKE = re.compile(r"^(requires|uses)_\w+$")
NEED_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ComponentNeeds))


def _check_role(needs: Any, role: str, owner: str) -> ComponentNeeds:
    if not isinstance(needs, ComponentNeeds):
        raise TypeError(f"{role} {owner}.needs is a {type(needs).__name__}: declare "
                        "needs = prpo_lightning.ComponentNeeds(...) with any of " + ", ".join(NEED_NAMES))
    allowed = ROLE_NEEDS[role]
    wrong = [name for name in NEED_NAMES if getattr(needs, name) and name not in allowed]
    if wrong:
        raise TypeError(f"{role} {owner} declares {wrong}, which a {role} cannot use; a {role} may declare "
                        f"{list(allowed) or 'no needs'}")
    return needs


def declare_needs(cls: type, role: str) -> None:
    """Turn the earlier boolean flags of a component class into its ``needs`` and check them (called by the bases'
    ``__init_subclass__``).

    Raises:
        TypeError: an unknown ``requires_*``/``uses_*`` attribute, a flag that is not a bool, a need the role cannot
            use, or ``needs`` that is not a :class:`ComponentNeeds`.
    """
    own = vars(cls)
    unknown = sorted(k for k in own if _FLAG_LIKE.match(k) and k not in LEGACY_FLAGS)
    if unknown:
        raise TypeError(f"{role} {cls.__name__} declares {unknown}, which the framework does not know: declare "
                        f"needs = prpo_lightning.ComponentNeeds(...) with any of {list(ROLE_NEEDS[role])}")
    legacy = {k: v for k, v in own.items() if k in LEGACY_FLAGS}
    for key, value in legacy.items():
        if not isinstance(value, bool):
            raise TypeError(f"{role} {cls.__name__}.{key} must be a bool, got {value!r}; better: declare "
                            f"needs = prpo_lightning.ComponentNeeds({LEGACY_FLAGS[key]}=...)")
    declared = own.get("needs")
    if isinstance(declared, property):  # computed per instance (e.g. a wrapper): checked by needs_of
        return
    base = declared if declared is not None else getattr(cls, "needs", ComponentNeeds())
    if legacy:
        base = replace(_check_role(base, role, cls.__name__), **{LEGACY_FLAGS[k]: v for k, v in legacy.items()})
    cls.needs = _check_role(base, role, cls.__name__)


def needs_of(component: Any, role: str) -> ComponentNeeds:
    """The checked needs of a component instance (None: a role left empty needs nothing).

    Raises:
        TypeError: the instance sets one of the earlier flags as an instance attribute (it would be ignored), or
            its ``needs`` is not a :class:`ComponentNeeds` the role can use.
    """
    if component is None:
        return ComponentNeeds()
    name = type(component).__name__
    legacy = sorted(k for k in getattr(component, "__dict__", {}) if k in LEGACY_FLAGS)
    if legacy:
        fix = ", ".join(f"{LEGACY_FLAGS[k]}=..." for k in legacy)
        raise TypeError(f"{role} {name} sets {legacy} on the instance; the framework reads needs: assign "
                        f"self.needs = prpo_lightning.ComponentNeeds({fix}) in __init__ instead")
    return _check_role(getattr(component, "needs", ComponentNeeds()), role, name)
