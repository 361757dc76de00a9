#!/usr/bin/env bash
# The CUDA paths tested and measured in one command, on a machine with an NVIDIA GPU and
# torch installed but no network:
#   scripts/gpu_check.sh [OUT_DIR]        (OUT_DIR defaults to gpu_out/; new or empty)
# First, where pip reaches PyPI: scripts/gpu_bundle.sh (fills gpu_bundle/, which travels
# with the working tree). Then, on the GPU machine, from the repository's root, this:
# 1. installs the bundle's wheels into a scratch folder (--no-deps --no-index: the
#    machine's own torch is never touched);
# 2. runs, each under its own time limit, going on to the next whatever happens:
#    - equivalence: scripts/gpu_equivalence.py, CUDA against CPU, and both recurrence
#      implementations timed;
#    - tests: the test suite with SEQ2SEQ_TEST_DEVICE=cuda;
#    - train_fp32, train_bf16: scripts/benchmark.py train, 90 s each, the 25-minute
#      Multi30k config;
#    - torchrun: one-GPU torchrun (NCCL) training run of 50 steps, whose bundle the
#      decode step reads;
#    - decode: scripts/benchmark.py decode on CUDA, greedy and beam 5, batches 64 and 256;
# 3. writes OUT_DIR/gpu_report.json, OUT_DIR/summary.md and OUT_DIR/logs.tar.gz (every
#    step's log). It exits 0 when every step passed, 1 otherwise, and 2 (one line on
#    stderr) where it cannot start: no CUDA, no bundle, OUT_DIR not empty.
# Knobs: GPU_BUNDLE (bundle folder), GPU_CHECK_BUDGET (seconds for all steps, 480),
# GPU_CHECK_TRAIN_SECONDS (90), GPU_CHECK_TEST_WORKERS (pytest-xdist workers, 4).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/gpu_out}"
bundle="${GPU_BUNDLE:-$root/gpu_bundle}"
budget="${GPU_CHECK_BUDGET:-480}"
train_seconds="${GPU_CHECK_TRAIN_SECONDS:-90}"
workers="${GPU_CHECK_TEST_WORKERS:-4}"
python="${PYTHON:-python3}"

fail() { echo "error: $*" >&2; exit 2; }

cuda="$("$python" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" \
    || fail "$python cannot import torch (name the Python that has it in PYTHON)"
[ "$cuda" = 1 ] \
    || fail "no CUDA device here (torch.cuda.is_available() is false); run this on a GPU machine"
[ -d "$bundle/wheels" ] && [ -d "$bundle/multi30k" ] \
    || fail "no bundle at $bundle: run scripts/gpu_bundle.sh where pip reaches PyPI"
bundle="$(cd "$bundle" && pwd)"  # the steps that change directory read it too
[ -n "$(ls -A "$out" 2>/dev/null)" ] && fail "$out is not empty; name a new or empty folder"
mkdir -p "$out" || fail "cannot create $out"

scratch="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
steps="$scratch/steps" logs="$scratch/logs" site="$scratch/site"
mkdir -p "$steps" "$logs"
data="$bundle/multi30k"
start_s=$SECONDS
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# step NAME CAP RESULT_JSON COMMAND...: run COMMAND under `timeout`, at most CAP seconds and
# never past the budget (skipped when under 20 s of it are left); record its outcome.
step() {
    local name="$1" cap="$2" result="$3"; shift 3
    local left=$((budget - (SECONDS - start_s)))
    local limit=$((cap < left ? cap : left)) rc began=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee "$logs/$name.log"
    if [ "$limit" -lt 20 ]; then
        echo "skipped: ${left}s of the ${budget}s budget left" | tee -a "$logs/$name.log"
        rc=-1
    else
        timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >> "$logs/$name.log" 2>&1
        rc=$?
    fi
    echo "== $name: rc $rc after $((SECONDS - began))s"
    "$python" "$root/scripts/gpu_report.py" record "$steps" "$name" --rc "$rc" \
        --seconds "$((SECONDS - began))" --limit "$limit" --log "$logs/$name.log" \
        ${result:+--result "$result"} --command "$*"
}

install() {
    "$python" -c 'import torch; print("torch before:", torch.__version__, torch.__file__)' &&
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" --find-links "$bundle/wheels" "$bundle"/wheels/*.whl &&
    "$python" -c 'import torch, hydra, omegaconf, datasets, seq2seq, fastapi
print("torch after:", torch.__version__, torch.__file__, "cuda", torch.version.cuda)'
}

tests() {
    local parallel=()
    if [ "$workers" -gt 1 ] && "$python" -c 'import xdist' 2>/dev/null; then
        parallel=(-n "$workers" --dist loadfile)
    fi
    (cd "$root" && SEQ2SEQ_TEST_DEVICE=cuda SEQ2SEQ_MULTI30K="$data" \
        "$python" -m pytest -q -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} tests)
}

train_bench() {  # PRECISION
    "$python" "$root/scripts/benchmark.py" train --experiment multi30k_en_de_25min \
        --data-dir "$data" --warmup 10 --train-steps 1000000 --train-seconds "$train_seconds" \
        --override "train.precision=$1" --override "tokenizer.cache_dir=$scratch/spm" \
        --json "$scratch/train_$1.json"
}

torchrun_run() {
    (cd "$scratch" && "$python" -m torch.distributed.run --standalone --nproc-per-node=1 \
        -m seq2seq.train experiment=multi30k_en_de_25min "data.dir=$data" \
        "tokenizer.cache_dir=$scratch/spm" "run_dir=$scratch/torchrun" train.max_steps=50 train.ensemble=1 \
        train.valid_every=50 train.log_every=10 train.backend=nccl) &&
    "$python" "$root/scripts/gpu_report.py" run "$scratch/torchrun" "$scratch/torchrun.json"
}

decode_bench() {
    local model="$scratch/torchrun/best"
    [ -d "$model" ] || model="$scratch/torchrun/last"
    "$python" "$root/scripts/benchmark.py" decode --bundle "$model" \
        --data-dir "$data" --device cuda --batch-sizes 64 256 --reps 2 --no-process \
        --json "$scratch/decode.json"
}

# `timeout` runs a new bash: it needs the functions and the settings they read.
export -f install tests train_bench torchrun_run decode_bench
export root bundle data scratch site workers train_seconds python

step install 60 "" install
step equivalence 90 "$scratch/equivalence.json" \
    "$python" "$root/scripts/gpu_equivalence.py" --device cuda --json "$scratch/equivalence.json"
step tests 120 "" tests
step train_fp32 $((train_seconds + 50)) "$scratch/train_fp32.json" train_bench fp32
step train_bf16 $((train_seconds + 30)) "$scratch/train_bf16.json" train_bench bf16
step torchrun 90 "$scratch/torchrun.json" torchrun_run
step decode 90 "$scratch/decode.json" decode_bench

context="$("$python" - "$root" <<'PY'
import json, subprocess, sys, time
import torch
commit = subprocess.run(["git", "-C", sys.argv[1], "rev-parse", "--short", "HEAD"],
                        capture_output=True, text=True).stdout.strip() or "unknown"
try:
    device = torch.cuda.get_device_name(0)
except (AssertionError, RuntimeError) as e:
    device = f"unknown ({e})"
print(json.dumps({
    "device": device,
    "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})",
    "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    "commit": commit,
}))
PY
)"
[ -n "$context" ] || context='{}'
"$python" "$root/scripts/gpu_report.py" write "$steps" "$out" --context "$context"
tar -czf "$out/logs.tar.gz" -C "$scratch" logs
echo "total: $((SECONDS - start_s))s; report: $out/gpu_report.json, summary: $out/summary.md; runs and logs: $scratch"
cat "$out/summary.md"
"$python" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' \
    "$out/gpu_report.json"
