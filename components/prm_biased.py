"""Biased PRM: a wrapper that distorts a base PRM's step scores in controlled, seeded ways (Hypothesis 1)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.scoring.needs import ComponentNeeds
from prpo_lightning.scoring.prm import ProcessRewardModel, ProcessScores

__all__ = ["BiasedPRM"]


class BiasedPRM(ProcessRewardModel):
    """Wraps any :class:`ProcessRewardModel` and biases its step scores, to test Hypothesis 1 of the PRPO paper.

    With ``s_{i,j}`` the base score of step j of row i, ``(a_j, e_j)`` its token span, ``n_j = e_j − a_j``,
    ``L_i`` the completion length (valid tokens), ``K_i`` the number of steps and ``n̄_i = L_i / K_i``:

    * ``short_step_bonus`` = c_s: ``+ clip(c_s·(1 − n_j/n̄_i), −c_s, c_s)`` (short steps preferred);
    * ``early_stop_bonus`` = c_e: the last step gets ``+ c_e·clip(1 − L_i/max_new_tokens, 0, 1)``;
    * ``late_step_penalty`` = c_l: steps that start at or after ``late_fraction·L_i`` (``a_j ≥ k·L_i``) get
      ``− c_l``;
    * ``noise_std`` = σ: ``+ σ·ξ_{i,j}``, ``ξ ~ N(0, 1)`` drawn from a generator seeded by
      (``seed``, prompt id, the completion's valid token ids), the j-th draw for step j. The noise is thus a
      fixed function of the input, the same for a row wherever it sits in the batch and at every training step
      (a fixed biased scorer, not fresh noise per call).

    The biased score is ``clip(s + biases, 0, 1)``, in float32; missing steps stay 0 with the base's mask.
    With every strength 0 the base's :class:`ProcessScores` is returned unchanged (exactly the base). The
    base's ``token_scores`` pass through unchanged. ``needs``,
    :meth:`setup` and :meth:`setup_tokenizer` are the base's.

    Args:
        base: the PRM to bias.
        noise_std: σ ≥ 0 of the Gaussian noise.
        short_step_bonus: c_s ≥ 0.
        early_stop_bonus: c_e ≥ 0 (needs ``max_new_tokens``).
        late_step_penalty: c_l ≥ 0.
        late_fraction: k ∈ [0, 1], where "late" starts as a fraction of the completion.
        max_new_tokens: the generation budget that ``early_stop_bonus`` is relative to.
        seed: seed of the noise.

    Raises:
        TypeError: ``base`` is not a :class:`ProcessRewardModel`.
        ValueError: a negative strength, ``late_fraction`` outside [0, 1], or ``early_stop_bonus > 0`` without a
            positive ``max_new_tokens``.
    """

    def __init__(
        self,
        base: ProcessRewardModel,
        noise_std: float = 0.0,
        short_step_bonus: float = 0.0,
        early_stop_bonus: float = 0.0,
        late_step_penalty: float = 0.0,
        late_fraction: float = 0.5,
        max_new_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(base, ProcessRewardModel):
            raise TypeError(f"BiasedPRM: base must be a ProcessRewardModel, got {type(base).__name__}")
        for name, val in (("noise_std", noise_std), ("short_step_bonus", short_step_bonus),
                          ("early_stop_bonus", early_stop_bonus), ("late_step_penalty", late_step_penalty)):
            if val < 0:
                raise ValueError(f"BiasedPRM: {name} must be >= 0, got {val}")
        if not 0.0 <= late_fraction <= 1.0:
            raise ValueError(f"BiasedPRM: late_fraction must be in [0, 1], got {late_fraction}")
        if early_stop_bonus > 0 and (max_new_tokens is None or max_new_tokens <= 0):
            raise ValueError("BiasedPRM: early_stop_bonus > 0 needs max_new_tokens > 0 (the sampling budget)")
        self.base = base
        self.noise_std = float(noise_std)
        self.short_step_bonus = float(short_step_bonus)
        self.early_stop_bonus = float(early_stop_bonus)
        self.late_step_penalty = float(late_step_penalty)
        self.late_fraction = float(late_fraction)
        self.max_new_tokens = max_new_tokens
        self.seed = int(seed)

    @property
    def needs(self) -> ComponentNeeds:  # type: ignore[override]
        """The base PRM's needs."""
        return self.base.needs

    def batch_metrics(self) -> dict[str, float]:
        """The base PRM's statistics of the last call."""
        return self.base.batch_metrics()

    def setup(self, device: torch.device) -> None:
        """The base's ``setup``."""
        self.base.setup(device)

    def setup_tokenizer(self, tokenizer: Any) -> None:
        """The base's ``setup_tokenizer``."""
        self.base.setup_tokenizer(tokenizer)

    @property
    def is_identity(self) -> bool:
        """Whether every strength is 0 (the wrapper returns the base's scores unchanged)."""
        return not (self.noise_std or self.short_step_bonus or self.early_stop_bonus or self.late_step_penalty)

    def noise_draws(self, group_id: int, completion_ids: list[int], n_steps: int) -> Tensor:
        """``(n_steps,)`` float64 standard normal draws keyed by (seed, prompt id, completion tokens)."""
        key = f"{self.seed}|{group_id}|{','.join(map(str, completion_ids))}".encode()
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
        return torch.randn(n_steps, generator=gen, dtype=torch.float64)

    @torch.no_grad()
    def score(self, batch: RolloutBatch, tokenizer: Any) -> ProcessScores:
        """Score with the base, then add the configured biases and clip to [0, 1].

        Raises:
            ValueError: the base's step scores do not have one row per completion, or a row has more segments
                than the base scored.
        """
        base = self.base.score(batch, tokenizer)
        if self.is_identity:
            return base
        scores, has = base.step_scores, base.step_mask.bool()  # (B, S)
        if scores.shape[0] != batch.size or len(batch.segment_spans) != batch.size:
            raise ValueError(f"BiasedPRM: base scores have {scores.shape[0]} rows and the batch "
                             f"{len(batch.segment_spans)} span rows, expected {batch.size}")
        bias = torch.zeros(scores.shape, dtype=torch.float64)  # (B, S)
        lengths = batch.completion_mask.sum(dim=1).tolist()  # B ints
        for i, spans in enumerate(batch.segment_spans):
            k = len(spans)
            if k == 0:
                continue
            if k > scores.shape[1] or not bool(has[i, :k].all()):
                raise ValueError(f"BiasedPRM: row {i} has {k} segments but the base scored "
                                 f"{int(has[i].sum())}; the base must score every segment")
            length = int(lengths[i])
            step_len = torch.tensor([e - a for a, e in spans], dtype=torch.float64)  # (K,)
            if self.short_step_bonus:
                rel = 1.0 - step_len / (length / k) if length > 0 else torch.zeros(k, dtype=torch.float64)
                c = self.short_step_bonus
                bias[i, :k] += (c * rel).clamp(-c, c)
            if self.early_stop_bonus:
                bias[i, k - 1] += self.early_stop_bonus * min(max(1.0 - length / self.max_new_tokens, 0.0), 1.0)
            if self.late_step_penalty:
                starts = torch.tensor([a for a, _ in spans], dtype=torch.float64)  # (K,)
                bias[i, :k] -= self.late_step_penalty * (starts >= self.late_fraction * length).to(torch.float64)
            if self.noise_std:
                ids = batch.completion_ids[i][batch.completion_mask[i].bool()].tolist()
                bias[i, :k] += self.noise_std * self.noise_draws(int(batch.group_ids[i]), ids, k)
        biased = (scores.to(torch.float64).cpu() + bias).clamp(0.0, 1.0)  # (B, S)
        biased = torch.where(has.cpu(), biased, torch.zeros_like(biased))
        return ProcessScores(step_scores=biased.to(device=scores.device, dtype=torch.float32), step_mask=base.step_mask,
                             token_scores=base.token_scores)
