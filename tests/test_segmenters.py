"""Segmenters: prpo_spec.md §9 cases S1–S6 (both modes), delimiter mapping, fixed length, tiling property."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.segmenters import (
    DelimiterSegmenter,
    EntropySpikeSegmenter,
    FixedLengthSegmenter,
    cuts_to_spans,
)
from prpo_lightning.batch import RolloutBatch, check_spans_tile

torch.set_num_threads(1)


def make_batch(lengths: list[int], entropies: torch.Tensor | None = None, ids: torch.Tensor | None = None):
    b = len(lengths)
    if ids is not None:
        t = ids.shape[1]
    elif entropies is not None:
        t = entropies.shape[1]
    else:
        t = max([1, *lengths])
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return RolloutBatch(
        prompt_ids=torch.zeros(b, 1, dtype=torch.long),
        prompt_mask=torch.ones(b, 1, dtype=torch.long),
        completion_ids=torch.zeros(b, t, dtype=torch.long) if ids is None else ids,
        completion_mask=mask,
        group_ids=torch.zeros(b, dtype=torch.long),
        problems=["q"] * b,
        answers=["a"] * b,
        entropies=entropies,
    )


def spike_row(length: int, spikes: dict[int, float], t: int | None = None, base: float = 0.1) -> torch.Tensor:
    row = torch.full((t or length,), base)
    row[length:] = 0.0
    for p, v in spikes.items():
        row[p] = v
    return row


# (L, spikes, code spans, variant-B spans) from prpo_spec.md §9
CASES = {
    "S1": (
        40,
        {3: 2.0, 12: 2.5, 18: 1.2, 25: 3.0, 33: 1.5},
        [(0, 18), (18, 33), (33, 40)],
        [(0, 12), (12, 25), (25, 40)],
    ),
    "S2": (
        100,
        {0: 3.0, 5: 2.9, 30: 2.8, 60: 2.7, 90: 2.6},
        [(0, 30), (30, 60), (60, 100)],
        [(0, 30), (30, 60), (60, 90), (90, 100)],
    ),
    "S3": (
        80,
        {20: 1.0, 40: 2.0, 45: 3.0, 52: 1.5, 70: 2.5},
        [(0, 20), (20, 52), (52, 70), (70, 80)],
        [(0, 20), (20, 45), (45, 70), (70, 80)],
    ),
    "S4": (8, {2: 2.0, 5: 1.5}, [(0, 8)], [(0, 2), (2, 8)]),
    "S5": (5, {1: 2.0, 3: 1.5}, [(0, 5)], None),
    "S6": (
        30,
        {4: 5.0, 15: 4.0, 22: 3.0, 27: 2.0, 29: 1.0},
        [(0, 27), (27, 30)],
        [(0, 4), (4, 15), (15, 27), (27, 30)],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_entropy_spike_reference_mode_cases_s1_s6(case):
    length, spikes, code, _ = CASES[case]
    batch = make_batch([length], spike_row(length, spikes)[None])
    assert EntropySpikeSegmenter(k=5, min_gap=10, mode="reference").segment(batch, None) == [code]


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if CASES[c][3] is not None])
def test_entropy_spike_paper_mode_cases_s1_s6(case):
    length, spikes, _, variant_b = CASES[case]
    batch = make_batch([length], spike_row(length, spikes)[None])
    assert EntropySpikeSegmenter(k=5, min_gap=10, mode="paper").segment(batch, None) == [variant_b]


def test_entropy_spike_a1_rollout2_single_segment_and_batched_rows_with_padding():
    # A1 rollout #2: entropy 0.01·t, spike 10:2.0, L=12 -> top-5 {7..11} all within 10 -> one segment (code).
    t = 48
    row2 = torch.zeros(t)
    row2[:12] = 0.01 * torch.arange(12)
    row2[10] = 2.0
    rows = torch.stack([spike_row(40, CASES["S1"][1], t), row2, spike_row(30, CASES["S6"][1], t), torch.zeros(t)])
    batch = make_batch([40, 12, 30, 0], rows)
    ref = EntropySpikeSegmenter(mode="reference").segment(batch, None)
    assert ref == [CASES["S1"][2], [(0, 12)], CASES["S6"][2], []]
    # padding entropy never creates a cut: huge values beyond L are ignored
    rows2 = rows.clone()
    rows2[1, 12:] = 100.0
    assert EntropySpikeSegmenter(mode="reference").segment(make_batch([40, 12, 30, 0], rows2), None) == ref


def test_entropy_spike_requires_entropies_and_validates_args():
    with pytest.raises(ValueError):
        EntropySpikeSegmenter().segment(make_batch([3]), None)
    with pytest.raises(ValueError):
        EntropySpikeSegmenter(mode="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EntropySpikeSegmenter(min_gap=0)


def test_paper_mode_spikes_are_min_gap_apart_and_at_most_k_plus_one_segments():
    g = torch.Generator().manual_seed(0)
    ent = torch.rand(16, 200, generator=g)
    lengths = torch.randint(0, 201, (16,), generator=g).tolist()
    spans = EntropySpikeSegmenter(k=5, min_gap=10).segment(make_batch(lengths, ent), None)
    for row, length in zip(spans, lengths):
        check_spans_tile(row, length)
        cuts = [s for s, _ in row[1:]]
        assert len(row) <= 6
        assert all(b - a >= 10 for a, b in zip(cuts, cuts[1:]))


class CharTokenizer:
    """Minimal stand-in: one character per token (only ``batch_decode`` is needed)."""

    def __init__(self, text: str):
        self.text = text

    def batch_decode(self, seqs, **_):
        return [self.text[s[0]] for s in seqs]


def test_delimiter_segmenter_char_level_double_newline_and_step_markers():
    text = "ab\n\ncd\n\n\n\nef"
    ids = torch.arange(len(text))[None]
    batch = make_batch([len(text)], ids=ids)
    spans = DelimiterSegmenter().segment(batch, CharTokenizer(text))
    # "\n\n" belongs to the step it ends; the run of four newlines makes two cuts (8, 10), never an empty span
    assert spans == [[(0, 4), (4, 8), (8, 10), (10, 12)]]
    text2 = "Step 1: x=1 Step 2: y=2"
    batch2 = make_batch([len(text2)], ids=torch.arange(len(text2))[None])
    seg = DelimiterSegmenter(delimiters=[], markers=[r"Step \d+:"])
    assert seg.segment(batch2, CharTokenizer(text2)) == [[(0, 12), (12, 23)]]


def _tiny_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Step 1: 3 + 4 = 7\n\nStep 2: 7 * 2 = 14\n\nSo the answer is \\boxed{14}."] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def test_delimiter_segmenter_real_tokenizer_maps_chars_to_tokens():
    tok = _tiny_bpe_tokenizer()
    text = "Step 1: 3 + 4 = 7\n\nStep 2: 7 * 2 = 14\n\nSo the answer is \\boxed{14}."
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    batch = make_batch([len(ids)], ids=torch.tensor([ids + [tok.pad_token_id] * 3]))
    spans = DelimiterSegmenter().segment(batch, tok)[0]
    check_spans_tile(spans, len(ids))
    texts = [tok.decode(ids[s:e]) for s, e in spans]
    assert "".join(texts) == text + "<eos>"
    assert texts[0].endswith("\n\n") and texts[0].startswith("Step 1")
    assert texts[1].startswith("Step 2") and texts[1].endswith("\n\n")
    assert texts[2].startswith("So") and texts[2].endswith("<eos>")
    # markers start a step at the token holding the marker's first char
    spans_m = DelimiterSegmenter(delimiters=[], markers=[r"Step \d+:"]).segment(batch, tok)[0]
    texts_m = [tok.decode(ids[s:e]) for s, e in spans_m]
    assert len(texts_m) == 2 and texts_m[1].lstrip().startswith("Step 2")


class CountingTokenizer:
    """A tokenizer stand-in that maps token id t to ``text[t]`` and records every id it decodes."""

    def __init__(self, text: str):
        self.text = text
        self.decoded: list[int] = []

    def batch_decode(self, seqs, **_):
        self.decoded += [s[0] for s in seqs]
        return [self.text[s[0]] for s in seqs]


def test_delimiter_segmenter_decodes_each_token_once_per_tokenizer():
    """Item 7 of issue 12: per-token texts are cached after ``setup_tokenizer``, not decoded again every step."""
    text = "ab\n\ncd\n\nab"
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]])
    batch = make_batch([10], ids=ids)
    tok = CountingTokenizer(text)
    seg = DelimiterSegmenter()
    seg.setup_tokenizer(tok)
    first = seg.segment(batch, tok)
    assert first == [[(0, 4), (4, 8), (8, 10)]]
    assert sorted(tok.decoded) == list(range(8))  # each distinct id once, although 0 and 1 occur twice
    assert seg.segment(batch, tok) == first and len(tok.decoded) == 8  # the next step decodes nothing
    other = CountingTokenizer(text.upper())  # a different tokenizer is bound afresh, never served stale texts
    assert seg.segment(batch, other) == first and sorted(other.decoded) == list(range(8))


def test_fixed_length_segmenter():
    batch = make_batch([10, 3, 0, 8])
    assert FixedLengthSegmenter(segment_length=4).segment(batch, None) == [
        [(0, 4), (4, 8), (8, 10)],
        [(0, 3)],
        [],
        [(0, 4), (4, 8)],
    ]
    assert FixedLengthSegmenter(num_segments=3).segment(batch, None) == [
        [(0, 3), (3, 6), (6, 10)],
        [(0, 1), (1, 2), (2, 3)],
        [],
        [(0, 2), (2, 5), (5, 8)],
    ]


def test_cuts_to_spans_drops_out_of_range_and_duplicates():
    assert cuts_to_spans([0, 5, 5, 12, -1, 3], 10) == [(0, 3), (3, 5), (5, 10)]
    assert cuts_to_spans([1], 0) == []


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=5),
    k=st.integers(min_value=1, max_value=7),
    m=st.integers(min_value=1, max_value=15),
    mode=st.sampled_from(["paper", "reference"]),
    seg_len=st.integers(min_value=1, max_value=20),
    seed=st.integers(min_value=0, max_value=10_000),
    extra_pad=st.integers(min_value=0, max_value=5),
)
def test_property_every_segmenter_tiles_valid_tokens(lengths, k, m, mode, seg_len, seed, extra_pad):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths) + extra_pad
    ent = torch.rand(len(lengths), max(t, 1), generator=g)
    # repeated values exercise tie-breaking
    ent = torch.round(ent * 4) / 4
    batch = make_batch(lengths, ent, ids=torch.randint(0, 3, (len(lengths), max(t, 1)), generator=g))
    segs = [
        EntropySpikeSegmenter(k=k, min_gap=m, mode=mode).segment(batch, None),
        FixedLengthSegmenter(segment_length=seg_len).segment(batch, None),
        FixedLengthSegmenter(num_segments=seg_len).segment(batch, None),
        DelimiterSegmenter(markers=["b"]).segment(batch, CharTokenizer("a\nb")),
    ]
    for spans in segs:
        assert len(spans) == len(lengths)
        for i, (row, length) in enumerate(zip(spans, lengths)):
            check_spans_tile(row, length, row_index=i)
    batch.segment_spans = segs[0]
    assert batch.segment_ids().shape == (len(lengths), max(t, 1))
