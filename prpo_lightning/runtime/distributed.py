"""Small collective helpers and deterministic seeds for multi-process training.

Every helper is a no-op in a single process (no initialised ``torch.distributed`` group), so module code calls
them unconditionally.

How work is split across ranks (see ``docs/scaling.md``):

- each rank draws **distinct prompts** (:class:`~prpo_lightning.data.ResumableDistributedSampler`) and samples all
  G completions of each of its prompts locally, so a prompt's group never spans ranks and every group statistic
  (mean, std, leave-one-out baseline, …) is computed from the complete group on one rank;
- sampling is seeded per prompt group from ``(seed, global_step, prompt id)`` (:func:`group_seed`), so the
  completions of a prompt do not depend on which rank draws it or on how many ranks there are;
- loss normalisers (token and sequence counts) are summed over ranks before the backward pass, so the
  DDP-averaged gradient equals the single-process gradient of the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_MASK = (1 << 63) - 1


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Device for collective tensors: CUDA for NCCL, CPU otherwise (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64); identity in a single process."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_max(value: int) -> int:
    """Maximum of an integer over all ranks; identity in a single process."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_max_floats(values: list[float]) -> list[float]:
    """Element-wise maximum of ``values`` over all ranks (float64); identity in a single process.

    A collective call: every rank must call it with a list of the same length.
    """
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def group_seed(seed: int, step: int, group_id: int) -> int:
    """Sampling seed of one prompt group at one training step (a 63-bit mix of the three integers).

    It depends only on the run seed, the optimizer step at which the rollout starts and the prompt id, never
    on the rank, the world size or the prompt's position in the batch.
    """
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(group_id) * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK
    return x ^ (x >> 29)


def world_size() -> int:
    """Ranks of the active ``torch.distributed`` process group (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1
