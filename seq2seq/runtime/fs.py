"""Output files that never clobber an input and appear whole or not at all.

Why: ``output=X`` with ``input=X`` (or ``./X``, or a symlink to X) used to
truncate X before it was read, and a run that failed half-way left a truncated
output in place of the previous one. Two rules fix both: an output that is the
same file as any input (compared by device and inode, so every spelling of a
path is caught) is refused before anything is opened, and an output is written
to a temporary file beside its target and renamed over it only when the run
succeeds.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO, cast


class OutputError(ValueError):
    """An output path would overwrite an input or another output."""


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` names through any symlinks, or None if absent."""
    try:
        st = os.stat(Path(path).expanduser())
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _special(path: str | Path) -> bool:
    """A device, FIFO or socket: written through, never clobbered (``/dev/null``)."""
    try:
        return not stat.S_ISREG(os.stat(Path(path).expanduser()).st_mode)
    except OSError:
        return False


def check_outputs(outputs: dict[str, str | None], inputs: dict[str, str | Path | None]) -> None:
    """Refuse outputs that are the same file as an input or as each other.

    Args:
        outputs: option name -> path (None: not written, e.g. stdout).
        inputs: option name -> path (None: not read from a file).

    Raises:
        OutputError: naming both options and the path.
    """
    seen: dict[tuple[int, int] | str, str] = {}
    for name, path in inputs.items():
        ident = _identity(path) if path is not None else None
        if ident is not None:
            seen.setdefault(ident, name)
    for name, path in outputs.items():
        if path is None or _special(path):
            continue
        key: tuple[int, int] | str = _identity(path) or os.path.realpath(Path(path).expanduser())
        if key in seen:
            raise OutputError(
                f"{name}={path} is the same file as {seen[key]}; writing it would destroy "
                f"{'that input' if seen[key] in inputs else 'the other output'}: "
                f"choose another {name}"
            )
        seen[key] = name


def files_under(root: str | Path, *, limit: int = 1000) -> dict[str, Path]:
    """Regular files under ``root`` (at most ``limit``), named for `check_outputs`."""
    found: dict[str, Path] = {}
    base = Path(root).expanduser()
    if base.is_file():
        return {f"model file {base}": base}
    for dirpath, _, names in os.walk(base):
        for name in names:
            if len(found) >= limit:
                return found
            path = Path(dirpath) / name
            found[f"model file {path}"] = path
    return found


@contextmanager
def replace_on_success(path: str | Path, *, encoding: str = "utf-8") -> Iterator[TextIO]:
    """A text file that replaces ``path`` only when the block ends without an error
    (see `_replaced`); lines end in "\\n"."""
    with _replaced(path, "w", encoding=encoding, newline="\n") as handle:
        yield cast(TextIO, handle)


@contextmanager
def replace_bytes_on_success(path: str | Path) -> Iterator[BinaryIO]:
    """`replace_on_success` for bytes."""
    with _replaced(path, "wb") as handle:
        yield cast(BinaryIO, handle)


@contextmanager
def _replaced(
    path: str | Path, mode: str, encoding: str | None = None, newline: str | None = None
) -> Iterator[IO[Any]]:
    """A file that replaces ``path`` only when the block ends without an error.

    The temporary file sits beside the target (beside the file a symlink points
    to), so the final rename stays on one file system and is atomic; a failed
    run removes it and leaves any existing ``path`` untouched. A target that is
    not a regular file (a device or FIFO) is written directly.
    """
    given = Path(path).expanduser()
    if _special(given):
        # A device, FIFO or terminal (/dev/null, /dev/stdout) is written in place:
        # renaming over it would replace the device node with a regular file.
        with open(given, mode, encoding=encoding, newline=newline) as stream:
            yield stream
        return
    target = Path(os.path.realpath(given))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode(target))
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write a whole text file through `replace_on_success`."""
    with replace_on_success(path) as handle:
        handle.write(text)


def _new_file_mode(target: Path) -> int:
    """The existing file's mode, or what ``open`` would give a new file (0o666 - umask)."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
