"""Files and directories written whole or not at all, outputs that never clobber an
input, and reads confined to their directory."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from seq2seq.config import TrainApp
from seq2seq.model import bundle
from seq2seq.runtime import fs
from seq2seq.runtime.fs import OutputError, check_outputs, replace_on_success
from tests.helpers import checkout_env, tiny_model

# ----------------------------------------------------------------- outputs vs inputs


def test_outputs_are_compared_by_inode(tmp_path):
    """A hard link is the same file under another name; a new path is no input."""
    src = tmp_path / "in.txt"
    src.write_text("x\n")
    os.link(src, tmp_path / "hard.txt")
    with pytest.raises(OutputError, match="same file as input"):
        check_outputs({"output": str(tmp_path / "hard.txt")}, {"input": str(src)})
    with pytest.raises(OutputError, match="same file as output"):
        check_outputs({"output": "a.txt", "alignments": "./a.txt"}, {"input": str(src)})
    check_outputs({"output": str(tmp_path / "new.txt")}, {"input": str(src), "stdin": None})
    check_outputs({"output": "/dev/null", "alignments": "/dev/null"}, {"input": "/dev/null"})


def test_output_to_a_device_writes_through_it(tmp_path):
    """``output=/dev/null`` must not replace the device node with a regular file."""
    before = os.stat("/dev/null")
    with replace_on_success("/dev/null") as out:
        out.write("discarded\n")
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    with replace_on_success(fifo) as out:
        out.write("through\n")
    assert reader.communicate(timeout=30)[0] == b"through\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


# ------------------------------------------------------------------- atomic writes


def test_failed_file_write_keeps_the_old_file_and_its_mode(tmp_path):
    path = tmp_path / "out.txt"
    fs.write_text(path, "earlier\n")
    path.chmod(0o640)
    with pytest.raises(RuntimeError), fs.replace_on_success(path) as out:
        out.write("half")
        raise RuntimeError("killed")
    assert path.read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    fs.write_bytes(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_write_through_a_symlink_replaces_its_target(tmp_path):
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("old\n")
    link.symlink_to(target)
    fs.write_text(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"


def test_failed_write_keeps_the_old_bundle(tmp_path, tiny_bundle):
    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    before = (path / bundle.WEIGHTS).read_bytes()
    with pytest.raises(RuntimeError), fs.atomic_directory(path) as tmp:
        (tmp / bundle.WEIGHTS).write_bytes(b"half-written")
        raise RuntimeError("killed")
    assert (path / bundle.WEIGHTS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize("replace", [True, False])
def test_directory_swap_replaces_unless_asked_to_keep(tmp_path, replace):
    """``replace=False`` (a cache built by several processes at once) keeps the copy
    that another writer completed first and discards its own."""
    path = tmp_path / "d"
    with fs.atomic_directory(path) as tmp:
        (tmp / "f").write_text("first")
    with fs.atomic_directory(path, replace=replace) as tmp:
        (tmp / "f").write_text("second")
    assert (path / "f").read_text() == ("second" if replace else "first")
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


# -------------------------------------------------------------------- confined reads


class Refused(ValueError):
    """The caller's own error for a file it must not read."""


def test_reads_stay_inside_their_directory(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "small").write_bytes(b"12345")
    (tmp_path / "outside").write_bytes(b"x")
    (root / "link").symlink_to(tmp_path / "outside")
    os.mkfifo(root / "fifo")
    assert fs.read_bounded(root, "small", 5) == b"12345"
    cases = [
        ("link", "points outside the box"),
        ("fifo", "not a regular file"),
        ("small", "at most 4"),
        ("absent", "has no absent"),
    ]
    for name, message in cases:
        with pytest.raises(Refused, match=message):
            fs.read_bounded(root, name, 4, error=Refused, within="the box")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_new_directories_and_bundle_files_get_the_umasks_modes(tmp_path, tokenizer, umask):
    """A service account must be able to read what a training wrote: a bundle's
    directory and files get what ``mkdir`` and ``open`` give under the umask
    (not the 0700 of a temporary directory, nor safetensors' 0600)."""

    old = os.umask(umask)
    try:
        with fs.atomic_directory(tmp_path / "plain") as tmp:
            (tmp / "f").write_text("x")
        path = bundle.save(
            tmp_path / "b", model=tiny_model(tokenizer), config=TrainApp(), tokenizer=tokenizer
        )
        assert (fs.new_file_mode(), fs.new_directory_mode()) == (0o666 & ~umask, 0o777 & ~umask)
    finally:
        os.umask(old)
    for directory in (tmp_path / "plain", path):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o666 & ~umask}


WRITER = """
import sys, time
from seq2seq.runtime.fs import replace_on_success
with replace_on_success(sys.argv[1]) as out:
    out.write("partial")
    out.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    """A translation killed mid-write leaves its hidden temporary; the next write of
    the same output removes it, but never the temporary of a writer still alive."""
    target = tmp_path / "out.txt"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)],
        stdout=subprocess.PIPE,
        text=True,
        env=checkout_env(),
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        (partial,) = (p for p in tmp_path.iterdir() if p.name.startswith(".out.txt."))
        fs.write_text(target, "first\n")
        assert partial.exists(), "a live writer's temporary was removed"
    finally:
        writer.kill()
        writer.wait()
    fs.write_text(target, "second\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert target.read_text() == "second\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_disk_names_the_file():
    with pytest.raises(OSError, match=r"cannot write /dev/full: No space left"):
        fs.write_text("/dev/full", "line\n" * 10_000)


@pytest.fixture
def file_size_limit():
    """Set how large a file may grow: a write beyond fails as on a full disk (EFBIG,
    or a short write), without filling one."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda size: resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def test_a_write_that_runs_out_of_room_names_its_file(tmp_path, tokenizer, file_size_limit):
    """The OS's own messages (``[Errno 27] File too large``, numpy's ``N requested
    and M written``, torch's ``unexpected pos``) name no file; each failure leaves
    what was there before and no temporary."""
    model = tiny_model(tokenizer)
    fits = bundle.save(tmp_path / "fits", model=model, config=TrainApp(), tokenizer=tokenizer)
    largest = max(f.stat().st_size for f in fits.iterdir())
    shutil.rmtree(fits)
    target = tmp_path / "out.txt"
    target.write_text("earlier\n")
    file_size_limit(largest + 4096)

    with pytest.raises(OSError, match=f"cannot write {target}: File too large"):
        fs.write_text(target, "x" * (largest + 10_000))
    store = tmp_path / "store"
    with (
        pytest.raises(OSError, match=f"cannot write {store}: a short write"),
        fs.atomic_directory(store) as tmp,
    ):
        np.zeros(largest + 10_000, dtype=np.int8).tofile(tmp / "ids")
    path = tmp_path / "bundle"
    state = {"big": torch.zeros(largest // 2)}
    with pytest.raises(OSError, match=f"cannot write {path / bundle.TRAINER_STATE}"):
        bundle.save(path, model=model, config=TrainApp(), tokenizer=tokenizer, trainer_state=state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert target.read_text() == "earlier\n"
