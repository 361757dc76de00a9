"""Corpus size and format: memory and time of a training run on 29 k to millions of pairs.

``python scripts/benchmark.py scale`` runs it. For each ``--sizes`` (0 is Multi30k's
own training split; any other size repeats it, copy r ending in " r", so no two
lines repeat) and each ``--formats``, the training split is written under
``--scale-dir`` in that format (``text``: two files; ``tsv``, ``jsonl``,
``parquet``; ``arrow``: a ``datasets`` ``save_to_disk`` directory) beside links
to the validation and test files, and reported as one JSON line:

* ``train_run0``: a real ``seq2seq.train`` child of ``--scale-steps`` steps on an
  empty cache (it trains SentencePiece and encodes the token store first), and
  ``train_run1``, ...: the same command again, on the cached store: wall time,
  time from the command to its first step, peak RSS (the child's own, from
  ``wait4``) and the median training tokens/s after the first five steps;
* ``encode_pairs_per_s``: the first run's encoding into the token store (rows
  read, cleaned, encoded, filtered and written, from the store's header);
* ``spm_*_pairs_per_s``: SentencePiece alone on the same cleaned lines, in a child
  process: one ``encode(list, num_threads=N)`` call per side (its own threaded
  batch API), the ceiling our encoding is measured against.

    python scripts/benchmark.py scale --data-dir $SEQ2SEQ_MULTI30K \\
        --scale-dir /tmp/scale --experiment multi30k_en_de_25min --formats tsv

Nothing here is a test: speed is measured, never asserted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from seq2seq.config import TrainApp

FORMATS = ("text", "tsv", "jsonl", "parquet", "arrow")
Writer = Callable[[Path, list[str], list[str]], Path]


def read_train(data_dir: Path, pairs: int) -> tuple[list[str], list[str]]:
    """Multi30k's training sides, repeated to ``pairs`` lines (0: as they are).

    A tab inside a sentence becomes a space, so that every format holds the same pairs.
    """
    sides = []
    for lang in ("en", "de"):
        with gzip.open(data_dir / f"train.{lang}.gz", "rt", encoding="utf-8") as handle:
            sides.append(handle.read().replace("\t", " ").splitlines())
    if pairs == 0:
        return sides[0], sides[1]
    n = len(sides[0])
    src, tgt = ([f"{side[i % n]} {i // n}" for i in range(pairs)] for side in sides)
    return src, tgt


def _write_text(out: Path, src: list[str], tgt: list[str]) -> Path:
    for lang, side in (("en", src), ("de", tgt)):
        with (out / f"train.{lang}").open("w", encoding="utf-8") as handle:
            handle.writelines(f"{line}\n" for line in side)
    return out / "train.en"


def _write_tsv(out: Path, src: list[str], tgt: list[str]) -> Path:
    path = out / "train.tsv"
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(f"{s}\t{t}\n" for s, t in zip(src, tgt, strict=True))
    return path


def _write_jsonl(out: Path, src: list[str], tgt: list[str]) -> Path:
    path = out / "train.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for s, t in zip(src, tgt, strict=True):
            handle.write(json.dumps({"src": s, "tgt": t}, ensure_ascii=False) + "\n")
    return path


def _write_parquet(out: Path, src: list[str], tgt: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = out / "train.parquet"
    pq.write_table(pa.table({"src": src, "tgt": tgt}), path, row_group_size=100_000)
    return path


def _write_arrow(out: Path, src: list[str], tgt: list[str]) -> Path:
    import datasets

    path = out / "train.arrow"
    datasets.Dataset.from_dict({"src": src, "tgt": tgt}).save_to_disk(str(path))
    return path


WRITERS: dict[str, Writer] = {
    "text": _write_text,
    "tsv": _write_tsv,
    "jsonl": _write_jsonl,
    "parquet": _write_parquet,
    "arrow": _write_arrow,
}


def write_corpus(data_dir: Path, out: Path, pairs: int, form: str) -> list[str]:
    """The corpus written once under ``out``; the data overrides that read it."""
    out.mkdir(parents=True, exist_ok=True)
    for stem in ("val", "test_2016_flickr"):
        for lang in ("en", "de"):
            link = out / f"{stem}.{lang}.gz"
            if not link.exists():
                link.symlink_to((data_dir / f"{stem}.{lang}.gz").resolve())
    done = out / "written"
    if not done.exists():
        WRITERS[form](out, *read_train(data_dir, pairs))
        done.write_text(form)
    if form == "text":
        return [f"data.dir={out}"]
    path = {"tsv": "train.tsv", "jsonl": "train.jsonl", "parquet": "train.parquet"}
    name = path.get(form, "train.arrow")
    return [f"data.dir={out}", f"data.format={form}", f"data.train.path={out / name}"]


def train_child(overrides: list[str], run_dir: Path, steps: int) -> dict:
    """One ``seq2seq.train`` process: wall, time to its first step, peak RSS, tokens/s.

    The first step is seen when its record reaches ``metrics.jsonl`` (``log_every=1``),
    polled every 20 ms; peak RSS is the child's own, from ``wait4``.
    """
    cmd = [
        sys.executable,
        "-m",
        "seq2seq.train",
        *overrides,
        f"run_dir={run_dir}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.valid_every=100000",
        "train.valid_max_sentences=200",
        "train.max_time=0",
        # One model on the best segmentation: the store's cost, whatever the recipe's
        # ensemble or subword sampling (whose first epoch is drawn before step 1).
        "train.ensemble=1",
        "tokenizer.sampling_alpha=0",
    ]
    metrics = run_dir / "metrics.jsonl"
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        first_step = None
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if first_step is None and metrics.exists() and '"train"' in metrics.read_text():
                first_step = time.perf_counter() - start
            if pid:
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise RuntimeError(f"training failed: {' '.join(cmd)}\n{log.read()[-2000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train" and r["step"] > 5]
    return {
        "wall_s": round(wall, 2),
        "first_step_s": round(first_step or wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "train_tokens_per_s": round(statistics.median(rates)) if rates else None,
    }


def spm_rates(overrides: list[str], threads: int) -> dict:
    """SentencePiece alone on the cleaned training lines, with the run's cached models.

    Runs in a child process (``benchmark_scale.py spm``), so the lines it holds
    never count in a training run's memory.
    """
    from seq2seq.data.chunks import clean
    from seq2seq.data.corpus import train_source
    from seq2seq.data.tokenizer import source_cache_key, train_or_load_pairs

    config = _compose(overrides)
    source = train_source(config.data)
    key = source_cache_key(source.fingerprint, config.tokenizer)
    tokenizer = train_or_load_pairs(source.pairs, key, config.tokenizer)
    src: list[str] = []
    tgt: list[str] = []
    for chunk in source.chunks(100_000):
        kept = clean(chunk.src, chunk.tgt)
        src += kept[0]
        tgt += kept[1]
    result = {"spm_pairs": len(src)}
    for name, count in (("one_thread", 1), (f"{threads}_threads", threads)):
        start = time.perf_counter()
        tokenizer.src.encode(src, out_type=int, num_threads=count)
        tokenizer.tgt.encode(tgt, out_type=int, num_threads=count)
        result[f"spm_{name}_pairs_per_s"] = round(len(src) / (time.perf_counter() - start))
    return result


def _compose(overrides: list[str]) -> TrainApp:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from seq2seq._hydra import register_configs
    from seq2seq.config import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "run_dir=unused"])
        return OmegaConf.to_object(cfg)


def _store_header(cache: Path) -> dict:
    (header,) = (cache / "tokens").glob("*/header.json")
    return json.loads(header.read_text())


def bench_scale(args: argparse.Namespace) -> list[dict]:
    """Each size in each format: a first run on an empty cache, runs on the cached
    store, the first run's encoding rate, and SentencePiece's own rate."""
    data_dir = Path(args.data_dir).resolve()
    root = Path(args.scale_dir)
    threads = len(os.sched_getaffinity(0))
    results = []
    for size in args.sizes:
        for form in args.formats:
            corpus = root / f"m30k_{size}_{form}"
            data = write_corpus(data_dir, corpus, size, form)
            cache = root / f"cache_{size}_{form}"
            shutil.rmtree(cache, ignore_errors=True)
            overrides = [
                f"experiment={args.experiment}",
                *data,
                f"tokenizer.cache_dir={cache / 'spm'}",
                f"data.cache_dir={cache / 'tokens'}",
                *args.override,
            ]
            result: dict = {"pairs": size, "format": form, "corpus": str(corpus)}
            for run in range(args.scale_runs):
                run_dir = cache / f"run{run}"
                result[f"train_run{run}"] = train_child(overrides, run_dir, args.scale_steps)
                shutil.rmtree(run_dir, ignore_errors=True)
            header = _store_header(cache)
            result["lines"] = header["lines"]
            result["encode_s"] = header["encode_seconds"]
            result["encode_pairs_per_s"] = round(header["lines"] / header["encode_seconds"])
            spm = subprocess.run(
                [sys.executable, __file__, "spm", str(threads), json.dumps(overrides)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            result |= json.loads(spm.strip().splitlines()[-1])
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


if __name__ == "__main__" and sys.argv[1:2] == ["spm"]:
    print(json.dumps(spm_rates(json.loads(sys.argv[3]), int(sys.argv[2]))))
