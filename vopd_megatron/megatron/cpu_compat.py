"""Run Megatron-Core's tensor- and pipeline-parallel code on CPU (gloo) when CUDA is absent.

Megatron-Core assumes a GPU in places that have nothing to do with the maths:
it allocates on `torch.cuda.current_device()`, seeds and forks the CUDA
generator, writes `device="cuda"`, and checks `param.type()` against
`'torch.cuda.FloatTensor'`. Without a GPU each of these raises. `enable()`
points them at the CPU, so the same code runs with the same numerics; with a
GPU it changes nothing. Spawned test ranks (`vopd_megatron.testing.GlooPool`)
call it before `init_process_group("gloo")`. Nothing happens on import: the
switch is always an explicit call. This module is the switch and the list of
places redirected; the stand-ins themselves are in `cpu_standins.py`.

The redirections, narrowest first:

1. CUDA RNG -> CPU RNG, in `megatron.core.tensor_parallel.random` only: its
   `torch.cuda.manual_seed` / `get_rng_state` (`model_parallel_cuda_manual_seed`,
   `CudaRNGStatesTracker.add`) and its `_get/_set_cuda_rng_state` helpers
   (`tracker.fork()`, recompute's RNG replay) act on the CPU generator, the
   one CPU dropout draws from. `fork()`'s "CPU RNG state changed" warning,
   always true here, is filtered.
2. `device="cuda"` literals -> CPU, in the `_CUDA_LITERAL_MODULES` only (their
   `torch` gets CPU-mapping tensor factories): the schedules' token counter,
   `broadcast_data`'s size exchange, the default causal mask
   (`transformer.utils`), grad-norm/clipping buffers (`clip_grads`,
   `utils.local_multi_tensor_l2_norm`), the mixed-precision optimizer's flags
   and loss scale, the rerun state machine, dist-checkpointing's plan check.
3. `Tensor.cuda()` -> no-op and `Tensor.type()` -> `'torch.cuda.*'`, only
   while the `_RUN_AS_IF_CUDA` functions run: `.cuda()` in `broadcast_data`,
   in `LanguageModule.setup_embeddings_and_output_layer` (tied embeddings
   across pipeline stages) and in the static inference controller; the type
   strings in `Float16OptimizerWithFloat16Params`, `DistributedOptimizer` and
   `clip_grad_by_total_norm_fp32`. Tensor methods cannot be redirected per
   module, so they are swapped for those calls (not thread-safe).
4. `torch.cuda.{current_device, synchronize, current_stream, default_stream,
   stream, Stream, Event}` -> thin wrappers over PyTorch's device-agnostic
   `torch.cpu` stand-ins, process-wide: `current_device()` places tensors in
   ~60 Megatron modules (layers, mappings, attention, p2p, DDP buffers,
   optimizers, inference); p2p, timers and DDP synchronize; DDP's grad sync
   uses streams (0.16 `default_stream`, 0.19 `current_stream`); `Event` times.
   Safe process-wide because without a GPU each of these raises: only failing
   calls change. (Distinct functions: torch.compile rejects aliases.)
5. `megatron.core.inference.communication_utils._is_cuda` (an `is_cuda`
   assertion before the pipeline-parallel send/recv/broadcast of static
   inference) -> a not-None check, for PP > 1 sampling.

6. `enable_training_loop()`, separate and explicit, for Megatron-LM's own loop
   (`megatron.training`: `pretrain`, `save_checkpoint`, `load_checkpoint`):
   its `initialize_megatron` allows no CUDA; `_initialize_distributed` and
   `_set_random_seed` run as if one device existed (so the model-parallel groups
   are built and the TP RNG tracker is seeded, on the CPU generator);
   `get_device_arch_version` reports 0 (no device); the CUDA-kernel JIT warm-up
   is skipped; `device="cuda"` literals in `training.py` and CUDA RNG state in
   its checkpointing and the rerun state machine go to the CPU, as in 1. and 2.;
   `get_model`'s `model.cuda()` runs as in 3.

What the front end needs to *plan* a GPU run on a machine without one is not
here: `config.megatron_lm.planning_as_on_gpu()`, only while a configuration is
checked and built.

Not covered (they fail loudly, as before): Transformer Engine and apex, fused
kernels (`apply_rope_fusion`, `gradient_accumulation_fusion`), the dynamic
inference engine, CUDA graphs, and other `.cuda()` calls (e.g.
dist-checkpointing's fully-parallel load exchange).
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys
import types

import torch

from . import cpu_standins as standins

__all__ = ["enable", "enable_training_loop", "is_active"]

_active = False
_training_loop_active = False


def is_active() -> bool:
    """True once `enable()` has installed the CPU redirections in this process."""
    return _active


def enable() -> bool:
    """Install the CPU redirections if CUDA is unavailable (idempotent).

    Returns True when the redirections are active, False when CUDA is present
    (nothing is changed then). Imports the Megatron-Core modules it patches.
    """
    global _active
    if _active:
        return True
    if torch.cuda.is_available():
        return False
    _redirect_rng()
    for name in _CUDA_LITERAL_MODULES:
        module = _import(name)
        if module is not None:
            module.torch = standins.TORCH_CUDA_LITERALS_ON_CPU
    for module_name, qualname in _RUN_AS_IF_CUDA:
        _wrap(module_name, qualname, standins.run_as_if_cuda)
    for name, standin in standins.CUDA_STANDINS.items():
        setattr(torch.cuda, name, standin)
    comm = _import("megatron.core.inference.communication_utils")
    if comm is not None and hasattr(comm, "_is_cuda"):
        _replace(comm, "_is_cuda", standins.is_tensor)  # 5. inference p2p / broadcast checks
    _active = True
    return True


def _import(name: str) -> types.ModuleType | None:
    """The module, or None where this megatron-core version lacks it or its extras."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# --- 1. CUDA RNG -> CPU RNG, in megatron.core.tensor_parallel.random -------------


def _redirect_rng():
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random.torch = standins.Redirect(torch, cuda=standins.CPU_RNG_CUDA)
    _replace(random, "_get_cuda_rng_state", standins.get_cpu_rng_state)
    _replace(random, "_set_cuda_rng_state", standins.set_cpu_rng_state)
    # `fork()` warns when the CPU generator moved inside it; here the forked
    # generator *is* the CPU one, so every random draw in a fork would warn.
    logging.getLogger(random.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context"
    )


# --- 2. literal device="cuda" -> CPU, in the listed modules ----------------------

_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)


# --- 3. Tensor.cuda() / Tensor.type() while the listed functions run ---------------

_RUN_AS_IF_CUDA = (
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.inference.text_generation_controllers.text_generation_controller",
     "TextGenerationController.generate_all_output_tokens_static_batch"),
)


# --- patching helpers ---------------------------------------------------------------


def _wrap(module_name: str, qualname: str, decorator):
    """Replace `module.qualname` (a function or `Class.method`) by `decorator(it)`, if it exists."""
    owner = _import(module_name)
    *class_path, attr = qualname.split(".")
    for name in class_path:
        owner = getattr(owner, name, None)
    original = getattr(owner, attr, None)
    if original is None:
        return
    if isinstance(owner, types.ModuleType):
        _replace(owner, attr, decorator(original))
    else:
        setattr(owner, attr, decorator(original))


def _replace(module: types.ModuleType, name: str, new):
    """Set `module.name = new`, and rebind Megatron modules that imported the old object by name."""
    old = getattr(module, name)
    for other in list(sys.modules.values()):
        if getattr(other, "__name__", "").startswith("megatron.") and getattr(other, name, None) is old:
            setattr(other, name, new)
    setattr(module, name, new)


# --- 6. Megatron-LM's training loop (megatron.training), switched on separately ------


def enable_training_loop() -> bool:
    """`enable()`, plus what `megatron.training.pretrain` and its checkpointing need on CPU.

    Separate and explicit: only a script that runs Megatron-LM's own loop on CPU
    (examples/pretrain_with_vopd_loss.py --cpu, tests that call Megatron-LM's
    `save_checkpoint` / `load_checkpoint`) turns it on. No-op with CUDA.
    """
    global _training_loop_active
    if not enable():
        return False
    if _training_loop_active:
        return True
    utils = _import("megatron.training.utils.common_utils")
    _replace(utils, "get_device_arch_version", standins.no_device_arch)
    training = _import("megatron.training.training")
    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    for name in ("_initialize_distributed", "_set_random_seed"):
        _wrap("megatron.training.initialize", name, standins.as_if_one_device)
    _import("megatron.training.initialize")._warmup_jit_function = standins.no_jit_warmup
    for name in _TRAINING_CUDA_LITERAL_MODULES:
        _import(name).torch = standins.TORCH_CUDA_LITERALS_ON_CPU
    for name in _TRAINING_CUDA_RNG_MODULES:  # their CUDA RNG state is the CPU generator's, as in 1.
        _import(name).torch = standins.Redirect(standins.TORCH_CUDA_LITERALS_ON_CPU, cuda=standins.CPU_RNG_CUDA)
    _wrap("megatron.training.training", "get_model", standins.run_as_if_cuda)  # model_module.cuda(...)
    _training_loop_active = True
    return True


_TRAINING_CUDA_LITERAL_MODULES = ("megatron.training.training",)
_TRAINING_CUDA_RNG_MODULES = ("megatron.core.rerun_state_machine", "megatron.training.checkpointing")


