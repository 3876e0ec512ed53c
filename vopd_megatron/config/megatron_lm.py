"""Megatron-LM's training package as the configuration code needs it: imported quietly, and
asked about the machine as the GPU target would answer.

The front end reads Megatron-LM's parser, `validate_args` and
`core_transformer_config_from_args` (config/megatron_args.py). Two things
stand between them and a laptop, and both are handled here, below every
module that plans or builds a model:

* Importing `megatron.training` reconfigures logging: its training.py calls
  `logging.basicConfig(level=INFO)` with a handler that writes every
  Megatron-Core INFO record to stdout. `import_megatron_training()` puts the
  root logger's handlers and level back as they were.
* `planning_as_on_gpu()`, only while a configuration is checked and built
  (never while a model runs), answers two questions about the machine as the
  GPU target would, so that `--dry-run` plans a GPU job on a laptop and the
  front end builds Megatron-LM's exact TransformerConfig there (with a GPU it
  changes nothing):

  - `validate_args` asks the GPU's architecture (`get_device_arch_version`)
    whenever TP or CP > 1, to demand CUDA_DEVICE_MAX_CONNECTIONS=1 before
    Blackwell; without a GPU that query raises, so it answers 10.
  - TransformerConfig refuses `apply_rope_fusion` (Megatron-LM's default)
    when Transformer Engine's fused RoPE kernel is not importable; a stub that
    raises if ever called stands in for it. The config a model is built with
    on such a machine turns the fusion off instead (model/builder.py).

Running Megatron-Core's parallel code on CPU is another matter, switched on
explicitly by `vopd_megatron.megatron.cpu_compat.enable()`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging

import torch


@functools.cache
def import_megatron_training() -> None:
    """Import megatron.training without what its import does to logging (see the module docstring)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for module in ("megatron.training", "megatron.training.arguments", "megatron.training.training"):
        importlib.import_module(module)

    root.handlers[:] = handlers
    root.setLevel(level)


def _fused_rope_stub(*args, **kwargs):
    raise RuntimeError("Transformer Engine's fused RoPE kernel is not available on this machine")


@contextlib.contextmanager
def planning_as_on_gpu():
    """While open, machine checks of Megatron-LM's argument and config validation see a GPU target."""
    import megatron.core.models.common.embeddings.rope_utils as rope_utils

    import_megatron_training()
    import megatron.training.arguments as arguments

    if torch.cuda.is_available() and rope_utils.fused_apply_rotary_pos_emb is not None:
        yield
        return
    saved = arguments.get_device_arch_version, rope_utils.fused_apply_rotary_pos_emb
    if not torch.cuda.is_available():
        arguments.get_device_arch_version = lambda: 10
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = _fused_rope_stub
    try:
        yield
    finally:
        arguments.get_device_arch_version, rope_utils.fused_apply_rotary_pos_emb = saved
