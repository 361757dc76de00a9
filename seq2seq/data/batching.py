"""From token ids to padded tensor batches under a token budget.

Sentences are bucketed by length so batches carry little padding, batches are
capped by ``max_tokens`` (padded cells, the real cost on the hardware) rather
than by a sentence count, and the order is shuffled per epoch from
``(seed, epoch)`` alone, so a resumed run sees exactly the batches an
uninterrupted run would. Everything works on numpy arrays of lengths and flat
id arrays (memory-mapped for a large corpus): no Python object per sentence.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

logger = logging.getLogger(__name__)

Pair = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Batch:
    """A padded batch of sentence pairs (batch-first).

    Attributes:
        src: (B, S) source ids, padded.
        src_lengths: (B,) real source lengths.
        tgt_in: (B, T) decoder input: BOS + target, padded.
        tgt_out: (B, T) decoder output: target + EOS, padded.
    """

    src: Tensor
    src_lengths: Tensor
    tgt_in: Tensor
    tgt_out: Tensor

    @property
    def n_tokens(self) -> int:
        """Real target tokens (EOS included): the unit of loss and throughput."""
        return int((self.tgt_out != PAD_ID).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))


def pad(seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[Tensor, Tensor]:
    """Right-pad id lists into (B, max_len) and return their (B,) lengths."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out, lengths


@dataclass(frozen=True)
class FlatIds:
    """Sentences of one side stored back to back: sentence i is
    ``ids[offsets[i] : offsets[i] + lengths[i]]``.

    Attributes:
        ids: (total,) all ids (any integer dtype; a ``np.memmap`` for a token store).
        offsets: (N + 1,) start of each sentence, then the end.
        lengths: (N,) ids per sentence.
    """

    ids: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_sequences(cls, seqs: Sequence[Sequence[int]]) -> FlatIds:
        lengths = np.fromiter(map(len, seqs), np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, count=int(offsets[-1]))
        return cls(ids, offsets, lengths)

    def padded(self, indices: np.ndarray, *, shift: int = 0, extra: int = 0) -> np.ndarray:
        """(B, shift + max length + extra) int64 rows of PAD, sentence ``indices[b]``
        written from column ``shift`` of row b, gathered in one fancy index."""
        lengths = self.lengths[indices].astype(np.int64)
        width = int(lengths.max(initial=0))
        columns = np.arange(width)
        inside = columns < lengths[:, None]
        out = np.full((len(indices), shift + width + extra), PAD_ID, np.int64)
        positions = self.offsets[indices].astype(np.int64)[:, None] + columns
        out[:, shift : shift + width][inside] = self.ids[positions[inside]]
        return out


def collate_flat(src: FlatIds, tgt: FlatIds, indices: np.ndarray) -> Batch:
    """Pad the pairs ``indices`` of two flat id arrays into a Batch with BOS/EOS added."""
    indices = np.asarray(indices, dtype=np.int64)
    src_rows = src.padded(indices)
    tgt_in = tgt.padded(indices, shift=1)
    tgt_in[:, 0] = BOS_ID
    tgt_out = tgt.padded(indices, extra=1)
    tgt_out[np.arange(len(indices)), tgt.lengths[indices]] = EOS_ID
    return Batch(
        torch.from_numpy(src_rows),
        torch.from_numpy(src.lengths[indices].astype(np.int64)),
        torch.from_numpy(tgt_in),
        torch.from_numpy(tgt_out),
    )


def collate(pairs: Sequence[Pair]) -> Batch:
    """Pad a list of (source ids, target ids) into a Batch with BOS/EOS added."""
    src = FlatIds.from_sequences([s for s, _ in pairs])
    tgt = FlatIds.from_sequences([t for _, t in pairs])
    return collate_flat(src, tgt, np.arange(len(pairs)))


def encode_pairs(
    src_lines: Sequence[str],
    tgt_lines: Sequence[str],
    tokenizer: Tokenizer,
    *,
    max_length: int = 0,
    max_ratio: float = 0.0,
) -> list[Pair]:
    """Tokenise pairs and drop those outside the length and length-ratio filters.

    ``max_length`` bounds both sides in pieces and ``max_ratio`` the ratio of
    the longer side to the shorter; 0 disables a filter. Filters are for
    training only: evaluation data is never filtered.
    """
    src_ids = tokenizer.encode_src(src_lines)
    tgt_ids = tokenizer.encode_tgt(tgt_lines)
    n_src = np.fromiter(map(len, src_ids), np.int64, count=len(src_ids))
    n_tgt = np.fromiter(map(len, tgt_ids), np.int64, count=len(tgt_ids))
    keep = within_limits(n_src, n_tgt, max_length, max_ratio)
    kept = [(src_ids[i], tgt_ids[i]) for i in np.flatnonzero(keep)]
    if len(kept) < len(src_ids):
        logger.info(
            "length filters (max_length=%d, max_ratio=%g) dropped %d of %d pairs",
            max_length,
            max_ratio,
            len(src_ids) - len(kept),
            len(src_ids),
        )
    return kept


def within_limits(
    n_src: np.ndarray, n_tgt: np.ndarray, max_length: int, max_ratio: float
) -> np.ndarray:
    """(N,) bool: the pairs with no empty side, no side over ``max_length`` pieces and
    a longer-to-shorter ratio of at most ``max_ratio`` (0 disables a limit)."""
    longer, shorter = np.maximum(n_src, n_tgt), np.minimum(n_src, n_tgt)
    keep = shorter > 0
    if max_length:
        keep &= longer <= max_length
    if max_ratio:
        keep &= longer / np.maximum(shorter, 1) <= max_ratio
    return keep


def token_batches(
    lengths: np.ndarray | Sequence[tuple[int, int]],
    *,
    max_tokens: int,
    seed: int | None = None,
    epoch: int = 0,
) -> list[np.ndarray]:
    """Group example indices into length-bucketed batches under a token budget.

    Examples are sorted by (target, source) length and packed greedily in that
    order; a batch's cost is ``B * (max length + 1)`` over both sides (the padded
    cells the model really computes). With a seed, ties within a length are
    broken at random and the batch order is shuffled, deterministically per
    ``(seed, epoch)`` with numpy's Generator; without a seed the order is sorted
    (for evaluation).

    Args:
        lengths: (N, 2) source and target length per example, in pieces.
        max_tokens: budget of padded cells per batch; a single longer pair
            still gets a batch of its own rather than being dropped.

    Returns:
        One integer array of example indices per batch.
    """
    lengths = np.asarray(lengths).reshape(-1, 2)
    if not len(lengths):
        return []
    src, tgt = lengths[:, 0].astype(np.int32), lengths[:, 1].astype(np.int32)
    rng = np.random.default_rng([seed % 2**64, epoch]) if seed is not None else None
    # int32 indices: half the memory of int64 on a corpus of millions of pairs
    order = np.arange(len(lengths), dtype=np.int32 if len(lengths) < 2**31 else np.int64)
    if rng is not None:
        rng.shuffle(order)
    key = tgt[order].astype(np.int64) * (int(src.max()) + 1) + src[order]
    if key.max() < 1 << 16:
        key = key.astype(np.uint16)  # numpy's stable sort is a radix sort for 16 bits
    order = order[np.argsort(key, kind="stable")]
    sizes = np.maximum(src, tgt)[order] + 1
    batches = np.split(order, _greedy_starts(sizes, max_tokens))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _greedy_starts(sizes: np.ndarray, max_tokens: int) -> list[int]:
    """Where each batch but the first begins when ``sizes`` are packed greedily in
    order: a batch takes the next example unless ``count * max size`` would pass
    ``max_tokens``, and never stays empty.

    Why it is fast: the sizes fall into runs that never decrease (one per target
    length), and within a run the largest size is the last one taken, so each
    batch's end is one binary search instead of a step per example.
    """
    edges = [0, *(np.flatnonzero(np.diff(sizes) < 0) + 1).tolist(), len(sizes)]
    starts: list[int] = []
    open_start, open_max = 0, 0  # the batch still filling, and its largest size
    for lo, hi in itertools.pairwise(edges):
        run = sizes[lo:hi]
        position = np.arange(lo, hi)
        # The open batch takes the run's first k examples while it stays in budget.
        fits = position - open_start + 1 <= max_tokens // np.maximum(run, open_max)
        k = int(np.searchsorted(~fits, True)) if lo > open_start else 0
        if lo > open_start and k < len(run):
            starts.append(lo + k)
            open_start = lo + k
        elif lo > open_start:
            open_max = max(open_max, int(run[-1]))
            continue
        # Fresh batches inside the run: batch [b, j] fits while j + 1 - cap[j] <= b.
        reach = position + 1 - max_tokens // run
        while True:
            end = max(int(np.searchsorted(reach, open_start, side="right")) + lo, open_start + 1)
            if end >= hi:
                break
            starts.append(end)
            open_start = end
        open_max = int(run[-1])
    return starts
