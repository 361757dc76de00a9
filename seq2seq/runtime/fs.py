"""Files and directories that appear whole or not at all, never clobber an input,
and are read back only from where they should be.

Why each rule:

* **Written beside, then renamed.** Every file (`atomic_file`) and every
  directory (`atomic_directory`) is written under a temporary name in the
  target's own directory, flushed to disk, and renamed into place, so a kill or
  a full disk at any moment leaves either the previous version or the new one,
  never a torn one. The rename stays on one file system, where it is atomic.
* **Nothing half-written is left behind.** A writer killed mid-write leaves its
  temporary file; the next write of the same file removes it (each temporary is
  locked while its writer lives, so only a dead writer's goes). A write that
  fails for want of space says which file it was writing.
* **Outputs never clobber inputs.** An output that is the same file as any
  input (compared by device and inode, so every spelling of a path is caught)
  is refused before anything is opened (`check_outputs`): truncating it would
  destroy what the run was about to read.
* **Reads stay inside their directory.** A directory someone else wrote may
  hold a symlink out of it, a FIFO that blocks a reader, or a huge file;
  `regular_file` and `read_bounded` refuse all three before reading a byte.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO, cast

logger = logging.getLogger(__name__)


class OutputError(ValueError):
    """An output path would overwrite an input or another output."""


# ------------------------------------------------------------------ outputs vs inputs


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


# ----------------------------------------------------------------------------- files


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; on success it is
    flushed to disk and renamed over ``path``, on an error removed.

    The temporary file sits beside the file a symlink points to, so the link
    survives and the rename stays on one file system. It gets the mode of the
    file it replaces (or a new file's), so a replaced file keeps its permissions.
    """
    target = Path(os.path.realpath(Path(path).expanduser()))
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    fd, tmp = _locked_temporary(target)
    try:
        os.chmod(tmp, _new_file_mode(target))
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and (named := naming(e, target)) is not None:
            raise named from e
        raise
    finally:
        os.close(fd)
    _fsync(target.parent)


def _locked_temporary(target: Path) -> tuple[int, str]:
    """A new temporary file beside ``target``, locked (``flock``) while it is written.

    Why the lock: a writer killed mid-write leaves its temporary behind; the next
    writer of ``target`` removes those it can lock (`_remove_abandoned`), since
    the kernel drops a dead process's lock, while a live writer's stays locked.
    One removed between its creation and its lock is noticed (no links left) and
    replaced.
    """
    while True:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink:
                return fd, tmp
        except BlockingIOError:  # another writer is removing it as abandoned
            pass
        os.close(fd)


def _remove_abandoned(target: Path) -> None:
    """Remove the temporaries of writers of ``target`` that were killed mid-write:
    those of `_locked_temporary`'s names that no live process holds locked."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"[a-z0-9_]{8}\.tmp")
    try:
        names = [n for n in os.listdir(target.parent) if pattern.fullmatch(n)]
    except OSError:
        return
    for name in names:
        path = target.parent / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if stat.S_ISREG(os.fstat(fd).st_mode) and os.path.samestat(
                os.fstat(fd), os.lstat(path)
            ):
                os.unlink(path)
                logger.info("removed %s, left by a write that was interrupted", path)
        except OSError:  # locked by a live writer, or gone meanwhile
            pass
        finally:
            os.close(fd)


@contextmanager
def replace_on_success(path: str | Path, *, encoding: str = "utf-8") -> Iterator[TextIO]:
    """A text file that replaces ``path`` only when the block ends without an error
    (see `atomic_file`); lines end in "\\n"."""
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
    """An open `atomic_file`; a target that is not a regular file is written directly."""
    if _special(path):
        # A device, FIFO or terminal (/dev/null, /dev/stdout) is written in place:
        # renaming over it would replace the device node with a regular file.
        try:
            with open(Path(path).expanduser(), mode, encoding=encoding, newline=newline) as out:
                yield out
        except OSError as e:
            named = naming(e, Path(path))
            if named is None:
                raise
            raise named from e
        return
    with (
        atomic_file(path) as tmp,
        open(tmp, mode, encoding=encoding, newline=newline) as handle,
    ):
        yield handle


# A write with nowhere to go: the OS's message names no file.
_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's, errno unset


def naming(error: OSError, path: Path) -> OSError | None:
    """A failed write that names no file (a full disk, a short write) as an error
    naming ``path``; None for any other error, which stays as it is."""
    if error.filename is not None:
        return None
    if error.errno is None and _SHORT_WRITE.fullmatch(str(error)):
        return OSError(f"cannot write {path}: a short write ({error}); is the disk full?")
    if error.errno in _WRITE_FAILURES:
        return OSError(error.errno, f"cannot write {path}: {error.strerror}")
    return None


def write_text(path: str | Path, text: str) -> None:
    """Write a whole text file through `replace_on_success`."""
    with replace_on_success(path) as handle:
        handle.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole file through `replace_bytes_on_success`."""
    with replace_bytes_on_success(path) as handle:
        handle.write(data)


def _new_file_mode(target: Path) -> int:
    """The existing file's mode, or what ``open`` would give a new file."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        return new_file_mode()


def new_file_mode() -> int:
    """What ``open`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def new_directory_mode() -> int:
    """What ``mkdir`` gives a new directory: 0o777 less the umask."""
    return 0o777 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting
    it to read it would give files another thread creates meanwhile mode 0o666)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------- directories


@contextmanager
def atomic_directory(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """A fresh temporary directory beside ``path`` for the block to fill; on success
    its files are flushed to disk and it takes the place of ``path``.

    An existing ``path`` is renamed aside to ``NAME.old`` first and removed last;
    a kill between the two renames leaves ``NAME.old`` as the one complete copy,
    which readers fall back to. A failed block removes the temporary directory.

    Args:
        replace: False for a cache keyed by its content, which several processes
            may build at once: a ``path`` that another one completed meanwhile is
            kept and this copy discarded, so a reader never sees it swapped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        # mkdtemp creates it 0700; the directory it becomes is read like any other
        # (a service account loads a bundle), so it gets a new directory's mode.
        os.chmod(tmp, new_directory_mode())
        yield tmp
        _fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (named := naming(e, path)) is not None:
            raise named from e
        raise
    if not replace:
        _rename_unless_present(tmp, path)
        return
    old = path.with_name(path.name + ".old")
    # A set-aside copy is stale only while ``path`` itself is complete; without
    # ``path`` it is the one complete copy and stays until the new one is in place.
    if os.path.lexists(path):
        remove_entry(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    remove_entry(old)


def _rename_unless_present(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``, or discard it if another writer put ``path`` there."""
    try:
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("another process wrote %s first; using it", path)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    _fsync(path.parent)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (itself included) to disk."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            file = Path(dirpath) / name
            if file.is_file() and not file.is_symlink():
                _fsync(file)
        _fsync(Path(dirpath))


def remove_entry(path: Path) -> None:
    """Remove a file, a symlink (not what it points to) or a directory tree, if present."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# ----------------------------------------------------------------------------- reads


def regular_file(
    root: Path,
    name: str,
    *,
    limit: int | None,
    error: type[ValueError] = ValueError,
    within: str = "the directory",
) -> Path:
    """``root/name`` (through symlinks) if it is a regular file inside ``root`` of at
    most ``limit`` bytes; otherwise ``error``, naming ``root`` as ``within``."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(root / name)
    if os.path.commonpath([real_root, real]) != real_root:
        raise error(f"{root / name} points outside {within} (to {real})")
    try:
        st = os.stat(real)
    except FileNotFoundError as e:
        raise error(f"{root} has no {name}") from e
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{root / name} is not a regular file")
    if limit is not None and st.st_size > limit:
        raise error(f"{root / name} has {st.st_size} bytes; at most {limit} are accepted")
    return Path(real)


def read_bounded(
    root: Path,
    name: str,
    limit: int,
    *,
    error: type[ValueError] = ValueError,
    within: str = "the directory",
) -> bytes:
    """The bytes of `regular_file`, read without blocking and never past ``limit``."""
    path = regular_file(root, name, limit=limit, error=error, within=within)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise error(f"{root / name} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{root / name} has more than {limit} bytes")
    return data
