"""CPU stand-ins for what Megatron-Core asks of CUDA: the objects `cpu_compat` puts in CUDA's place.

Each stand-in answers as its CUDA original would on a machine with one GPU,
but acts on the CPU, so the same Megatron code runs with the same numerics.
Nothing here patches anything: `cpu_compat.enable()` (and
`enable_training_loop()`) decides where each one goes, and only when CUDA is
absent. Kept apart so that the switch reads as a list of places, and each
stand-in as a small, testable function with the CUDA signature it replaces.

* `Redirect`: a module with some attributes replaced (a `torch` whose CUDA
  RNG or tensor factories are CPU ones), for the modules listed in cpu_compat.
* CUDA RNG -> CPU RNG: `CPU_RNG_CUDA`, `get_cpu_rng_state`, `set_cpu_rng_state`.
* `device="cuda"` literals -> CPU: `TORCH_CUDA_LITERALS_ON_CPU`.
* `Tensor.cuda()` / `Tensor.type()` while a function runs: `run_as_if_cuda`.
* `torch.cuda.{current_device, synchronize, current_stream, default_stream,
  stream, Stream, Event}`: `CUDA_STANDINS`.
* Static inference's `is_cuda` assertion: `is_tensor`.
* Megatron-LM's own loop: `as_if_one_device`, `no_jit_warmup`, `no_device_arch`.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import time
import types

import torch


class Redirect(types.ModuleType):
    """A module `target` with some attributes replaced; all others are `target`'s."""

    def __init__(self, target: types.ModuleType, **overrides):
        super().__init__(target.__name__, target.__doc__)
        self.__dict__.update(overrides)
        self._target = target

    def __getattr__(self, name):  # called only for names not overridden
        return getattr(self._target, name)

    def __repr__(self):
        return f"<{self.__name__}, redirected to CPU by vopd_megatron cpu_compat>"


def get_cpu_rng_state(device=None, clone=False, graph_safe=False) -> torch.Tensor:
    """Stands in for `random._get_cuda_rng_state`; the returned state is a copy."""
    return torch.get_rng_state()


def set_cpu_rng_state(new_state: torch.Tensor, device=-1, graph_safe=False) -> None:
    """Stands in for `random._set_cuda_rng_state`."""
    torch.set_rng_state(new_state)


CPU_RNG_CUDA = Redirect(
    torch.cuda,
    manual_seed=torch.manual_seed,
    get_rng_state=lambda device="cuda": torch.get_rng_state(),
    set_rng_state=lambda new_state, device="cuda": torch.set_rng_state(new_state),
)


def on_cpu(factory):
    """`factory` with a CUDA `device=` argument (a string, torch.device or index) mapped to CPU."""

    @functools.wraps(factory)
    def wrapper(*args, device=None, **kwargs):
        if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
            device = "cpu"
        return factory(*args, device=device, **kwargs)

    return wrapper


FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange",
    "empty_like", "zeros_like", "ones_like", "full_like",
)
TORCH_CUDA_LITERALS_ON_CPU = Redirect(
    torch, **{name: on_cpu(getattr(torch, name)) for name in FACTORIES}
)


def cuda_noop(self, device=None, non_blocking=False, memory_format=None):
    return self


@contextlib.contextmanager
def tensors_as_if_cuda():
    """CPU tensors' `.cuda()` returns them unchanged and `.type()` reports `torch.cuda.*`."""
    original_cuda, original_type = torch.Tensor.cuda, torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu":
            return name
        return name.replace("torch.", "torch.cuda.", 1)  # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor'

    torch.Tensor.cuda, torch.Tensor.type = cuda_noop, cuda_type
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.type = original_cuda, original_type


def run_as_if_cuda(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with tensors_as_if_cuda():
            return fn(*args, **kwargs)

    return wrapper


class CpuStream(torch.cpu.Stream):
    """`torch.cuda.Stream` on CPU: takes CUDA's arguments; CPU work is in order, so waits are no-ops."""

    def __init__(self, device=None, priority=0, **kwargs):
        super().__init__()

    @staticmethod
    def priority_range():
        return 0, 0


class CpuEvent(torch.cpu.Event):
    """`torch.cuda.Event` on CPU: work is synchronous, so a wall-clock stamp at `record()` times it."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **kwargs):
        self._recorded_at = None

    def record(self, stream=None):
        self._recorded_at = time.perf_counter()

    def elapsed_time(self, end_event: CpuEvent) -> float:
        """Milliseconds from this event's `record()` to `end_event`'s, as CUDA reports them."""
        return (end_event._recorded_at - self._recorded_at) * 1e3


# Distinct functions, not the `torch.cpu` ones themselves: torch.compile keys its
# handlers by function identity and rejects `torch.cuda.X is torch.cpu.X`.
def cpu_current_device() -> str:
    return torch.cpu.current_device()  # "cpu", a valid `device=` argument


def cpu_synchronize(device=None) -> None:
    torch.cpu.synchronize()


def cpu_current_stream(device=None) -> torch.cpu.Stream:
    return torch.cpu.current_stream()


def cpu_stream(stream):
    return torch.cpu.stream(stream)


CUDA_STANDINS = {
    "current_device": cpu_current_device,
    "synchronize": cpu_synchronize,
    "current_stream": cpu_current_stream,
    "default_stream": cpu_current_stream,
    "stream": cpu_stream,
    "Stream": CpuStream,
    "Event": CpuEvent,
}


def is_tensor(tensor) -> None:
    """Stands in for `inference.communication_utils._is_cuda`, which asserts `tensor.is_cuda`
    before the pipeline-parallel send/recv/broadcast of static inference (PP > 1 sampling)."""
    assert tensor is not None


def as_if_one_device(fn):
    """Run `fn` as if one CUDA device existed (`set_device` does nothing): Megatron-LM's
    `_initialize_distributed` then builds the model-parallel groups and `_set_random_seed`
    seeds the tensor-parallel RNG tracker (redirected to the CPU generator by 1.)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        module = sys.modules[fn.__module__]
        module.torch = Redirect(torch, cuda=Redirect(torch.cuda, device_count=lambda: 1,
                                                       set_device=lambda device: None))
        try:
            return fn(*args, **kwargs)
        finally:
            module.torch = torch

    return wrapper


def no_jit_warmup(*args, **kwargs) -> None:
    """Stands in for `initialize._warmup_jit_function`, which runs the fused CUDA kernels once."""


def no_device_arch() -> int:
    """Stands in for `get_device_arch_version` (the GPU's major compute capability): 0, no device."""
    return 0
