"""A training the run directory refuses changes nothing there: not the model, not
the checkpoint, not the record of how the run was configured."""

from __future__ import annotations

from pathlib import Path

import pytest

from seq2seq import train
from seq2seq.model import bundle
from seq2seq.training.fit import fit
from seq2seq.training.rundir import RunDirError
from tests.helpers import one_error_line, train_config

RECORD = ("config.yaml", "hydra.yaml", "overrides.yaml")


def _contents(run: Path) -> dict[str, bytes]:
    """Every file under ``run`` but the lock and the log, by relative path."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name not in (".lock", "train.log")
    }


def test_an_ensemble_is_refused_on_a_single_models_run_dir(tmp_path):
    run = tmp_path / "run"
    fit(train_config(tmp_path, max_steps=7), run_dir=run)
    before = _contents(run)
    for resume in (True, False):
        config = train_config(tmp_path, max_steps=7, ensemble=2, resume=resume)
        with pytest.raises(RunDirError, match=r"single model's run .*train\.ensemble=1"):
            fit(config, run_dir=run)
    assert _contents(run) == before


def test_a_single_model_is_refused_on_an_ensembles_run_dir(tmp_path):
    run = tmp_path / "run"
    fit(train_config(tmp_path, max_steps=3, valid_every=3, ensemble=2), run_dir=run)
    before = _contents(run)
    for resume in (True, False):
        config = train_config(tmp_path, max_steps=3, valid_every=3, resume=resume)
        with pytest.raises(RunDirError, match=r"an ensemble's run .*train\.ensemble"):
            fit(config, run_dir=run)
    assert _contents(run) == before
    assert bundle.ensemble_members(run / "best") is not None


def _train(run_app, run: Path, *overrides: str) -> tuple[int, str]:
    code, _, err = run_app(
        train.main,
        "debug=tiny",
        f"run_dir={run}",
        f"tokenizer.cache_dir={run.parent / 'spm'}",
        "train.max_steps=10",
        *overrides,
    )
    return code, err


def test_a_refused_training_leaves_the_run_and_its_record_untouched(run_app, tmp_path):
    run = tmp_path / "run"
    code, err = _train(run_app, run)
    assert code == 0, err
    assert "train.max_steps=10" in (run / ".hydra/overrides.yaml").read_text()
    before = _contents(run)
    assert {f".hydra/{name}" for name in RECORD} <= set(before)

    for refused in ("model.hidden_size=32", "train.ensemble=2"):
        code, err = _train(run_app, run, refused)
        one_error_line(code, err)
        assert str(run) in err
        assert _contents(run) == before, refused

    code, err = _train(run_app, run, "train.max_steps=20")
    assert code == 0, err
    assert "train.max_steps=20" in (run / ".hydra/overrides.yaml").read_text()
