"""The device a benchmark runs on: its peak FLOP/s and bandwidth (datasheet or calibrated), its free
memory, and how peak memory is measured there. Imports torch: only `archplan bench` uses it."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from archplan.bench.roofline import DecodeRates
from archplan.dtypes import DType
from archplan.hardware import match_device_name

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


def calibrate_matmul(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of square matmuls (2·n³ FLOPs each), best of repeated timings."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def calibrate_copy(device: torch.device, n_bytes: int = 1 << 27, seconds: float = 0.3) -> float:
    """Achieved bytes/s of a large tensor copy (read + write counted, as STREAM's Copy)."""
    src = torch.empty(n_bytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n_bytes / best


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class DecodeCalibration:
    """The rates that bound a decode step at `rows` rows (the decode batch), measured in the run.

    - GEMV bandwidth and matmul call overhead, once: `F.linear` at `rows` rows streaming 128 MiB of
      weights (beyond a CPU last-level cache or GPU L2) twice, as 1024×1024 and as 4096×4096
      matrices; per call t = overhead + bytes / bandwidth, solved from the two. On CPU the
      overhead is the BLAS call and its thread team (at some batches MKL's small-M GEMM waits for
      a descheduled worker on a loaded machine); on CUDA a launch. The skinny-matmul rate is the
      same calls' FLOP/s at that bandwidth.
    - op overhead, sampled between the timed decode steps (`sample`), so both see the same load on a
      shared machine: a chain of tiny non-matmul ops (view, multiply, cast, add), per op;
    - attention call overhead, sampled likewise: the same chain with a one-token SDPA over 128
      keys in each link, less the chain's other ops. On CPU the kernel fans out to ATen's thread
      pool right after single-threaded ops; on a loaded machine that is where a step waits for a
      descheduled worker (9 ms per call in a profile of a 4-layer decode here).
    Medians, as the step time is the median of the steps. On CUDA the chains measure the host's
    issue rate (one synchronisation at the end).
    """

    LINKS = 8

    def __init__(self, device: torch.device, dtype: torch.dtype, rows: int, weight_bytes: int = 1 << 27) -> None:
        self.device, self.rows, self.dtype = device, rows, dtype
        self.element = torch.finfo(dtype).bits // 8
        per_call: dict[int, float] = {}
        for width in (1024, 4096):
            weights = [torch.randn(width, width, device=device, dtype=dtype)
                       for _ in range(max(2, weight_bytes // (width * width * self.element)))]
            xs = torch.randn(rows, width, device=device, dtype=dtype)

            def stream() -> None:
                for w in weights:
                    F.linear(xs, w)

            stream()
            per_call[width] = statistics.median(_seconds(stream, device) for _ in range(3)) / len(weights)
            del weights
        small, large = 1024 * 1024 * self.element, 4096 * 4096 * self.element
        slope = (per_call[4096] - per_call[1024]) / (large - small)
        if slope * large > per_call[4096] or slope <= 0:  # noise inverted the pair: no overhead seen
            slope = per_call[4096] / large
        self.bandwidth = 1 / slope
        self.matmul_seconds = per_call[1024] - slope * small
        self.x = torch.randn(rows, 256, device=device, dtype=dtype)
        self.q = torch.randn(rows, 4, 1, 64, device=device, dtype=dtype)
        self.kv = torch.randn(rows, 4, 128, 64, device=device, dtype=dtype)
        self.others: list[float] = []
        self.attention: list[float] = []
        for _ in range(3):
            self.sample()

    def _chain(self, attend: bool) -> None:
        y = self.x
        for _ in range(self.LINKS):
            y = (y.view(self.rows, 16, 16) * 0.5).view(self.rows, 256).to(self.dtype) + self.x
            if attend:
                F.scaled_dot_product_attention(self.q, self.kv, self.kv)

    def sample(self) -> None:
        self.others.append(_seconds(lambda: self._chain(False), self.device))
        self.attention.append(_seconds(lambda: self._chain(True), self.device))

    def rates(self) -> DecodeRates:
        op_seconds = statistics.median(self.others) / (4 * self.LINKS)
        attention_seconds = max(statistics.median(self.attention) / self.LINKS - 4 * op_seconds, op_seconds)
        return DecodeRates(gemv_bandwidth=self.bandwidth, skinny_flops=2 * self.rows * self.bandwidth / self.element,
                           matmul_seconds=max(self.matmul_seconds, op_seconds), attention_seconds=attention_seconds,
                           op_seconds=op_seconds, overlap=self.device.type == "cuda")


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
                      f"calibrated in this run: {dtype.value} 1024³ matmul and a 128 MiB copy")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU ({sys.platform}, {torch.get_num_threads()} threads)"


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


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes and how they were measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process peak RSS since the run began (VmHWM)"
    # ru_maxrss is KiB on Linux: the process's lifetime high-water mark, torch import included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (ru_maxrss)"
