"""The apps' expected failures: one ``error:`` line and exit code 2, never a
traceback; outputs never replace an input, and a failed run leaves earlier
results as they were."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from seq2seq import evaluate, train, translate
from seq2seq.config import DecodeConfig
from seq2seq.data.tokenizer import SRC_FILE, TGT_FILE
from seq2seq.model import bundle
from tests.helpers import checkout_env, copy_bundle, one_error_line, rewrite_header, weights

# ------------------------------------ outputs never clobber inputs or earlier results


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
    one_error_line(code, err)
    assert "same file as input" in err
    assert src.read_text() == "one\ntwo\n"


def test_failed_translation_leaves_the_existing_output_untouched(run_app, tiny_bundle, tmp_path):
    src, dst = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(b"fine\n\xff\xfe broken\n")
    dst.write_text("earlier results\n")
    code, _, err = run_app(translate.main, f"model={tiny_bundle}", f"input={src}", f"output={dst}")
    one_error_line(code, err)
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


@pytest.mark.parametrize("shard", [None, "1/2"])
def test_dev_null_is_an_empty_input(run_app, tiny_bundle, tmp_path, shard):
    dst = tmp_path / "out.txt"
    args = [f"shard={shard}"] if shard else []
    code, _, err = run_app(
        translate.main, f"model={tiny_bundle}", "input=/dev/null", f"output={dst}", *args
    )
    assert code == 0, err
    assert dst.read_text() == ""


def test_a_sharded_translation_refuses_a_pipe_naming_it(run_app, tiny_bundle, tmp_path):
    """A shard counts its input's lines first: a pipe would be drained by the count."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = run_app(
        translate.main, f"model={tiny_bundle}", f"input={fifo}", "shard=1/2", "output=x.txt"
    )
    one_error_line(code, err)
    assert f"input {fifo} is not a regular file" in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_disk_is_one_line_naming_the_output(run_app, tiny_bundle, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("one two\n" * 2000)
    code, _, err = run_app(
        translate.main, f"model={tiny_bundle}", f"input={src}", "output=/dev/full"
    )
    bar = "translate: "  # the progress bar's redrawn line, ended before the error
    one_error_line(code, "\n".join(x for x in err.splitlines() if not x.startswith(bar)))
    assert "cannot write /dev/full: No space left on device" in err


def test_evaluate_refuses_to_overwrite_its_reference(run_app, tiny_bundle, tmp_path, monkeypatch):
    src, ref = tmp_path / "src.txt", tmp_path / evaluate.HYP_FILE
    src.write_text("one\ntwo\n")
    ref.write_text("eins\nzwei\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_app(evaluate.main, f"model={tiny_bundle}", f"src={src}", f"ref={ref}")
    one_error_line(code, err)
    assert "same file as ref 1" in err
    assert ref.read_text() == "eins\nzwei\n"


def test_evaluate_empty_files_is_an_error_not_a_crash(run_app, tmp_path):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("")
    ref.write_text("")
    code, _, err = run_app(evaluate.main, f"hyp={hyp}", f"ref={ref}")
    one_error_line(code, err)
    assert "no lines" in err


# ------------------------------------------------------------------ bad configuration


@pytest.mark.skipif(bool(find_spec("MeCab")), reason="the Japanese tokenizer is installed")
def test_a_tokenizer_without_its_package_is_one_line(run_app, tmp_path):
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("eins zwei\n")
    code, _, err = run_app(evaluate.main, f"hyp={hyp}", f"ref={hyp}", "tokenize=ja-mecab")
    one_error_line(code, err)
    assert "tokenize=ja-mecab needs an optional package" in err and "sacrebleu[ja]" in err


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
    one_error_line(code, err)
    assert message in err and out == ""


def test_run_dir_that_is_a_file_is_one_line(run_app, tmp_path):
    """Hydra creates the run directory before the app runs; its failure is worded too."""
    (tmp_path / "file").write_text("")
    code, _, err = run_app(train.main, "debug=tiny", f"run_dir={tmp_path / 'file'}")
    one_error_line(code, err)
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
    one_error_line(code, err)
    assert override.split("=")[0] in err and out == ""


def test_decode_config_default_is_valid():
    """The defaults pass the checks that refuse bad values."""
    from seq2seq.decoding.translator import check_decode

    check_decode(DecodeConfig())


# -------------------------------------------------------------------- damaged bundles


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
        ("alias_cycle", "aliases are refused"),
        ("header_dtype", "corrupt header"),
        ("nan", "NaN or infinite"),
    ],
)
def test_damaged_bundles_fail_with_one_line(run_app, tiny_bundle, tmp_path, damage, message):
    """Each fails before a tensor of the model is allocated (``huge`` would need 120 GB)."""
    path = copy_bundle(tiny_bundle, tmp_path)
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
    elif damage == "alias_cycle":
        (path / bundle.CONFIG).write_text("a: &a [*a]\n")
    elif damage == "header_dtype":
        rewrite_header(
            path / bundle.WEIGHTS, lambda t: t["decoder.generator.bias"].update(dtype="F16")
        )
    elif damage == "nan":
        tensors = weights(path)
        tensors["decoder.generator.bias"][0] = float("nan")
        save_file(tensors, str(path / bundle.WEIGHTS))
    else:
        data = (path / bundle.WEIGHTS).read_bytes()
        (path / bundle.WEIGHTS).write_bytes(data[: len(data) - 100])
    src = tmp_path / "in.txt"
    src.write_text("one\n")
    code, out, err = run_app(translate.main, f"model={path}", f"input={src}")
    one_error_line(code, err)
    assert message in err and out == ""


@pytest.mark.slow
def test_torchrun_ranks_error_lines_stay_whole(tiny_bundle, tmp_path):
    """Every process of a torchrun job fails alike; each line is written in one
    write, so the lines on the shared stderr never run into each other."""
    missing = tmp_path / ("a-long-name-" * 20 + "missing.txt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "seq2seq.translate", f"model={tiny_bundle}"]
    result = subprocess.run(
        [*command, f"input={missing}", f"output={tmp_path / 'out.txt'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=checkout_env(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR=""),
        timeout=300,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(lines) == 2, result.stderr[-3000:]
    assert all(line == f"error: input file not found: {missing}" for line in lines), lines
