"""Which forward passes a run makes, and why: one pure decision from the components' needs, taken once at setup.

:func:`plan_passes` turns the scoring components' :class:`~prpo_lightning.scoring.needs.ComponentNeeds`, the rollout
engine's :class:`~prpo_lightning.rollout.engine.EngineCapabilities`, the loss and update settings and the strategy
into a :class:`PassPlan`. The module computes it when the model is configured, logs it once, and hands it to the
rollout collector and the policy updater, which only read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prpo_lightning.config import LossConfig, OptimConfig
from prpo_lightning.rollout.engine import EngineCapabilities
from prpo_lightning.scoring.needs import needs_of


@dataclass(frozen=True)
class RunNeeds:
    """The needs of a run's scoring components taken together (see :func:`combine_needs`).

    Attributes:
        reference_logprobs: the aligner or the PRM reads reference log-probs.
        reads_logprobs: the aligner or the PRM reads old log-probs/entropies before the update.
        segmenter_entropies: the aligner scores steps and its segmenter reads entropies.
        process_scores: the aligner reads PRM step scores (segment and score each batch).
        group_relative: the aligner's advantages are relative to the prompt's group.
    """

    reference_logprobs: bool = False
    reads_logprobs: bool = False
    segmenter_entropies: bool = False
    process_scores: bool = False
    group_relative: bool = False


def combine_needs(verifier: Any, aligner: Any, segmenter: Any | None, prm: Any | None) -> RunNeeds:
    """Check every component's needs (:func:`~prpo_lightning.scoring.needs.needs_of`) and combine them.

    The PRM's needs count whenever a PRM is configured; the segmenter's only when the aligner scores steps.
    """
    needs_of(verifier, "verifier")
    a, s, p = needs_of(aligner, "aligner"), needs_of(segmenter, "segmenter"), needs_of(prm, "prm")
    return RunNeeds(
        reference_logprobs=a.reference_logprobs or p.reference_logprobs,
        reads_logprobs=any(n.reference_logprobs or n.rollout_logprobs for n in (a, p)),
        segmenter_entropies=a.process_scores and s.entropies,
        process_scores=a.process_scores,
        group_relative=a.group_relative,
    )


def needs_reference_model(needs: RunNeeds, loss: LossConfig) -> bool:
    """A frozen reference model is kept only when the KL coefficient is > 0 or a component reads reference log-probs."""
    return loss.kl_coef > 0 or needs.reference_logprobs


@dataclass(frozen=True)
class PassPlan:
    """The forward passes of every training step (besides sampling and the update's own pass).

    Attributes:
        reference: a frozen reference model computes ``ref_logprobs`` after sampling.
        old_logprobs: a separate no-grad pass computes ``old_logprobs`` and entropies after sampling. Without it the
            update is on-policy and its own forward pass gives ``log π_old = log π_θ.detach()``.
        generation_entropies: entropies are recorded while sampling (the segmenter needs them, no pass computes them).
        sampler_check: the engine's own log-probs are checked against ``old_logprobs`` and the loss is
            importance-weighted (:mod:`prpo_lightning.rollout.offpolicy`).
        share_prompt_prefix: log-prob passes compute each distinct prompt once per micro-batch.
        lockstep: ranks must make equal numbers of policy forward calls (ZeRO-3 with several ranks).
        reasons: one line per decision, for the log.
        micro_batch_tokens: the token budget of the log-prob passes' micro-batches (``optim.micro_batch_tokens``), or
            None (``micro_batch_size`` rows).
        packing: the log-prob passes are padding-free (``optim.packing``).
    """

    reference: bool
    old_logprobs: bool
    generation_entropies: bool
    sampler_check: bool
    share_prompt_prefix: bool
    lockstep: bool
    reasons: tuple[str, ...]
    micro_batch_tokens: int | None = None
    packing: bool = False

    def describe(self) -> str:
        """A one-paragraph summary for the log."""
        return "[prpo] forward passes per step: " + "; ".join(self.reasons)


def plan_passes(
    needs: RunNeeds,
    engine: EngineCapabilities,
    loss: LossConfig,
    optim: OptimConfig,
    gradient_checkpointing: bool = False,
    lockstep: bool = False,
    asynchronous: bool = False,
) -> PassPlan:
    """Decide the passes of a step (pure: the same inputs always give the same plan).

    Args:
        needs: the components' combined needs (:func:`combine_needs`).
        engine: the rollout engine's capabilities.
        loss: the loss settings (``kl_coef``).
        optim: the update structure (``ppo_epochs``, ``mini_batch_size``, ``share_prompt_prefix``).
        gradient_checkpointing: activation checkpointing is on (no KV cache: prompts cannot be shared).
        lockstep: DeepSpeed ZeRO-3 with several ranks.
        asynchronous: ``model.async_rollout.enabled`` (every update is off-policy by ``max_staleness`` versions).

    Raises:
        ValueError: ``optim.micro_batch_tokens`` with ``loss.top_entropy_quantile < 1`` (its quantile is taken per
            micro-batch, so the token-budget grouping would change which tokens are kept).
    """
    if optim.micro_batch_tokens is not None and loss.top_entropy_quantile < 1.0:
        raise ValueError(
            f"model.optim.micro_batch_tokens={optim.micro_batch_tokens} cannot be combined with "
            f"model.loss.top_entropy_quantile={loss.top_entropy_quantile}: the entropy quantile is taken over each "
            "micro-batch's tokens, and token-budget micro-batches group the rows by length, so the kept tokens (and "
            "the gradient) would depend on the grouping; use model.optim.micro_batch_size (micro_batch_tokens: null) "
            "or top_entropy_quantile: 1")
    reasons = []
    reference = needs_reference_model(needs, loss)
    reasons.append("reference log-probs: " + ("yes (" + ("loss.kl_coef > 0" if loss.kl_coef > 0 else
                                                          "a component reads them") + ")" if reference else "no"))
    off_policy = optim.ppo_epochs > 1 or optim.mini_batch_size is not None
    engine_entropies_missing = needs.segmenter_entropies and not engine.entropies
    why = [w for w, on in (("off-policy update (ppo_epochs > 1 or mini_batch_size)", off_policy),
                           ("asynchronous rollouts (the update is off-policy)", asynchronous),
                           ("a component reads old log-probs", needs.reads_logprobs),
                           ("the engine is not exactly the trainer's distribution", not engine.exact_trainer_distribution),
                           ("the segmenter needs entropies the engine cannot record", engine_entropies_missing)) if on]
    old_logprobs = bool(why)
    reasons.append("old log-prob pass: " + ("yes (" + ", ".join(why) + ")" if why else
                                            "no (on-policy: the update's forward pass gives them)"))
    generation_entropies = needs.segmenter_entropies and not old_logprobs
    if needs.segmenter_entropies:
        reasons.append("entropies: " + ("recorded while sampling" if generation_entropies else "from the old log-prob "
                                                                                            "pass"))
    sampler_check = engine.sampler_logprobs and old_logprobs
    if sampler_check:
        reasons.append("sampler-vs-trainer check and importance weights: yes (the engine returns its log-probs)")
    share = optim.share_prompt_prefix and not gradient_checkpointing and not lockstep
    reasons.append(f"shared prompt prefixes: {'yes' if share else 'no'}")
    if optim.micro_batch_tokens is not None:
        reasons.append(f"micro-batches: by a budget of {optim.micro_batch_tokens} tokens (rows sorted by length)")
    if optim.packing:
        reasons.append("padding-free packed passes: yes")
    return PassPlan(reference, old_logprobs, generation_entropies, sampler_check, share, lockstep, tuple(reasons),
                    optim.micro_batch_tokens, optim.packing)


__all__ = ["PassPlan", "RunNeeds", "combine_needs", "needs_reference_model", "plan_passes"]
