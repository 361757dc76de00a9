"""Speed benchmark: training tokens/s, decoding speed, peak memory, roofline.

Each part runs in its own process, so peak RSS is that part's own:

    python scripts/benchmark.py all --data-dir ../shared/data/multi30k \
        --bundle runs/multi30k/.../best [--experiment multi30k_en_de] [--train-steps 150]

* ``train``: builds the trainer exactly as ``seq2seq-train experiment=...`` does
  (same data, pieces, sizes, batches, precision) and times real training steps
  after a warm-up. Reports non-pad target tokens/s, and the achieved FLOP/s
  (FLOPs of one step counted with ``torch.utils.flop_counter``) as a fraction
  of this machine's fp32 and bf16 matmul peaks, measured in the same run.
  ``--sampling-alpha A`` times the steps on a sampled epoch (subword
  regularisation) while the next epoch is sampled in the background.
* ``decode``: translates a test file, greedy and beam 5 at batch 64, in a child
  ``seq2seq-translate`` process (whole-process time and peak RSS) and in this
  process (translation time alone), and reports sentences/s and target tokens/s,
  in ``--decode-precision`` (fp32, or bf16 autocast, which pays on CPUs with
  native bf16), and the same roofline as training: the search's matmul FLOPs
  (counted in one more pass) per second of translation, against both peaks.
  Each is the median of ``--reps`` runs: on a shared 2-core VM one run varied
  by up to 40% from the next.

* ``scale``: corpus size. Builds Multi30k's training split repeated to each
  ``--sizes`` (each copy's lines end in a different number, so no two lines
  repeat) under ``--scale-dir``, and reports per size, one JSON line each:
  SentencePiece training time, first encoding into the token store (seconds,
  pairs/s, and one process's SentencePiece-only rate for scale), opening the
  cached tokenizer and store again, and then a real ``seq2seq.train`` child
  process of ``--scale-steps`` steps on the cached data: wall time, time from
  the command to its first step, peak RSS (the child's own, from ``wait4``)
  and the median training tokens/s after the first five steps. Size 0 is the
  original corpus itself, the baseline for every other size.

        python scripts/benchmark.py scale --data-dir ../shared/data/multi30k \
            --scale-dir /tmp/scale --experiment multi30k_en_de_25min

Nothing here is a test: speed is measured, never asserted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

if TYPE_CHECKING:
    from seq2seq.config import TrainApp
    from seq2seq.data.tokenizer import Tokenizer
    from seq2seq.decoding.translator import Translator


def matmul_peak(dtype: torch.dtype, size: int = 2048, min_seconds: float = 1.0) -> float:
    """GFLOP/s of a large square matmul: the practical compute ceiling.

    Why the size can shrink: a CPU without native bf16 emulates it about 100x
    slower than fp32, and a 2048-square product would then take tens of
    seconds; the peak is a rate, so a smaller product measures it just as well.
    """
    while True:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        start = time.perf_counter()
        a @ b  # warm-up, and a probe of how slow this dtype is here
        if time.perf_counter() - start < 0.5 or size <= 256:
            break
        size //= 2
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < min_seconds:
        a @ b
        reps += 1
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def matmul_peaks() -> dict[str, float]:
    """This machine's fp32 and bf16 matmul peaks (GFLOP/s), measured now."""
    return {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}


def roofline(achieved: float, peaks: dict[str, float]) -> dict[str, float]:
    """Achieved GFLOP/s against both peaks, as training and decoding report it."""
    return {
        "achieved_gflops": round(achieved, 1),
        "peak_gflops_fp32": round(peaks["fp32"], 1),
        "peak_gflops_bf16": round(peaks["bf16"], 1),
        "fraction_of_fp32_peak": round(achieved / peaks["fp32"], 3),
        "fraction_of_bf16_peak": round(achieved / peaks["bf16"], 3),
    }


def _set_threads(threads: int) -> None:
    """Set intra-op threads only when asked, so the default measures what users get."""
    if threads > 0:
        torch.set_num_threads(threads)


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def bench_train(args: argparse.Namespace) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from seq2seq._hydra import register_configs
    from seq2seq.config import conf_dir
    from seq2seq.data import sampling
    from seq2seq.data.batching import token_batches
    from seq2seq.runtime.allocator import retain_freed_memory
    from seq2seq.training.trainer import Trainer

    register_configs()
    overrides = [f"experiment={args.experiment}", "run_dir=unused", *args.override]
    if args.sampling_alpha is not None:
        overrides.append(f"tokenizer.sampling_alpha={args.sampling_alpha}")
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        config = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    _set_threads(args.threads)
    retain_freed_memory()  # as seq2seq-train does
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer.from_config(config, run_dir=Path(run_dir))
    t = config.train
    data, lengths, sample_seconds = trainer.train_data, trainer.lengths, 0.0
    # With subword sampling, epoch 0's sampled pairs are timed, while epoch 1 is
    # written in the background as in training.
    sampled = sampling.for_training(config, trainer.train_data, trainer.tokenizer)
    if sampled is not None:
        start = time.perf_counter()
        data = sampled.epoch(0)
        sample_seconds = time.perf_counter() - start
        lengths = sampling.pair_lengths(data)
    batches = token_batches(lengths, max_tokens=t.max_tokens, seed=t.seed)
    batch_list = [data.batch(b) for b in batches[: 1 + args.warmup + args.train_steps]]
    with FlopCounterMode(display=False) as counter:
        trainer.train_step([batch_list[0]])
    flops_per_token = counter.get_total_flops() / batch_list[0].n_tokens
    for batch in batch_list[1 : 1 + args.warmup]:
        trainer.train_step([batch])
    timed = batch_list[1 + args.warmup : 1 + args.warmup + args.train_steps]
    tokens = sum(b.n_tokens for b in timed)
    sentences = sum(b.src.size(0) for b in timed)
    start = time.perf_counter()
    for batch in timed:
        trainer.train_step([batch])
    seconds = time.perf_counter() - start
    writing_ahead = False
    if sampled is not None:
        writing_ahead = sampled.pending is not None and not sampled.conn.poll()
        sampled.close()
    rate = tokens / seconds
    peaks = matmul_peaks()
    achieved = flops_per_token * rate / 1e9
    return {
        "experiment": args.experiment,
        "precision": "bf16" if trainer.use_bf16 else "fp32",
        "parameters_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 2),
        "steps": len(timed),
        "sentences_per_batch": round(sentences / len(timed), 1),
        "train_tgt_tokens_per_s": round(rate),
        "train_sentences_per_s": round(sentences / seconds, 1),
        "sampling_alpha": config.tokenizer.sampling_alpha,
        # one epoch's sampling in the foreground; whether the next was still being
        # written in the background when the timed steps ended
        "epoch_sample_s": round(sample_seconds, 2),
        "sampling_overlapped_all_steps": writing_ahead,
        "epoch_batches": len(batches),
        "gflop_per_tgt_token": round(flops_per_token / 1e9, 4),
        **roofline(achieved, peaks),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def bench_decode(args: argparse.Namespace) -> list[dict]:
    from seq2seq.data.text import read_lines
    from seq2seq.decoding.translator import Translator

    src = Path(args.data_dir) / f"{args.test_stem}.{args.src_lang}.gz"
    lines = read_lines(src)
    # The child processes run first, while this one holds no model: a child's peak
    # RSS counts the pages it shared with its parent before exec, so after the
    # in-process runs below it would report this process's memory, not its own.
    searches = (("greedy", 1), ("beam5", 5))
    walls, child_rss = {}, {}
    for name, beam in searches:
        walls[name] = statistics.median(
            _translate_process(args, src, beam) for _ in range(args.reps)
        )
        child_rss[name] = peak_rss_mb(resource.RUSAGE_CHILDREN)  # the max over children so far
    results = []
    _set_threads(args.threads)
    peaks = matmul_peaks()
    for name, beam in searches:
        translator = Translator.from_bundle(args.bundle, device="cpu").with_decode(
            beam_size=beam, batch_size=64, nbest=1, precision=args.decode_precision
        )
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            hyps = translator.hypotheses(lines)
            times.append(time.perf_counter() - start)
        seconds, wall = statistics.median(times), walls[name]
        tokens = sum(len(h[0].tokens) + 1 for h in hyps if h)
        achieved = _decode_flops(translator, lines) / seconds / 1e9
        results.append(
            {
                "search": name,
                "precision": args.decode_precision,
                "sentences": len(lines),
                "reps": args.reps,
                "translate_s": round(seconds, 2),
                "translate_s_all": [round(t, 2) for t in times],
                "sentences_per_s": round(len(lines) / seconds, 1),
                "tgt_tokens_per_s": round(tokens / seconds),
                "process_wall_s": round(wall, 2),
                "process_sentences_per_s": round(len(lines) / wall, 1),
                "process_peak_rss_mb": round(child_rss[name]),
                **roofline(achieved, peaks),
            }
        )
    return results


def _decode_flops(translator: Translator, lines: list[str]) -> float:
    """Matmul FLOPs of one pass over ``lines``, as ``torch.utils.flop_counter``
    counts them (everything else in a search step, elementwise work and ``topk``,
    counts zero: the roofline asks how close the matmuls bring us to the peak).

    One worker: the counter is a dispatch mode, which only sees its own thread.
    The searches, and so the FLOPs, are the same with any number of workers.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        translator.with_decode(workers=1).hypotheses(lines)
    return counter.get_total_flops()


def _translate_process(args: argparse.Namespace, src: Path, beam: int) -> float:
    """Wall time of a whole ``seq2seq-translate`` process: start-up, load, decode, write."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "seq2seq.translate",
            f"model={args.bundle}",
            f"input={src}",
            f"output={Path(tmp) / 'hyp.txt'}",
            f"decode.beam_size={beam}",
            "decode.batch_size=64",
            f"decode.precision={args.decode_precision}",
            *([f"threads={args.threads}"] if args.threads else []),
        ]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


# ------------------------------------------------------------------------- scale


def _open_for_writing(path: Path, *, gz: bool) -> TextIO:
    if gz:
        return gzip.open(path, "wt", encoding="utf-8", compresslevel=1)
    return path.open("w", encoding="utf-8")


def write_repeated_corpus(data_dir: Path, out: Path, pairs: int) -> Path:
    """Multi30k's training split repeated to ``pairs`` lines, copy r ending in " r".

    Plain text above 100k pairs (gzip would dominate the time to write it); the
    validation and test files are linked, not copied.
    """
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if pairs <= 100_000 else ""
    sides = {}
    for lang in ("en", "de"):
        with gzip.open(data_dir / f"train.{lang}.gz", "rt", encoding="utf-8") as handle:
            sides[lang] = handle.read().splitlines()
        for stem in ("val", "test_2016_flickr"):
            link = out / f"{stem}.{lang}.gz"
            if not link.exists():
                link.symlink_to((data_dir / f"{stem}.{lang}.gz").resolve())
    for lang, lines in sides.items():
        path = out / f"train.{lang}{suffix}"
        if path.exists():
            continue
        tmp = path.with_name(path.name + ".tmp")
        with _open_for_writing(tmp, gz=bool(suffix)) as handle:
            for n in range(pairs):
                handle.write(f"{lines[n % len(lines)]} {n // len(lines)}\n")
        tmp.rename(path)
    return out


def _scale_config(args: argparse.Namespace, data_dir: Path, cache: Path) -> list[str]:
    return [
        f"experiment={args.experiment}",
        f"data.dir={data_dir}",
        f"tokenizer.cache_dir={cache / 'spm'}",
        f"data.cache_dir={cache / 'tokens'}",
        *args.override,
    ]


def _compose(overrides: list[str]) -> TrainApp:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from seq2seq._hydra import register_configs
    from seq2seq.config import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "run_dir=unused"])
        return OmegaConf.to_object(cfg)


def _spm_rate(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Pairs/s of SentencePiece alone, in this one process: the encoder's own ceiling."""
    start = time.perf_counter()
    tokenizer.encode_src([s for s, _ in pairs])
    tokenizer.encode_tgt([t for _, t in pairs])
    return len(pairs) / (time.perf_counter() - start)


def prepare_timings(overrides: list[str]) -> dict:
    """Tokenizer training, first encoding and the cached reopening, timed in this process."""
    from itertools import islice

    from seq2seq.data import store as tokdata
    from seq2seq.data.corpus import train_source
    from seq2seq.data.tokenizer import source_cache_key, train_or_load_pairs

    config = _compose(overrides)
    data, tok_cfg = config.data, config.tokenizer
    start = time.perf_counter()
    source = train_source(data)
    tokenizer = train_or_load_pairs(
        source.pairs, source_cache_key(source.fingerprint, tok_cfg), tok_cfg
    )
    tokenizer_s = time.perf_counter() - start
    workers = data.num_workers or len(os.sched_getaffinity(0))
    start = time.perf_counter()
    store = tokdata.open_or_build(
        source,
        tokenizer,
        directory=tokdata.cache_dir(data, tok_cfg),
        filters=tokdata.Filters(data.max_length, data.max_ratio),
        workers=workers,
    )
    encode_s = time.perf_counter() - start
    lines = json.loads((store.path / tokdata.HEADER).read_text())["lines"]
    start = time.perf_counter()
    tokdata.prepare(data, tok_cfg)
    cached_s = time.perf_counter() - start
    return {
        "pairs": lines,
        "pairs_kept": len(store),
        "tokenizer_train_s": round(tokenizer_s, 2),
        "encode_s": round(encode_s, 2),
        "encode_pairs_per_s": round(lines / encode_s),
        "encode_workers": workers,
        "spm_one_process_pairs_per_s": round(
            _spm_rate(tokenizer, list(islice(source.pairs(), 50_000)))
        ),
        "cached_open_s": round(cached_s, 3),
        "store_mb": round(sum(p.stat().st_size for p in store.path.iterdir()) / 2**20, 1),
    }


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
    ]
    metrics = run_dir / "metrics.jsonl"
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        raise RuntimeError(f"training failed: {' '.join(cmd)}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train" and r["step"] > 5]
    return {
        "wall_s": round(wall, 2),
        "first_step_s": round(first_step or wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "train_tokens_per_s": round(statistics.median(rates)) if rates else None,
    }


def bench_scale(args: argparse.Namespace) -> list[dict]:
    """The original corpus, then each size: prepare timings and a training child."""
    data_dir = Path(args.data_dir).resolve()
    root = Path(args.scale_dir)
    results = []
    for size in args.sizes:
        corpus = (
            data_dir if size == 0 else write_repeated_corpus(data_dir, root / f"m30k_{size}", size)
        )
        cache = root / f"cache_{size or 'base'}"
        shutil.rmtree(cache, ignore_errors=True)
        overrides = _scale_config(args, corpus, cache)
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); import benchmark; "
            "print(json.dumps(benchmark.prepare_timings(json.loads(sys.argv[2]))))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(overrides)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = {"corpus": str(corpus), **json.loads(out.strip().splitlines()[-1])}
        for run in range(args.scale_runs):
            run_dir = cache / f"run{run}"
            result[f"train_run{run}"] = train_child(overrides, run_dir, args.scale_steps)
            shutil.rmtree(run_dir, ignore_errors=True)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def _without_json(argv: list[str]) -> list[str]:
    """The parent writes the combined report; children only print theirs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            out.append(arg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["train", "decode", "all", "scale"])
    parser.add_argument("--experiment", default="multi30k_en_de")
    parser.add_argument("--data-dir", default=None, help="local corpus directory (data.dir)")
    parser.add_argument("--bundle", default=None, help="trained bundle for the decode part")
    parser.add_argument("--test-stem", default="test_2016_flickr")
    parser.add_argument("--src-lang", default="en")
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (default: torch's own choice)"
    )
    parser.add_argument("--decode-precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--reps", type=int, default=3, help="decoding runs; medians reported")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument(
        "--sampling-alpha",
        type=float,
        default=None,
        help="train part: tokenizer.sampling_alpha (subword sampling; 0 turns it off)",
    )
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[0, 100_000, 1_000_000, 5_000_000],
        help="training pairs per corpus; 0 is the original corpus",
    )
    parser.add_argument("--scale-dir", default="/tmp/seq2seq-scale", help="corpora and caches")
    parser.add_argument("--scale-steps", type=int, default=20, help="steps of each training run")
    parser.add_argument("--scale-runs", type=int, default=2, help="training runs per size")
    args = parser.parse_args()
    if args.part == "all":
        report = {}
        for part in ("train", "decode"):
            if part == "decode" and not args.bundle:
                continue
            cmd = [sys.executable, __file__, part, *_without_json(sys.argv[2:])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            report[part] = json.loads(out.strip().splitlines()[-1])
    elif args.part == "train":
        report = bench_train(args)
    elif args.part == "scale":
        if not args.data_dir:
            parser.error("scale needs --data-dir (Multi30k's directory)")
        report = bench_scale(args)
    else:
        if not args.bundle or not args.data_dir:
            parser.error("decode needs --bundle and --data-dir")
        report = bench_decode(args)
    text = json.dumps(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
