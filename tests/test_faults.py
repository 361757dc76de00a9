"""Fault injection: careless or hostile use never loses work, hangs, or prints a traceback.

Kills are simulated in-process where the moment matters (an exception raised at
an exact rename leaves the disk as a kill -9 would) and are real ``kill -9`` of
``python -m seq2seq.train`` in one end-to-end test; ``scripts/faults.py`` runs
the long random-kill loop.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from seq2seq import evaluate, train, translate
from seq2seq.config import (
    BuiltinConfig,
    DataConfig,
    DecodeConfig,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    TrainApp,
    TrainingConfig,
)
from seq2seq.data.tokenizer import SRC_FILE, TGT_FILE, cache_key, train_or_load
from seq2seq.model import bundle
from seq2seq.runtime.fs import OutputError, check_outputs, replace_on_success
from seq2seq.training import rundir
from seq2seq.training.trainer import Trainer
from tests.helpers import ROOT

# ------------------------------------------------------------------------------ helpers


def _config(tmp_path: Path, **train_fields) -> TrainApp:
    fields = {"max_tokens": 300, "valid_every": 7, "log_every": 3, "device": "cpu"}
    fields |= train_fields
    return TrainApp(
        data=DataConfig(builtin=BuiltinConfig(train_size=200, valid_size=8, test_size=8)),
        tokenizer=TokenizerConfig(vocab_size=100, cache_dir=str(tmp_path / "spm")),
        model=ModelConfig(embedding_size=16, hidden_size=16, attention_size=16, dropout=0.3),
        optim=OptimConfig(schedule="constant"),
        train=TrainingConfig(**fields),
        run_dir=str(tmp_path / "run"),
    )


def _fit(config: TrainApp):
    return Trainer.from_config(config, run_dir=Path(config.run_dir)).fit()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / bundle.WEIGHTS))


def _steps(run: Path, kind: str = "train") -> list[int]:
    return [r["step"] for r in bundle.load_metrics(run) if r["kind"] == kind]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HYDRA_FULL_ERROR": ""}


def _cli(app: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"seq2seq.{app}", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=timeout,
    )


def _one_error_line(code: int, err: str) -> None:
    """An expected failure: exit 2 and exactly one ``error:`` line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err


class Killed(BaseException):
    """Raised where a kill -9 would stop the process; the disk is left as it was."""


def _copy_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "hostile"
    shutil.copytree(tiny_bundle, copy)
    return copy


# ------------------------------------------------ 1. output equal to input; failed runs


@pytest.mark.parametrize("spelling", ["same", "dot", "symlink"])
def test_translate_refuses_output_that_is_its_input(
    run_app, tiny_bundle, tmp_path, monkeypatch, spelling
):
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\n")
    monkeypatch.chdir(tmp_path)
    output = {"same": str(src), "dot": "./in.txt", "symlink": str(tmp_path / "link.txt")}
    (tmp_path / "link.txt").symlink_to(src)
    code, _, err = run_app(
        translate.main, f"model={tiny_bundle}", f"input={src}", f"output={output[spelling]}"
    )
    _one_error_line(code, err)
    assert "same file as input" in err
    assert src.read_text() == "one\ntwo\n"


def test_outputs_are_compared_by_inode(tmp_path):
    """A hard link is the same file under another name; a new path is no input."""
    src = tmp_path / "in.txt"
    src.write_text("x\n")
    os.link(src, tmp_path / "hard.txt")
    with pytest.raises(OutputError, match="same file as input"):
        check_outputs({"output": str(tmp_path / "hard.txt")}, {"input": str(src)})
    with pytest.raises(OutputError, match="same file as output"):
        check_outputs({"output": "a.txt", "alignments": "./a.txt"}, {"input": str(src)})
    check_outputs({"output": str(tmp_path / "new.txt")}, {"input": str(src), "stdin": None})
    check_outputs({"output": "/dev/null", "alignments": "/dev/null"}, {"input": "/dev/null"})


def test_output_to_a_device_writes_through_it(tmp_path):
    """``output=/dev/null`` must not replace the device node with a regular file."""
    before = os.stat("/dev/null")
    with replace_on_success("/dev/null") as out:
        out.write("discarded\n")
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    with replace_on_success(fifo) as out:
        out.write("through\n")
    assert reader.communicate(timeout=30)[0] == b"through\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


def test_failed_translation_leaves_the_existing_output_untouched(run_app, tiny_bundle, tmp_path):
    src, dst = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(b"fine\n\xff\xfe broken\n")
    dst.write_text("earlier results\n")
    code, _, err = run_app(translate.main, f"model={tiny_bundle}", f"input={src}", f"output={dst}")
    _one_error_line(code, err)
    assert "not valid UTF-8" in err
    assert dst.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


def test_a_line_of_nul_bytes_is_an_empty_line(run_app, tiny_bundle, tmp_path):
    src, dst = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(b"one two\n\x00\x00\x00\n \x00 \t\n")
    code, _, err = run_app(
        translate.main, f"model={tiny_bundle}", f"input={src}", f"output={dst}", "scores=true"
    )
    assert code == 0, err
    lines = dst.read_text().split("\n")
    assert lines[1:] == ["\t0.0000", "\t0.0000", ""], lines
    assert lines[0] != "\t0.0000"


# ------------------------------------------------------------- 7. evaluate's outputs


def test_evaluate_refuses_to_overwrite_its_reference(run_app, tiny_bundle, tmp_path, monkeypatch):
    src, ref = tmp_path / "src.txt", tmp_path / evaluate.HYP_FILE
    src.write_text("one\ntwo\n")
    ref.write_text("eins\nzwei\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_app(evaluate.main, f"model={tiny_bundle}", f"src={src}", f"ref={ref}")
    _one_error_line(code, err)
    assert "same file as ref 1" in err
    assert ref.read_text() == "eins\nzwei\n"


def test_evaluate_empty_files_is_an_error_not_a_crash(run_app, tmp_path):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("")
    ref.write_text("")
    code, _, err = run_app(evaluate.main, f"hyp={hyp}", f"ref={ref}")
    _one_error_line(code, err)
    assert "no lines" in err


# ------------------------------------------------------------ 8. one line, exit code 2


@pytest.mark.parametrize(
    ("app", "args", "message"),
    [
        (train.main, ["debug=tiny", "no_such_key=1"], "no_such_key"),
        (train.main, ["debug=tiny", "train.max_steps=many"], "train.max_steps"),
        (train.main, ["debug=no_such_option"], "no_such_option"),
        (translate.main, ["model=m", "decode.beam=3"], "decode.beam"),
        (evaluate.main, ["hyp=h", "ref=r", "tokenize=13a", "unknown=1"], "unknown"),
    ],
)
def test_hydra_config_errors_are_one_line(run_app, tmp_path, app, args, message):
    code, out, err = run_app(app, *args, f"hydra.run.dir={tmp_path}")
    _one_error_line(code, err)
    assert message in err and out == ""


def test_run_dir_that_is_a_file_is_one_line(run_app, tmp_path):
    """Hydra creates the run directory before the app runs; its failure is worded too."""
    (tmp_path / "file").write_text("")
    code, _, err = run_app(train.main, "debug=tiny", f"run_dir={tmp_path / 'file'}")
    _one_error_line(code, err)
    assert "File exists" in err


def test_hydra_full_error_keeps_the_traceback(monkeypatch):
    from hydra.errors import ConfigCompositionException

    monkeypatch.setattr(sys, "argv", ["train", "debug=tiny", "no_such_key=1"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigCompositionException):
        train.main()
    assert os.environ["HYDRA_FULL_ERROR"] == "1"


@pytest.mark.parametrize(
    "override",
    ["decode.alpha=nan", "decode.alpha=-1", "decode.beam_size=100000", "decode.max_len_a=inf"],
)
def test_decode_values_are_checked(run_app, tiny_bundle, tmp_path, override):
    src = tmp_path / "in.txt"
    src.write_text("one\n")
    code, out, err = run_app(translate.main, f"model={tiny_bundle}", f"input={src}", override)
    _one_error_line(code, err)
    assert override.split("=")[0] in err and out == ""


def _edit_config(path: Path, edit) -> None:
    raw = yaml.safe_load((path / bundle.CONFIG).read_text())
    edit(raw)
    (path / bundle.CONFIG).write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("unknown_key", "does not fit the configuration schema"),
        ("wrong_shape", "has shape"),
        ("huge", "far more than its weights file"),
        ("swapped_spm", "not the tokenizer this model was trained with"),
        ("truncated", "truncated"),
    ],
)
def test_damaged_bundles_fail_with_one_line(run_app, tiny_bundle, tmp_path, damage, message):
    """Each fails before a tensor of the model is allocated (``huge`` would need 120 GB)."""
    path = _copy_bundle(tiny_bundle, tmp_path)
    if damage == "unknown_key":
        _edit_config(path, lambda raw: raw["model"].update(colour="blue"))
    elif damage == "wrong_shape":
        _edit_config(path, lambda raw: raw["model"].update(hidden_size=24))
    elif damage == "huge":
        huge = {"hidden_size": 100_000, "embedding_size": 40_000}
        _edit_config(path, lambda raw: raw["model"].update(huge))
    elif damage == "swapped_spm":
        (path / SRC_FILE).rename(path / "x")
        (path / TGT_FILE).rename(path / SRC_FILE)
        (path / "x").rename(path / TGT_FILE)
    else:
        data = (path / bundle.WEIGHTS).read_bytes()
        (path / bundle.WEIGHTS).write_bytes(data[: len(data) - 100])
    src = tmp_path / "in.txt"
    src.write_text("one\n")
    code, out, err = run_app(translate.main, f"model={path}", f"input={src}")
    _one_error_line(code, err)
    assert message in err and out == ""


# ------------------------------------------------------------------ 6. hostile bundles


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (["..", "member1"], "plain names"),
        (["/etc", "member1"], "plain names"),
        (["."], "plain names"),
        ([".", "."], "plain names"),
        ("member1", "plain names"),
        (["member1", "ghost"], "not a directory"),
        (["member1", "link"], "not a directory"),
    ],
)
def test_ensemble_members_are_plain_subdirectories(tiny_bundle, tmp_path, members, message):
    path = tmp_path / "ens"
    path.mkdir()
    shutil.copytree(tiny_bundle, path / "member1")
    (path / "link").symlink_to(tiny_bundle)
    (path / bundle.ENSEMBLE).write_text(json.dumps({"members": members}))
    with pytest.raises(bundle.BundleError, match=message):
        bundle.load(path)


def test_bundle_files_must_be_inside_the_bundle(tiny_bundle, tmp_path):
    path = _copy_bundle(tiny_bundle, tmp_path)
    outside = tmp_path / "outside.spm"
    shutil.move(path / SRC_FILE, outside)
    (path / SRC_FILE).symlink_to(outside)
    with pytest.raises(bundle.BundleError, match="points outside the bundle"):
        bundle.load(path)


HOSTILE_LOAD = """
import sys
from seq2seq.model import bundle
for path in sys.argv[1:]:
    try:
        bundle.load(path)
        print("loaded")
    except bundle.BundleError as e:
        print("refused:", e)
"""


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))


@pytest.mark.slow
def test_unbounded_files_are_refused_without_reading(tiny_bundle, tmp_path):
    """A device, a FIFO or an oversized file in a bundle is refused at once; loaded in
    a child with a memory limit and a timeout so that a regression cannot exhaust this
    machine or hang the suite."""
    paths = []
    for kind in ("dev_zero", "fifo", "huge_spm"):
        path = shutil.copytree(tiny_bundle, tmp_path / kind)
        (path / SRC_FILE).unlink()
        if kind == "dev_zero":
            (path / SRC_FILE).symlink_to("/dev/zero")
        elif kind == "fifo":
            os.mkfifo(path / SRC_FILE)
        else:
            with open(path / SRC_FILE, "wb") as f:
                f.truncate(bundle.MAX_SPM_BYTES + 1)
        paths.append(str(path))
    done = subprocess.run(
        [sys.executable, "-c", HOSTILE_LOAD, *paths],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        preexec_fn=_limit_memory,
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("refused:") for line in lines), done.stderr
    assert "points outside the bundle" in lines[0]
    assert "not a regular file" in lines[1]
    assert "at most" in lines[2]


# --------------------------------------------- 2. no silent restart; best/ is protected


def test_missing_last_is_refused_instead_of_restarting(tmp_path):
    run = tmp_path / "run"
    _fit(_config(tmp_path, max_steps=14))
    best = _weights(run / "best")
    shutil.rmtree(run / "last")
    with pytest.raises(rundir.RunDirError, match=r"train\.resume=false"):
        _fit(_config(tmp_path, max_steps=21))
    assert all(torch.equal(best[k], v) for k, v in _weights(run / "best").items())
    assert _steps(run) == [3, 6, 9, 12]


def test_kill_before_the_first_checkpoint_starts_over_cleanly(tmp_path, monkeypatch):
    """Killed while the first ``last/`` is half-written: the next run starts from step
    0 without duplicating records, and ends where an uninterrupted run ends."""
    _fit(_config(tmp_path / "a", max_steps=14))
    real = torch.save

    def torn(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 torn")
        monkeypatch.setattr(torch, "save", real)
        raise Killed

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(Killed):
        _fit(_config(tmp_path, max_steps=14))
    assert (tmp_path / "run/best").is_dir() and not (tmp_path / "run/last").exists()
    assert _fit(_config(tmp_path, max_steps=14)).steps == 14
    a, b = _weights(tmp_path / "a/run/last"), _weights(tmp_path / "run/last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(tmp_path / "run") == [3, 6, 9, 12]


def test_fresh_start_keeps_a_better_best(tmp_path):
    run = tmp_path / "run"
    _fit(_config(tmp_path, max_steps=7))
    before = (run / "best" / bundle.WEIGHTS).read_bytes()
    records = bundle.load_metrics(run / "best")
    records[-1]["best_bleu"] = 99.0  # an earlier model far better than the next one
    (run / "best" / bundle.METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))

    result = _fit(_config(tmp_path, max_steps=14, resume=False, seed=7))
    assert result.steps == 14
    assert (run / "best" / bundle.WEIGHTS).read_bytes() == before
    assert result.best_bleu == 99.0
    assert (run / rundir.PREVIOUS_METRICS).is_file()
    assert _steps(run) == [3, 6, 9, 12], "the fresh run's metrics start over"


def _kill_at_checkpoint_rename(monkeypatch, *, when: int) -> None:
    """Kill the next ``when``-th rename of a finished ``.last.tmp-*`` into ``last``,
    i.e. between the two renames of a checkpoint swap."""
    real = os.replace
    seen = {"n": 0}

    def replace(src, dst, *args, **kwargs):
        if ".last.tmp-" in str(src) and str(dst).endswith("last"):
            seen["n"] += 1
            if seen["n"] == when:
                monkeypatch.setattr(os, "replace", real)
                raise Killed
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_kills_between_the_two_renames_resume_exactly(tmp_path, monkeypatch):
    """Twice in a row a kill leaves ``last/`` absent, the previous checkpoint set aside
    and the new one complete in ``.last.tmp-*``: each resume starts from the newest
    complete copy, and the result equals an uninterrupted run."""
    straight = _config(tmp_path / "a", max_steps=28, average_last=2)
    _fit(straight)

    config = _config(tmp_path / "b", max_steps=28, average_last=2)
    run = Path(config.run_dir)
    for when in (2, 1):
        _kill_at_checkpoint_rename(monkeypatch, when=when)
        with pytest.raises(Killed):
            _fit(config)
        assert not (run / "last").exists() and (run / "last.old").is_dir()
        assert list(run.glob(".last.tmp-*"))
    result = _fit(config)

    assert result.steps == 28
    for kind in ("last", "average"):
        a, b = _weights(tmp_path / "a/run" / kind), _weights(run / kind)
        assert all(torch.equal(a[k], b[k]) for k in a), kind
    assert _steps(run) == sorted(set(_steps(run))), "no step was trained twice"
    assert _steps(run, "valid") == [7, 14, 21, 28]
    assert not list(run.glob(".last.tmp-*")) and not (run / "last.old").exists()


def test_symlinked_last_survives_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "last").symlink_to(elsewhere)
    result = _fit(_config(tmp_path, max_steps=21))
    assert result.steps == 21
    assert (run / "last").is_dir() and not (run / "last").is_symlink()
    assert elsewhere.is_dir()


def test_complete_temporary_checkpoint_is_used_and_stale_ones_removed(tmp_path):
    """``last.old`` is gone too (a kill after it was deleted): the complete
    ``.last.tmp-*`` is the newest checkpoint; half-written copies are removed."""
    _fit(_config(tmp_path / "a", max_steps=14))
    run = tmp_path / "run"
    _fit(_config(tmp_path, max_steps=7))
    shutil.rmtree(run / "last")
    shutil.copytree(tmp_path / "a/run/last", run / ".last.tmp-abc123")
    (run / ".last.tmp-torn").mkdir()
    (run / ".last.tmp-torn" / bundle.TRAINER_STATE).write_bytes(b"PK\x03\x04 torn")
    (run / ".metrics.jsonl.x1y2").write_text("partial")
    (run / "best.old").mkdir()

    result = _fit(_config(tmp_path, max_steps=21))
    assert result.steps == 21
    left = sorted(p.name for p in run.iterdir() if p.name.startswith(".") or "old" in p.name)
    assert left == [".lock"]
    assert _steps(run, "valid") == [7, 14, 21]


# ------------------------------------------------------------------ 3. honest resume


def test_resume_refuses_changed_data(tmp_path):
    _fit(_config(tmp_path, max_steps=7))
    changed = _config(tmp_path, max_steps=14)
    changed.data.builtin.seed = 2
    with pytest.raises(rundir.RunDirError, match=r"data\.builtin\.seed: 1 -> 2"):
        _fit(changed)


def test_resume_refuses_changed_data_files(tmp_path):
    """Same settings, other lines (files edited in place): the data key differs."""
    config = _config(tmp_path, max_steps=7)
    _fit(config)
    manifest = rundir.read_manifest(Path(config.run_dir))
    assert manifest is not None
    manifest["data_key"] = cache_key(["other"], ["lines"], config.tokenizer)
    manifest["data_digest"] = "0" * 32
    rundir.write_manifest(Path(config.run_dir), manifest)
    with pytest.raises(rundir.RunDirError, match=r"training data .* changed"):
        _fit(_config(tmp_path, max_steps=14))


def test_resume_takes_the_tokenizer_from_the_checkpoint(tmp_path, pairs):
    config = _config(tmp_path, max_steps=7)
    _fit(config)
    # The cache now holds another tokenizer under this data's key.
    cache = next(Path(config.tokenizer.cache_dir).iterdir())
    settings = TokenizerConfig(vocab_size=90, cache_dir=str(tmp_path / "x"))
    foreign = train_or_load([s for s, _ in pairs], [t for _, t in pairs], settings)
    for name, data in foreign.serialize().items():
        (cache / name).write_bytes(data)
    trainer = Trainer.from_config(_config(tmp_path, max_steps=14), run_dir=Path(config.run_dir))
    last = Path(config.run_dir) / "last"
    expected = {name: (last / name).read_bytes() for name in (SRC_FILE, TGT_FILE)}
    assert trainer.tokenizer.serialize() == expected
    assert trainer.fit().steps == 14


def test_changed_learning_rate_takes_effect_on_resume(tmp_path):
    _fit(_config(tmp_path, max_steps=7))
    config = _config(tmp_path, max_steps=12)
    config.optim.lr = 0.004
    _fit(config)
    lrs = {r["step"]: r["lr"] for r in bundle.load_metrics(tmp_path / "run") if "lr" in r}
    assert lrs[6] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.004)


# -------------------------------------------------------------- 5. a finished run ends


@pytest.mark.parametrize("stop", ["max_steps", "patience"])
def test_finished_run_does_not_train_further(tmp_path, stop):
    budget = {"max_steps": 10} if stop == "max_steps" else {"max_steps": 35, "patience": 1}
    first = _fit(_config(tmp_path, **budget))
    run = tmp_path / "run"
    before = (run / "last" / bundle.WEIGHTS).read_bytes()
    records = bundle.load_metrics(run)

    again = _fit(_config(tmp_path, **budget))
    assert again.steps == first.steps
    assert again.stop_reason.startswith("already finished")
    assert (run / "last" / bundle.WEIGHTS).read_bytes() == before
    assert bundle.load_metrics(run) == records


# ------------------------------------------------------------ 4. one writer per run


@pytest.mark.slow
def test_second_training_stops_naming_the_lock_holder(tmp_path):
    config = _config(tmp_path, max_steps=7)
    holder = Trainer.from_config(config, run_dir=Path(config.run_dir))  # holds the lock
    done = _cli("train", "debug=tiny", f"run_dir={config.run_dir}", cwd=tmp_path, timeout=120)
    _one_error_line(done.returncode, done.stderr)
    assert f"PID {os.getpid()}" in done.stderr
    assert holder.fit().steps == 7
    assert _steps(tmp_path / "run") == [3, 6]


# ---------------------------------------------------------------------- kill -9, full disk


def _train_args(run: Path) -> list[str]:
    return [
        "debug=tiny",
        f"run_dir={run}",
        "train.max_steps=24",
        "train.valid_every=4",
        "train.threads=1",
        "train.valid_max_sentences=5",
        "data.builtin.valid_size=5",
        f"tokenizer.cache_dir={run.parent / 'spm'}",
    ]


def _validations(run: Path) -> int:
    metrics = run / bundle.METRICS
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return sum('"valid"' in line for line in lines)


def _wait_for_validation(run: Path, proc: subprocess.Popen, deadline: float) -> None:
    """Until the run records one more validation: a kill after a fixed sleep could
    come after a fast machine had already finished the run."""
    seen = _validations(run)
    while _validations(run) <= seen and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_exactly(tmp_path):
    """Three real kills of ``python -m seq2seq.train``, the last as soon as a checkpoint
    write starts; the resumed run ends with the weights of an uninterrupted one."""
    straight = _cli("train", *_train_args(tmp_path / "a"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run = tmp_path / "b"
    rng = random.Random(3)
    kills = 0
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "seq2seq.train", *_train_args(run)],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        if attempt < 2:  # at a random moment after the run's next validation
            _wait_for_validation(run, proc, deadline)
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # inside a checkpoint write
            while not list(run.glob(".last.tmp-*")) and time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = _cli("train", *_train_args(run), cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= 2
    a, b = _weights(tmp_path / "a/last"), _weights(run / "last")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


class FillDisk:
    """A reporter that fills the file system of ``path`` at step ``at``."""

    def __init__(self, path: Path, at: int) -> None:
        self.path, self.at = path, at

    def on_step(self, step: int, loss: float, tokens_per_s: float) -> None:
        if step != self.at:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError:
            pass
        finally:
            os.close(fd)

    def on_record(self, record) -> None:
        pass


def test_full_disk_during_a_checkpoint_keeps_best_and_last(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        config = _config(tmp_path, max_steps=7)
        config.run_dir = str(disk / "run")
        _fit(config)
        last, best = _weights(disk / "run/last"), _weights(disk / "run/best")
        config.train.max_steps = 14
        trainer = Trainer.from_config(config, run_dir=disk / "run")
        trainer.reporter = FillDisk(disk / "filler", at=13)
        with pytest.raises(OSError, match="No space left"):
            trainer.fit()
        for kind, before in (("last", last), ("best", best)):
            after = _weights(disk / "run" / kind)
            assert all(torch.equal(before[k], after[k]) for k in before), kind
        assert not list((disk / "run").glob(".*.tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_decode_config_default_is_valid():
    """The defaults pass the checks that refuse bad values."""
    from seq2seq.decoding.translator import check_decode

    check_decode(DecodeConfig())
