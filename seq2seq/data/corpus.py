"""Locate the splits of a parallel corpus and read them as cleaned sentence pairs.

Every source (the built-in generator, two aligned text files, TSV, JSONL,
Parquet, Arrow, a ``save_to_disk`` directory, a hub dataset) is one reader that
yields ``Chunk``s; the training split is streamed from it into the tokenizer and
the token store, the small splits are collected into a ``datasets.Dataset``.
Both go through ``locate`` and ``clean``, so they cannot disagree.

Where a split comes from, in order of precedence:

1. the format's own keys: ``src``/``tgt`` (``text``) or ``path`` (``tsv``, ``jsonl``,
   ``parquet``, ``arrow``);
2. ``data.dir`` with the split's ``stem``: ``{dir}/{stem}.{src_lang}`` and
   ``{dir}/{stem}.{tgt_lang}`` (``.gz`` accepted), whatever the format, so a hub
   corpus such as Multi30k can be read from a local copy;
3. the split name (``hub``) or the generator (``builtin``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import datasets

from seq2seq.config import BuiltinConfig, DataConfig, DataFormat, SplitConfig
from seq2seq.data import builtin
from seq2seq.data.chunks import Chunk, CorpusError, clean
from seq2seq.data.digest import file_digest, text_digest
from seq2seq.data.lines import LineFile, TextPair
from seq2seq.data.tables import HubDataset, TableFiles

__all__ = ["CorpusError", "PairSource", "load_corpus", "load_split", "locate", "train_source"]

logger = logging.getLogger(__name__)

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")
CHUNK_ROWS = 10_000  # rows read at a time when a split is collected or sampled
SAMPLE_BYTES = 1 << 16  # read from each end of a file for its fingerprint
SETTLE_NS = 20_000_000  # longer than a kernel clock tick, which file times advance by


class _MissingDirFile(CorpusError):
    """A ``{dir}/{stem}.{lang}`` file is absent: lets ``load_corpus`` skip a test split."""


@functools.lru_cache(maxsize=2)
def _builtin_splits(
    settings: tuple[int, ...], src_lang: str, tgt_lang: str
) -> dict[str, list[tuple[str, str]]]:
    """Generated once per settings, so loading three splits does not generate three times.

    ``settings`` is ``dataclasses.astuple(BuiltinConfig)``: the dataclass is not hashable.
    """
    cfg = BuiltinConfig(*settings)
    try:
        return builtin.make_splits(cfg, src_lang=src_lang, tgt_lang=tgt_lang)
    except ValueError as e:
        raise CorpusError(str(e)) from e


@dataclasses.dataclass(frozen=True)
class Generated:
    """A split of the built-in generated corpus (``seq2seq.data.builtin``)."""

    settings: tuple[int, ...]
    split: Split
    src_lang: str
    tgt_lang: str
    files = ()

    def _pairs(self) -> list[tuple[str, str]]:
        return _builtin_splits(self.settings, self.src_lang, self.tgt_lang)[self.split]

    def chunks(self, size: int) -> Iterator[Chunk]:
        pairs = self._pairs()
        for first in range(0, len(pairs), size):
            part = pairs[first : first + size]
            yield Chunk([s for s, _ in part], [t for _, t in part], len(part))

    def fingerprint(self) -> str:
        pairs = self._pairs()
        return _content_fingerprint([s for s, _ in pairs], [t for _, t in pairs])


Reader = TextPair | LineFile | TableFiles | HubDataset | Generated


# ----------------------------------------------------------------------- locating


def _resolve_in_dir(directory: str, stem: str, lang: str) -> Path:
    """``{dir}/{stem}.{lang}``, or the same with ``.gz`` when only that exists."""
    plain = Path(directory).expanduser() / f"{stem}.{lang}"
    gz = plain.with_name(plain.name + ".gz")
    if not plain.exists() and gz.exists():
        return gz
    if not plain.exists():
        raise _MissingDirFile(f"corpus file not found: {plain} (nor {gz.name})")
    return plain


def _format(cfg: DataConfig) -> DataFormat:
    try:
        return DataFormat.parse(str(cfg.format), "data.format")
    except ValueError as e:
        raise CorpusError(str(e)) from e


def locate(cfg: DataConfig, split: Split) -> Reader | None:
    """The reader of one split by the precedence rule above, or None when the
    split is not configured."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    form, skip = _format(cfg), cfg.skip_bad_rows
    split_cfg: SplitConfig = getattr(cfg, split)
    if form == DataFormat.text and (split_cfg.src or split_cfg.tgt):
        if not (split_cfg.src and split_cfg.tgt):
            raise CorpusError(f"data.{split}: set both src and tgt (got {split_cfg})")
        return TextPair(Path(split_cfg.src).expanduser(), Path(split_cfg.tgt).expanduser(), skip)
    langs = (cfg.src_lang, cfg.tgt_lang)
    if form in (DataFormat.tsv, DataFormat.jsonl) and split_cfg.path:
        return LineFile(Path(split_cfg.path).expanduser(), str(form), *langs, skip)
    if form in (DataFormat.parquet, DataFormat.arrow) and split_cfg.path:
        path = Path(split_cfg.path).expanduser()
        return TableFiles(path, str(form), split_cfg.split, *langs, skip)
    if cfg.dir and split_cfg.stem:
        return TextPair(
            _resolve_in_dir(cfg.dir, split_cfg.stem, cfg.src_lang),
            _resolve_in_dir(cfg.dir, split_cfg.stem, cfg.tgt_lang),
            skip,
        )
    if form == DataFormat.hub and split_cfg.split:
        name = cfg.hub_name or cfg.name
        return HubDataset(name, cfg.hub_config, split_cfg.split, *langs, cfg.hub_streaming, skip)
    if form == DataFormat.builtin:
        return Generated(dataclasses.astuple(cfg.builtin), split, *langs)
    return None


def _not_configured(cfg: DataConfig, split: Split) -> CorpusError:
    form = _format(cfg)
    keys = {
        DataFormat.text: f"data.{split}.src and data.{split}.tgt",
        DataFormat.hub: f"data.{split}.split",
        DataFormat.builtin: "nothing (always configured)",
    }.get(form, f"data.{split}.path")
    return CorpusError(
        f"no {split} split configured for data.format={form}: set {keys}, "
        f"or data.dir with data.{split}.stem"
    )


# ---------------------------------------------------------------------- fingerprints


def _settled_stat(path: Path) -> os.stat_result:
    """``path.stat()`` taken a clock tick after the file's last change.

    Why wait: file times advance in ticks, so a write in the same tick as the
    change seen here would leave every time unchanged. Only a file changed in
    the last moment waits, and for at most one tick.
    """
    stat = path.stat()
    wait = stat.st_ctime_ns + SETTLE_NS - time.time_ns()
    if wait > 0:
        time.sleep(min(wait, SETTLE_NS) / 1e9)
        stat = path.stat()
    return stat


def _file_fingerprint(path: Path) -> str:
    """Path, size, times, inode and the first and last bytes of a file.

    Why not a hash of the content: a second run must start without reading a
    corpus of millions of lines again. Size and mtime catch an ordinary edit;
    the change time and inode catch an edit or a replacement that restored the
    old mtime (``touch -r``, ``cp -p``, ``mv``), which the sampled bytes may miss
    when the change is in the middle. The content itself is hashed once, when a
    token store is built from it (``PairSource.content_digest``).
    """
    try:
        stat = _settled_stat(path)
        with path.open("rb") as handle:
            head = handle.read(SAMPLE_BYTES)
            handle.seek(max(0, stat.st_size - SAMPLE_BYTES))
            tail = handle.read(SAMPLE_BYTES)
    except FileNotFoundError as e:
        raise CorpusError(f"corpus file not found: {path}") from e
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e
    identity = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    digest = hashlib.sha256(f"{path.resolve()}\0{identity}\0".encode())
    digest.update(head)
    digest.update(tail)
    return digest.hexdigest()


def _files_digest(paths: Sequence[Path]) -> str:
    """Digest of the bytes of the files, as stored (compressed for ``.gz``)."""
    try:
        return text_digest("files", *(file_digest(path) for path in paths))
    except FileNotFoundError as e:
        raise CorpusError(f"corpus file not found: {e.filename}") from e
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {e.filename}: {e.strerror or e}") from e


def _content_fingerprint(src: Sequence[str], tgt: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for side in (src, tgt):
        digest.update(f"\0side {len(side)}\0".encode())
        for line in side:
            digest.update(line.encode("utf-8", "surrogatepass"))
            digest.update(b"\0")
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class PairSource:
    """A split, re-readable chunk by chunk without holding it in memory.

    ``files`` names two aligned text files; ``reader`` any other source (see ``locate``).
    """

    name: str
    files: tuple[Path, Path] | None = None
    reader: Reader | None = None

    @property
    def source(self) -> Reader:
        if self.reader is not None:
            return self.reader
        assert self.files is not None
        return TextPair(*self.files)

    @property
    def paths(self) -> tuple[Path, ...]:
        """The local files the split is read from (none for the generator or the hub)."""
        return tuple(self.source.files)

    def chunks(self, size: int) -> Iterator[Chunk]:
        """Consecutive rows, decoded and parsed; clean them with ``clean``."""
        return self.source.chunks(size)

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Cleaned, non-empty (source, target) pairs in corpus order."""
        for chunk in self.chunks(CHUNK_ROWS):
            src, tgt, _ = clean(chunk.src, chunk.tgt)
            yield from zip(src, tgt, strict=True)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the corpus for caches without reading it: the files' identity,
        or the dataset's own fingerprint; with what decides how rows become pairs."""
        source = self.source
        if isinstance(source, TextPair):
            src, tgt = (_file_fingerprint(path) for path in source.files)
            skip = "\0skip bad rows" if source.skip_bad_rows else ""
            return hashlib.sha256(f"files\0{src}\0{tgt}{skip}".encode()).hexdigest()
        if isinstance(source, HubDataset | Generated):
            return source.fingerprint()
        digest = hashlib.sha256(repr(dataclasses.astuple(source)).encode())
        for path in source.files:
            digest.update(_file_fingerprint(path).encode())
        return digest.hexdigest()

    @functools.cached_property
    def content_digest(self) -> str:
        """Identifies the rows themselves, whatever the files' names and times:
        reads the files whole (at memory speed), so only a build asks for it."""
        paths = self.paths
        return _files_digest(paths) if paths else self.fingerprint


# --------------------------------------------------------------------------- public


def train_source(cfg: DataConfig) -> PairSource:
    """The training split as a ``PairSource``, streamed whatever its format."""
    reader = locate(cfg, "train")
    if reader is None:
        raise _not_configured(cfg, "train")
    files = reader.files if isinstance(reader, TextPair) else None
    return PairSource(cfg.name, files=files, reader=reader)  # type: ignore[arg-type]


def report_bad_rows(split: str, count: int, names: Sequence[str]) -> None:
    """Log the rows that ``data.skip_bad_rows`` dropped, naming the first few."""
    if count:
        logger.warning(
            "%s split: skipped %d bad rows (data.skip_bad_rows=true); first: %s",
            split,
            count,
            "; ".join(names),
        )


def _load(cfg: DataConfig, split: Split) -> datasets.Dataset | None:
    """One split collected into a Dataset, or None when it is not configured."""
    reader = locate(cfg, split)
    if reader is None:
        return None
    src: list[str] = []
    tgt: list[str] = []
    rows = dropped = bad = 0
    names: list[str] = []
    for chunk in reader.chunks(CHUNK_ROWS):
        kept_src, kept_tgt, empty = clean(chunk.src, chunk.tgt)
        src += kept_src
        tgt += kept_tgt
        rows, dropped, bad = rows + chunk.rows, dropped + empty, bad + chunk.bad
        names += chunk.bad_names[: max(0, 3 - len(names))]
    report_bad_rows(split, bad, names)
    if dropped:
        logger.warning("%s split: dropped %d of %d pairs with an empty side", split, dropped, rows)
    if not src:
        raise CorpusError(f"{split} split of {cfg.name!r} has no non-empty pairs")
    logger.info("%s split: %d pairs (%s)", split, len(src), cfg.name)
    return datasets.Dataset.from_dict({"src": src, "tgt": tgt})


def load_split(cfg: DataConfig, split: Split) -> datasets.Dataset:
    """One split as a Dataset with columns "src" and "tgt" (stripped, no empty sides)."""
    dataset = _load(cfg, split)
    if dataset is None:
        raise _not_configured(cfg, split)
    return dataset


def load_corpus(cfg: DataConfig) -> datasets.DatasetDict:
    """Train, valid and (when configured) test splits.

    The test split is optional: it is skipped when not configured, or when
    ``data.dir`` has no file for its stem (the default stem "test" may simply not exist).
    """
    splits: dict[str, datasets.Dataset] = {}
    for split in SPLITS:
        try:
            dataset = _load(cfg, split)
        except _MissingDirFile as e:
            if split != "test":
                raise
            logger.warning("skipping the test split: %s", e)
            continue
        if dataset is None and split == "test":
            logger.info("no test split configured for data.format=%s; skipping it", cfg.format)
            continue
        if dataset is None:
            raise _not_configured(cfg, split)
        splits[split] = dataset
    return datasets.DatasetDict(splits)
