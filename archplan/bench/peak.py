"""The peak memory of one forward, measured: on CUDA by the caching allocator's high-water mark,
elsewhere by the torch profiler's memory tracking, which sees every allocation of the CPU
allocator during the real forward (inside fused kernels too), with the bytes of the weights
added. The `--seq` sweep, `--compare-backends` and bench's own prefill row measure with it; a
process's peak RSS would hold the torch runtime's hundreds of MiB and the allocator's reuse of
freed pages, and say nothing of the forward."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Callable, Iterator

import torch

from archplan.bench.device import synchronize


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied weights once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


@contextlib.contextmanager
def silent_stderr() -> Iterator[None]:
    """Kineto writes a line to file descriptor 2 when a profile starts and stops, and c10's CPU
    allocator one when the profiled run frees a block allocated before the profile began ("Memory
    block of unknown size ..."); drop those, which describe the profiler, not the run."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# glibc malloc.h: mallopt parameters and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def keep_freed_memory(device: torch.device) -> Iterator[None]:
    """CPU under glibc: serve every block from the heap and never give it back, as torch's CUDA
    caching allocator keeps its blocks. By default glibc serves every block over 32 MiB by mmap and
    unmaps it on free, so from 8k-16k tokens each pass faults and zeroes its activations afresh: on
    seed-s4d at 16k, 348k page faults and 0.57 s of system time in a 1.09 s pass (8k -> 16k took
    2.6x; 0.72 s and 2.0x without them), a cost of the allocator's size class that no FLOP or byte
    count has."""
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        yield
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)


def forward_peak_bytes(model: torch.nn.Module, run: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak bytes of one forward, weights included."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    # The profiler's memory tracking records every allocation and free of the CPU allocator, also
    # those inside a fused kernel (SDPA's scores), which a dispatch-level tracker cannot see.
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with silent_stderr():
        prof.start()
        try:
            run()
        finally:
            prof.stop()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),  # type: ignore[union-attr]
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return (weight_bytes(model) + peak,
            "weights + the peak of the CPU allocator's allocations during the forward (torch.profiler, "
            "profile_memory=True)")
