"""Random kill -9 of a tiny training run, resumed each time, against an uninterrupted run.

Usage::

    python scripts/faults.py [--kills 50] [--seed 0] [--workdir DIR] [--max-steps 40]

One uninterrupted ``python -m seq2seq.train debug=tiny`` run is the reference.
Then the same command is started again and again in other run directories and
killed with SIGKILL, each time in one of three ways, until ``--kills`` kills
have landed:

* ``random``: after a random delay (anywhere in the process's life, start-up
  included);
* ``write``: as soon as a checkpoint directory ``.last.tmp-*`` appears, plus a
  random delay of up to 30 ms (inside the checkpoint write);
* ``swap``: as soon as ``last.old`` appears (between or just after the two
  renames that swap a checkpoint in).

A killed run is simply started again (the same command resumes); when one
finishes, its ``last``, ``best`` and ``average`` weights are compared with the
reference's and the next run directory begins. Prints the kills by kind, the
disk states they left, the resumes, and the largest absolute weight difference.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("random", "write", "swap")
BUNDLES = ("last", "best", "average")


def train_args(run: Path, args: argparse.Namespace) -> list[str]:
    return [
        "debug=tiny",
        f"run_dir={run}",
        f"train.max_steps={args.max_steps}",
        "train.valid_every=4",
        "train.log_every=2",
        "train.average_last=3",
        "train.threads=1",
        "train.valid_max_sentences=5",
        "train.patience=0",
        "data.builtin.valid_size=5",
        f"tokenizer.cache_dir={run.parent / 'spm'}",
    ]


def start(run: Path, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "seq2seq.train", *train_args(run, args)],
            cwd=run.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(proc: subprocess.Popen, ready, timeout: float, *, poll: float) -> bool:
    """Check ``ready()`` every ``poll`` seconds until it holds (True) or the process
    ends or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def markers(run: Path) -> set[tuple[str, int]]:
    """Checkpoint write markers present now, by name and inode: ``.last.tmp-*``
    directories and the set-aside ``last.old``."""
    found = set()
    for path in [*run.glob(".last.tmp-*"), run / "last.old"]:
        try:
            found.add((path.name, path.lstat().st_ino))
        except OSError:
            continue
    return found


def kill_once(
    proc: subprocess.Popen, run: Path, kind: str, rng: random.Random, life: float
) -> bool:
    """Kill ``proc`` the way ``kind`` says; False when it finished first.

    Markers left by an earlier kill do not count: a ``write`` or ``swap`` kill
    waits for one this process made.
    """
    stale = markers(run)

    def fresh(prefix: str) -> bool:
        return any(name.startswith(prefix) for name, _ in markers(run) - stale)

    if kind == "random":
        wait_for(proc, lambda: False, rng.uniform(0.2, life), poll=0.01)
    elif kind == "write":
        wait_for(proc, lambda: fresh(".last.tmp-"), life * 3, poll=0.001)
        time.sleep(rng.uniform(0.0, 0.03))
    else:
        wait_for(proc, lambda: fresh("last.old"), life * 3, poll=0.0002)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def disk_state(run: Path) -> str:
    """What the kill left: the checkpoint directories present."""
    parts = [name for name in ("last", "last.old") if os.path.lexists(run / name)]
    if any(run.glob(".last.tmp-*")):
        parts.append(".last.tmp-*")
    return "+".join(parts) or "no checkpoint"


def max_difference(a: Path, b: Path) -> float:
    worst = 0.0
    for name in BUNDLES:
        x, y = (
            load_file(str(a / name / "model.safetensors")),
            load_file(str(b / name / "model.safetensors")),
        )
        assert x.keys() == y.keys(), name
        worst = max(worst, *(float((x[k].double() - y[k].double()).abs().max()) for k in x))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/seq2seq-faults"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / "train.log"

    reference = args.workdir / "reference"
    began = time.monotonic()
    if start(reference, args, log).wait():
        sys.exit(f"the reference run failed; see {log}")
    life = time.monotonic() - began
    print(f"reference run: {life:.1f}s for {args.max_steps} steps", flush=True)

    kills: Counter[str] = Counter()
    states: Counter[str] = Counter()
    starts = runs = 0
    worst = 0.0
    while sum(kills.values()) < args.kills:
        runs += 1
        run = args.workdir / f"run{runs:03d}"
        while True:
            proc = start(run, args, log)
            starts += 1
            kind = rng.choice(KINDS) if sum(kills.values()) < args.kills else None
            if kind and kill_once(proc, run, kind, rng, life):
                kills[kind] += 1
                states[disk_state(run)] += 1
                continue
            if proc.wait() != 0:
                sys.exit(f"run {run} failed; see {log}")
            break
        diff = max_difference(reference, run)
        worst = max(worst, diff)
        print(f"{run.name}: finished, max abs weight difference {diff}", flush=True)
    resumes = len(re.findall(r"resumed from .* at step", log.read_text(errors="replace")))
    print(f"kills: {sum(kills.values())} ({', '.join(f'{k} {n}' for k, n in kills.items())})")
    print(f"disk state after the kills: {dict(states)}")
    print(f"process starts: {starts}; resumes from a checkpoint: {resumes}; runs completed: {runs}")
    print(f"max abs weight difference (last, best, average) against the reference: {worst}")


if __name__ == "__main__":
    main()
