"""Helpers the tests import: tiny seeded models and the repository's paths.

Fixtures live in ``conftest.py`` (pytest loads it as a plugin); plain functions
that tests call live here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from seq2seq.config import (
    BuiltinConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    TrainApp,
    TrainingConfig,
)
from seq2seq.data.tokenizer import PAD_ID, Tokenizer
from seq2seq.model import bundle
from seq2seq.model.model import Seq2Seq
from seq2seq.training.trainer import FitResult, Trainer

ROOT = Path(__file__).resolve().parents[1]
# Multi30k for the tests that need real data (they skip without it).
MULTI30K = Path(os.environ.get("SEQ2SEQ_MULTI30K", ROOT.parent / "shared" / "data" / "multi30k"))


def tiny_model(
    tokenizer: Tokenizer,
    *,
    seed: int = 0,
    attention: str = "bahdanau",
    cell: str = "gru",
    **sizes: int,
) -> Seq2Seq:
    """A seeded model with hidden 16 (dropout off unless asked for)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        attention=attention,  # type: ignore[arg-type]
        cell=cell,  # type: ignore[arg-type]
        embedding_size=sizes.get("embedding_size", 8),
        hidden_size=sizes.get("hidden_size", 16),
        attention_size=sizes.get("attention_size", 8),
        encoder_layers=sizes.get("encoder_layers", 1),
        decoder_layers=sizes.get("decoder_layers", 1),
        dropout=0.0,
        softmax_head=sizes.get("softmax_head", 0),
    )
    return Seq2Seq.from_config(
        cfg, src_vocab=tokenizer.src_vocab_size, tgt_vocab=tokenizer.tgt_vocab_size, pad_id=PAD_ID
    ).eval()


def lively_model(tokenizer: Tokenizer, *, seed: int = 1, softmax_head: int = 0) -> Seq2Seq:
    """The tiny model with weights scaled up, so outputs differ between inputs.

    With the default small initialisation an untrained model emits one piece for every
    input, which would make order and batching tests pass vacuously.
    """
    model = tiny_model(tokenizer, seed=seed, softmax_head=softmax_head)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    return model


# ----------------------------------------------------------------------------- training


def train_config(
    tmp_path: Path,
    *,
    train_size: int = 200,
    valid_size: int = 8,
    schedule: str = "constant",
    **train: Any,
) -> TrainApp:
    """A seconds-long training run in ``tmp_path``: a built-in corpus of ``train_size``
    pairs, a hidden-16 model on the CPU, validation every 7 steps; ``train`` sets any
    other `TrainingConfig` field (a budget such as ``max_steps`` is needed)."""
    fields: dict[str, Any] = {"max_tokens": 300, "valid_every": 7, "log_every": 3, "device": "cpu"}
    return TrainApp(
        data=DataConfig(
            builtin=BuiltinConfig(
                train_size=train_size, valid_size=valid_size, test_size=valid_size
            )
        ),
        tokenizer=TokenizerConfig(vocab_size=100, cache_dir=str(tmp_path / "spm")),
        model=ModelConfig(embedding_size=16, hidden_size=16, attention_size=16, dropout=0.3),
        optim=OptimConfig(schedule=schedule),  # type: ignore[arg-type]
        train=TrainingConfig(**(fields | train)),
        run_dir=str(tmp_path / "run"),
    )


def train_run(config: TrainApp) -> FitResult:
    """Train ``config`` in its own ``run_dir`` (resuming what is there)."""
    return Trainer.from_config(config, run_dir=Path(config.run_dir)).fit()


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a bundle's (or checkpoint's) weights file, by name."""
    return load_file(str(Path(path) / bundle.WEIGHTS))


def logged_steps(run: Path, kind: str = "train") -> list[int]:
    """The steps of a run's metrics records of one ``kind``."""
    return [r["step"] for r in bundle.load_metrics(run) if r["kind"] == kind]


def copy_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A copy of a bundle that a test may damage."""
    copy = tmp_path / "hostile"
    shutil.copytree(tiny_bundle, copy)
    return copy


def rewrite_header(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to the JSON header of the safetensors file at ``path``."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    change({k: v for k, v in header.items() if k != "__metadata__"})
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


# ---------------------------------------------------------------------------- processes


def checkout_env(**extra: str) -> dict[str, str]:
    """This process's environment with this checkout first on ``PYTHONPATH``."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_cli(app: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m seq2seq.<app> args`` against this checkout, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", f"seq2seq.{app}", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=checkout_env(HYDRA_FULL_ERROR=""),
        timeout=timeout,
    )


def one_error_line(code: int, err: str) -> None:
    """An expected failure: exit 2 and exactly one ``error:`` line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
