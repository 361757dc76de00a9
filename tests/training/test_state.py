"""The checkpoint's trainer state: what it holds, and that older layouts resume
exactly or are refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from seq2seq.model import bundle
from seq2seq.training import state
from tests.helpers import train_config, train_run, weights


def _config(tmp_path: Path, **train: Any):
    return train_config(tmp_path, schedule="plateau", teacher_forcing=0.8, **train)


def _first_layout(record: dict[str, Any]) -> dict[str, Any]:
    """The unnumbered layout: counters and rank 0's random states at the top."""
    old = {k: v for k, v in record["state"].items() if k != "validated_step"}
    old |= {
        "optimizer": record["optimizer"],
        "torch_rng": record["rng"][0]["cpu"],
        "python_rng": record["rng"][0]["python"],
    }
    if record["scheduler"] is not None:
        old["scheduler"] = record["scheduler"]
    return old


def test_the_checkpoint_records_where_training_stands(tmp_path):
    train_run(_config(tmp_path, max_steps=10))
    checkpoint = state.load(tmp_path / "run" / "last")
    assert checkpoint is not None
    s = checkpoint.state
    assert (s.step, s.validated_step, s.world_size, s.accumulate) == (10, 10, 1, 1)
    assert s.epoch * 1000 + s.position > 0 and s.elapsed > 0
    assert len(checkpoint.rng) == 1 and checkpoint.scheduler is not None


def test_a_checkpoint_in_the_first_layout_resumes_exactly(tmp_path):
    train_run(_config(tmp_path / "a", max_steps=24))
    train_run(_config(tmp_path / "b", max_steps=10))
    path = tmp_path / "b/run/last" / bundle.TRAINER_STATE
    torch.save(_first_layout(torch.load(path, weights_only=True)), path)

    result = train_run(_config(tmp_path / "b", max_steps=24))
    assert result.steps == 24
    a, b = weights(tmp_path / "a/run/last"), weights(tmp_path / "b/run/last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_newer_layout_is_refused_naming_the_file(tmp_path):
    train_run(_config(tmp_path, max_steps=7))
    path = tmp_path / "run/last" / bundle.TRAINER_STATE
    record = torch.load(path, weights_only=True)
    torch.save(record | {"format": state.FORMAT + 1}, path)
    with pytest.raises(state.CheckpointError) as refused:
        train_run(_config(tmp_path, max_steps=14))
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "format" in message
