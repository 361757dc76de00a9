"""A token store's directory on disk: the header that seals it, the check that
opens it, and the rename that replaces one that cannot be trusted.

Why every byte is checked on every open: a truncated, emptied or overwritten
array must never be trained on, and a size check misses garbage written over a
file at the same size. Each array's digest (``digest.file_digest``, at memory
speed) is recorded in ``header.json`` when the store is built, and the header
carries a checksum of itself, so an edited count or dtype cannot make intact
arrays read wrongly either. A store that fails is renamed out of the way and
built again, never patched or reopened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from seq2seq.data.digest import file_digest, text_digest

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
HEADER = "header.json"
SIDES = ("src", "tgt")
KINDS = ("ids", "off", "len")
ARRAYS = tuple(f"{side}.{kind}" for side in SIDES for kind in KINDS)


class TokenStoreError(ValueError):
    """A token store that cannot be used; the message names the file or directory."""


def _checksum(header: dict[str, Any]) -> str:
    body = {key: value for key, value in header.items() if key != "checksum"}
    return text_digest(json.dumps(body, sort_keys=True))


def seal(directory: Path, header: dict[str, Any]) -> None:
    """Write ``header.json`` for the arrays in ``directory``: ``header`` plus each
    side's token count, each array's digest and the header's own checksum.

    The last step of a build: a directory without a sound header is never used.
    """
    sealed = dict(header)
    for side in SIDES:
        size = (directory / f"{side}.ids").stat().st_size
        sealed[f"{side}_tokens"] = size // np.dtype(sealed[f"{side}_dtype"]).itemsize
    sealed["digests"] = {name: file_digest(directory / name) for name in ARRAYS}
    sealed["checksum"] = _checksum(sealed)
    (directory / HEADER).write_text(json.dumps(sealed, indent=1) + "\n")


def read_header(directory: Path) -> dict[str, Any]:
    """The store's header, once its format and checksum are right.

    Raises:
        TokenStoreError: missing, unreadable, of another format, or edited.
    """
    path = directory / HEADER
    try:
        header = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise TokenStoreError(f"{directory} is an incomplete token store (no {HEADER})") from e
    except OSError as e:
        raise TokenStoreError(f"cannot read {path}: {e.strerror or e}") from e
    except ValueError as e:  # JSON or UTF-8
        raise TokenStoreError(f"{path} is not a valid token store header ({e})") from e
    if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
        version = header.get("version") if isinstance(header, dict) else None
        raise TokenStoreError(f"{path}: token store format {version}, not {FORMAT_VERSION}")
    if header.get("checksum") != _checksum(header):
        raise TokenStoreError(f"{path} does not match its checksum (edited or damaged)")
    return header


def _layout(header: dict[str, Any], name: str) -> tuple[np.dtype, int]:
    """Element type and count of the array ``name`` (e.g. ``src.off``)."""
    side, kind = name.split(".")
    if kind == "ids":
        return np.dtype(header[f"{side}_dtype"]), int(header[f"{side}_tokens"])
    if kind == "off":
        return np.dtype(np.int64), int(header["pairs"]) + 1
    return np.dtype(header["length_dtype"]), int(header["pairs"])


def _check_array(directory: Path, name: str, header: dict[str, Any]) -> tuple[np.dtype, int]:
    path = directory / name
    try:
        dtype, count = _layout(header, name)
        want = header["digests"][name]
    except (KeyError, TypeError, ValueError) as e:
        raise TokenStoreError(f"{directory / HEADER} does not describe {name} ({e!r})") from e
    try:
        size = path.stat().st_size
        if size != count * dtype.itemsize:
            raise TokenStoreError(
                f"{path} holds {size} bytes where its header says {count * dtype.itemsize}"
            )
        if file_digest(path) != want:
            raise TokenStoreError(f"{path} changed after the store was built (digest differs)")
    except FileNotFoundError as e:
        raise TokenStoreError(f"{path} is missing") from e
    except OSError as e:
        raise TokenStoreError(f"cannot read {path}: {e.strerror or e}") from e
    return dtype, count


def verify(directory: Path) -> dict[str, Any]:
    """Check the header and every array of the store in ``directory``; its header.

    Raises:
        TokenStoreError: naming the first file that is missing, damaged or changed.
    """
    header = read_header(directory)
    for name in ARRAYS:
        _check_array(directory, name, header)
    return header


def open_arrays(directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The verified header and every array, memory-mapped read-only."""
    header = verify(directory)
    arrays = {}
    for name in ARRAYS:
        dtype, count = _layout(header, name)
        path = directory / name
        try:
            # numpy cannot map an empty file; an empty array needs no file.
            arrays[name] = np.memmap(path, dtype=dtype, mode="r") if count else np.zeros(0, dtype)
        except OSError as e:
            raise TokenStoreError(f"cannot map {path}: {e.strerror or e}") from e
    return header, arrays


def discard(directory: Path) -> None:
    """Rename a store out of the way (one atomic step, so nobody opens half of it),
    then delete it. Processes that mapped it keep reading their open files."""
    prefix = f".{directory.name}."
    aside = Path(tempfile.mkdtemp(dir=directory.parent, prefix=prefix, suffix=".bad"))
    with contextlib.suppress(FileNotFoundError):  # another process discarded it first
        os.rename(directory, aside / directory.name)
    shutil.rmtree(aside, ignore_errors=True)
