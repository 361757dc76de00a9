"""Bundles round-trip, swaps are atomic, and loading never unpickles code."""

from __future__ import annotations

import pickle

import pytest
import torch

from seq2seq.config import ModelConfig, TrainApp
from seq2seq.model import bundle
from tests.helpers import tiny_model


def _config() -> TrainApp:
    return TrainApp(
        model=ModelConfig(embedding_size=8, hidden_size=16, attention_size=8, dropout=0.0),
        run_dir="unused",
    )


def test_round_trip(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    path = bundle.save(
        tmp_path / "b", model=model, config=_config(), tokenizer=tokenizer, metrics=[{"step": 1}]
    )
    loaded = bundle.load(path)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert loaded.config == _config()
    assert loaded.tokenizer.encode_src(["ninety-four"]) == tokenizer.encode_src(["ninety-four"])
    assert bundle.load_metrics(path) == [{"step": 1}]
    assert loaded.model.decoder.generator.weight is loaded.model.decoder.embed.weight


def test_interrupted_swap_falls_back_to_the_previous_bundle(tmp_path, tokenizer):
    path = bundle.save(
        tmp_path / "b", model=tiny_model(tokenizer), config=_config(), tokenizer=tokenizer
    )
    # a kill between "rename old aside" and "rename new into place"
    path.rename(path.with_name("b.old"))
    assert bundle.resolve(path) == path.with_name("b.old")
    assert bundle.load(path).model is not None


def test_trainer_state_refuses_pickled_code(tmp_path, tokenizer):
    path = bundle.save(
        tmp_path / "b",
        model=tiny_model(tokenizer),
        config=_config(),
        tokenizer=tokenizer,
        trainer_state={"step": 3, "rng": torch.get_rng_state()},
    )
    assert bundle.load_trainer_state(path)["step"] == 3

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": Evil()}, path / bundle.TRAINER_STATE)
    with pytest.raises(pickle.UnpicklingError):
        bundle.load_trainer_state(path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(bundle.BundleError, match="not a model bundle"):
        bundle.load(tmp_path)
