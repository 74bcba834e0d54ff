"""The benchmarks' memory measure: bytes allocated by torch while a function runs, read from the allocator.

On CPU from the profiler's allocation events (``torch.profiler`` with ``profile_memory=True``: every allocation
and free of torch's CPU allocator with the running total it keeps), on CUDA from the caching allocator's own
counters. :func:`check_measure` fails unless a tensor of known size is measured to the byte; each benchmark
process runs it before it measures anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

MIB = 2**20


def allocator_peak(fn: Callable[[], object], device: str = "cpu") -> tuple[int, int]:
    """(peak, end) bytes allocated by torch on ``device`` while ``fn()`` runs, relative to its start.

    Exact, from the allocator: on CPU the profiler records every allocation and free of torch's CPU
    allocator together with the running total it keeps (freed tensors that were allocated before the
    call and not seen by any profiler are not subtracted, which can only overstate the peak); on CUDA the
    caching allocator's own counters. ``fn``'s return value is dropped before ``end`` is read.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:  # the chrome trace is the public record of the totals
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as trace:
            events = json.load(trace)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not memory:
        return 0, 0
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    end = memory[-1]["Total Allocated"] - start
    if end != sum(e["Bytes"] for e in memory):  # out of order: the running total cannot be trusted
        raise RuntimeError("profiler memory events out of order; cannot compute the peak")
    return max(e["Total Allocated"] for e in memory) - start, end


def check_measure(device: str = "cpu") -> None:
    """Fails unless allocator_peak reports a known 3 MiB temporary next to a kept 1 MiB tensor exactly."""
    kept = []

    def known():
        kept.append(torch.empty(MIB // 4, device=device))
        torch.empty(3 * MIB // 4, device=device).fill_(1.0)

    peak, end = allocator_peak(known, device)
    if (peak, end) != (4 * MIB, MIB):
        raise RuntimeError(f"allocator_peak measured ({peak}, {end}) bytes for a known (4 MiB, 1 MiB)")
