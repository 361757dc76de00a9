"""A bundle from someone else: loading reads only regular files inside it, within
size limits, and ensemble members are plain sub-directories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from seq2seq.config import ModelConfig, PieceModel, TokenizerConfig, TrainApp
from seq2seq.data.tokenizer import SRC_FILE, train_or_load
from seq2seq.model import bundle
from tests.helpers import checkout_env, copy_bundle, rewrite_header, tiny_model


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
    path = copy_bundle(tiny_bundle, tmp_path)
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
        env=checkout_env(HYDRA_FULL_ERROR=""),
        timeout=120,
        preexec_fn=_limit_memory,
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("refused:") for line in lines), done.stderr
    assert "points outside the bundle" in lines[0]
    assert "not a regular file" in lines[1]
    assert "at most" in lines[2]


# ------------------------------------------------------------ the bundle's config


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """About 300 bytes of YAML whose aliases expand to ``width ** levels`` strings."""
    names = "abcdefghijklmnopqrstuvwxyz"
    lines = ["a: &a [" + ",".join(["x"] * width) + "]"]
    for k in range(1, levels):
        n, prev = names[k], names[k - 1]
        lines.append(f"{n}: &{n} [" + ",".join([f"*{prev}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]\n", "alias"),
        ("data: &d {max_length: 50}\nrun_dir: x\ntokenizer: *d\n", "alias"),
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nesting deeper"),
        ("run_dir: ${oc.env:SEQ2SEQ_TEST_SECRET}\n", "run_dir holds an interpolation"),
        ("data: {dir: '${oc.env:SEQ2SEQ_TEST_SECRET}'}\nrun_dir: x\n", "data.dir holds"),
        ("run_dir: x\ndata: {dir: '${run_dir}'}\n", "data.dir holds an interpolation"),
        ("run_dir: x\ntrain: {accumulate: 0}\n", "train.accumulate=0"),
        ("run_dir: x\noptim: {lr: .inf}\n", "optim.lr=inf"),
    ],
)
def test_a_hostile_config_is_refused_by_the_loader(
    tiny_bundle, tmp_path, monkeypatch, text, message
):
    """Aliases are refused (a few hundred bytes expanded to gigabytes, or a cycle),
    interpolations are never resolved (``oc.env`` would read this machine's
    environment, which the service's page would then show), and values are
    range-checked like the apps' own."""
    monkeypatch.setenv("SEQ2SEQ_TEST_SECRET", "leaked-secret")
    path = copy_bundle(tiny_bundle, tmp_path)
    (path / bundle.CONFIG).write_text(text)
    for load in (bundle.load_config, bundle.load):
        with pytest.raises(bundle.BundleError, match=message) as refused:
            load(path)
        error = str(refused.value)
        assert str(path / bundle.CONFIG) in error and "\n" not in error
        assert "leaked-secret" not in error


def test_an_alias_bomb_is_refused_before_it_expands(tiny_bundle, tmp_path):
    """Loaded in a child with a memory limit and a timeout, so that a regression
    cannot exhaust this machine or hang the suite."""
    path = copy_bundle(tiny_bundle, tmp_path)
    (path / bundle.CONFIG).write_text(_alias_bomb())
    assert len(_alias_bomb()) < 320
    done = subprocess.run(
        [sys.executable, "-c", HOSTILE_LOAD, str(path)],
        capture_output=True,
        text=True,
        env=checkout_env(HYDRA_FULL_ERROR=""),
        timeout=60,
        preexec_fn=_limit_memory,
    )
    assert done.stdout.startswith("refused:") and "alias" in done.stdout, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 1


def test_a_config_without_aliases_or_interpolations_still_loads(tiny_bundle, tmp_path):
    """The loader refuses what a saved bundle never holds, and nothing it does."""
    path = copy_bundle(tiny_bundle, tmp_path)
    text = (path / bundle.CONFIG).read_text()
    (path / bundle.CONFIG).write_text(text.replace("run_dir: x", "run_dir: 'a $ {b} &c *d'"))
    assert bundle.load_config(path).run_dir == "a $ {b} &c *d"


# -------------------------------------------------------------- ensembles, weights


def test_an_ensemble_of_members_with_different_tokenizers_is_refused(tmp_path, tokenizer, pairs):
    """``save_ensemble`` checks it; a hand-made (or edited) ensemble is refused at
    load too, instead of translating every line to nothing."""
    other = train_or_load(
        [s for s, _ in pairs],
        [t for _, t in pairs],
        TokenizerConfig(vocab_size=120, model_type=PieceModel.bpe, cache_dir=str(tmp_path)),
    )
    assert other.tgt_vocab_size == tokenizer.tgt_vocab_size  # only the pieces differ
    root = tmp_path / "ens"
    config = TrainApp(model=ModelConfig(embedding_size=8, hidden_size=16, attention_size=8))
    for name, tok in (("member1", tokenizer), ("member2", other)):
        bundle.save(root / name, model=tiny_model(tok), config=config, tokenizer=tok)
    (root / bundle.ENSEMBLE).write_text(json.dumps({"members": ["member1", "member2"]}))
    with pytest.raises(bundle.BundleError, match="different SentencePiece models") as refused:
        bundle.load(root)
    error = str(refused.value)
    assert str(root / "member1") in error and str(root / "member2") in error


def test_nan_or_infinite_weights_are_refused(tiny_bundle, tmp_path, tokenizer):
    config = bundle.load_config(tiny_bundle)
    for value in (float("nan"), float("inf")):
        model = tiny_model(tokenizer)
        with torch.no_grad():
            model.decoder.generator.bias[3] = value
        path = bundle.save(tmp_path / str(value), model=model, config=config, tokenizer=tokenizer)
        with pytest.raises(bundle.BundleError, match="NaN or infinite") as refused:
            bundle.load(path)
        assert str(path / bundle.WEIGHTS) in str(refused.value)


def _as_f16(tensors) -> None:
    next(iter(tensors.values()))["dtype"] = "F16"


def _as_i32(tensors) -> None:
    next(iter(tensors.values()))["dtype"] = "I32"


def _unknown_dtype(tensors) -> None:
    next(iter(tensors.values()))["dtype"] = "F5"


def _shifted(tensors) -> None:
    first = min(tensors.values(), key=lambda t: t["data_offsets"][0])
    begin, end = first["data_offsets"]
    first["data_offsets"] = [begin + 4, end + 4]


def _swapped_ranges(tensors) -> None:
    a, b = sorted(tensors.values(), key=lambda t: t["data_offsets"][0])[:2]
    a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_as_f16, "byte range"),
        (_as_i32, "stored as I32"),
        (_unknown_dtype, "stored as F5"),
        (_shifted, "byte range"),
        (_swapped_ranges, "byte range"),
    ],
)
def test_a_weights_header_that_does_not_match_is_refused(tiny_bundle, tmp_path, change, message):
    """An element type or byte range the model's tensors cannot have raised
    safetensors' own ``SafetensorError`` (a traceback) or loaded shifted bytes."""
    path = copy_bundle(tiny_bundle, tmp_path)
    rewrite_header(path / bundle.WEIGHTS, change)
    with pytest.raises(bundle.BundleError, match=message) as refused:
        bundle.load(path)
    assert str(path / bundle.WEIGHTS) in str(refused.value)
