"""From sampled completions to token advantages: verify → segment → PRM → align, with per-stage metrics.

Every completion is graded against ``batch.answers[i]``, its own sample's answer, and every group statistic
is taken by ``batch.group_ids`` (prompt id), so the result does not depend on row order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from prpo_lightning.aligner import AdvantageAligner
from prpo_lightning.batch import RolloutBatch, check_spans_tile
from prpo_lightning.grouping import group_index, zero_variance_fraction
from prpo_lightning.prm import ProcessRewardModel
from prpo_lightning.segmenter import Segmenter
from prpo_lightning.verifier import OutcomeVerifier, VerdictStatus


def grade(batch: RolloutBatch, verifier: OutcomeVerifier) -> dict[str, float]:
    """Fill ``batch.verdicts`` and ``batch.outcome_rewards`` ``(B,)``; return verifier metrics."""
    verdicts = verifier.verify_batch(batch.completions, batch.answers)
    if len(verdicts) != batch.size:
        raise RuntimeError(f"{type(verifier).__name__}.verify_batch returned {len(verdicts)} verdicts for {batch.size}")
    batch.verdicts = verdicts
    batch.outcome_rewards = torch.tensor([v.reward for v in verdicts], dtype=torch.float32)
    return {
        "verifier/unparsable": float(sum(v.status is VerdictStatus.UNPARSABLE for v in verdicts)),
        "verifier/timeouts": float(sum(v.timed_out for v in verdicts)),
        "verifier/errors": float(sum(v.error is not None for v in verdicts)),
    }


def segment_and_score(
    batch: RolloutBatch, segmenter: Segmenter, prm: ProcessRewardModel, tokenizer: Any
) -> dict[str, float]:
    """Fill ``segment_spans``, ``step_scores`` ``(B, S)``, ``step_mask`` ``(B, S)`` and ``token_scores``.

    Raises:
        ValueError: if a segmenter's spans do not tile a completion, or the PRM returns the wrong shape.
    """
    spans = segmenter.segment(batch, tokenizer)
    lengths = batch.lengths.tolist()
    if len(spans) != batch.size:
        raise ValueError(f"{type(segmenter).__name__} returned spans for {len(spans)} rows, expected {batch.size}")
    for i, row in enumerate(spans):
        check_spans_tile(row, int(lengths[i]), row_index=i)
    batch.segment_spans = spans
    scores = prm.score(batch, tokenizer)
    counts = torch.tensor([len(r) for r in spans], dtype=torch.float32)  # (B,)
    if scores.step_scores.shape[0] != batch.size:
        raise ValueError(f"{type(prm).__name__} scored {scores.step_scores.shape[0]} rows, expected {batch.size}")
    batch.step_scores = scores.step_scores.float().cpu()
    batch.step_mask = scores.step_mask.bool().cpu()
    batch.token_scores = None if scores.token_scores is None else scores.token_scores.float().cpu()
    valid = batch.step_scores[batch.step_mask]
    metrics = {
        "segments/per_completion": float(counts.mean()) if counts.numel() else 0.0,
        "segments/max": float(counts.max()) if counts.numel() else 0.0,
    }
    if valid.numel():
        metrics.update(
            {
                "prm/score_mean": float(valid.mean()),
                "prm/score_std": float(valid.std()) if valid.numel() > 1 else 0.0,
                "prm/score_min": float(valid.min()),
                "prm/score_max": float(valid.max()),
            }
        )
    return metrics


def compute_advantages(
    batch: RolloutBatch,
    verifier: OutcomeVerifier,
    aligner: AdvantageAligner,
    segmenter: Segmenter | None,
    prm: ProcessRewardModel | None,
    tokenizer: Any,
) -> dict[str, float]:
    """Run the whole scoring pipeline on ``batch`` (in place) and return its metrics.

    Raises:
        ValueError: if the aligner needs process scores but no segmenter/PRM is configured, or it returns
            advantages of the wrong shape or with NaN/inf.
    """
    metrics = grade(batch, verifier)
    if aligner.uses_process_scores:
        if segmenter is None or prm is None:
            raise ValueError(
                f"{type(aligner).__name__} uses process scores: configure model.segmenter and model.prm"
            )
        metrics.update(segment_and_score(batch, segmenter, prm, tokenizer))
    adv = aligner.align(batch)  # (B, T)
    if adv.shape != batch.completion_mask.shape:
        raise ValueError(f"{type(aligner).__name__} returned shape {tuple(adv.shape)}, expected {tuple(batch.completion_mask.shape)}")
    if not torch.isfinite(adv).all():
        raise ValueError(f"{type(aligner).__name__} produced NaN/inf advantages")
    batch.advantages = adv.float() * batch.completion_mask  # (B, T)
    metrics.update(rollout_metrics(batch))
    return metrics


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """TRL-style rollout statistics: reward, accuracy, zero-variance groups, lengths, entropy, advantages."""
    r = batch.outcome_rewards if batch.outcome_rewards is not None else torch.zeros(batch.size)
    mask = batch.completion_mask
    lengths = mask.sum(dim=1).float()  # (B,)
    n_tok = mask.sum().clamp(min=1)
    _, n_groups = group_index(batch.group_ids)
    out = {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
        "accuracy": float(sum(v.is_correct for v in batch.verdicts)) / max(batch.size, 1),
        "frac_zero_std_groups": zero_variance_fraction(r, batch.group_ids.cpu()),
        "num_groups": float(n_groups),
        "completion/length_mean": float(lengths.mean()),
        "completion/length_max": float(lengths.max()),
        "completion/length_min": float(lengths.min()),
        "completion/truncated_frac": float(batch.truncated.float().mean()) if batch.truncated is not None else 0.0,
        "completion/no_boxed_frac": sum("\\boxed" not in c for c in batch.completions) / max(batch.size, 1),
    }
    if batch.entropies is not None:
        out["entropy"] = float((batch.entropies * mask).sum() / n_tok)
    if batch.advantages is not None:
        adv: Tensor = batch.advantages[mask]
        out["advantage/mean"] = float(adv.mean()) if adv.numel() else 0.0
        out["advantage/std"] = float(adv.std()) if adv.numel() > 1 else 0.0
    return out
