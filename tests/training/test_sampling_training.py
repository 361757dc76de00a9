"""Training with subword regularisation: sampled training pairs, best-segmented
validation and translation, exact resume, and two processes equal to one."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from seq2seq.config import TrainApp
from seq2seq.data.batching import encode_pairs
from seq2seq.data.corpus import load_split
from seq2seq.decoding.translator import Translator
from seq2seq.model import bundle
from seq2seq.training import validation
from seq2seq.training.trainer import Trainer
from seq2seq.training.validation import ValidSet
from tests.helpers import train_config, weights
from tests.runtime.test_distributed import _ok, _weights, launch

ALPHA = 0.2


def _config(tmp_path: Path, alpha: float = ALPHA, **train: Any) -> TrainApp:
    config = train_config(tmp_path, train_size=300, valid_size=20, schedule="plateau", **train)
    config.tokenizer.sampling_alpha = alpha
    return config


def _fit(config: TrainApp) -> None:
    Trainer.from_config(config, run_dir=Path(config.run_dir)).fit()


def test_sampling_changes_training(tmp_path):
    _fit(_config(tmp_path / "on", max_steps=10))
    _fit(_config(tmp_path / "off", alpha=0.0, max_steps=10))
    on, off = weights(tmp_path / "on/run/last"), weights(tmp_path / "off/run/last")
    assert any(not torch.equal(on[name], off[name]) for name in on)


def test_validation_and_translation_read_the_best_segmentation(tmp_path):
    """The recorded validation equals one recomputed from best-segmented pairs, and
    the bundle translates a line the same way every time."""
    config = _config(tmp_path, max_steps=14, valid_every=14)
    _fit(config)
    [record] = [r for r in bundle.load_metrics(tmp_path / "run") if r["kind"] == "valid"]
    loaded = bundle.load(tmp_path / "run/last")
    valid = load_split(config.data, "valid")
    best = ValidSet(
        encode_pairs(valid["src"], valid["tgt"], loaded.tokenizer),
        list(valid["src"]),
        list(valid["tgt"]),
    )
    scores = validation.validate(
        loaded.model,
        loaded.tokenizer,
        best,
        config,
        device=torch.device("cpu"),
        autocast=nullcontext,
    )
    # Within summation order; sampled pairs would change the loss in the first digits.
    assert scores.loss == pytest.approx(record["loss"], rel=1e-5)
    assert scores.bleu == pytest.approx(record["bleu"], abs=1e-6)
    translator = Translator(loaded.model, loaded.tokenizer, config.decode)
    lines = list(valid["src"])
    first = translator.translate(lines)
    assert translator.translate(lines) == first
    assert [translator.translate([line])[0] for line in lines] == first


def test_resume_with_sampling_equals_an_uninterrupted_run(tmp_path):
    """The cut falls inside an epoch after the first: the resumed run rebuilds the
    epoch it stopped in from the seed alone."""
    _fit(_config(tmp_path / "a", max_steps=40))
    _fit(_config(tmp_path / "b", max_steps=23))
    _fit(_config(tmp_path / "b", max_steps=40))
    records = bundle.load_metrics(tmp_path / "b/run")
    assert max(r["epoch"] for r in records) >= 1, "the runs cross an epoch"
    a, b = weights(tmp_path / "a/run/last"), weights(tmp_path / "b/run/last")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_two_processes_equal_one_accumulating_process_with_sampling(tmp_path):
    args = [
        "model.dropout=0",
        "train.max_steps=14",
        "train.valid_every=7",
        f"tokenizer.sampling_alpha={ALPHA}",
    ]
    runs = [
        launch(tmp_path, "two", *args, processes=2),
        launch(tmp_path, "one", *args, "train.accumulate=2"),
    ]
    for run in runs:
        _ok(run)
    a, b = _weights(tmp_path / "two/last"), _weights(tmp_path / "one/last")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-6, msg=name)
    epochs = [r["epoch"] for r in bundle.load_metrics(tmp_path / "one")]
    assert max(epochs) >= 1, "the runs cross an epoch"
