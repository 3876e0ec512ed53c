"""Run Megatron-Core's tensor- and pipeline-parallel code on CPU (gloo) when CUDA is absent.

Megatron-Core assumes a GPU in places that have nothing to do with the maths:
it allocates on `torch.cuda.current_device()`, seeds and forks the CUDA
generator, writes `device="cuda"`, and checks `param.type()` against
`'torch.cuda.FloatTensor'`. Without a GPU each of these raises. `enable()`
points them at the CPU, so the same code runs with the same numerics; with a
GPU it changes nothing. Spawned test ranks (`vopd_megatron.testing.GlooPool`)
call it before `init_process_group("gloo")`.

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

import contextlib
import functools
import importlib
import logging
import sys
import time
import types

import torch

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
            module.torch = _TORCH_CUDA_LITERALS_ON_CPU
    for module_name, qualname in _RUN_AS_IF_CUDA:
        _wrap(module_name, qualname, _run_as_if_cuda)
    for name, standin in _CUDA_STANDINS.items():
        setattr(torch.cuda, name, standin)
    comm = _import("megatron.core.inference.communication_utils")
    if comm is not None and hasattr(comm, "_is_cuda"):
        _replace(comm, "_is_cuda", _is_tensor)  # 5. inference p2p / broadcast checks
    _active = True
    return True


class _Redirect(types.ModuleType):
    """A module `target` with some attributes replaced; all others are `target`'s."""

    def __init__(self, target: types.ModuleType, **overrides):
        super().__init__(target.__name__, target.__doc__)
        self.__dict__.update(overrides)
        self._target = target

    def __getattr__(self, name):  # called only for names not overridden
        return getattr(self._target, name)

    def __repr__(self):
        return f"<{self.__name__}, redirected to CPU by vopd_megatron cpu_compat>"


def _import(name: str) -> types.ModuleType | None:
    """The module, or None where this megatron-core version lacks it or its extras."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# --- 1. CUDA RNG -> CPU RNG, in megatron.core.tensor_parallel.random -------------


def _get_cpu_rng_state(device=None, clone=False, graph_safe=False) -> torch.Tensor:
    """Stands in for `random._get_cuda_rng_state`; the returned state is a copy."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device=-1, graph_safe=False) -> None:
    """Stands in for `random._set_cuda_rng_state`."""
    torch.set_rng_state(new_state)


_CPU_RNG_CUDA = _Redirect(
    torch.cuda,
    manual_seed=torch.manual_seed,
    get_rng_state=lambda device="cuda": torch.get_rng_state(),
    set_rng_state=lambda new_state, device="cuda": torch.set_rng_state(new_state),
)


def _redirect_rng():
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random.torch = _Redirect(torch, cuda=_CPU_RNG_CUDA)
    _replace(random, "_get_cuda_rng_state", _get_cpu_rng_state)
    _replace(random, "_set_cuda_rng_state", _set_cpu_rng_state)
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


def _on_cpu(factory):
    """`factory` with a CUDA `device=` argument (a string, torch.device or index) mapped to CPU."""

    @functools.wraps(factory)
    def wrapper(*args, device=None, **kwargs):
        if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
            device = "cpu"
        return factory(*args, device=device, **kwargs)

    return wrapper


_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange",
    "empty_like", "zeros_like", "ones_like", "full_like",
)
_TORCH_CUDA_LITERALS_ON_CPU = _Redirect(
    torch, **{name: _on_cpu(getattr(torch, name)) for name in _FACTORIES}
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


def _cuda_noop(self, device=None, non_blocking=False, memory_format=None):
    return self


@contextlib.contextmanager
def _tensors_as_if_cuda():
    """CPU tensors' `.cuda()` returns them unchanged and `.type()` reports `torch.cuda.*`."""
    original_cuda, original_type = torch.Tensor.cuda, torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu":
            return name
        return name.replace("torch.", "torch.cuda.", 1)  # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor'

    torch.Tensor.cuda, torch.Tensor.type = _cuda_noop, cuda_type
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.type = original_cuda, original_type


def _run_as_if_cuda(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensors_as_if_cuda():
            return fn(*args, **kwargs)

    return wrapper


# --- 4. torch.cuda stand-ins, process-wide ------------------------------------------


class _CpuStream(torch.cpu.Stream):
    """`torch.cuda.Stream` on CPU: takes CUDA's arguments; CPU work is in order, so waits are no-ops."""

    def __init__(self, device=None, priority=0, **kwargs):
        super().__init__()

    @staticmethod
    def priority_range():
        return 0, 0


class _CpuEvent(torch.cpu.Event):
    """`torch.cuda.Event` on CPU: work is synchronous, so a wall-clock stamp at `record()` times it."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **kwargs):
        self._recorded_at = None

    def record(self, stream=None):
        self._recorded_at = time.perf_counter()

    def elapsed_time(self, end_event: _CpuEvent) -> float:
        """Milliseconds from this event's `record()` to `end_event`'s, as CUDA reports them."""
        return (end_event._recorded_at - self._recorded_at) * 1e3


# Distinct functions, not the `torch.cpu` ones themselves: torch.compile keys its
# handlers by function identity and rejects `torch.cuda.X is torch.cpu.X`.
def _current_device() -> str:
    return torch.cpu.current_device()  # "cpu", a valid `device=` argument


def _synchronize(device=None) -> None:
    torch.cpu.synchronize()


def _current_stream(device=None) -> torch.cpu.Stream:
    return torch.cpu.current_stream()


def _stream(stream):
    return torch.cpu.stream(stream)


_CUDA_STANDINS = {
    "current_device": _current_device,
    "synchronize": _synchronize,
    "current_stream": _current_stream,
    "default_stream": _current_stream,
    "stream": _stream,
    "Stream": _CpuStream,
    "Event": _CpuEvent,
}


# --- 5. inference communication checks ----------------------------------------------


def _is_tensor(tensor) -> None:
    """Stands in for `inference.communication_utils._is_cuda`, which asserts `tensor.is_cuda`
    before the pipeline-parallel send/recv/broadcast of static inference (PP > 1 sampling)."""
    assert tensor is not None


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
    _replace(utils, "get_device_arch_version", _no_device_arch)
    training = _import("megatron.training.training")
    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    for name in ("_initialize_distributed", "_set_random_seed"):
        _wrap("megatron.training.initialize", name, _as_if_one_device)
    _import("megatron.training.initialize")._warmup_jit_function = _no_jit_warmup
    for name in _TRAINING_CUDA_LITERAL_MODULES:
        _import(name).torch = _TORCH_CUDA_LITERALS_ON_CPU
    for name in _TRAINING_CUDA_RNG_MODULES:  # their CUDA RNG state is the CPU generator's, as in 1.
        _import(name).torch = _Redirect(_TORCH_CUDA_LITERALS_ON_CPU, cuda=_CPU_RNG_CUDA)
    _wrap("megatron.training.training", "get_model", _run_as_if_cuda)  # model_module.cuda(...)
    _training_loop_active = True
    return True


def _as_if_one_device(fn):
    """Run `fn` as if one CUDA device existed (`set_device` does nothing): Megatron-LM's
    `_initialize_distributed` then builds the model-parallel groups and `_set_random_seed`
    seeds the tensor-parallel RNG tracker (redirected to the CPU generator by 1.)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        module = sys.modules[fn.__module__]
        module.torch = _Redirect(torch, cuda=_Redirect(torch.cuda, device_count=lambda: 1,
                                                       set_device=lambda device: None))
        try:
            return fn(*args, **kwargs)
        finally:
            module.torch = torch

    return wrapper


_TRAINING_CUDA_LITERAL_MODULES = ("megatron.training.training",)
_TRAINING_CUDA_RNG_MODULES = ("megatron.core.rerun_state_machine", "megatron.training.checkpointing")


def _no_jit_warmup(*args, **kwargs) -> None:
    """Stands in for `initialize._warmup_jit_function`, which runs the fused CUDA kernels once."""


def _no_device_arch() -> int:
    """Stands in for `get_device_arch_version` (the GPU's major compute capability): 0, no device."""
    return 0
