"""A bundle from someone else: loading reads only regular files inside it, within
size limits, and ensemble members are plain sub-directories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from seq2seq.data.tokenizer import SRC_FILE
from seq2seq.model import bundle
from tests.helpers import checkout_env, copy_bundle


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (["..", "member1"], "plain names"),
        (["/etc", "member1"], "plain names"),
        (["."], "plain names"),
        ([".", "."], "plain names"),
        ("member1", "plain names"),
        (["member1", "ghost"], "not a directory"),
        (["member1", "link"], "not a directory"),
    ],
)
def test_ensemble_members_are_plain_subdirectories(tiny_bundle, tmp_path, members, message):
    path = tmp_path / "ens"
    path.mkdir()
    shutil.copytree(tiny_bundle, path / "member1")
    (path / "link").symlink_to(tiny_bundle)
    (path / bundle.ENSEMBLE).write_text(json.dumps({"members": members}))
    with pytest.raises(bundle.BundleError, match=message):
        bundle.load(path)


def test_bundle_files_must_be_inside_the_bundle(tiny_bundle, tmp_path):
    path = copy_bundle(tiny_bundle, tmp_path)
    outside = tmp_path / "outside.spm"
    shutil.move(path / SRC_FILE, outside)
    (path / SRC_FILE).symlink_to(outside)
    with pytest.raises(bundle.BundleError, match="points outside the bundle"):
        bundle.load(path)


HOSTILE_LOAD = """
import sys
from seq2seq.model import bundle
for path in sys.argv[1:]:
    try:
        bundle.load(path)
        print("loaded")
    except bundle.BundleError as e:
        print("refused:", e)
"""


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))


@pytest.mark.slow
def test_unbounded_files_are_refused_without_reading(tiny_bundle, tmp_path):
    """A device, a FIFO or an oversized file in a bundle is refused at once; loaded in
    a child with a memory limit and a timeout so that a regression cannot exhaust this
    machine or hang the suite."""
    paths = []
    for kind in ("dev_zero", "fifo", "huge_spm"):
        path = shutil.copytree(tiny_bundle, tmp_path / kind)
        (path / SRC_FILE).unlink()
        if kind == "dev_zero":
            (path / SRC_FILE).symlink_to("/dev/zero")
        elif kind == "fifo":
            os.mkfifo(path / SRC_FILE)
        else:
            with open(path / SRC_FILE, "wb") as f:
                f.truncate(bundle.MAX_SPM_BYTES + 1)
        paths.append(str(path))
    done = subprocess.run(
        [sys.executable, "-c", HOSTILE_LOAD, *paths],
        capture_output=True,
        text=True,
        env=checkout_env(HYDRA_FULL_ERROR=""),
        timeout=120,
        preexec_fn=_limit_memory,
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("refused:") for line in lines), done.stderr
    assert "points outside the bundle" in lines[0]
    assert "not a regular file" in lines[1]
    assert "at most" in lines[2]
