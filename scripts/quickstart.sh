#!/usr/bin/env bash
# README command 1: set up .venv (Python >= 3.12, megatron-core 0.19.x), then, on CPU:
#   1. vopd-train on examples/tiny (a 2-layer student, a deeper and wider frozen
#      teacher) with TP2 over two gloo processes, 10 iterations: the plumbing;
#   2. the arithmetic testbed's short demo: a teacher and a smaller student are
#      trained once by vopd-sft (cached in runs/arithmetic/), then the student is
#      distilled on-policy with opd and with vopd; a small report (held-out
#      reverse KL and accuracy, gradient variance, baseline cost) is written to
#      runs/arithmetic/short/report.md. The full 6-mode x 3-seed comparison is
#      docs/arithmetic_report.md (python examples/arithmetic/compare_modes.py).
# Extra arguments go to compare_modes.py.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
echo "[quickstart] vopd-train, examples/tiny, TP2 on CPU"
PYTHON="$root/.venv/bin/python" bash examples/tiny/run_cpu.sh 2 --train-iters 10 2>&1 \
  | grep -E '^\[vopd\]|^wrote|rror'
echo "[quickstart] arithmetic testbed, short demo (first run: ~5 min more, to train the teacher and student once)"
exec "$root/.venv/bin/python" examples/arithmetic/compare_modes.py --short "$@"
