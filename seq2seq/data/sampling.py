"""Subword regularisation: every training epoch reads its own seeded segmentation.

Why it works this way:

* SentencePiece's own sampling cannot be used: its generator is salted per
  process, so the same seed gives other segmentations in another process, and a
  resumed run or a second torchrun process would train on other pairs. The
  segmentations are drawn here instead, from SentencePiece's pieces and scores:
  unigram by forward-filtering, backward-sampling over all segmentations with
  probabilities ``p(x) ** alpha`` (Kudo, 2018, ``nbest_size=-1``), BPE by dropping
  each applicable merge with probability ``alpha`` (Provilkov et al., 2020).
* Both work word by word, from the store's best ids: pieces never cross a word
  boundary, so a sentence's segmentations are its words' segmentations side by
  side, and a word's best pieces spell its text. A word's lattice is built once
  and kept in a bounded cache; a word holding an unknown piece keeps its best
  pieces, since its text cannot be recovered.
* Pair ``i`` of epoch ``e`` draws from a stream seeded by ``(train.seed, e, side,
  i)`` alone, so neither chunking nor threads change an epoch: a resumed run and
  every torchrun process build exactly the epoch an uninterrupted run builds.
* Whole epochs, not batches, are sampled, because batching packs pairs by their
  lengths, which sampling changes. A worker process writes each epoch to files
  beside the token store, mapped back like it and unlinked at once, so memory
  stays flat for any corpus. Besides the epoch being trained, only the next one is
  written, in the background, so only the first is waited for.
"""

from __future__ import annotations

import bisect
import logging
import math
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from itertools import accumulate, chain, pairwise
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import BinaryIO

import numpy as np
import sentencepiece as spm

from seq2seq.config import PieceModel, TrainApp
from seq2seq.data.batching import FlatIds
from seq2seq.data.store import TokenStore
from seq2seq.data.tokenizer import UNK_ID, Tokenizer

logger = logging.getLogger(__name__)

CHUNK_PAIRS = 2_000  # pairs per written piece of an epoch
CACHED_WORDS = 1 << 16  # word lattices kept: the frequent words of any corpus
SIDES = ("src", "tgt")
WORD_START = "\u2581"  # SentencePiece's word-boundary mark
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15

Draw = Callable[[], float]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (products wrap)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def pair_seeds(seed: int, epoch: int, side: int, start: int, stop: int) -> np.ndarray:
    """The stream seeds (uint64) of pairs ``start:stop`` of one side in one epoch."""
    base = np.zeros(1, np.uint64)
    for part in (seed & _MASK64, epoch, side):
        base = _mix(base ^ np.uint64(part))
    with np.errstate(over="ignore"):
        return _mix(np.arange(start, stop, dtype=np.uint64) * np.uint64(_GOLDEN) + base)


def stream(seed: int) -> Draw:
    """Uniform draws in [0, 1) from splitmix64 seeded by ``seed``: a few integer
    operations per draw, where a numpy generator costs microseconds to make."""
    state = seed & _MASK64

    def draw() -> float:
        nonlocal state
        state = (state + _GOLDEN) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return ((z ^ (z >> 31)) >> 11) * 2.0**-53

    return draw


class _Pieces:
    """One SentencePiece model's pieces as text, for building words' segmentations."""

    def __init__(self, processor: spm.SentencePieceProcessor) -> None:
        size = processor.get_piece_size()
        self.text = [processor.id_to_piece(i) for i in range(size)]
        plain = [
            i
            for i in range(size)
            if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_unused(i))
        ]
        self.ids = {self.text[i]: i for i in plain}
        self.score = [processor.get_score(i) for i in range(size)]
        self.longest = max((len(self.text[i]) for i in plain), default=1)
        starts = np.zeros(size, bool)
        starts[[i for i in plain if self.text[i].startswith(WORD_START)]] = True
        self.starts_word = starts

    def word_text(self, word: tuple[int, ...]) -> str:
        return "".join(self.text[i] for i in word)


class UnigramWords:
    """Samples a word's segmentation with probability ``p(x) ** alpha`` over all of them."""

    def __init__(self, processor: spm.SentencePieceProcessor, alpha: float) -> None:
        self.pieces = _Pieces(processor)
        self.alpha = alpha
        self.lattice = lru_cache(maxsize=CACHED_WORDS)(self._lattice)

    def _lattice(
        self, word: tuple[int, ...]
    ) -> list[tuple[list[int], list[int], list[float]]] | None:
        """Per end position: the starts and ids of the pieces ending there and the
        cumulative weights of choosing each (forward-filtered); None when the word
        has one segmentation."""
        text, pieces = self.pieces.word_text(word), self.pieces
        forward = [0.0] + [-math.inf] * len(text)
        ends: list[tuple[list[int], list[int], list[float]]] = [([], [], [])]
        for end in range(1, len(text) + 1):
            starts, ids, logits = [], [], []
            for start in range(max(0, end - pieces.longest), end):
                piece = pieces.ids.get(text[start:end])
                if piece is not None and forward[start] > -math.inf:
                    starts.append(start)
                    ids.append(piece)
                    logits.append(forward[start] + self.alpha * pieces.score[piece])
            top = max(logits, default=-math.inf)
            if logits:
                total = sum(math.exp(v - top) for v in logits)
                forward[end] = top + math.log(total)
                weights = list(accumulate(math.exp(v - top) for v in logits))
            else:
                weights = []
            ends.append((starts, ids, weights))
        return ends if any(len(e[0]) > 1 for e in ends) else None

    def __call__(self, word: tuple[int, ...], draw: Draw) -> list[int]:
        lattice = self.lattice(word)
        if lattice is None:
            return list(word)
        out, end = [], len(lattice) - 1
        while end > 0:
            starts, ids, weights = lattice[end]
            k = bisect.bisect_right(weights, draw() * weights[-1])
            k = min(k, len(ids) - 1)
            out.append(ids[k])
            end = starts[k]
        return out[::-1]


class BpeWords:
    """BPE-dropout: merges applied best first, each applicable merge skipped with
    probability ``alpha`` at every step; at 0 it is SentencePiece's BPE encoding."""

    def __init__(self, processor: spm.SentencePieceProcessor, alpha: float) -> None:
        self.pieces = _Pieces(processor)
        self.alpha = alpha

    def __call__(self, word: tuple[int, ...], draw: Draw) -> list[int]:
        ids, score = self.pieces.ids, self.pieces.score
        symbols = list(self.pieces.word_text(word))
        while len(symbols) > 1:
            best, best_score = -1, -math.inf
            for k in range(len(symbols) - 1):
                piece = ids.get(symbols[k] + symbols[k + 1])
                if piece is None or (self.alpha and draw() < self.alpha):
                    continue
                if score[piece] > best_score:
                    best, best_score = k, score[piece]
            if best < 0:
                break
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
        return [ids.get(s, UNK_ID) for s in symbols]


WordSampler = Callable[[tuple[int, ...], Draw], list[int]]


def word_sampler(
    processor: spm.SentencePieceProcessor, model_type: PieceModel | str, alpha: float
) -> WordSampler:
    """The sampler for a model of ``model_type`` (unigram or BPE-dropout)."""
    if str(model_type) == str(PieceModel.bpe):
        return BpeWords(processor, alpha)
    return UnigramWords(processor, alpha)


def sample_sentence(
    row: list[int], sampler: WordSampler, starts_word: np.ndarray, draw: Draw
) -> list[int]:
    """One sentence's sampled ids from its best ``row``, word by word."""
    cuts = [k for k, piece in enumerate(row) if starts_word[piece]]
    if not cuts or cuts[0] != 0:
        cuts.insert(0, 0)
    cuts.append(len(row))
    out: list[int] = []
    for a, b in pairwise(cuts):
        word = tuple(row[a:b])
        out += word if UNK_ID in word else sampler(word, draw)
    return out


class Resampler:
    """Samples the segmentation of a range of stored pairs."""

    def __init__(
        self,
        store: TokenStore,
        tokenizer: Tokenizer,
        *,
        model_type: PieceModel | str,
        alpha: float,
        seed: int,
    ) -> None:
        self.store = store
        self.seed = seed
        self.samplers = [
            word_sampler(processor, model_type, alpha)
            for processor in (tokenizer.src, tokenizer.tgt)
        ]

    def __call__(self, epoch: int, start: int, stop: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per side: the sampled ids of pairs ``start:stop`` back to back, and their lengths."""
        out = []
        sides = (self.store.src, self.store.tgt)
        for k, (flat, sampler) in enumerate(zip(sides, self.samplers, strict=True)):
            starts_word = sampler.pieces.starts_word  # type: ignore[attr-defined]
            seeds = pair_seeds(self.seed, epoch, k, start, stop).tolist()
            pieces = [
                sample_sentence(row.tolist(), sampler, starts_word, stream(seed))
                for row, seed in zip(_rows(flat, start, stop), seeds, strict=True)
            ]
            lengths = np.fromiter(map(len, pieces), np.int32, count=len(pieces))
            ids = np.fromiter(chain.from_iterable(pieces), flat.ids.dtype, int(lengths.sum()))
            out.append((ids, lengths))
        return out


def _rows(flat: FlatIds, start: int, stop: int) -> list[np.ndarray]:
    """Sentences ``start:stop`` of one side, copied out of the map in one read."""
    first, last = int(flat.offsets[start]), int(flat.offsets[stop])
    block = np.asarray(flat.ids[first:last])
    cuts = np.asarray(flat.offsets[start + 1 : stop], np.int64) - first
    return np.split(block, cuts)


class SampledEpochs:
    """The training pairs of each epoch, segmented afresh from ``(seed, epoch)``.

    One worker process writes them. A thread would not do: the samplers are Python,
    and a thread holding the interpreter lock between training's operations slows
    every step of the loop (measured, docs/benchmarks.md).
    """

    def __init__(
        self,
        store: TokenStore,
        tokenizer: Tokenizer,
        *,
        model_type: PieceModel | str,
        alpha: float,
        seed: int,
        directory: Path | None = None,
    ) -> None:
        self.store = store
        self.root = Path(tempfile.mkdtemp(prefix=".sampled-", dir=directory))
        source = store.path if store.path is not None else (store.src, store.tgt)
        models = tokenizer.serialize()
        settings = (source, models, str(model_type), alpha, seed, self.root, CHUNK_PAIRS)
        context = multiprocessing.get_context("spawn")  # no fork of a threaded trainer
        self.conn, theirs = context.Pipe()
        self.worker: BaseProcess | None = context.Process(
            target=_serve, args=(theirs, settings), name="sample-epochs", daemon=True
        )
        self.worker.start()
        theirs.close()
        self.pending: int | None = None  # the epoch the worker is writing

    def epoch(self, epoch: int) -> TokenStore:
        """Epoch ``epoch``'s pairs (sampled now unless written ahead); the next epoch
        is then written in the background."""
        if self.worker is None:
            raise RuntimeError("the sampled epochs were closed")
        if self.pending != epoch:
            if self.pending is not None:
                shutil.rmtree(self._receive(), ignore_errors=True)  # an epoch nobody reads
            start = time.monotonic()
            self._request(epoch)
            directory = self._receive()
            logger.info("sampled epoch %d's segmentation in %.1fs", epoch, time.monotonic() - start)
        else:
            directory = self._receive()
        try:
            data = _open(directory, self.store)
        finally:
            shutil.rmtree(directory, ignore_errors=True)  # the maps keep the data alive
        self._request(epoch + 1)
        return data

    def close(self) -> None:
        """Stop the worker and remove what it wrote."""
        if self.worker is not None:
            self.worker.terminate()
            self.worker.join()
            self.worker = None
            self.conn.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _request(self, epoch: int) -> None:
        self.conn.send(epoch)
        self.pending = epoch

    def _receive(self) -> Path:
        try:
            reply = self.conn.recv()
        except EOFError as e:
            raise RuntimeError("the process sampling the training epochs died") from e
        self.pending = None
        if isinstance(reply, BaseException):
            raise reply
        return Path(reply)


Settings = tuple[Path | tuple[FlatIds, FlatIds], dict[str, bytes], str, float, int, Path, int]


def _serve(conn: Connection, settings: Settings) -> None:
    """The worker: write each epoch asked for and answer with its directory."""
    source, models, model_type, alpha, seed, root, chunk = settings
    store = TokenStore.open(source) if isinstance(source, Path) else TokenStore(*source)
    tokenizer = Tokenizer.from_serialized(models)
    resampler = Resampler(store, tokenizer, model_type=model_type, alpha=alpha, seed=seed)
    while True:
        try:
            epoch = conn.recv()
        except EOFError:
            return
        try:
            conn.send(str(_write(resampler, epoch, root / f"epoch-{epoch}", chunk)))
        except Exception as e:  # handed to the trainer, which raises it
            conn.send(e)


def _write(resampler: Resampler, epoch: int, directory: Path, chunk: int) -> Path:
    """Sample every chunk and append the results in pair order to ``directory``."""
    store = resampler.store
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    files: dict[str, BinaryIO] = {}
    try:
        for side in SIDES:
            files[f"{side}.ids"] = (directory / f"{side}.ids").open("wb")
            files[f"{side}.len"] = (directory / f"{side}.len").open("wb")
        for start in range(0, len(store), chunk):
            sampled = resampler(epoch, start, min(start + chunk, len(store)))
            for side, (ids, lengths) in zip(SIDES, sampled, strict=True):
                ids.tofile(files[f"{side}.ids"])
                lengths.tofile(files[f"{side}.len"])
    finally:
        for handle in files.values():
            handle.close()
    return directory


def _open(directory: Path, store: TokenStore) -> TokenStore:
    """Map one written epoch as a TokenStore with the store's id types and counts."""
    sides = []
    for side, flat in zip(SIDES, (store.src, store.tgt), strict=True):
        lengths = _map(directory / f"{side}.len", np.dtype(np.int32))
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        sides.append(FlatIds(_map(directory / f"{side}.ids", flat.ids.dtype), offsets, lengths))
    return TokenStore(sides[0], sides[1], counts=store.counts)


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    """A read-only map of a whole file (an empty array for an empty file)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def pair_lengths(store: TokenStore) -> np.ndarray:
    """(N, 2) source pieces and target pieces + EOS: what batching packs by."""
    return np.stack([store.src_lengths, store.tgt_lengths.astype(np.int32) + 1], axis=1)


def for_training(config: TrainApp, store: TokenStore, tokenizer: Tokenizer) -> SampledEpochs | None:
    """This run's sampled epochs, or None when ``tokenizer.sampling_alpha`` is 0.

    The files go beside the token store (never into a tmpfs that would hold them in
    memory).
    """
    t = config.tokenizer
    if t.sampling_alpha <= 0:
        return None
    logger.info("subword regularisation: %s, alpha %g", t.model_type, t.sampling_alpha)
    return SampledEpochs(
        store,
        tokenizer,
        model_type=t.model_type,
        alpha=t.sampling_alpha,
        seed=config.train.seed,
        directory=store.path.parent if store.path is not None else None,
    )
