"""Processes against threads on one machine: training and translation under torchrun.

Training: ``torchrun --nproc-per-node=P`` (one intra-op thread per process) against
one process with P threads (and with one) and ``train.accumulate=P``, so all see the
same global batches and take the same optimiser steps; the figure is training target tokens/s
(from ``metrics.jsonl``, summed over processes, first logging window dropped).

Translation: ``torchrun --nproc-per-node=P -m seq2seq.translate`` against one
process with P threads on the same input: wall time of the whole command, input
sentences/s, and whether the two outputs are byte for byte the same.

Runs alternate between the two setups (A, B, A, B, ...) so that a shared machine's
load hits both alike; medians and the spread are printed.

    python scripts/benchmark_torchrun.py train --data-dir $SEQ2SEQ_MULTI30K
    python scripts/benchmark_torchrun.py translate --model runs/m30k/best \\
        --input $SEQ2SEQ_MULTI30K/test_2016_flickr.en.gz
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seq2seq.decoding.sharding import count_lines

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _run(command: list[str], env: dict[str, str]) -> float:
    """Run ``command``; its wall time in seconds (stops the benchmark on failure)."""
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def _tokens_per_s(run_dir: Path) -> float:
    """Median training tokens/s over the logging windows after the first."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rates = [r["tokens_per_s"] for r in map(json.loads, lines) if r["kind"] == "train"]
    return statistics.median(rates[1:])


def _summary(name: str, values: list[float], unit: str) -> str:
    spread = f"{min(values):,.1f} .. {max(values):,.1f}"
    return (
        f"{name}: median {statistics.median(values):,.1f} {unit} (range {spread}, n={len(values)})"
    )


def train(args: argparse.Namespace, scratch: Path, env: dict[str, str]) -> None:
    p = args.processes
    common = [
        "experiment=multi30k_en_de_25min",
        f"data.dir={args.data_dir}",
        f"train.max_steps={args.steps}",
        f"train.log_every={args.log_every}",
        "train.valid_every=1000000",
        "train.valid_max_sentences=20",
        "train.max_time=0",
        "train.patience=0",
        "train.ensemble=1",  # one model, whatever the recipe's ensemble
    ]
    setups = {
        f"{p} processes x 1 thread": [*TORCHRUN, f"--nproc-per-node={p}", "-m", "seq2seq.train"],
        f"1 process x {p} threads, accumulate={p}": [
            *(sys.executable, "-m", "seq2seq.train"),
            f"train.threads={p}",
            f"train.accumulate={p}",
        ],
        f"1 process x 1 thread, accumulate={p}": [
            *(sys.executable, "-m", "seq2seq.train"),
            "train.threads=1",
            f"train.accumulate={p}",
        ],
    }
    rates: dict[str, list[float]] = {name: [] for name in setups}
    for repeat in range(args.repeats):
        for k, (name, command) in enumerate(setups.items()):
            run_dir = scratch / f"train-{repeat}-{k}"
            _run([*command, *common, f"run_dir={run_dir}"], env)
            rates[name].append(_tokens_per_s(run_dir))
            print(f"{name}: {rates[name][-1]:,.0f} target tokens/s", flush=True)
    for name, values in rates.items():
        print(_summary(name, values, "target tokens/s"))


def translate(args: argparse.Namespace, scratch: Path, env: dict[str, str]) -> None:
    p = args.processes
    common = [f"model={args.model}", f"input={args.input}", *args.override]
    setups = {
        f"{p} processes x 1 thread": [
            *TORCHRUN,
            f"--nproc-per-node={p}",
            "-m",
            "seq2seq.translate",
        ],
        f"1 process x {p} threads": [
            *(sys.executable, "-m", "seq2seq.translate"),
            f"threads={p}",
        ],
    }
    lines = count_lines(args.input)
    speeds: dict[str, list[float]] = {name: [] for name in setups}
    outputs: dict[str, bytes] = {}
    for _ in range(args.repeats):
        for k, (name, command) in enumerate(setups.items()):
            out = scratch / f"out-{k}.txt"
            seconds = _run([*command, *common, f"output={out}"], env)
            speeds[name].append(lines / seconds)
            outputs[name] = out.read_bytes()
            print(f"{name}: {seconds:.1f} s, {lines / seconds:.1f} sentences/s", flush=True)
    for name, values in speeds.items():
        print(_summary(name, values, "sentences/s (whole command)"))
    print("byte-identical outputs:", len(set(outputs.values())) == 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["train", "translate"])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="global optimiser steps")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("SEQ2SEQ_MULTI30K"),
        help="Multi30k's directory (default: $SEQ2SEQ_MULTI30K)",
    )
    parser.add_argument("--model", help="bundle to translate with")
    parser.add_argument("--input", help="file to translate")
    parser.add_argument("--override", nargs="*", default=[], help="extra translate overrides")
    parser.add_argument("--scratch", help="where runs go (default: a temporary directory)")
    args = parser.parse_args()
    if args.part == "train" and not args.data_dir:
        parser.error("train needs --data-dir or $SEQ2SEQ_MULTI30K (Multi30k's directory)")
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(args.scratch or tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        (train if args.part == "train" else translate)(args, scratch, env)


if __name__ == "__main__":
    main()
