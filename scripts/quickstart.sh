#!/usr/bin/env bash
# README command 1: set up .venv (Python >= 3.12, megatron-core 0.19.x), then, on CPU,
# the arithmetic testbed's short demo: a teacher and a smaller student are trained
# once by vopd-sft (cached in runs/arithmetic/), then the student is distilled
# on-policy with opd and with vopd, and vopd once more at TP2 (two gloo processes
# under torchrun); a small report (held-out reverse KL and accuracy, gradient
# variance, baseline cost, TP1 vs TP2) is written to runs/arithmetic/short/report.md.
# The full 6-mode x 3-seed comparison is docs/arithmetic_report.md
# (python examples/arithmetic/compare_modes.py). The layout plumbing alone, with a
# random teacher: bash examples/tiny/run_cpu.sh [1|2|4].
# Extra arguments go to compare_modes.py.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
echo "[quickstart] arithmetic testbed, short demo (first run: ~6 min more, to train the teacher and student once)"
exec "$root/.venv/bin/python" examples/arithmetic/compare_modes.py --short "$@"
