"""Token ids of the training split on disk, memory-mapped, built once per corpus and tokenizer.

Why: a corpus of millions of pairs held as Python lists of ints costs about a
gigabyte per million pairs and is read and encoded again on every run. Here
the ids are encoded once, chunk by chunk in threads (SentencePiece releases the
interpreter lock while it encodes), into flat arrays on disk (fairseq's
binarized ``.bin``/``.idx`` idea); every later run on the same corpus, tokenizer
and length filters maps them in, and memory holds only the pages a batch touches.

One store is a directory ``{cache_dir}/{key}/``:

* ``src.ids``, ``tgt.ids``: every sentence's ids back to back (uint16 when the
  vocabulary fits, else int32);
* ``src.off``, ``tgt.off``: int64 start of each sentence, then the end (N + 1);
* ``src.len``, ``tgt.len``: pieces per sentence (uint16, else int32);
* ``header.json``: counts, dtypes, each array's digest and the digest of the
  corpus, written last (see ``integrity``).

The directory is built under a temporary name and renamed into place, so an
interrupted build never leaves a store that looks complete; every open checks
it against its header, and one that fails is built again in its place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from seq2seq.config import DataConfig, TokenizerConfig
from seq2seq.data.batching import Batch, FlatIds, collate_flat, within_limits
from seq2seq.data.chunks import FIRST_BAD, Chunk, CorpusError, clean
from seq2seq.data.corpus import PairSource, report_bad_rows, train_source
from seq2seq.data.integrity import (
    FORMAT_VERSION,
    HEADER,
    SIDES,
    TokenStoreError,
    discard,
    open_arrays,
    seal,
)
from seq2seq.data.tokenizer import Tokenizer, source_cache_key, train_or_load_pairs
from seq2seq.runtime import cores
from seq2seq.runtime.fs import atomic_directory

logger = logging.getLogger(__name__)

__all__ = [
    "HEADER",
    "Filters",
    "Prepared",
    "TokenStore",
    "TokenStoreError",
    "cache_dir",
    "open_or_build",
    "prepare",
    "store_key",
]

# Rows read, bad rows skipped (the first few named), pairs dropped as empty or by
# the length filters, and pairs kept: recorded when a store is built.
COUNTS = ("lines", "bad_rows", "bad_examples", "empty", "filtered", "pairs")
CHUNK_LINES = 10_000  # rows per encoding task: large enough to amortise the hand-over


class TokenStore:
    """The encoded training pairs: lengths as numpy arrays, batches padded from the ids."""

    def __init__(
        self,
        src: FlatIds,
        tgt: FlatIds,
        *,
        path: Path | None = None,
        corpus_digest: str = "",
        counts: dict[str, Any] | None = None,
    ) -> None:
        if len(src.lengths) != len(tgt.lengths):
            raise ValueError(f"sides differ: {len(src.lengths)} and {len(tgt.lengths)} sentences")
        self.src = src
        self.tgt = tgt
        self.path = path
        self.corpus_digest = corpus_digest  # the content the store was encoded from
        self.counts = counts or {}  # what became of the corpus's rows (see ``COUNTS``)

    def __len__(self) -> int:
        return len(self.src.lengths)

    @property
    def src_lengths(self) -> np.ndarray:
        """(N,) source pieces per pair."""
        return self.src.lengths

    @property
    def tgt_lengths(self) -> np.ndarray:
        """(N,) target pieces per pair (without BOS/EOS)."""
        return self.tgt.lengths

    def batch(self, indices: np.ndarray) -> Batch:
        """The pairs ``indices`` as a padded Batch, read straight from the arrays."""
        return collate_flat(self.src, self.tgt, indices)

    @classmethod
    def open(cls, directory: Path) -> TokenStore:
        """Map a built store after checking it against its header.

        Raises:
            TokenStoreError: the store is incomplete, or changed since it was built.
        """
        header, arrays = open_arrays(directory)
        src, tgt = (
            FlatIds(arrays[f"{side}.ids"], arrays[f"{side}.off"], arrays[f"{side}.len"])
            for side in SIDES
        )
        try:
            counts = {name: header[name] for name in COUNTS if name in header}
            digest = str(header["corpus_digest"])
            return cls(src, tgt, path=directory, corpus_digest=digest, counts=counts)
        except (KeyError, ValueError) as e:
            raise TokenStoreError(f"{directory / HEADER} does not describe the store ({e})") from e


# --------------------------------------------------------------------- building


@dataclass(frozen=True)
class Filters:
    """Training length filters (0 disables one); see ``batching.encode_pairs``."""

    max_length: int
    max_ratio: float


@dataclass(frozen=True)
class _Encoded:
    """One chunk's kept pairs, flattened, and what was dropped."""

    ids: tuple[np.ndarray, np.ndarray]
    lengths: tuple[np.ndarray, np.ndarray]
    lines: int
    empty: int
    filtered: int
    bad: int
    bad_names: tuple[str, ...]


class _Encoder:
    """Cleans, encodes and filters one chunk; called from several threads at once."""

    def __init__(self, tokenizer: Tokenizer, filters: Filters) -> None:
        self.tokenizer = tokenizer
        self.filters = filters
        self.dtypes = tuple(
            _id_dtype(n) for n in (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
        )

    def __call__(self, chunk: Chunk) -> _Encoded:
        src, tgt, empty = clean(chunk.src, chunk.tgt)
        # One SentencePiece thread per call: the pool already runs one call per core,
        # and its default of a thread per core inside each call oversubscribes them.
        rows = (
            self.tokenizer.src.encode(src, out_type=int, num_threads=1),
            self.tokenizer.tgt.encode(tgt, out_type=int, num_threads=1),
        )
        lengths = [np.fromiter(map(len, side), np.int64, count=len(side)) for side in rows]
        keep = within_limits(
            lengths[0], lengths[1], self.filters.max_length, self.filters.max_ratio
        )
        flat = []
        for side, side_lengths, dtype in zip(rows, lengths, self.dtypes, strict=True):
            ids = np.fromiter(chain.from_iterable(side), dtype, count=int(side_lengths.sum()))
            flat.append(ids[np.repeat(keep, side_lengths)])
        return _Encoded(
            ids=(flat[0], flat[1]),
            lengths=(lengths[0][keep], lengths[1][keep]),
            lines=chunk.rows,
            empty=empty,
            filtered=int(len(src) - keep.sum()),
            bad=chunk.bad,
            bad_names=chunk.bad_names,
        )


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def _encoded_chunks(source: PairSource, encoder: _Encoder, workers: int) -> Iterator[_Encoded]:
    """Encoded chunks in corpus order, from ``workers`` threads (in this one for 1).

    Why threads: SentencePiece encodes without the interpreter lock, so threads
    use every core while this thread reads the next chunk, with no pickling of
    chunks to processes. At most two chunks per thread are in flight, so the
    corpus is never read far ahead of the encoding.
    """
    chunks = source.chunks(CHUNK_LINES)
    if workers <= 1:
        yield from map(encoder, chunks)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="encode") as pool:
        pending: deque[Future[_Encoded]] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(encoder, chunk))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _write_arrays(directory: Path, encoded: Iterable[_Encoded]) -> tuple[dict[str, Any], str]:
    """Append each chunk's ids to ``*.ids`` as it arrives; lengths and offsets at the end.

    Returns the counts (rows read, bad rows skipped and the first few named, pairs
    dropped as empty or by the filters, pairs kept) and the dtype of the length arrays.
    """
    lengths: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
    counts: dict[str, Any] = {"lines": 0, "empty": 0, "filtered": 0, "bad_rows": 0}
    names: list[str] = []
    files: dict[str, BinaryIO] = {}
    try:
        for side in SIDES:
            files[side] = (directory / f"{side}.ids").open("wb")
        for chunk in encoded:
            for side, ids, side_lengths in zip(SIDES, chunk.ids, chunk.lengths, strict=True):
                ids.tofile(files[side])
                lengths[side].append(side_lengths)
            for name in ("lines", "empty", "filtered"):
                counts[name] += getattr(chunk, name)
            counts["bad_rows"] += chunk.bad
            names += chunk.bad_names[: max(0, FIRST_BAD - len(names))]
    finally:
        for handle in files.values():
            handle.close()
    joined = {side: np.concatenate([np.zeros(0, np.int64), *lengths[side]]) for side in SIDES}
    longest = max(int(joined[side].max(initial=0)) for side in SIDES)
    length_dtype = np.dtype(np.uint16 if longest < (1 << 16) - 2 else np.int32)
    for side in SIDES:
        offsets = np.zeros(len(joined[side]) + 1, np.int64)
        np.cumsum(joined[side], out=offsets[1:])
        offsets.tofile(directory / f"{side}.off")
        joined[side].astype(length_dtype).tofile(directory / f"{side}.len")
    return {**counts, "bad_examples": names, "pairs": len(joined["src"])}, str(length_dtype)


def store_key(fingerprint: str, tokenizer: Tokenizer, filters: Filters) -> str:
    """Hash of what determines the store: the corpus, the models, the filters, the format."""
    digest = hashlib.sha256(f"{FORMAT_VERSION}\0{fingerprint}\0{filters}\0".encode())
    for name, model in sorted(tokenizer.serialize().items()):
        digest.update(name.encode() + b"\0" + model)
    return digest.hexdigest()[:32]


def _build(
    directory: Path,
    source: PairSource,
    tokenizer: Tokenizer,
    filters: Filters,
    workers: int,
) -> None:
    """Encode ``source`` into a temporary directory and rename it to ``directory``."""
    with atomic_directory(directory, replace=False) as tmp:
        start = time.monotonic()
        encoder = _Encoder(tokenizer, filters)
        counts, length_dtype = _write_arrays(tmp, _encoded_chunks(source, encoder, workers))
        seconds = time.monotonic() - start
        _check_counts(counts, source.name, filters)
        header = {
            "version": FORMAT_VERSION,
            **counts,
            "length_dtype": length_dtype,
            "src_dtype": str(_id_dtype(tokenizer.src_vocab_size)),
            "tgt_dtype": str(_id_dtype(tokenizer.tgt_vocab_size)),
            "max_length": filters.max_length,
            "max_ratio": filters.max_ratio,
            "files": [str(path) for path in source.paths] or None,
            "encode_seconds": round(seconds, 3),
            "corpus_digest": source.content_digest,
        }
        seal(tmp, header)
        logger.info(
            "encoded %d lines in %.1fs (%.0f pairs/s, %d threads) into %s",
            counts["lines"],
            seconds,
            counts["lines"] / max(seconds, 1e-9),
            workers,
            directory,
        )


def _check_counts(counts: dict[str, Any], name: str, filters: Filters) -> None:
    report_bad_rows("train", counts["bad_rows"], counts["bad_examples"])
    if counts["empty"]:
        logger.warning(
            "train split: dropped %d of %d pairs with an empty side",
            counts["empty"],
            counts["lines"],
        )
    kept_text = counts["lines"] - counts["empty"]
    if kept_text == 0:
        raise CorpusError(f"train split of {name!r} has no non-empty pairs")
    if counts["filtered"]:
        logger.info(
            "length filters (max_length=%d, max_ratio=%g) dropped %d of %d pairs",
            filters.max_length,
            filters.max_ratio,
            counts["filtered"],
            kept_text,
        )
    if counts["pairs"] == 0:
        raise CorpusError("no training pairs left after filtering; check data and filters")


def _open_cached(directory: Path) -> TokenStore | None:
    """The cached store, or None when there is none or it fails its check (it is
    then built again and replaces the one found)."""
    if not os.path.lexists(directory):
        return None
    try:
        return TokenStore.open(directory)
    except TokenStoreError as e:
        logger.warning("rebuilding the token store %s: %s", directory, e)
        discard(directory)
        return None


def cache_dir(data: DataConfig, tokenizer: TokenizerConfig) -> Path:
    """``data.cache_dir``, or ``tokens`` next to the tokenizer cache."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    return Path(tokenizer.cache_dir).expanduser().parent / "tokens"


def open_or_build(
    source: PairSource,
    tokenizer: Tokenizer,
    *,
    directory: Path,
    filters: Filters,
    workers: int = 0,
) -> TokenStore:
    """The store for this corpus, tokenizer and filters under ``directory``:
    mapped from the cache, or encoded with ``workers`` threads (0: one per core)."""
    path = directory / store_key(source.fingerprint, tokenizer, filters)
    store = _open_cached(path)
    if store is None:
        _build(path, source, tokenizer, filters, workers or cores())
        store = TokenStore.open(path)
    else:
        logger.info("loaded cached token store from %s", path)
    logger.info("train split: %d pairs (%s)", len(store), source.name)
    return store


@dataclass(frozen=True)
class Prepared:
    """What training reads, and what names its data for resume checks: the key (the
    corpus's identity and the tokenizer settings) and the digest of its content."""

    tokenizer: Tokenizer
    store: TokenStore
    data_key: str

    @property
    def data_digest(self) -> str:
        return self.store.corpus_digest


def prepare(
    data: DataConfig, tokenizer_cfg: TokenizerConfig, *, tokenizer: Tokenizer | None = None
) -> Prepared:
    """Training split -> tokenizer (cached) -> token store (cached): what training reads.

    A resumed run passes its checkpoint's ``tokenizer``: the run must go on with the
    pieces it started with, whatever SentencePiece would learn from the data now.
    """
    source = train_source(data)
    data_key = source_cache_key(source.fingerprint, tokenizer_cfg)
    if tokenizer is None:
        tokenizer = train_or_load_pairs(source.pairs, data_key, tokenizer_cfg)
    store = open_or_build(
        source,
        tokenizer,
        directory=cache_dir(data, tokenizer_cfg),
        filters=Filters(data.max_length, data.max_ratio),
        workers=data.num_workers,
    )
    return Prepared(tokenizer, store, data_key)
