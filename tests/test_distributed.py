"""Training under torchrun: two gloo processes on CPU, launched the way users launch them.

Each run is ``python -m torch.distributed.run --standalone --nproc-per-node=2 -m
seq2seq.train debug=tiny ...`` (a tiny model, a few steps, one thread per process),
compared with one process fed the same global batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seq2seq import bundle

from .conftest import ROOT

# Two gloo processes may wait on each other at most this long (seconds), so a rank
# that misses a decision fails the test quickly instead of hanging it.
TIMEOUT = 60


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def train(tmp_path: Path, run: str, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """``seq2seq.train debug=tiny`` into ``tmp_path/run``, under torchrun when
    ``processes`` > 1; the tokenizer cache is shared by all runs of a test."""
    launcher = [sys.executable, "-m", "seq2seq.train"]
    if processes > 1:
        launcher = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            f"--nproc-per-node={processes}",
            *("-m", "seq2seq.train"),
        ]
    overrides = [
        "debug=tiny",
        f"run_dir={tmp_path / run}",
        f"tokenizer.cache_dir={tmp_path / 'spm'}",
        "train.threads=1",
        f"train.timeout={TIMEOUT}",
        *args,
    ]
    return subprocess.run(
        [*launcher, *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=300,
    )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return bundle.load(path).model.state_dict()


# Twelve steps of two batches each: the epoch has an odd number of batches, so the
# runs cross an epoch's end where the second process has no batch of its own.
NO_DROPOUT = ["model.dropout=0", "train.max_steps=100", "train.valid_every=6", "train.patience=1"]


@pytest.mark.slow
def test_two_processes_equal_one_accumulating_process(tmp_path):
    """2 processes x 1 batch = 1 process x ``train.accumulate=2`` on the same global
    batches, within float32 rounding of a different summation order (the gradient
    average over processes). Early stopping, decided on rank 0 from the broadcast
    BLEU, ends both processes at the same step (a rank that missed it would hang)."""
    two = _ok(train(tmp_path, "two", *NO_DROPOUT, processes=2))
    one = _ok(train(tmp_path, "one", *NO_DROPOUT, "train.accumulate=2"))
    for out in (two.stdout, one.stdout):
        assert "stopped after 12 steps" in out and "early stopping" in out, out
    assert two.stdout.count("model bundle:") == 1, "rank 0 alone reports"

    a, b = _weights(tmp_path / "two/last"), _weights(tmp_path / "one/last")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-6, msg=name)

    records = bundle.load_metrics(tmp_path / "two")
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), "only rank 0 writes metrics"
    assert {r["world_size"] for r in records if r["kind"] == "train"} == {2}
    assert all(
        r["world_size"] == 1 for r in bundle.load_metrics(tmp_path / "one") if r["kind"] == "train"
    )


@pytest.mark.slow
def test_resume_under_two_processes_is_exact(tmp_path):
    """With dropout on, every process's random stream is checkpointed too."""
    common = ["model.dropout=0.3", "train.valid_every=5", "train.patience=0"]
    _ok(train(tmp_path, "straight", *common, "train.max_steps=15", processes=2))
    _ok(train(tmp_path, "resumed", *common, "train.max_steps=10", processes=2))
    again = _ok(train(tmp_path, "resumed", *common, "train.max_steps=15", processes=2))
    assert "stopped after 15 steps" in again.stdout
    a, b = _weights(tmp_path / "straight/last"), _weights(tmp_path / "resumed/last")
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # Another world size must keep the batches per step, or stop with an error.
    other = train(tmp_path, "resumed", *common, "train.max_steps=20")
    assert other.returncode == 2
    [error] = [line for line in other.stderr.splitlines() if "error:" in line]
    assert "2 process(es) x train.accumulate=1" in error and "Traceback" not in other.stderr
