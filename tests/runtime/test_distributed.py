"""Training under torchrun: two gloo processes on CPU, launched the way users launch them.

Each run is ``python -m torch.distributed.run --standalone --nproc-per-node=2 -m
seq2seq.train debug=tiny ...`` (a tiny model, a few steps, one thread per process),
compared with one process fed the same global batches.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seq2seq import translate
from seq2seq.config import DecodeConfig, TranslateApp
from seq2seq.decoding.sharding import Shard, count_lines, parse_shard, plan
from seq2seq.model import bundle
from seq2seq.runtime.distributed import RestartError, World, check_restartable
from tests.helpers import checkout_env

# Two gloo processes may wait on each other at most this long (seconds), so a rank
# that misses a decision fails the test quickly instead of hanging it.
TIMEOUT = 60


def _env() -> dict[str, str]:
    return checkout_env(OMP_NUM_THREADS="1")


def launch(tmp_path: Path, run: str, *args: str, processes: int = 1) -> subprocess.Popen:
    """Start ``seq2seq.train debug=tiny`` into ``tmp_path/run``, under torchrun when
    ``processes`` > 1. Each run name has its own tokenizer cache, so runs started
    side by side never race to build one."""
    launcher = [sys.executable, "-m", "seq2seq.train"]
    if processes > 1:
        launcher = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            f"--nproc-per-node={processes}",
            *("-m", "seq2seq.train"),
        ]
    overrides = [
        "debug=tiny",
        f"run_dir={tmp_path / run}",
        f"tokenizer.cache_dir={tmp_path / 'spm' / run}",
        "train.threads=1",
        f"train.timeout={TIMEOUT}",
        *args,
    ]
    return subprocess.Popen(
        [*launcher, *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_env(),
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def train(tmp_path: Path, run: str, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    return finish(launch(tmp_path, run, *args, processes=processes))


def _ok(result: subprocess.CompletedProcess | subprocess.Popen) -> subprocess.CompletedProcess:
    if isinstance(result, subprocess.Popen):
        result = finish(result)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return bundle.load(path).model.state_dict()


# Twelve steps of two batches each: the epoch has an odd number of batches, so the
# runs cross an epoch's end where the second process has no batch of its own.
NO_DROPOUT = ["model.dropout=0", "train.max_steps=100", "train.valid_every=6", "train.patience=1"]


@pytest.mark.slow
def test_two_processes_equal_one_accumulating_process(tmp_path):
    """2 processes x 1 batch = 1 process x ``train.accumulate=2`` on the same global
    batches, within float32 rounding of a different summation order (the gradient
    average over processes). Early stopping, decided on rank 0 from the broadcast
    BLEU, ends both processes at the same step (a rank that missed it would hang)."""
    runs = [
        launch(tmp_path, "two", *NO_DROPOUT, processes=2),
        launch(tmp_path, "one", *NO_DROPOUT, "train.accumulate=2"),
    ]
    two, one = (_ok(run) for run in runs)
    for out in (two.stdout, one.stdout):
        assert "stopped after 12 steps" in out and "early stopping" in out, out
    assert two.stdout.count("model bundle:") == 1, "rank 0 alone reports"

    a, b = _weights(tmp_path / "two/last"), _weights(tmp_path / "one/last")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-6, msg=name)

    records = bundle.load_metrics(tmp_path / "two")
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), "only rank 0 writes metrics"
    assert {r["world_size"] for r in records if r["kind"] == "train"} == {2}
    assert all(
        r["world_size"] == 1 for r in bundle.load_metrics(tmp_path / "one") if r["kind"] == "train"
    )


@pytest.mark.slow
def test_resume_under_two_processes_is_exact(tmp_path):
    """With dropout on, every process's random stream is checkpointed too."""
    common = ["model.dropout=0.3", "train.valid_every=5", "train.patience=0"]
    runs = [
        launch(tmp_path, "straight", *common, "train.max_steps=15", processes=2),
        launch(tmp_path, "resumed", *common, "train.max_steps=10", processes=2),
    ]
    for run in runs:
        _ok(run)
    again = _ok(train(tmp_path, "resumed", *common, "train.max_steps=15", processes=2))
    assert "stopped after 15 steps" in again.stdout
    a, b = _weights(tmp_path / "straight/last"), _weights(tmp_path / "resumed/last")
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # Another world size must keep the batches per step, or stop with an error.
    other = train(tmp_path, "resumed", *common, "train.max_steps=20")
    assert other.returncode == 2
    [error] = [line for line in other.stderr.splitlines() if "error:" in line]
    assert "2 process(es) x train.accumulate=1" in error and "Traceback" not in other.stderr


# -------------------------------------------------------------------- sharded translation


@pytest.fixture(scope="module")
def source(pairs, tmp_path_factory) -> Path:
    """Eleven lines (shards of unequal size), an empty one among them, no final newline."""
    lines = [s for s, _ in pairs[:10]]
    lines.insert(4, "")
    path = tmp_path_factory.mktemp("input") / "src.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _translate(tiny_bundle: Path, source: Path | None, output: Path, **options: object) -> None:
    config = TranslateApp(
        model=str(tiny_bundle),
        input=str(source) if source else None,
        output=str(output),
        decode=DecodeConfig(beam_size=3, nbest=2),
        device="cpu",
        **options,  # type: ignore[arg-type]
    )
    translate.run(config)


def test_shard_spans_cover_every_line_once():
    for total in (0, 1, 5, 11, 100):
        for count in (1, 2, 3, 7):
            spans = [Shard(k, count).span(total) for k in range(1, count + 1)]
            assert [i for a, b in spans for i in range(a, b)] == list(range(total))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_bad_shard_is_named(text):
    with pytest.raises(ValueError, match=r"shard=.*K/N"):
        parse_shard(text)


def test_count_lines_reads_as_the_translator_does(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_bytes(b"one\ntwo\r\n\nlast without newline")
    packed = tmp_path / "a.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert count_lines(str(plain)) == count_lines(str(packed)) == 4
    assert count_lines(str(plain)) == len(list(translate.read_input(str(plain))))


def test_plan_under_torchrun_gives_each_rank_its_range(source, tmp_path):
    out = str(tmp_path / "out.txt")
    second = plan(
        None,
        World(rank=1, size=2, local_rank=1, local_size=2),
        input=str(source),
        output=out,
        alignments=None,
    )
    assert (second.start, second.stop) == (5, 11)
    assert second.output == out + ".part-00002-of-00002" and second.alignments is None
    with pytest.raises(ValueError, match="output=FILE"):
        plan(None, World(size=2), input=str(source), output=None, alignments=None)
    with pytest.raises(ValueError, match=r"shard=1/2 .* without torchrun"):
        plan("1/2", World(size=2), input=str(source), output=out, alignments=None)
    alone = plan(None, World(), input=None, output=None, alignments=None)
    assert (alone.start, alone.stop, alone.output) == (0, None, None)


def test_shards_joined_in_order_equal_one_run(tiny_bundle, source, tmp_path):
    """``shard=K/N`` outputs (n-best indices over the whole input, alignments) joined
    with ``cat`` are byte for byte the unsharded output."""
    _translate(tiny_bundle, source, tmp_path / "all.txt", alignments=str(tmp_path / "all.json"))
    for k in (1, 2, 3):
        extra = {"shard": f"{k}/3", "alignments": str(tmp_path / f"al.{k}")}
        _translate(tiny_bundle, source, tmp_path / f"out.{k}", **extra)
    for stem, whole in (("out", "all.txt"), ("al", "all.json")):
        joined = b"".join((tmp_path / f"{stem}.{k}").read_bytes() for k in (1, 2, 3))
        assert joined == (tmp_path / whole).read_bytes(), stem
    assert len(set((tmp_path / "all.txt").read_text().splitlines())) > 5  # not vacuous
    with pytest.raises(ValueError, match="stdin"):
        _translate(tiny_bundle, None, tmp_path / "x", shard="1/2")


@pytest.mark.slow
def test_torchrun_translation_equals_one_process(tiny_bundle, source, tmp_path):
    _translate(tiny_bundle, source, tmp_path / "one.txt")
    args = [f"model={tiny_bundle}", f"input={source}", "decode.beam_size=3", "decode.nbest=2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "seq2seq.translate", *args]
    result = subprocess.run(
        [*command, f"output={tmp_path / 'two.txt'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "two.txt").read_bytes() == (tmp_path / "one.txt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt", "two.txt"], "parts removed"


def test_a_restart_on_the_shared_store_is_refused_clearly(monkeypatch):
    """torchrun's restarted workers cannot rejoin through the agent's shared store."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    check_restartable()  # the first attempt joins as usual
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(RestartError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        check_restartable()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    check_restartable()
