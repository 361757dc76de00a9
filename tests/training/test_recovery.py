"""Kills and a full disk at any moment lose no work: the next run resumes from the
newest complete checkpoint and ends where an uninterrupted run ends.

Kills are simulated in-process where the moment matters (an exception raised at
an exact rename leaves the disk as a kill -9 would) and are real ``kill -9`` of
``python -m seq2seq.train`` in one end-to-end test; ``scripts/faults.py`` runs
the long random-kill loop.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seq2seq.model import bundle
from seq2seq.training.trainer import Trainer
from tests.helpers import (
    checkout_env,
    logged_steps,
    run_cli,
    train_config,
    train_run,
    weights,
)


class Killed(BaseException):
    """Raised where a kill -9 would stop the process; the disk is left as it was."""


# --------------------------------------------------- a kill inside a checkpoint write


def test_kill_before_the_first_checkpoint_starts_over_cleanly(tmp_path, monkeypatch):
    """Killed while the first ``last/`` is half-written: the next run starts from step
    0 without duplicating records, and ends where an uninterrupted run ends."""
    train_run(train_config(tmp_path / "a", max_steps=14))
    real = torch.save

    def torn(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 torn")
        monkeypatch.setattr(torch, "save", real)
        raise Killed

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(Killed):
        train_run(train_config(tmp_path, max_steps=14))
    assert (tmp_path / "run/best").is_dir() and not (tmp_path / "run/last").exists()
    assert train_run(train_config(tmp_path, max_steps=14)).steps == 14
    a, b = weights(tmp_path / "a/run/last"), weights(tmp_path / "run/last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged_steps(tmp_path / "run") == [3, 6, 9, 12]


def _kill_at_checkpoint_rename(monkeypatch, *, when: int) -> None:
    """Kill the next ``when``-th rename of a finished ``.last.tmp-*`` into ``last``,
    i.e. between the two renames of a checkpoint swap."""
    real = os.replace
    seen = {"n": 0}

    def replace(src, dst, *args, **kwargs):
        if ".last.tmp-" in str(src) and str(dst).endswith("last"):
            seen["n"] += 1
            if seen["n"] == when:
                monkeypatch.setattr(os, "replace", real)
                raise Killed
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_kills_between_the_two_renames_resume_exactly(tmp_path, monkeypatch):
    """Twice in a row a kill leaves ``last/`` absent, the previous checkpoint set aside
    and the new one complete in ``.last.tmp-*``: each resume starts from the newest
    complete copy, and the result equals an uninterrupted run."""
    straight = train_config(tmp_path / "a", max_steps=28, average_last=2)
    train_run(straight)

    config = train_config(tmp_path / "b", max_steps=28, average_last=2)
    run = Path(config.run_dir)
    for when in (2, 1):
        _kill_at_checkpoint_rename(monkeypatch, when=when)
        with pytest.raises(Killed):
            train_run(config)
        assert not (run / "last").exists() and (run / "last.old").is_dir()
        assert list(run.glob(".last.tmp-*"))
    result = train_run(config)

    assert result.steps == 28
    for kind in ("last", "average"):
        a, b = weights(tmp_path / "a/run" / kind), weights(run / kind)
        assert all(torch.equal(a[k], b[k]) for k in a), kind
    assert logged_steps(run) == sorted(set(logged_steps(run))), "no step was trained twice"
    assert logged_steps(run, "valid") == [7, 14, 21, 28]
    assert not list(run.glob(".last.tmp-*")) and not (run / "last.old").exists()


def test_complete_temporary_checkpoint_is_used_and_stale_ones_removed(tmp_path):
    """``last.old`` is gone too (a kill after it was deleted): the complete
    ``.last.tmp-*`` is the newest checkpoint; half-written copies are removed."""
    train_run(train_config(tmp_path / "a", max_steps=14))
    run = tmp_path / "run"
    train_run(train_config(tmp_path, max_steps=7))
    shutil.rmtree(run / "last")
    shutil.copytree(tmp_path / "a/run/last", run / ".last.tmp-abc123")
    (run / ".last.tmp-torn").mkdir()
    (run / ".last.tmp-torn" / bundle.TRAINER_STATE).write_bytes(b"PK\x03\x04 torn")
    (run / ".metrics.jsonl.x1y2").write_text("partial")
    (run / "best.old").mkdir()

    result = train_run(train_config(tmp_path, max_steps=21))
    assert result.steps == 21
    left = sorted(p.name for p in run.iterdir() if p.name.startswith(".") or "old" in p.name)
    assert left == [".lock"]
    assert logged_steps(run, "valid") == [7, 14, 21]


# ----------------------------------------------------------------- kill -9, full disk


def _train_args(run: Path) -> list[str]:
    return [
        "debug=tiny",
        f"run_dir={run}",
        "train.max_steps=24",
        "train.valid_every=4",
        "train.threads=1",
        "train.valid_max_sentences=5",
        "data.builtin.valid_size=5",
        f"tokenizer.cache_dir={run.parent / 'spm'}",
    ]


def _validations(run: Path) -> int:
    metrics = run / bundle.METRICS
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return sum('"valid"' in line for line in lines)


def _wait_for_validation(run: Path, proc: subprocess.Popen, deadline: float) -> None:
    """Until the run records one more validation: a kill after a fixed sleep could
    come after a fast machine had already finished the run."""
    seen = _validations(run)
    while _validations(run) <= seen and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_exactly(tmp_path):
    """Three real kills of ``python -m seq2seq.train``, the last as soon as a checkpoint
    write starts; the resumed run ends with the weights of an uninterrupted one."""
    straight = run_cli("train", *_train_args(tmp_path / "a"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run = tmp_path / "b"
    rng = random.Random(3)
    kills = 0
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "seq2seq.train", *_train_args(run)],
            cwd=tmp_path,
            env=checkout_env(HYDRA_FULL_ERROR=""),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        if attempt < 2:  # at a random moment after the run's next validation
            _wait_for_validation(run, proc, deadline)
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # inside a checkpoint write
            while not list(run.glob(".last.tmp-*")) and time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = run_cli("train", *_train_args(run), cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= 2
    a, b = weights(tmp_path / "a/last"), weights(run / "last")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


class FillDisk:
    """A reporter that fills the file system of ``path`` at step ``at``."""

    def __init__(self, path: Path, at: int) -> None:
        self.path, self.at = path, at

    def on_step(self, step: int, loss: float, tokens_per_s: float) -> None:
        if step != self.at:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError:
            pass
        finally:
            os.close(fd)

    def on_record(self, record) -> None:
        pass


def test_full_disk_during_a_checkpoint_keeps_best_and_last(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        config = train_config(tmp_path, max_steps=7)
        config.run_dir = str(disk / "run")
        train_run(config)
        last, best = weights(disk / "run/last"), weights(disk / "run/best")
        config.train.max_steps = 14
        trainer = Trainer.from_config(config, run_dir=disk / "run")
        trainer.reporter = FillDisk(disk / "filler", at=13)
        with pytest.raises(OSError, match="No space left"):
            trainer.fit()
        for kind, before in (("last", last), ("best", best)):
            after = weights(disk / "run" / kind)
            assert all(torch.equal(before[k], after[k]) for k in before), kind
        assert not list((disk / "run").glob(".*.tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)])
