"""Weight snapshots taken at validations, and their average.

Why: the weights of the last few validations of a run that has settled sit
around a minimum; their mean is usually a better model than any one of them
(checkpoint averaging, as in most NMT toolkits) and costs one pass over a few
files at the end of training, no extra training step.

Snapshots are bare safetensors files (weights only, no optimiser state), one
per validation, named by step; only the newest ``keep`` stay on disk, so a
resumed run averages the same files a straight run would.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from seq2seq.runtime.fs import atomic_file

SNAPSHOT_DIR = "snapshots"


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:09d}.safetensors"


def list_snapshots(run_dir: Path) -> list[Path]:
    """Snapshot files, oldest first (the zero-padded step sorts by name)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    return sorted(folder.glob("step_*.safetensors")) if folder.is_dir() else []


def take_snapshot(model: nn.Module, run_dir: Path, step: int, *, keep: int) -> Path:
    """Write the model's weights atomically, then drop all but the newest ``keep``."""
    path = snapshot_path(run_dir, step)
    try:
        with atomic_file(path) as tmp:
            save_model(model, str(tmp))
    except SafetensorError as e:  # e.g. a full disk; an OSError like any other write
        raise OSError(f"cannot write {path}: {e}") from e
    for old in list_snapshots(run_dir)[:-keep]:
        old.unlink()
    return path


def average_weights(files: list[Path]) -> dict[str, Tensor]:
    """The element-wise mean of several weight files of one architecture.

    Sums run in float64 so the mean does not depend on the order of files.
    """
    if not files:
        raise ValueError("no snapshots to average")
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for file in files:
        tensors = load_file(str(file))
        if total and tensors.keys() != total.keys():
            raise ValueError(f"{file} does not hold the same weights as {files[0]}")
        for name, tensor in tensors.items():
            dtypes[name] = tensor.dtype
            total[name] = total.get(name, 0) + tensor.to(torch.float64)
    return {name: (t / len(files)).to(dtypes[name]) for name, t in total.items()}


def load_average(model: nn.Module, files: list[Path]) -> None:
    """Put the mean of ``files`` into ``model`` (tied weights stay tied)."""
    averaged = average_weights(files)
    folder = Path(files[0]).parent
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".average.", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(averaged, tmp)
        load_model(model, tmp, device=str(next(model.parameters()).device))
    finally:
        Path(tmp).unlink(missing_ok=True)
