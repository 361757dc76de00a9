"""Corpora kept as tables: Parquet files, Arrow files, ``save_to_disk`` directories, hub datasets.

Why Arrow record batches and never ``dataset["src"]``: a table of millions of
rows turned into Python lists costs gigabytes. Here Parquet is read batch by
batch, Arrow files and ``datasets`` tables are memory-mapped, a hub dataset can
be streamed (``data.hub_streaming``), and only one chunk of rows is ever a list.

A table holds a pair as columns ``src`` and ``tgt``, a ``translation`` column of
``{language: text}``, or one column per language (``data.src_lang``/``tgt_lang``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seq2seq.data.chunks import BadRows, Chunk, CorpusError, pair_of


def pair_columns(names: Sequence[str], src_lang: str, tgt_lang: str, where: str) -> tuple[str, ...]:
    """The columns that hold a pair, in order of preference."""
    if "src" in names and "tgt" in names:
        return ("src", "tgt")
    if "translation" in names:
        return ("translation",)
    if src_lang in names and tgt_lang in names:
        return (src_lang, tgt_lang)
    raise CorpusError(
        f"{where} has columns {list(names)}; expected 'src' and 'tgt', 'translation', or "
        f"{src_lang!r} and {tgt_lang!r} (data.src_lang/data.tgt_lang)"
    )


def _side(table: pa.Table, columns: tuple[str, ...], lang: str, index: int, where: str) -> Any:
    if columns != ("translation",):
        return table.column(columns[index])
    column = table.column("translation")
    if not pa.types.is_struct(column.type) or column.type.get_field_index(lang) < 0:
        raise CorpusError(f"{where}: 'translation' has no language {lang!r} ({column.type})")
    return pc.struct_field(column, lang)


def _is_text(values: Any) -> bool:
    return bool(pa.types.is_string(values.type) or pa.types.is_large_string(values.type))


@dataclass(frozen=True)
class _Rows:
    """How a table's rows become a chunk: where they come from and which columns."""

    where: str
    src_lang: str
    tgt_lang: str
    skip_bad_rows: bool

    def chunks(self, tables: Iterable[pa.Table]) -> Iterator[Chunk]:
        bad, first, columns = BadRows(self.skip_bad_rows), 0, None
        for table in tables:
            if columns is None:
                columns = pair_columns(table.column_names, self.src_lang, self.tgt_lang, self.where)
            sides = [
                _side(table, columns, lang, i, self.where) for i, lang in enumerate(self._langs)
            ]
            src, tgt = sides[0].to_pylist(), sides[1].to_pylist()
            if not all(_is_text(side) and side.null_count == 0 for side in sides):
                kept = []
                for number, (s, t) in enumerate(zip(src, tgt, strict=True), start=first + 1):
                    pair = pair_of(s, t)
                    if pair is None:
                        bad.reject(f"{self.where}: row {number}", "a side is missing or not text")
                    else:
                        kept.append(pair)
                src, tgt = [s for s, _ in kept], [t for _, t in kept]
            yield bad.chunk(src, tgt, table.num_rows)
            first += table.num_rows

    @property
    def _langs(self) -> tuple[str, str]:
        return (self.src_lang, self.tgt_lang)


def _rebatch(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Tables of ``size`` rows (the last one shorter), whatever the batches' sizes."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        pending.append(batch)
        rows += batch.num_rows
        while rows >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending)


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC stream (as ``datasets`` writes) or file."""
    source = pa.memory_map(str(path))
    try:
        yield from pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)


@dataclass(frozen=True, eq=False)
class TableFiles:
    """``format=parquet`` (a file, or a directory of ``*.parquet``) or ``format=arrow``
    (an Arrow file, or a ``datasets`` ``save_to_disk`` directory; ``split`` picks
    one split of a saved ``DatasetDict``)."""

    path: Path
    format: str
    split: str | None
    src_lang: str
    tgt_lang: str
    skip_bad_rows: bool = False

    @functools.cached_property
    def files(self) -> tuple[Path, ...]:
        """The data files, which the corpus fingerprint covers."""
        if not self.path.exists():
            raise CorpusError(f"corpus file not found: {self.path}")
        if self.format == "parquet" and self.path.is_dir():
            found = tuple(sorted(self.path.rglob("*.parquet")))
            if not found:
                raise CorpusError(f"no *.parquet files in {self.path}")
            return found
        if self.path.is_dir():
            return tuple(Path(f["filename"]) for f in self._saved.cache_files)
        return (self.path,)

    @functools.cached_property
    def _saved(self) -> datasets.Dataset:
        """The ``save_to_disk`` dataset at ``path``, memory-mapped."""
        try:
            saved = datasets.load_from_disk(str(self.path))
        except (OSError, ValueError) as e:
            raise CorpusError(f"{self.path} is not a datasets save_to_disk directory: {e}") from e
        if isinstance(saved, datasets.DatasetDict):
            if self.split not in saved:
                raise CorpusError(
                    f"{self.path} has splits {sorted(saved)}; set data.<split>.split to one"
                )
            return saved[self.split]
        return saved

    def chunks(self, size: int) -> Iterator[Chunk]:
        rows = _Rows(str(self.path), self.src_lang, self.tgt_lang, self.skip_bad_rows)
        try:
            yield from rows.chunks(self._tables(size))
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"cannot read {self.format} corpus {self.path}: {e}") from e

    def _tables(self, size: int) -> Iterator[pa.Table]:
        if self.path.is_dir() and self.format == "arrow":
            yield from self._saved.with_format("arrow").iter(batch_size=size)
        elif self.format == "parquet":
            for file in self.files:
                yield from _rebatch(pq.ParquetFile(file).iter_batches(batch_size=size), size)
        else:
            yield from _rebatch(_arrow_batches(self.path), size)


@dataclass(frozen=True, eq=False)
class HubDataset:
    """A split loaded by ``datasets.load_dataset``: a hub name, or a local folder of
    data files (the same code, e.g. with ``HF_DATASETS_OFFLINE=1``)."""

    name: str
    config: str | None
    split: str
    src_lang: str
    tgt_lang: str
    streaming: bool = False
    skip_bad_rows: bool = False
    files = ()

    @functools.cached_property
    def dataset(self) -> datasets.Dataset | datasets.IterableDataset:
        try:
            return datasets.load_dataset(
                self.name, self.config, split=self.split, streaming=self.streaming
            )
        except Exception as e:  # network, missing dataset, unknown split: all mean the same here
            raise CorpusError(
                f"could not load dataset {self.name!r} (config {self.config!r}, split "
                f"{self.split!r}) with datasets.load_dataset: {e}. Without network, point "
                f"data.dir= at local files {{stem}}.{self.src_lang}/{{stem}}.{self.tgt_lang}"
                f"[.gz] or use data.format=text/tsv/jsonl/parquet/arrow"
            ) from e

    def fingerprint(self) -> str:
        """The dataset's own fingerprint (a streamed one: its name, split and info)."""
        dataset = self.dataset
        if isinstance(dataset, datasets.Dataset):
            own = dataset._fingerprint
        else:
            own = repr((self.name, self.config, self.split, dataset.info.version))
        langs = f"{self.src_lang}\0{self.tgt_lang}\0{self.skip_bad_rows}"
        return hashlib.sha256(f"hub\0{own}\0{langs}".encode()).hexdigest()

    def chunks(self, size: int) -> Iterator[Chunk]:
        where = f"dataset {self.name!r} split {self.split!r}"
        rows = _Rows(where, self.src_lang, self.tgt_lang, self.skip_bad_rows)
        dataset = self.dataset
        if isinstance(dataset, datasets.Dataset):
            yield from rows.chunks(dataset.with_format("arrow").iter(batch_size=size))
        else:
            batches = dataset.iter(batch_size=size)
            yield from rows.chunks(pa.Table.from_pydict(batch) for batch in batches)
