"""What every corpus reader yields: chunks of sentence pairs, and the rules all chunks obey.

Why one module: whatever the format (aligned text, TSV, JSONL, Parquet, Arrow,
a hub dataset, the generator), pairs reach the tokenizer and the token store as
the same ``Chunk``, malformed rows are refused or skipped by the same rule, and
sentences are cleaned by the same ``clean``. A reader never holds more than one
chunk, so a corpus of any size is read in bounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from seq2seq.data.text import TextError, decode_block

FIRST_BAD = 3  # bad rows named in the log and metrics; the rest are counted


class CorpusError(TextError):
    """A corpus cannot be read: missing or misaligned files, malformed rows, no config."""

    utf8_hint = "fix the file or set data.skip_bad_rows=true"


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows of a split, decoded but not yet cleaned.

    ``rows`` counts every row read (bad ones too); ``src``/``tgt`` hold the rows
    that parsed (empty strings for blank rows); ``bad`` counts the malformed rows
    skipped and ``bad_names`` names the first few ("file:line: reason").
    """

    src: list[str]
    tgt: list[str]
    rows: int
    bad: int = 0
    bad_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class BadLine:
    """A line that could not be decoded, kept in its place so that bad rows are
    refused (or named) in file order whatever made them bad."""

    number: int
    reason: str


@dataclass
class BadRows:
    """The bad-row policy of one read: the first bad row stops it, unless ``skip``."""

    skip: bool
    names: list[str] = field(default_factory=list)
    count: int = 0

    def reject(self, where: str, reason: str) -> None:
        """Refuse the row at ``where`` (raises), or count it when skipping."""
        if not self.skip:
            raise CorpusError(f"{where}: {reason}; {CorpusError.utf8_hint}")
        self.count += 1
        if len(self.names) < FIRST_BAD:
            self.names.append(f"{where}: {reason}")

    def chunk(self, src: list[str], tgt: list[str], rows: int) -> Chunk:
        """The chunk of these rows with the bad rows counted since the last chunk."""
        chunk = Chunk(src, tgt, rows, self.count, tuple(self.names))
        self.names, self.count = [], 0
        return chunk


def decode_rows(raw: Sequence[bytes], path: Path, first: int) -> list[str | BadLine]:
    """Decoded lines, a line that is not UTF-8 as a ``BadLine`` in its place.

    The block is decoded in one call; only a block that fails is decoded line by line.
    """
    try:
        return list(decode_block(raw, name=path, first=first, error=CorpusError))
    except CorpusError:
        pass
    lines: list[str | BadLine] = []
    hint = f"; {CorpusError.utf8_hint}"
    for number, line in enumerate(raw, start=first + 1):
        try:
            lines.extend(decode_block([line], name=path, first=number - 1, error=CorpusError))
        except CorpusError as e:
            reason = str(e).removeprefix(f"{path}:{number}: ").removesuffix(hint)
            lines.append(BadLine(number, reason))
    return lines


def clean(src: Sequence[str], tgt: Sequence[str]) -> tuple[list[str], list[str], int]:
    """Stripped sentences without the pairs that have an empty side, and how many
    pairs were dropped: the one cleaning rule of every split and format."""
    src = [s.strip() for s in src]
    tgt = [t.strip() for t in tgt]
    if all(src) and all(tgt):
        return src, tgt, 0
    kept = [i for i, (s, t) in enumerate(zip(src, tgt, strict=True)) if s and t]
    return [src[i] for i in kept], [tgt[i] for i in kept], len(src) - len(kept)


def pair_of(src: object, tgt: object) -> tuple[str, str] | None:
    """``(src, tgt)`` when both are strings, else None (a missing or non-text side)."""
    if isinstance(src, str) and isinstance(tgt, str):
        return src, tgt
    return None
