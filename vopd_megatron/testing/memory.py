"""Peak memory of a piece of work on CPU, from PyTorch's own allocator events.

On a GPU `torch.cuda.max_memory_allocated` answers "how much did this step
need at most"; PyTorch's CPU allocator keeps no such counter. The profiler
with `profile_memory=True` records every CPU allocation and free (size > 0,
free < 0) with its time, so the running sum over time is the allocated
bytes above what existed before, and its maximum is the peak extra memory.
Used by benchmarks/bench_loss.py and by the fused loss's memory test.
"""
from __future__ import annotations

from typing import Callable


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running sum of CPU allocator events recorded while `fn` runs."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    level = peak = 0
    for _, size in sorted(events):
        level += size
        peak = max(peak, level)
    return peak
