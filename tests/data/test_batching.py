"""Token-budget batches: every example once, budget kept, deterministic per epoch."""

from __future__ import annotations

import random

import numpy as np
import torch

from seq2seq.data.batching import FlatIds, collate, collate_flat, encode_pairs, pad, token_batches
from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def _lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [(rng.randint(1, 40), rng.randint(1, 40)) for _ in range(n)]


def test_every_example_once_and_budget_kept():
    lengths = _lengths()
    batches = token_batches(lengths, max_tokens=300, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        cost = len(b) * max(max(lengths[i]) + 1 for i in b)
        assert cost <= 300 or len(b) == 1


def test_shuffle_is_deterministic_per_epoch_and_differs_between_epochs():
    lengths = _lengths()
    first = [b.tolist() for b in token_batches(lengths, max_tokens=300, seed=3, epoch=0)]
    again = token_batches(np.array(lengths, dtype=np.uint16), max_tokens=300, seed=3, epoch=0)
    assert first == [b.tolist() for b in again]
    other = token_batches(lengths, max_tokens=300, seed=3, epoch=1)
    assert first != [b.tolist() for b in other]
    other_seed = token_batches(lengths, max_tokens=300, seed=4, epoch=0)
    assert first != [b.tolist() for b in other_seed]


def _greedy_reference(lengths, max_tokens):
    """The packing rule written out one example at a time, in (target, source) order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i][1], lengths[i][0], i))
    batches, current, longest = [], [], 0
    for i in order:
        size = max(lengths[i]) + 1
        if current and (len(current) + 1) * max(longest, size) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    return [*batches, current] if current else batches


def test_batches_are_the_greedy_packing_of_the_sorted_examples():
    for seed, budget in ((0, 300), (1, 90), (2, 1000), (3, 41)):
        lengths = _lengths(700, seed=seed)
        got = [b.tolist() for b in token_batches(lengths, max_tokens=budget)]
        assert got == _greedy_reference(lengths, budget)


def test_a_pair_over_budget_gets_a_batch_of_its_own():
    lengths = [*_lengths(50), (400, 3), (5, 500), *_lengths(50, seed=1)]
    batches = token_batches(lengths, max_tokens=300, seed=0)
    assert [50] in [b.tolist() for b in batches]
    assert [51] in [b.tolist() for b in batches]
    assert token_batches(np.zeros((0, 2), np.int64), max_tokens=300, seed=0) == []


def test_bucketing_keeps_padding_low():
    lengths = _lengths(2000)
    batches = token_batches(lengths, max_tokens=1000, seed=0)
    real = sum(t for _, t in lengths)
    padded = sum(len(b) * max(lengths[i][1] for i in b) for b in batches)
    assert real / padded > 0.9


def test_collate_adds_bos_eos_and_pads():
    batch = collate([([5, 6, 7], [8, 9]), ([5], [8, 9, 10])])
    assert batch.src.tolist() == [[5, 6, 7], [5, PAD_ID, PAD_ID]]
    assert batch.src_lengths.tolist() == [3, 1]
    assert batch.tgt_in.tolist() == [[BOS_ID, 8, 9, PAD_ID], [BOS_ID, 8, 9, 10]]
    assert batch.tgt_out.tolist() == [[8, 9, EOS_ID, PAD_ID], [8, 9, 10, EOS_ID]]
    assert batch.n_tokens == 7


def test_collate_flat_pads_from_flat_arrays_like_collate():
    rng = random.Random(5)
    pairs = [
        (
            [rng.randint(4, 99) for _ in range(rng.randint(1, 9))],
            [rng.randint(4, 99)] * rng.randint(1, 7),
        )
        for _ in range(40)
    ]
    src = FlatIds.from_sequences([s for s, _ in pairs])
    tgt = FlatIds.from_sequences([t for _, t in pairs])
    narrow = FlatIds(src.ids.astype(np.uint16), src.offsets, src.lengths.astype(np.uint16))
    indices = np.array([7, 3, 39, 0, 12])
    chosen = [pairs[i] for i in indices]
    want_src, want_lengths = pad([s for s, _ in chosen])
    want_in, _ = pad([[BOS_ID, *t] for _, t in chosen])
    want_out, _ = pad([[*t, EOS_ID] for _, t in chosen])
    for flat in (src, narrow):
        batch = collate_flat(flat, tgt, indices)
        assert torch.equal(batch.src, want_src) and batch.src.dtype == torch.long
        assert torch.equal(batch.src_lengths, want_lengths)
        assert torch.equal(batch.tgt_in, want_in) and torch.equal(batch.tgt_out, want_out)


def test_pad_empty_list():
    out, lengths = pad([])
    assert out.shape == (0, 0) and lengths.shape == (0,)
    assert torch.equal(pad([[1]])[0], torch.tensor([[1]]))


def test_length_filters(tokenizer):
    src = ["one two three", "four", "x " * 50]
    tgt = ["eins zwei drei", "vier fünf sechs sieben acht neun zehn elf zwölf", "y"]
    kept = encode_pairs(src, tgt, tokenizer, max_length=20, max_ratio=3.0)
    assert len(kept) == 1
    assert encode_pairs(src, tgt, tokenizer) == list(
        zip(tokenizer.encode_src(src), tokenizer.encode_tgt(tgt), strict=True)
    )
