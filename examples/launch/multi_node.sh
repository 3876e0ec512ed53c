#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=8 RDZV_HOST=node001 bash examples/launch/multi_node.sh CONFIG.yaml [flags...]
# RDZV_HOST must be reachable from all nodes; RDZV_ID identifies the job.
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [flags...]}; shift
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST}"
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron's usual setting
exec torchrun \
  --nnodes "$NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:${RDZV_PORT:-29500}" --rdzv-id "${RDZV_ID:-vopd}" \
  -m vopd_megatron.training.train --config "$config" "$@"
