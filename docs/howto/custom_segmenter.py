"""How-to: write your own Segmenter (this file is included in the docs and executed by tests/test_docs_howto.py)."""

from __future__ import annotations

from typing import Any

from prpo_lightning import RolloutBatch, Segmenter
from prpo_lightning.batch import Span


# [segmenter-class]
class LineSegmenter(Segmenter):
    """One segment per line: a cut after every token whose text contains a newline.

    Args:
        max_segments: merge the tail into the last segment beyond this many segments (PRMs have a context
            limit, and very many tiny steps make process rewards noisy).
    """

    def __init__(self, max_segments: int = 16) -> None:
        if max_segments < 1:
            raise ValueError(f"max_segments must be >= 1, got {max_segments}")
        self.max_segments = max_segments

    def segment(self, batch: RolloutBatch, tokenizer: Any) -> list[list[Span]]:
        spans: list[list[Span]] = []
        for ids, length in zip(batch.completion_ids.tolist(), batch.lengths.tolist()):
            # the text of each of the L_i valid tokens (EOS included); decoding works for byte-level BPE too
            pieces = tokenizer.batch_decode([[i] for i in ids[:length]])
            cuts = [t + 1 for t, piece in enumerate(pieces[:-1]) if "\n" in piece]  # cut *after* a newline
            cuts = cuts[: self.max_segments - 1]
            bounds = [0, *cuts, length]
            spans.append([(s, e) for s, e in zip(bounds, bounds[1:])] if length else [])
        return spans
# [segmenter-class-end]


# [segmenter-usage]
def demo() -> list[list[Span]]:
    """Segment two hand-made completions (the demo's character tokenizer: one token per character)."""
    import torch

    from prpo_lightning.batch import check_spans_tile
    from prpo_lightning.demo.policy import build_tokenizer

    tok = build_tokenizer()
    texts = ["3 + 4 = 7\n7 * 5 = 35\n\\boxed{35}", "\\boxed{9}"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    batch = RolloutBatch(
        prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
        completion_ids=ids, completion_mask=mask, group_ids=torch.tensor([0, 0]),
        problems=["Start with 3, add 4, multiply by 5.", "What is 4 + 5?"], answers=["35", "9"],
    )
    spans = LineSegmenter().segment(batch, tok)
    for row, length in zip(spans, batch.lengths.tolist()):
        check_spans_tile(row, length)  # the contract: contiguous, non-empty, exactly [0, L_i)
    return spans


if __name__ == "__main__":
    print(demo())  # [[(0, 10), (10, 21), (21, 26)], [(0, 4)]]  (``\\boxed{`` is a single token)
# [segmenter-usage-end]
