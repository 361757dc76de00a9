"""The GPU check's parts that run anywhere: the CUDA-vs-CPU comparison run CPU against
CPU, the report it writes, and the scripts' refusals where they cannot run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.helpers import ROOT

SCRIPTS = ROOT / "scripts"
TINY_TIMING = [
    *("--time-steps", "1", "--time-warmup", "0", "--time-batch", "3", "--time-length", "4"),
    *("--time-hidden", "16", "--time-vocab", "30", "--time-head", "10"),
]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*command: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        # One thread, as in this process: a child spinning on two would fight the suite.
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_equivalence_cpu_against_cpu_agrees_on_every_variant(tmp_path: Path) -> None:
    """Both recurrences on the CPU agree with the reference: loss, gradients, bf16
    loss, greedy and beam search; the report names its tolerances and the faster path."""
    out = tmp_path / "eq.json"
    result = _run(
        sys.executable,
        SCRIPTS / "gpu_equivalence.py",
        "--device",
        "cpu",
        "--json",
        out,
        *TINY_TIMING,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    assert report["ok"] is True
    assert set(report["tolerances"]) == {
        "loss_rtol",
        "grad_rel_to_max",
        "bf16_loss_rtol",
        "score_rtol",
    }
    assert set(report["variants"]) == {
        f"{softmax}, {impl}"
        for softmax in ("full softmax", "two-level softmax")
        for impl in ("handwritten", "torch")
    }
    for variant in report["variants"].values():
        assert variant["failed"] == []
        assert {s["sentences"] for s in variant["search"].values()} == {24}
    timing = report["timing"]
    assert set(timing["step_seconds"]) == {"handwritten", "torch"}
    assert timing["faster"] in timing["step_seconds"]


def test_equivalence_flags_what_is_out_of_tolerance() -> None:
    """A gradient moved past its tolerance, or one sentence searched differently,
    fails the comparison and is named."""
    eq = _script("gpu_equivalence")
    model = eq.tiny_model(eq.RnnImpl.handwritten, 0, torch.device("cpu"))
    reference = eq.run(model, eq.tiny_batch(), torch.device("cpu"))
    assert eq.compare(reference, reference)["ok"]
    moved = {**reference, "grads": dict(reference["grads"])}
    name, grad = next(iter(moved["grads"].items()))
    moved["grads"][name] = grad + 1e-3 * grad.abs().max()
    assert eq.compare(reference, moved)["failed"] == ["grads"]
    greedy = list(reference["search"]["greedy"])
    tokens, score = greedy[3]
    greedy[3] = ([*tokens, 7], score)
    other = {**reference, "search": {**reference["search"], "greedy": greedy}}
    result = eq.compare(reference, other)
    assert result["failed"] == ["greedy"]
    assert result["search"]["greedy"]["same_tokens"] == 23


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hidden = {"CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    result = _run("bash", SCRIPTS / "gpu_check.sh", out, env=hidden)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: no CUDA device")
    assert not out.exists()


def test_gpu_bundle_without_multi30k_fails_in_one_line(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    result = _run(
        "bash",
        SCRIPTS / "gpu_bundle.sh",
        bundle,
        env={"SEQ2SEQ_MULTI30K": str(tmp_path / "absent")},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: no Multi30k folder at {tmp_path / 'absent'} (set SEQ2SEQ_MULTI30K)"
    ]
    assert not bundle.exists()


def test_gpu_bundle_never_clears_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    data = tmp_path / "data"
    data.mkdir()
    result = _run("bash", SCRIPTS / "gpu_bundle.sh", mine, env={"SEQ2SEQ_MULTI30K": str(data)})
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "keep"


def _record(steps: Path, name: str, rc: int, log_text: str, result: object = None) -> None:
    log = steps.parent / f"{name}.log"
    log.write_text(log_text)
    extra: list[str | Path] = []
    if result is not None:
        (steps.parent / f"{name}.json").write_text(json.dumps(result))
        extra = ["--result", steps.parent / f"{name}.json"]
    done = _run(
        sys.executable,
        SCRIPTS / "gpu_report.py",
        "record",
        steps,
        name,
        "--rc",
        str(rc),
        "--seconds",
        "12.5",
        "--limit",
        "60",
        "--log",
        log,
        *extra,
    )
    assert done.returncode == 0, done.stderr


def test_report_gathers_every_step_in_order_with_its_status_and_figures(tmp_path: Path) -> None:
    steps, out = tmp_path / "steps", tmp_path / "out"
    train = {
        "precision": "bf16",
        "train_tgt_tokens_per_s": 123456,
        "steps": 900,
        "seconds": 90.0,
        "fraction_of_bf16_peak": 0.01,
    }
    _record(steps, "install", 0, "ok\n")
    _record(steps, "tests", 1, "....F\n1 failed, 4 passed, 2 skipped in 3.2s\n")
    _record(steps, "train_bf16", 0, "figures\n", train)
    _record(steps, "torchrun", 124, "step 10\nstep 20\n")
    _record(steps, "decode", -1, "skipped\n")
    context = json.dumps({"device": "NVIDIA H100", "torch": "2.11"})
    done = _run(
        sys.executable, SCRIPTS / "gpu_report.py", "write", steps, out, "--context", context
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["device"] == "NVIDIA H100"
    assert report["ok"] is False
    assert list(report["steps"]) == ["install", "tests", "train_bf16", "torchrun", "decode"]
    statuses = [s["status"] for s in report["steps"].values()]
    assert statuses == ["passed", "failed", "passed", "timed out", "skipped"]
    assert report["steps"]["tests"]["counts"] == {"failed": 1, "passed": 4, "skipped": 2}
    assert report["steps"]["train_bf16"]["result"] == train
    assert report["steps"]["torchrun"]["log_tail"] == ["step 10", "step 20"]
    summary = (out / "summary.md").read_text()
    assert "| tests | failed (1 failed, 4 passed, 2 skipped) | 12.5 | 60 |" in summary
    assert "123,456 target tokens/s" in summary
    assert "## torchrun: end of its log" in summary
    assert "## decode: end of its log" not in summary  # skipped, not failed


@pytest.mark.parametrize(
    "rc, status",
    [(0, "passed"), (2, "failed"), (124, "timed out"), (137, "timed out"), (-1, "skipped")],
)
def test_status_of_an_exit_code(rc: int, status: str) -> None:
    assert _script("gpu_report").status(rc) == status


def test_a_run_directory_gives_its_last_records_backend_and_bundles(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in ("best", "last", ".hydra"):
        (run / name).mkdir(parents=True)
        (run / name / "config.yaml").write_text("x: 1\n")
    records = [
        {"kind": "train", "step": 10, "loss": 7.5, "tokens_per_s": 1000.0},
        {"kind": "train", "step": 50, "loss": 5.25, "tokens_per_s": 2000.0},
        {"kind": "valid", "step": 50, "loss": 5.0, "bleu": 0.5},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "train.log").write_text("rank 0 of 1 (local 0 of 1), backend nccl, 16 threads\n")
    out = tmp_path / "run.json"
    done = _run(sys.executable, SCRIPTS / "gpu_report.py", "run", run, out)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures == {
        "train": records[1],
        "valid": records[2],
        "backend": "nccl",
        "bundles": ["best", "last"],
    }
    steps = tmp_path / "steps"
    _record(steps, "torchrun", 0, "done\n", figures)
    done = _run(sys.executable, SCRIPTS / "gpu_report.py", "write", steps, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "backend nccl, step 50: loss 5.250, 2,000 target tokens/s" in summary
    assert "bundles: best, last" in summary


def test_a_run_directory_without_metrics_is_one_error_line(tmp_path: Path) -> None:
    done = _run(sys.executable, SCRIPTS / "gpu_report.py", "run", tmp_path, tmp_path / "x.json")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
