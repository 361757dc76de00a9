"""The one way text files are read: UTF-8 lines with their numbers, from plain or gzip files.

Every reader of sentences (corpora, translation input, evaluation files, the
scripts) comes through here, so the rules hold everywhere:

* lines end at "\\n" only: a stray "\\r" or U+2028 inside a sentence cannot split it
  and break the one-line-per-sentence contract (a CRLF file keeps its "\\r", which
  every consumer strips as whitespace);
* a leading byte-order mark is dropped;
* ``*.gz`` files are decompressed;
* an invalid byte sequence names its file and 1-based line number
  (``errors="strict"``), or becomes U+FFFD (``errors="replace"``);
* a line of only whitespace and NUL characters reads as "" (it carries no text).

Why bytes first: a text-mode reader decodes 8 KB blocks and cannot say which
line was bad; decoding a block of lines ourselves is as fast and can.
"""

from __future__ import annotations

import gzip
import itertools
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

BLOCK_LINES = 10_000  # lines decoded together by ``iter_lines``


class TextError(ValueError):
    """A text file cannot be read: missing, corrupt gzip, or not UTF-8 (naming the line).

    Subclasses name their own way out of an encoding error in ``utf8_hint``.
    """

    utf8_hint = "fix the file or read it with errors=replace"


def open_binary(
    path: str | Path, *, what: str = "file", error: type[TextError] = TextError
) -> BinaryIO:
    """``path`` opened for reading bytes, gunzipped when it ends in ``.gz``.

    ``what`` names the file in errors ("input file", "corpus file") and ``error`` is
    the exception raised, so each caller keeps its own error type.
    """
    file = Path(path).expanduser()
    try:
        if file.suffix == ".gz":
            return gzip.open(file, "rb")  # type: ignore[return-value]
        return file.open("rb")
    except FileNotFoundError as e:
        raise error(f"{what} not found: {file}") from e
    except OSError as e:
        raise error(f"cannot read {what} {file}: {e}") from e


def read_block(
    handle: BinaryIO, size: int, *, name: object, error: type[TextError] = TextError
) -> list[bytes]:
    """The next ``size`` raw lines of ``handle`` (fewer at the end), each with its "\\n"."""
    try:
        return list(itertools.islice(handle, size))
    except (OSError, EOFError, zlib.error) as e:
        raise error(f"{name}: corrupt or truncated file: {e}") from e


def decode_block(
    raw: Sequence[bytes],
    *,
    name: object,
    first: int,
    errors: str = "strict",
    error: type[TextError] = TextError,
) -> list[str]:
    """Decoded lines without their "\\n"; ``first`` is the 0-based number of ``raw[0]``.

    The block is decoded in one call and split again at "\\n"; only a failure is
    looked at line by line, to name the line.
    """
    if not raw:
        return []
    try:
        text = b"".join(raw).decode("utf-8", errors=errors)
    except UnicodeDecodeError:
        for number, line in enumerate(raw, start=first + 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(
                    f"{name}:{number}: not valid UTF-8 (byte {e.start + 1} of the line: "
                    f"{e.reason}); {error.utf8_hint}"
                ) from e
        raise
    lines = text.split("\n")[: len(raw)]  # every line but the file's last ends with "\n"
    if first == 0:
        lines[0] = lines[0].removeprefix("\ufeff")
    if "\0" in text:
        lines = ["" if blank(line) else line for line in lines]
    return lines


def blank(line: str) -> bool:
    """A line of only whitespace and NUL characters carries no text."""
    return not line.replace("\0", "").strip()


def iter_lines(
    path: str | Path | None,
    *,
    errors: str = "strict",
    what: str = "file",
    error: type[TextError] = TextError,
) -> Iterator[str]:
    """Lines of ``path`` (stdin when None), read lazily in blocks.

    The file is opened at once, so a missing file fails here rather than at the
    first ``next``; it is closed when the iterator is exhausted or fails.
    """
    if path is None:
        return _lines(sys.stdin.buffer, "<stdin>", errors, error, close=False)
    handle = open_binary(path, what=what, error=error)
    return _lines(handle, path, errors, error, close=True)


def _lines(
    handle: BinaryIO, name: object, errors: str, error: type[TextError], *, close: bool
) -> Iterator[str]:
    first = 0
    try:
        while raw := read_block(handle, BLOCK_LINES, name=name, error=error):
            yield from decode_block(raw, name=name, first=first, errors=errors, error=error)
            first += len(raw)
    finally:
        if close:
            handle.close()


def read_lines(
    path: str | Path,
    *,
    errors: str = "strict",
    what: str = "file",
    error: type[TextError] = TextError,
) -> list[str]:
    """Every line of ``path``, as ``iter_lines`` reads them."""
    return list(iter_lines(path, errors=errors, what=what, error=error))
