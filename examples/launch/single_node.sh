#!/usr/bin/env bash
# One node, all its GPUs: vopd-train under torchrun.
#   bash examples/launch/single_node.sh CONFIG.yaml [vopd-train flags...]
# e.g. bash examples/launch/single_node.sh examples/tiny/config.yaml --tensor-model-parallel-size 8
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [flags...]}; shift
gpus=${GPUS_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
# Megatron-LM's argument checks require it at TP > 1 before Blackwell (as for pretrain_gpt.py).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
exec torchrun --standalone --nproc-per-node "$gpus" -m vopd_megatron.training.train --config "$config" "$@"
