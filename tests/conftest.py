"""Shared tiny fixtures: a generated corpus, a small tokenizer, a tiny model."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from seq2seq.config import ModelConfig, TokenizerConfig, TrainApp
from seq2seq.data.builtin import generate_pairs
from seq2seq.data.tokenizer import Tokenizer, train_or_load
from seq2seq.model import bundle
from tests.helpers import lively_model

# One thread: tiny models gain nothing from two, and a test run then never
# fights a benchmark or another job for both cores (OpenMP spin-waits make an
# oversubscribed run many times slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where device-sensitive tests run: ``SEQ2SEQ_TEST_DEVICE`` (``cpu`` by default;
    ``scripts/gpu_check.sh`` sets ``cuda``)."""
    name = os.environ.get("SEQ2SEQ_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"SEQ2SEQ_TEST_DEVICE={name} but CUDA is not available")
    return torch.device(name)


@pytest.fixture(scope="session")
def pairs() -> list[tuple[str, str]]:
    return generate_pairs(200, seed=7)


@pytest.fixture(scope="session")
def tokenizer(pairs: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    cfg = TokenizerConfig(vocab_size=120, cache_dir=str(tmp_path_factory.mktemp("spm")))
    return train_or_load([s for s, _ in pairs], [t for _, t in pairs], cfg)


@pytest.fixture(scope="module")
def tiny_bundle(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved bundle of `lively_model`: what the apps load in their tests."""
    config = TrainApp(
        model=ModelConfig(embedding_size=8, hidden_size=16, attention_size=8, dropout=0.0),
        run_dir="x",
    )
    path = tmp_path_factory.mktemp("bundle") / "model"
    return bundle.save(path, model=lively_model(tokenizer), config=config, tokenizer=tokenizer)


@pytest.fixture
def run_app(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """Call an app's ``main()`` in this process with ``args`` as its command line;
    returns (exit code, stdout, stderr)."""

    def run(main: Callable[[], None], *args: str) -> tuple[int, str, str]:
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        monkeypatch.setattr(sys, "argv", ["app", *args])
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            root.handlers[:], root.level = handlers, level  # Hydra configured logging
        out, err = capsys.readouterr()
        return code, out, err

    return run
