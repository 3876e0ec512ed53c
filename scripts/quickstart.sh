#!/usr/bin/env bash
# README command 1: set up .venv (Python >= 3.12, megatron-core 0.19.x), then run
# the main job on its embedded default, on CPU:
#   1. vopd-train on examples/tiny (a 2-layer student, a deeper and wider frozen
#      teacher) with TP2 over two gloo processes, 10 iterations;
#   2. the on-policy loss demo: every loss mode distilling a vocab-parallel
#      student table over gloo (python -m vopd_megatron.demo).
# Extra arguments go to the demo.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
echo "[quickstart] vopd-train, examples/tiny, TP2 on CPU"
PYTHON="$root/.venv/bin/python" bash examples/tiny/run_cpu.sh 2 --train-iters 10 2>&1 \
  | grep -E '^\[vopd\]|^wrote|rror'
echo "[quickstart] on-policy loss demo"
exec "$root/.venv/bin/python" -m vopd_megatron.demo "$@"
