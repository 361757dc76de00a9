"""Token-budget batches: every example once, budget kept, deterministic per epoch."""

from __future__ import annotations

import random

import torch

from seq2seq.batching import collate, encode_pairs, pad, token_batches
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID


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
    first = token_batches(lengths, max_tokens=300, seed=3, epoch=0)
    assert first == token_batches(lengths, max_tokens=300, seed=3, epoch=0)
    assert first != token_batches(lengths, max_tokens=300, seed=3, epoch=1)


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
