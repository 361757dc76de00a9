#!/usr/bin/env bash
# The main job on the built-in offline corpus, from a fresh checkout:
# install, train (stops by itself after 5 minutes of training), report
# validation BLEU, translate a sample, and score the held-out test split.
set -euo pipefail
cd "$(dirname "$0")/.."
run=runs/quickstart
# torch first, pinned to the CPU build (a bare "torch" can pull a multi-GB CUDA build).
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -e .
seq2seq-train run_dir="$run"
printf 'ninety-four\nMarch 3, 2021\nFrance, Germany, and Spain\n7 kilometers and 12 hours\n' \
  | seq2seq-translate model="$run/best"
python scripts/export_builtin.py "$run/data" > /dev/null
seq2seq-evaluate model="$run/best" src="$run/data/test.en" ref="$run/data/test.de" json="$run/test.json"
