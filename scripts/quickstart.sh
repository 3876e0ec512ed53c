#!/usr/bin/env bash
# README command 1: set up .venv (Python >= 3.12, megatron-core 0.19.x) and run
# the main job on its embedded default: a small vocab-parallel distillation
# on CPU over two gloo ranks (python -m vopd_megatron.demo).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m vopd_megatron.demo "$@"
