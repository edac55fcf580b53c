"""The device a benchmark runs on: its peak FLOP/s and bandwidth (datasheet or calibrated), its free
memory, and how peak memory is measured there. Imports torch: only `archplan bench` uses it."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from archplan.dtypes import DType
from archplan.hardware import match_device_name
from archplan.units import things

TORCH_DTYPES: dict[DType, torch.dtype] = {
    DType.fp32: torch.float32, DType.bf16: torch.bfloat16, DType.fp16: torch.float16,
}


@dataclass(frozen=True)
class DevicePeak:
    name: str
    peak_flops: float  # dense FLOP/s at the run's dtype
    bandwidth: float  # bytes/s
    source: str  # "datasheet: ..." or "calibrated in this run: ..."


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(run: Callable[[], object], device: torch.device, seconds: float, calls: int = 1) -> float:
    """Seconds of one of `calls` calls of `run`, the best of as many timed batches of them as fit
    in `seconds` (after one untimed call)."""
    run()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            run()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def calibrate_matmul(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of square matmuls (2·n³ FLOPs each), best of repeated timings, in both
    layouts a model's matmuls run: a·b, and a·bᵀ as `F.linear` passes its weight. Kernels differ by
    layout: fp16 on a CPU without fp16 arithmetic ran a·b at 1.0 GFLOP/s and a·bᵀ, what the
    model's linears run, at 21 (its MFU read 1,500%)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = min(_best_seconds(lambda other=other: torch.mm(a, other), device, seconds / 2, calls=4)
               for other in (b, b.t()))
    return 2 * size**3 / best


def calibrate_copy(device: torch.device, n_bytes: int = 1 << 27, seconds: float = 0.3) -> float:
    """Achieved bytes/s of a large tensor copy (read + write counted, as STREAM's Copy)."""
    src = torch.empty(n_bytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * n_bytes / _best_seconds(lambda: dst.copy_(src), device, seconds)


def device_peak(device: torch.device, dtype: DType) -> DevicePeak:
    """Datasheet dense peak for known GPUs; otherwise (CPU, unknown GPU) calibrate now."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = match_device_name(name)
        if known is not None and dtype.value in known.peak_flops:
            return DevicePeak(name, known.peak(dtype.value), known.hbm_bytes_per_s,
                              f"datasheet ({known.name}, dense {dtype.value})")
    else:
        name = _cpu_name()
    flops = calibrate_matmul(device, TORCH_DTYPES[dtype])
    bandwidth = calibrate_copy(device)
    return DevicePeak(name, flops, bandwidth,
                      f"calibrated in this run: {dtype.value} 1024³ matmuls (a·b and a·bᵀ) and a 128 MiB copy")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({things(torch.get_num_threads(), 'thread')})"
    except OSError:
        pass
    return f"CPU ({sys.platform}, {things(torch.get_num_threads(), 'thread')})"


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux resets the VmHWM high-water mark when 5 is written to clear_refs (proc(5)).
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory(device: torch.device, since: str = "the model was built") -> tuple[int, str]:
    """Peak bytes and how they were measured; `since` names the moment the caller reset the peak
    (`reset_peak_memory`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    # the whole process's resident set: the torch runtime (a few hundred MiB) too
                    return (int(line.split()[1]) * 1024,
                            f"process peak RSS since {since} (VmHWM), torch's runtime included")
    # ru_maxrss is KiB on Linux: the process's lifetime high-water mark, torch import included.
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "process peak RSS (ru_maxrss), torch's runtime included")
