"""Seconds per named part of a training step (teacher forward, student forward, loss).

Why not a host clock around each part: on a GPU the forward passes only queue
kernels, so `time.perf_counter()` around them measures how long the host took
to launch them, and the real cost lands wherever the next synchronisation
happens. Here each part is bracketed by CUDA events recorded on the current
stream: the interval is the GPU time from the moment the stream reaches the
part to the moment it finishes it. The events are read once, in `seconds()`,
after the step has synchronised anyway (the optimizer's grad norm), so timing
adds no synchronisation. On CPU the host clock is the truth and is used.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class SectionTimer:
    """Accumulates the time of named sections over a step's microbatches."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._events: list[tuple[str, object, object]] = []  # (name, start, end) CUDA events
        self._host: dict[str, float] = defaultdict(float)  # name -> seconds (CPU)

    @contextmanager
    def section(self, name: str):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._host[name] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        """{name: seconds} summed over the sections since `reset()`; waits for
        the last recorded event (normally long done: the step has synchronised)."""
        out = dict(self._host)
        for name, start, end in self._events:
            end.synchronize()
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1e3
        return out
