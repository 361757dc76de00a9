"""Corpora kept as lines of text: two aligned files, or one TSV or JSONL file.

Each reader streams its file(s) in chunks of lines and names a malformed row by
file and 1-based line. Two aligned files are compared line for line as they are
read: files that differ by one line would silently shift every later pair out
of alignment, so the first pass stops there, naming both files and both counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from seq2seq.data.chunks import BadLine, BadRows, Chunk, CorpusError, decode_rows, pair_of
from seq2seq.data.text import open_binary, read_block

# A row parser: the pair of one non-blank line, or the reason it is malformed.
Parser = Callable[[str], "tuple[str, str] | str"]


def _open(path: Path) -> BinaryIO:
    return open_binary(path, what="corpus file", error=CorpusError)


def _count_rest(handle: BinaryIO, path: Path) -> int:
    count = 0
    while block := _block(handle, path, 1 << 16):
        count += len(block)
    return count


def _block(handle: BinaryIO, path: Path, size: int) -> list[bytes]:
    return read_block(handle, size, name=path, error=CorpusError)


@dataclass(frozen=True)
class TextPair:
    """Two aligned plain-text files (``.gz`` too), one sentence per line."""

    src: Path
    tgt: Path
    skip_bad_rows: bool = False

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.src, self.tgt)

    def chunks(self, size: int) -> Iterator[Chunk]:
        """Both files side by side, ``size`` lines at a time; a line that is bad on
        either side drops the pair (with ``skip_bad_rows``)."""
        bad = BadRows(self.skip_bad_rows)
        with _open(self.src) as src, _open(self.tgt) as tgt:
            first = 0
            while True:
                src_raw, tgt_raw = _block(src, self.src, size), _block(tgt, self.tgt, size)
                if len(src_raw) != len(tgt_raw):
                    n_src = first + len(src_raw) + _count_rest(src, self.src)
                    n_tgt = first + len(tgt_raw) + _count_rest(tgt, self.tgt)
                    raise CorpusError(
                        f"misaligned corpus: {self.src} has {n_src} lines "
                        f"but {self.tgt} has {n_tgt}"
                    )
                if not src_raw:
                    return
                src_kept, tgt_kept = self._aligned(
                    decode_rows(src_raw, self.src, first),
                    decode_rows(tgt_raw, self.tgt, first),
                    bad,
                )
                yield bad.chunk(src_kept, tgt_kept, len(src_raw))
                first += len(src_raw)

    def _aligned(
        self, src: list[str | BadLine], tgt: list[str | BadLine], bad: BadRows
    ) -> tuple[list[str], list[str]]:
        """The pairs whose lines both decoded; a pair with a bad line on either side
        (or both) is one bad row, named by its first bad side."""
        kept: tuple[list[str], list[str]] = ([], [])
        for s, t in zip(src, tgt, strict=True):
            if isinstance(s, BadLine):
                bad.reject(f"{self.src}:{s.number}", s.reason)
            elif isinstance(t, BadLine):
                bad.reject(f"{self.tgt}:{t.number}", t.reason)
            else:
                kept[0].append(s)
                kept[1].append(t)
        return kept


@dataclass(frozen=True)
class LineFile:
    """One pair per line of one file: ``tsv`` ("source<TAB>target") or ``jsonl``
    (``{"src", "tgt"}`` or ``{"translation": {src_lang, tgt_lang}}``). A blank line
    is an empty pair (dropped and counted by the cleaning)."""

    path: Path
    format: str
    src_lang: str
    tgt_lang: str
    skip_bad_rows: bool = False

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.path,)

    def chunks(self, size: int) -> Iterator[Chunk]:
        parse = _tsv if self.format == "tsv" else _jsonl_parser(self.src_lang, self.tgt_lang)
        bad = BadRows(self.skip_bad_rows)
        with _open(self.path) as handle:
            first = 0
            while raw := _block(handle, self.path, size):
                src: list[str] = []
                tgt: list[str] = []
                for number, line in enumerate(decode_rows(raw, self.path, first), first + 1):
                    if isinstance(line, BadLine):
                        bad.reject(f"{self.path}:{number}", line.reason)
                        continue
                    pair = parse(line) if line.strip() else ("", "")
                    if isinstance(pair, str):
                        bad.reject(f"{self.path}:{number}", pair)
                        continue
                    src.append(pair[0])
                    tgt.append(pair[1])
                yield bad.chunk(src, tgt, len(raw))
                first += len(raw)


def _tsv(line: str) -> tuple[str, str] | str:
    fields = line.split("\t")
    if len(fields) != 2:
        return f"expected 'source<TAB>target' (exactly one tab), found {len(fields) - 1} tabs"
    return fields[0], fields[1]


def _jsonl_parser(src_lang: str, tgt_lang: str) -> Parser:
    shapes = (
        f'expected {{"src": str, "tgt": str}} or '
        f'{{"translation": {{"{src_lang}": str, "{tgt_lang}": str}}}}'
    )

    def parse(line: str) -> tuple[str, str] | str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"invalid JSON ({e.msg})"
        pair = None
        if isinstance(record, dict) and "src" in record and "tgt" in record:
            pair = pair_of(record["src"], record["tgt"])
        elif isinstance(record, dict) and isinstance(record.get("translation"), dict):
            translation = record["translation"]
            pair = pair_of(translation.get(src_lang), translation.get(tgt_lang))
        return shapes if pair is None else pair

    return parse
