"""Training speed with subword sampling against without, in one process.

On a shared machine two benchmark processes minutes apart differ by more than
the effect measured here, so one process alternates short windows of training
steps on the best segmentation and on a sampled epoch (same trainer, same
weights moving on) and reports each side's median window:

    python scripts/benchmark_sampling.py --data-dir ../shared/data/multi30k \\
        --experiment multi30k_en_de_25min --alpha 0.3 --windows 6 --steps 5

It also reports how long sampling one epoch takes (in the trainer's background
thread during training) against one epoch's training time at the measured rate.
Nothing here is a test: speed is measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seq2seq._hydra import register_configs
from seq2seq.config import conf_dir
from seq2seq.data import sampling
from seq2seq.data.batching import token_batches
from seq2seq.runtime.allocator import retain_freed_memory
from seq2seq.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default="multi30k_en_de_25min")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--windows", type=int, default=6, help="windows per side")
    parser.add_argument("--steps", type=int, default=5, help="steps per window")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override")
    args = parser.parse_args()

    register_configs()
    overrides = [
        f"experiment={args.experiment}",
        "run_dir=unused",
        f"data.dir={args.data_dir}",
        f"tokenizer.sampling_alpha={args.alpha}",
        *args.override,
    ]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        config = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    retain_freed_memory()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer.from_config(config, run_dir=Path(run_dir))
    sampled = sampling.for_training(config, trainer.train_data, trainer.tokenizer)
    assert sampled is not None, "--alpha must be above 0"
    start = time.perf_counter()
    data = sampled.epoch(0)
    sample_seconds = time.perf_counter() - start
    sampled.close()  # the windows below time training alone; the epoch cost is reported apart

    t = config.train
    sides = {
        "best": (trainer.train_data, token_batches(trainer.lengths, max_tokens=t.max_tokens)),
        "sampled": (data, token_batches(sampling.pair_lengths(data), max_tokens=t.max_tokens)),
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    sentences: dict[str, list[float]] = {name: [] for name in sides}
    for window in range(args.windows + 1):  # the first pair of windows warms up
        for name, (store, batches) in sides.items():
            chosen = batches[window * args.steps : (window + 1) * args.steps]
            ready = [store.batch(b) for b in chosen]
            begin = time.perf_counter()
            for batch in ready:
                trainer.train_step([batch])
            seconds = time.perf_counter() - begin
            if window:
                rates[name].append(sum(b.n_tokens for b in ready) / seconds)
                sentences[name].append(sum(b.src.size(0) for b in ready) / seconds)
    median = {name: statistics.median(values) for name, values in rates.items()}
    epoch_tokens = int(data.tgt_lengths.sum()) + len(data)  # target pieces + EOS
    epoch_seconds = epoch_tokens / median["sampled"]
    print(
        json.dumps(
            {
                "experiment": args.experiment,
                "alpha": args.alpha,
                "overrides": args.override,
                "tokens_per_s": {k: round(v) for k, v in median.items()},
                "ratio": round(median["sampled"] / median["best"], 3),
                "sentences_per_s": {
                    k: round(statistics.median(v), 1) for k, v in sentences.items()
                },
                "windows": {k: [round(r) for r in v] for k, v in rates.items()},
                "target_pieces": {
                    "best": int(trainer.train_data.tgt_lengths.sum()),
                    "sampled": int(data.tgt_lengths.sum()),
                },
                "epoch_sample_s": round(sample_seconds, 1),
                "epoch_train_s_at_sampled_rate": round(epoch_seconds),
            }
        )
    )


if __name__ == "__main__":
    main()
