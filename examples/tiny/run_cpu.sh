#!/usr/bin/env bash
# Train the tiny example on CPU with 1, 2 (TP2) or 4 (TP2 x PP2) processes:
#   bash examples/tiny/run_cpu.sh [1|2|4] [extra vopd-train flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
nproc=${1:-1}; shift || true
py=${PYTHON:-.venv/bin/python}
case "$nproc" in
  1) layout=() ;;
  2) layout=(--tensor-model-parallel-size 2) ;;
  # On-policy at TP2 x PP2 too (the sampler runs the pipeline). For rollouts
  # from an external sampler instead: --prompt-data "" --rollout-data examples/tiny/rollouts.jsonl
  4) layout=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2) ;;
  *) echo "usage: $0 [1|2|4] [flags...]" >&2; exit 2 ;;
esac
out=runs/tiny/np$nproc
teacher=${TEACHER:-runs/tiny/teacher}
if [ ! -f "$teacher/latest_checkpointed_iteration.txt" ]; then
  # No trained teacher yet: a fixed random one, the same on every layout.
  "$py" tools/init_checkpoint.py --config examples/tiny/config.yaml --which teacher --out "$teacher"
fi
exec "$py" -m torch.distributed.run --nproc-per-node "$nproc" -m vopd_megatron.training.train \
  --config examples/tiny/config.yaml "${layout[@]}" \
  --teacher-load "$teacher" --save "$out/checkpoints" --tensorboard-dir "$out/tensorboard" "$@"
