"""A run directory: no silent restart, an honest resume, one writer, and a finished
run that stays finished."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from seq2seq.config import TokenizerConfig
from seq2seq.data.tokenizer import SRC_FILE, TGT_FILE, cache_key, train_or_load
from seq2seq.model import bundle
from seq2seq.training import rundir
from seq2seq.training.trainer import Trainer
from tests.helpers import (
    logged_steps,
    one_error_line,
    run_cli,
    train_config,
    train_run,
    weights,
)

# ---------------------------------------------- no silent restart; best/ is protected


def test_missing_last_is_refused_instead_of_restarting(tmp_path):
    run = tmp_path / "run"
    train_run(train_config(tmp_path, max_steps=14))
    best = weights(run / "best")
    shutil.rmtree(run / "last")
    with pytest.raises(rundir.RunDirError, match=r"train\.resume=false"):
        train_run(train_config(tmp_path, max_steps=21))
    assert all(torch.equal(best[k], v) for k, v in weights(run / "best").items())
    assert logged_steps(run) == [3, 6, 9, 12]


def test_fresh_start_keeps_a_better_best(tmp_path):
    run = tmp_path / "run"
    train_run(train_config(tmp_path, max_steps=7))
    before = (run / "best" / bundle.WEIGHTS).read_bytes()
    records = bundle.load_metrics(run / "best")
    records[-1]["best_bleu"] = 99.0  # an earlier model far better than the next one
    (run / "best" / bundle.METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))

    result = train_run(train_config(tmp_path, max_steps=14, resume=False, seed=7))
    assert result.steps == 14
    assert (run / "best" / bundle.WEIGHTS).read_bytes() == before
    assert result.best_bleu == 99.0
    assert (run / rundir.PREVIOUS_METRICS).is_file()
    assert logged_steps(run) == [3, 6, 9, 12], "the fresh run's metrics start over"


def test_symlinked_last_survives_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "last").symlink_to(elsewhere)
    result = train_run(train_config(tmp_path, max_steps=21))
    assert result.steps == 21
    assert (run / "last").is_dir() and not (run / "last").is_symlink()
    assert elsewhere.is_dir()


# ---------------------------------------------------------------------- honest resume


def test_resume_refuses_changed_data(tmp_path):
    train_run(train_config(tmp_path, max_steps=7))
    changed = train_config(tmp_path, max_steps=14)
    changed.data.builtin.seed = 2
    with pytest.raises(rundir.RunDirError, match=r"data\.builtin\.seed: 1 -> 2"):
        train_run(changed)


def test_resume_refuses_changed_data_files(tmp_path):
    """Same settings, other lines (files edited in place): the data key differs."""
    config = train_config(tmp_path, max_steps=7)
    train_run(config)
    manifest = rundir.read_manifest(Path(config.run_dir))
    assert manifest is not None
    manifest["data_key"] = cache_key(["other"], ["lines"], config.tokenizer)
    manifest["data_digest"] = "0" * 32
    rundir.write_manifest(Path(config.run_dir), manifest)
    with pytest.raises(rundir.RunDirError, match=r"training data .* changed"):
        train_run(train_config(tmp_path, max_steps=14))


def test_resume_takes_the_tokenizer_from_the_checkpoint(tmp_path, pairs):
    config = train_config(tmp_path, max_steps=7)
    train_run(config)
    # The cache now holds another tokenizer under this data's key.
    cache = next(Path(config.tokenizer.cache_dir).iterdir())
    settings = TokenizerConfig(vocab_size=90, cache_dir=str(tmp_path / "x"))
    foreign = train_or_load([s for s, _ in pairs], [t for _, t in pairs], settings)
    for name, data in foreign.serialize().items():
        (cache / name).write_bytes(data)
    trainer = Trainer.from_config(
        train_config(tmp_path, max_steps=14), run_dir=Path(config.run_dir)
    )
    last = Path(config.run_dir) / "last"
    expected = {name: (last / name).read_bytes() for name in (SRC_FILE, TGT_FILE)}
    assert trainer.tokenizer.serialize() == expected
    assert trainer.fit().steps == 14


def test_changed_learning_rate_takes_effect_on_resume(tmp_path):
    train_run(train_config(tmp_path, max_steps=7))
    config = train_config(tmp_path, max_steps=12)
    config.optim.lr = 0.004
    train_run(config)
    lrs = {r["step"]: r["lr"] for r in bundle.load_metrics(tmp_path / "run") if "lr" in r}
    assert lrs[6] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.004)


# -------------------------------------------- a finished run ends; one writer per run


@pytest.mark.parametrize("stop", ["max_steps", "patience"])
def test_finished_run_does_not_train_further(tmp_path, stop):
    budget = {"max_steps": 10} if stop == "max_steps" else {"max_steps": 35, "patience": 1}
    first = train_run(train_config(tmp_path, **budget))
    run = tmp_path / "run"
    before = (run / "last" / bundle.WEIGHTS).read_bytes()
    records = bundle.load_metrics(run)

    again = train_run(train_config(tmp_path, **budget))
    assert again.steps == first.steps
    assert again.stop_reason.startswith("already finished")
    assert (run / "last" / bundle.WEIGHTS).read_bytes() == before
    assert bundle.load_metrics(run) == records


@pytest.mark.slow
def test_second_training_stops_naming_the_lock_holder(tmp_path):
    config = train_config(tmp_path, max_steps=7)
    holder = Trainer.from_config(config, run_dir=Path(config.run_dir))  # holds the lock
    done = run_cli("train", "debug=tiny", f"run_dir={config.run_dir}", cwd=tmp_path, timeout=120)
    one_error_line(done.returncode, done.stderr)
    assert f"PID {os.getpid()}" in done.stderr
    assert holder.fit().steps == 7
    assert logged_steps(tmp_path / "run") == [3, 6]
