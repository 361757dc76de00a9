"""Shared tiny fixtures: a generated corpus, a small tokenizer, a tiny model."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from seq2seq import bundle
from seq2seq.builtin import generate_pairs
from seq2seq.config import ModelConfig, TokenizerConfig, TrainApp
from seq2seq.model import Seq2Seq
from seq2seq.tokenizer import PAD_ID, Tokenizer, train_or_load

# One thread: tiny models gain nothing from two, and a test run then never
# fights a benchmark or another job for both cores (OpenMP spin-waits make an
# oversubscribed run many times slower).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def pairs() -> list[tuple[str, str]]:
    return generate_pairs(200, seed=7)


@pytest.fixture(scope="session")
def tokenizer(pairs: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    cfg = TokenizerConfig(vocab_size=120, cache_dir=str(tmp_path_factory.mktemp("spm")))
    return train_or_load([s for s, _ in pairs], [t for _, t in pairs], cfg)


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
