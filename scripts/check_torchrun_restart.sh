#!/usr/bin/env bash
# A worker killed with SIGKILL mid-run: torchrun --max-restarts restarts the job, the
# job resumes from last/, and ends with the same weights as a run never interrupted.
#   scripts/check_torchrun_restart.sh [SCRATCH_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
scratch="${1:-$(mktemp -d)}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$scratch"
rm -rf killed straight
args=(debug=tiny "tokenizer.cache_dir=$scratch/spm" train.max_steps=200 train.valid_every=20
      train.patience=0 model.dropout=0.3)
torchrun=(python -m torch.distributed.run --standalone --nproc-per-node=2)

TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "${torchrun[@]}" --max-restarts=3 -m seq2seq.train \
    "${args[@]}" "run_dir=$scratch/killed" > killed.out 2> killed.err &
agent=$!
until [ -f killed/last/trainer_state.pt ]; do sleep 1; done
sleep 3
victim="$(pgrep -P "$agent" | tail -1)"
echo "killing worker $victim after: $(grep '"valid"' killed/metrics.jsonl | tail -1)"
kill -9 "$victim"
wait "$agent"
echo "torchrun exit code after the kill: $?"

"${torchrun[@]}" -m seq2seq.train "${args[@]}" "run_dir=$scratch/straight" > straight.out 2> straight.err
python - <<'PY'
import torch
from seq2seq.model import bundle

killed, straight = (bundle.load(f"{d}/last").model.state_dict() for d in ("killed", "straight"))
print("same weights as the uninterrupted run:", all(torch.equal(killed[k], straight[k]) for k in killed))
print("resumed after a restart:", open("killed/train.log").read().count("resumed from"), "time(s)")
PY
