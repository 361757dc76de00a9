"""From token ids to padded tensor batches under a token budget.

Sentences are bucketed by length so batches carry little padding, batches are
capped by ``max_tokens`` (padded cells, the real cost on the hardware) rather
than by a sentence count, and the order is shuffled per epoch from
``(seed, epoch)`` alone, so a resumed run sees exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

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


def collate(pairs: Sequence[Pair]) -> Batch:
    """Pad a list of (source ids, target ids) into a Batch with BOS/EOS added."""
    src, src_lengths = pad([s for s, _ in pairs])
    tgt_in, _ = pad([[BOS_ID, *t] for _, t in pairs])
    tgt_out, _ = pad([[*t, EOS_ID] for _, t in pairs])
    return Batch(src, src_lengths, tgt_in, tgt_out)


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
    kept = [
        (s, t)
        for s, t in zip(src_ids, tgt_ids, strict=True)
        if _within_limits(len(s), len(t), max_length, max_ratio)
    ]
    if len(kept) < len(src_ids):
        logger.info(
            "length filters (max_length=%d, max_ratio=%g) dropped %d of %d pairs",
            max_length,
            max_ratio,
            len(src_ids) - len(kept),
            len(src_ids),
        )
    return kept


def _within_limits(n_src: int, n_tgt: int, max_length: int, max_ratio: float) -> bool:
    if n_src == 0 or n_tgt == 0:
        return False
    if max_length and max(n_src, n_tgt) > max_length:
        return False
    return not (max_ratio and max(n_src, n_tgt) / min(n_src, n_tgt) > max_ratio)


def token_batches(
    lengths: Sequence[tuple[int, int]], *, max_tokens: int, seed: int | None = None, epoch: int = 0
) -> list[list[int]]:
    """Group example indices into length-bucketed batches under a token budget.

    A batch's cost is ``B * (max length + 1)`` over both sides (the padded cells
    the model really computes). With a seed, ties within a length are broken
    at random and the batch order is shuffled, deterministically per
    ``(seed, epoch)``; without a seed the order is sorted (for evaluation).

    Args:
        lengths: (source length, target length) per example, in pieces.
        max_tokens: budget of padded cells per batch; a single longer pair
            still gets a batch of its own rather than being dropped.
    """
    rng = random.Random(f"{seed}:{epoch}") if seed is not None else None
    order = list(range(len(lengths)))
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: (lengths[i][1], lengths[i][0]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = max(lengths[i]) + 1
        if current and (len(current) + 1) * max(longest, size) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)
    return batches
