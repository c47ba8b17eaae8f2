"""Dynamic sampling (DAPO): drop prompt groups without learning signal and refill the batch with extra prompts.

Set with ``model.sampling.dynamic_sampling: {enabled, max_rounds, criterion}`` (peers: verl
``algorithm.filter_groups``, OpenRLHF ``--algo.dynamic_filtering_enable``). One training step then runs

1. generate and score the loader's batch (as without dynamic sampling);
2. drop every group (keyed by prompt id) without signal: ``criterion: outcome`` drops a group whose outcome rewards
   (after reward shaping) are all equal; ``criterion: advantage`` drops a group only when every token advantage in
   it is exactly 0, so a process aligner's group with equal outcomes but varying step scores is kept;
3. while some rank is short of its loader batch size and fewer than ``max_rounds`` extra rounds ran: draw extra
   prompts from the datamodule (:meth:`~prpo_lightning.data.PromptDataModule.extra_prompts`, seeded by
   ``(seed, global_step, round, rank)`` and excluding the prompts already drawn this step), generate, score and
   filter them, and keep groups with signal in draw order up to the missing number (the rest is surplus);
4. update on the concatenation of the kept groups. When the rounds run out, the step trains on what was kept.

Every rank runs the same number of rounds (the largest need is all-reduced), and each fills its own share, so
the global batch is the configured one. Everything is keyed by the seed, the step, the round and the rank, so a
resumed run draws and generates exactly what an uninterrupted one does. Each round is scored on its own, so an
aligner's statistics over the whole batch (not over a group) are per round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.batch import Round, RolloutBatch, StepContext
from prpo_lightning.config import DynamicSamplingConfig
from prpo_lightning.runtime.distributed import all_reduce_max, all_reduce_sum, group_seed, is_distributed
from prpo_lightning.scoring.grouping import group_extrema, group_sum

CRITERIA = ("outcome", "advantage")
_LEFT_PADDED = ("prompt_ids", "prompt_mask")
_SUMMED = ("data/skipped_long_prompts",)  # and every phase time (time/*) and token count (perf/*)


def _summed(key: str) -> bool:
    """Whether a round metric adds up over rounds (counts, phase times) instead of being round 0's."""
    return key in _SUMMED or key.startswith(("time/", "perf/"))


def signal_mask(batch: RolloutBatch, criterion: str) -> Tensor:
    """``(B,)`` bool: True on the rows of groups (by prompt id) that carry learning signal.

    Args:
        batch: a scored batch (``outcome_rewards`` for ``outcome``, ``advantages`` for ``advantage``).
        criterion: ``outcome`` (signal: the group's rewards are not all equal) or ``advantage`` (signal: some token
            advantage of the group is not exactly 0).

    Raises:
        ValueError: for an unknown criterion or a batch that was not scored.
    """
    if criterion == "outcome":
        if batch.outcome_rewards is None:
            raise ValueError("dynamic sampling (criterion 'outcome') needs a graded batch (outcome_rewards)")
        lo, hi = group_extrema(batch.outcome_rewards.double(), batch.group_ids)  # (B,), (B,)
        return hi != lo
    if criterion == "advantage":
        if batch.advantages is None:
            raise ValueError("dynamic sampling (criterion 'advantage') needs a scored batch (advantages)")
        nonzero = ((batch.advantages != 0) & batch.completion_mask).any(dim=1)  # (B,)
        return group_sum(nonzero.double(), batch.group_ids) > 0  # (B,)
    raise ValueError(f"dynamic sampling criterion must be one of {CRITERIA}, got {criterion!r}")


def ordered_group_ids(group_ids: Tensor) -> list[int]:
    """The distinct prompt ids of ``group_ids`` ``(B,)`` in order of first appearance."""
    return list(dict.fromkeys(int(i) for i in group_ids.tolist()))


def draw_seed(seed: int, step: int, round_index: int, rank: int) -> int:
    """Seed of the extra-prompt draw of one rank in one round of one step."""
    return group_seed(group_seed(seed, step, round_index), rank, 0)


def empty_prompt_batch() -> dict[str, Any]:
    """A prompt batch without prompts (a rank that needs none still joins the round)."""
    return {"id": torch.zeros(0, dtype=torch.long), "problem": [], "answer": []}


def _pad_to(value: Tensor, width: int, left: bool, pad: float) -> Tensor:
    extra = width - value.shape[1]
    if extra == 0:
        return value
    filler = torch.full((value.shape[0], extra), pad, dtype=value.dtype)  # (b, extra)
    return torch.cat([filler, value] if left else [value, filler], dim=1)


def concat_rollouts(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Concatenate scored rollout batches row-wise.

    ``(b, P)`` prompt tensors are left-padded and ``(b, T)``/``(b, S)`` tensors right-padded to the widest batch
    (token ids with ``pad_id``, everything else with 0/False); per-row lists are concatenated; ``extras`` are merged.

    Raises:
        ValueError: if a field is set in some batches and None in others, a per-row list is missing in some, or two
            batches set the same ``extras`` key.
    """
    if len(batches) == 1:
        return batches[0]
    merged: dict[str, Any] = {}
    for f in fields(RolloutBatch):
        values = [getattr(b, f.name) for b in batches]
        if f.name == "extras":
            extras: dict[str, Any] = {}
            for value in values:
                clash = set(extras) & set(value)
                if clash:
                    raise ValueError(f"dynamic sampling cannot merge RolloutBatch.extras: rounds both set {sorted(clash)}")
                extras.update(value)
            merged[f.name] = extras
        elif all(v is None for v in values):
            merged[f.name] = None
        elif any(v is None for v in values):
            raise ValueError(f"dynamic sampling cannot concatenate rounds: RolloutBatch.{f.name} is set in some "
                             "rounds and None in others")
        elif isinstance(values[0], Tensor):
            if values[0].dim() == 1:
                merged[f.name] = torch.cat(values)
            else:
                width = max(v.shape[1] for v in values)
                pad = pad_id if f.name in ("prompt_ids", "completion_ids") else 0
                merged[f.name] = torch.cat([_pad_to(v, width, f.name in _LEFT_PADDED, pad) for v in values])
        else:
            if any(len(v) != b.size for v, b in zip(values, batches)) and any(len(v) for v in values):
                raise ValueError(f"dynamic sampling cannot concatenate rounds: RolloutBatch.{f.name} is filled in "
                                 "some rounds only")
            merged[f.name] = [item for v in values for item in v]
    return RolloutBatch(**merged)


def _ids_of_all_ranks(ids: list[int]) -> set[int]:
    """The prompt ids of every rank's loader batch (this rank's alone without DDP), so no rank draws them."""
    if not is_distributed():
        return {int(i) for i in ids}
    gathered: list[list[int] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, [int(i) for i in ids])
    return {i for part in gathered for i in (part or [])}


class _Filler:
    """The per-step state of the refill loop on one rank."""

    def __init__(self, cfg: DynamicSamplingConfig, batch: dict[str, Any], ctx: StepContext, seed: int) -> None:
        self.cfg, self.ctx, self.seed = cfg, ctx, seed
        self.target = len(batch["id"])  # groups this rank trains on (its loader batch size)
        self.seen = _ids_of_all_ranks(batch["id"].tolist())  # prompt ids any rank trains on this step
        self.kept: list[RolloutBatch] = []
        self.kept_groups = self.generated = self.dropped = self.surplus = 0
        self.consumed = self.target

    @property
    def need(self) -> int:
        return self.target - self.kept_groups

    def absorb(self, scored: RolloutBatch) -> None:
        """Drop the groups of ``scored`` without signal; keep the others in draw order up to the need."""
        signal = signal_mask(scored, self.cfg.criterion)  # (B,)
        ids = ordered_group_ids(scored.group_ids)
        with_signal = ordered_group_ids(scored.group_ids[signal])
        take = with_signal[: self.need]
        self.generated += len(ids)
        self.dropped += len(ids) - len(with_signal)
        self.surplus += len(with_signal) - len(take)
        self.kept_groups += len(take)
        if take:
            rows = torch.isin(scored.group_ids, torch.tensor(take, dtype=scored.group_ids.dtype))  # (B,)
            self.kept.append(scored.select(rows.nonzero().squeeze(1)))

    def draw_count(self) -> int:
        """Prompts to draw for a need: the need over the fraction of groups kept so far, at most the batch size."""
        if self.need <= 0:
            return 0
        if self.kept_groups == 0:
            return self.target
        return min(self.target, math.ceil(self.need * self.generated / self.kept_groups))

    def draw(self, count: int, round_index: int) -> dict[str, Any]:
        """``count`` extra prompts from the datamodule (an empty batch for 0).

        Raises:
            TypeError: the datamodule does not implement ``extra_prompts``.
            ValueError: it returned more prompts than asked, or prompts already drawn this step.
        """
        if count == 0:
            return empty_prompt_batch()
        ctx, datamodule = self.ctx, self.ctx.datamodule
        draw = getattr(datamodule, "extra_prompts", None)
        if draw is None:
            raise TypeError(f"model.sampling.dynamic_sampling needs extra prompts, and the datamodule "
                            f"{type(datamodule).__name__} has no method extra_prompts(count, seed, exclude_ids) "
                            "(taking shard=(rank, world_size) under DDP): "
                            "derive it from prpo_lightning.data.PromptDataModule or implement that method "
                            "(return a collated prompt batch), or turn dynamic sampling off")
        seed = draw_seed(self.seed, ctx.step, round_index, ctx.rank)
        shard = {"shard": (ctx.rank, ctx.world_size)} if ctx.world_size > 1 else {}  # disjoint draws across ranks
        extra = draw(count, seed, frozenset(self.seen), **shard)
        ids = [int(i) for i in extra["id"].tolist()]
        if len(ids) > count or len(set(ids)) != len(ids) or self.seen & set(ids):
            raise ValueError(f"{type(datamodule).__name__}.extra_prompts({count}, ...) returned prompt ids {ids}: "
                             f"it must return at most {count} distinct prompts, none of the excluded ids")
        self.seen.update(ids)
        self.consumed += len(ids)
        return extra


def fill_batch(
    first: Round, batch: dict[str, Any], cfg: DynamicSamplingConfig, ctx: StepContext, seed: int,
    collect_round: Callable[[dict[str, Any], int], Round], pad_id: int,
) -> tuple[RolloutBatch | None, str | None, bool, bool]:
    """Filter the scored loader batch and refill it with extra rounds (a collective call: every rank calls it).

    Args:
        first: the generated and scored loader batch of this step (round 0); its ``metrics`` receive
            ``dynamic_sampling/*`` (summed over ranks) and keep the scoring metrics of the first scored round.
        batch: the loader's prompt batch of this step.
        cfg: the dynamic sampling settings.
        ctx: the step (its ``datamodule`` draws the extra prompts).
        seed: the run seed (extra draws are seeded by ``(seed, step, round, rank)``).
        collect_round: generates and scores a prompt batch in a given round (the collector's
            :meth:`~prpo_lightning.rollout.collector.RolloutCollector.collect_round`).
        pad_id: the tokenizer's pad id (to concatenate the kept rounds).

    Returns:
        ``(rollout, prm_error, no_prompts, no_signal)``: the kept groups of this rank (None: none kept, or a skipped
        PRM failure); the PRM failure that made this rank skip its batch (``on_prm_error: skip``) or None; whether no
        prompt of any round fitted ``max_prompt_length`` on this rank; whether no rank kept a single group (the step
        then updates nothing; the same on every rank).
    """
    filler, metrics, prm_error = _Filler(cfg, batch, ctx, seed), first.metrics, first.prm_error
    fitted = first.fitted
    if first.rollout is not None:
        filler.absorb(first.rollout)
    rounds = 0
    while rounds < cfg.max_rounds:
        local_need = 0 if prm_error is not None else filler.need
        if all_reduce_max(local_need) == 0:
            break
        rounds += 1
        extra = filler.draw(filler.draw_count() if prm_error is None else 0, rounds)
        new = collect_round(extra, rounds)
        fitted = fitted or new.fitted
        if new.fitted:
            prm_error = new.prm_error
            if new.rollout is not None:
                filler.absorb(new.rollout)
        for key in [k for k in {**metrics, **new.metrics} if _summed(k)]:  # the other metrics are round 0's
            metrics[key] = metrics.get(key, 0.0) + new.metrics.pop(key, 0.0)
        for key, value in new.metrics.items():
            metrics.setdefault(key, value)
    if prm_error is not None:
        filler.kept = []
    kept = concat_rollouts(filler.kept, pad_id) if filler.kept else None
    rows = kept.size if kept is not None else 0
    totals = all_reduce_sum([filler.dropped, filler.surplus, filler.consumed, filler.kept_groups, float(rows),
                             float(filler.need > 0 and prm_error is None)])
    dropped, surplus, consumed, kept_groups, kept_rows, short_ranks = totals
    if short_ranks and ctx.rank == 0:
        logging.getLogger(__name__).warning(
            "step %d: dynamic sampling ran out of rounds (max_rounds=%d) with %d rank(s) short of their batch; "
            "training on the %d groups kept", ctx.step, cfg.max_rounds, int(short_ranks), int(kept_groups))
    metrics.update({
        "dynamic_sampling/rounds": float(rounds),
        "dynamic_sampling/groups_dropped": dropped,
        "dynamic_sampling/groups_surplus": surplus,
        "dynamic_sampling/groups_kept": kept_groups,
        "dynamic_sampling/prompts_consumed": consumed,
        "dynamic_sampling/batch_filled": float(short_ranks == 0),
    })
    no_prompts = kept is None and prm_error is None and not fitted
    return kept, prm_error, no_prompts, kept_rows == 0
