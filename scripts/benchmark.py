"""Speed benchmark: training tokens/s, decoding speed, peak memory, roofline.

Each part runs in its own process, so peak RSS is that part's own:

    python scripts/benchmark.py all --data-dir $SEQ2SEQ_MULTI30K \
        --bundle runs/multi30k/.../best [--experiment multi30k_en_de] [--train-steps 150]

* ``train``: builds the trainer exactly as ``seq2seq-train experiment=...`` does
  (same data, pieces, sizes, batches, precision) and times real training steps
  after a warm-up: ``--train-steps`` of them, or fewer once ``--train-seconds``
  have passed (the epoch's batches come round again if it runs out). Reports
  non-pad target tokens/s, and the achieved FLOP/s (FLOPs of one step counted
  with ``torch.utils.flop_counter``) as a fraction of this machine's fp32 and
  bf16 matmul peaks (on the training device), measured in the same run.
  ``--sampling-alpha A`` times the steps on a sampled epoch (subword
  regularisation) while the next epoch is sampled in the background.
* ``decode``: translates a test file, greedy and beam 5 at each ``--batch-sizes``
  (64) on ``--device`` (cpu), in a child ``seq2seq-translate`` process
  (whole-process time and peak RSS) and in this process (translation time alone,
  after a warm-up batch; ``--no-process`` keeps only this), and reports
  sentences/s and target tokens/s,
  in ``--decode-precision`` (fp32, or bf16 autocast, which pays on CPUs with
  native bf16), and the same roofline as training: the search's matmul FLOPs
  (counted in one more pass) per second of translation, against both peaks.
  Each is the median of ``--reps`` runs: on a shared 2-core VM one run varied
  by up to 40% from the next.

* ``scale``: corpus size and format, in ``benchmark_scale.py`` (read its docstring):
  peak RSS and wall of training runs on 29 k to millions of pairs, first and
  cached, and first-run encoding against SentencePiece's own threaded rate.

        python scripts/benchmark.py scale --data-dir $SEQ2SEQ_MULTI30K \
            --scale-dir /tmp/scale --experiment multi30k_en_de_25min --formats text tsv

Nothing here is a test: speed is measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from seq2seq.decoding.translator import Translator


def matmul_peak(
    dtype: torch.dtype, size: int = 2048, min_seconds: float = 1.0, device: str = "cpu"
) -> float:
    """GFLOP/s of a large square matmul: the practical compute ceiling.

    Why the size can shrink: a CPU without native bf16 emulates it about 100x
    slower than fp32, and a 2048-square product would then take tens of
    seconds; the peak is a rate, so a smaller product measures it just as well.
    """
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        if device != "cpu":
            a @ b  # the first product on a GPU also pays for loading its library
            _sync(device)
        start = time.perf_counter()
        a @ b  # warm-up, and a probe of how slow this dtype is here
        _sync(device)
        if time.perf_counter() - start < 0.5 or size <= 256:
            break
        size //= 2
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < min_seconds:
        a @ b
        _sync(device)
        reps += 1
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def matmul_peaks(device: str = "cpu") -> dict[str, float]:
    """This machine's fp32 and bf16 matmul peaks (GFLOP/s) on ``device``, measured now."""
    size = 8192 if device.startswith("cuda") else 2048
    return {
        dtype: matmul_peak(getattr(torch, name), size, device=device)
        for dtype, name in (("fp32", "float32"), ("bf16", "bfloat16"))
    }


def _sync(device: str | torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


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
    # Past the first epoch's batches the same ones come round again.
    wanted = 1 + args.warmup + args.train_steps
    batch_list = [data.batch(b) for b in batches[:wanted]]
    batch_list = (batch_list * -(-wanted // len(batch_list)))[:wanted]
    with FlopCounterMode(display=False) as counter:
        trainer.train_step([batch_list[0]])
    flops_per_token = counter.get_total_flops() / batch_list[0].n_tokens
    for batch in batch_list[1 : 1 + args.warmup]:
        trainer.train_step([batch])
    device = str(trainer.device)
    _sync(device)
    timed, start = [], time.perf_counter()
    for batch in batch_list[1 + args.warmup :]:
        trainer.train_step([batch])
        timed.append(batch)
        if args.train_seconds and time.perf_counter() - start >= args.train_seconds:
            break
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(b.n_tokens for b in timed)
    sentences = sum(b.src.size(0) for b in timed)
    writing_ahead = False
    if sampled is not None:
        writing_ahead = sampled.pending is not None and not sampled.conn.poll()
        sampled.close()
    rate = tokens / seconds
    peaks = matmul_peaks(device)
    achieved = flops_per_token * rate / 1e9
    return {
        "experiment": args.experiment,
        "device": _device_name(device),
        "precision": "bf16" if trainer.use_bf16 else "fp32",
        "parameters_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 2),
        "steps": len(timed),
        "seconds": round(seconds, 1),
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

    src = Path(args.data_dir) / f"{args.test_stem}.{args.src_lang}.gz"
    lines = read_lines(src)
    # The child processes run first, while this one holds no model: a child's peak
    # RSS counts the pages it shared with its parent before exec, so after the
    # in-process runs below it would report this process's memory, not its own.
    searches = (("greedy", 1), ("beam5", 5))
    walls: dict[str, float] = {}
    child_rss: dict[str, float] = {}
    for name, beam in searches if not args.no_process else ():
        walls[name] = statistics.median(
            _translate_process(args, src, beam) for _ in range(args.reps)
        )
        child_rss[name] = peak_rss_mb(resource.RUSAGE_CHILDREN)  # the max over children so far
    _set_threads(args.threads)
    peaks = matmul_peaks(args.device)
    results = []
    for batch_size in args.batch_sizes:
        for name, beam in searches:
            result = _decode_in_process(args, lines, beam, batch_size, peaks)
            if name in walls:
                result["process_wall_s"] = round(walls[name], 2)
                result["process_sentences_per_s"] = round(len(lines) / walls[name], 1)
                result["process_peak_rss_mb"] = round(child_rss[name])
            results.append({"search": name, **result})
    return results


def _decode_in_process(
    args: argparse.Namespace, lines: list[str], beam: int, batch_size: int, peaks: dict
) -> dict:
    """Translation time alone of ``lines``, the median of ``args.reps`` runs."""
    from seq2seq.decoding.translator import Translator

    translator = Translator.from_bundle(args.bundle, device=args.device).with_decode(
        beam_size=beam, batch_size=batch_size, nbest=1, precision=args.decode_precision
    )
    translator.hypotheses(lines[:batch_size])  # warm-up: kernels, libraries, caches
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        hyps = translator.hypotheses(lines)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = sum(len(h[0].tokens) + 1 for h in hyps if h)
    achieved = _decode_flops(translator, lines) / seconds / 1e9
    return {
        "device": _device_name(args.device),
        "precision": args.decode_precision,
        "batch_size": batch_size,
        "sentences": len(lines),
        "reps": args.reps,
        "translate_s": round(seconds, 2),
        "translate_s_all": [round(t, 2) for t in times],
        "sentences_per_s": round(len(lines) / seconds, 1),
        "tgt_tokens_per_s": round(tokens / seconds),
        **roofline(achieved, peaks),
    }


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
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("SEQ2SEQ_MULTI30K"),
        help="Multi30k's directory, data.dir (default: $SEQ2SEQ_MULTI30K)",
    )
    parser.add_argument("--bundle", default=None, help="trained bundle for the decode part")
    parser.add_argument("--test-stem", default="test_2016_flickr")
    parser.add_argument("--src-lang", default="en")
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (default: torch's own choice)"
    )
    parser.add_argument("--decode-precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--reps", type=int, default=3, help="decoding runs; medians reported")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=100, help="timed steps at most")
    parser.add_argument(
        "--train-seconds", type=float, default=0, help="stop timing after this long (0: no limit)"
    )
    parser.add_argument("--device", default="cpu", help="where the decode part runs")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[64], help="decode batch sizes"
    )
    parser.add_argument(
        "--no-process", action="store_true", help="decode: skip the whole-process timings"
    )
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
    parser.add_argument(
        "--formats", nargs="+", default=["text"], help="text, tsv, jsonl, parquet, arrow"
    )
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
        import benchmark_scale

        report = benchmark_scale.bench_scale(args)
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
