"""Prompt ids are group ids: two prompts with one id in a batch would have their completions pooled."""

from __future__ import annotations

from typing import Any

import torch


class DuplicatePromptIdError(ValueError):
    """A batch holds two prompts with one id: their completions would be pooled into one group."""


def check_unique_ids(batch: dict[str, Any], where: str) -> None:
    """Refuse a prompt batch whose ``id`` holds a value twice (ids are the group ids of the G completions).

    Args:
        batch: a prompt batch (``batch["id"]``: tensor or sequence of ints).
        where: what the batch is, for the message (e.g. ``"training batch 3 of MyDataModule"``).

    Raises:
        DuplicatePromptIdError: naming the repeated ids, their counts and ``where``.
    """
    ids = batch.get("id") if isinstance(batch, dict) else None
    if ids is None:
        return
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    seen: dict[Any, int] = {}
    for v in values:
        seen[v] = seen.get(v, 0) + 1
    repeated = {v: n for v, n in seen.items() if n > 1}
    if repeated:
        problems = batch.get("problem")
        shown = ", ".join(f"id {v} x{n}" for v, n in list(repeated.items())[:5])
        example = ""
        if isinstance(problems, (list, tuple)) and len(problems) == len(values):
            first = next(iter(repeated))
            texts = [str(problems[i])[:60] for i, v in enumerate(values) if v == first][:2]
            example = f" (id {first}: {texts})"
        raise DuplicatePromptIdError(
            f"{where}: prompt ids repeat within one batch ({shown}){example}. The completions of prompts that share "
            "an id are pooled into one group, which mixes their rewards and advantages. Fix: give every row of the "
            "data module a unique 'id'."
        )
