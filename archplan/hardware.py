"""Accelerator datasheet figures: DENSE peak FLOP/s per dtype (never the 2:4-sparse figures the
datasheets print first), HBM bandwidth and memory. Shared by size (GPU-hours), plan and bench.

Sources: NVIDIA A100 datasheet (2021), H100 datasheet (SXM5 / PCIe columns, sparse figures halved),
H200 product brief (2024), DGX/HGX B200 datasheet (per-GPU, sparse halved), L4 and L40S datasheets,
Ada "AD102" whitepaper App. A (RTX 4090, FP32-accumulate tensor figures), AMD Instinct MI300X
datasheet, NVIDIA V100 datasheet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from archplan.errors import ArchplanError

TERA = 1e12


@dataclass(frozen=True)
class Accelerator:
    key: str
    name: str
    peak_flops: dict[str, float]  # dtype -> dense FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: int
    aliases: tuple[str, ...] = field(default=())

    def peak(self, dtype: str) -> float:
        try:
            return self.peak_flops[dtype]
        except KeyError:
            have = ", ".join(sorted(self.peak_flops))
            raise ArchplanError(f"{self.name} has no {dtype} peak on record (has: {have})") from None


GiB = 1 << 30


def _tf(**peaks: float) -> dict[str, float]:
    return {dtype: value * TERA for dtype, value in peaks.items()}


ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("a100-40gb", "NVIDIA A100 SXM 40GB",
                _tf(fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624), 1555e9, 40 * GiB),
    Accelerator("a100-80gb", "NVIDIA A100 SXM 80GB",
                _tf(fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624), 2039e9, 80 * GiB, ("a100",)),
    Accelerator("h100-sxm", "NVIDIA H100 SXM5 80GB",
                _tf(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9, int8=1978.9),
                3.35e12, 80 * GiB, ("h100", "h100-80gb")),
    Accelerator("h100-pcie", "NVIDIA H100 PCIe 80GB",
                _tf(fp32=51.2, tf32=378, bf16=756, fp16=756, fp8=1513, int8=1513), 2.0e12, 80 * GiB),
    Accelerator("h200", "NVIDIA H200 SXM 141GB",
                _tf(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9, int8=1978.9),
                4.8e12, 141 * 10**9, ("h200-sxm",)),
    Accelerator("b200", "NVIDIA B200 (HGX) 180GB",
                _tf(fp32=75, tf32=1100, bf16=2250, fp16=2250, fp8=4500, int8=4500),
                7.7e12, 180 * 10**9),
    Accelerator("l4", "NVIDIA L4 24GB",
                _tf(fp32=30.3, tf32=60, bf16=121, fp16=121, fp8=242.5, int8=242.5), 300e9, 24 * GiB),
    Accelerator("l40s", "NVIDIA L40S 48GB",
                _tf(fp32=91.6, tf32=183, bf16=362.05, fp16=362.05, fp8=733, int8=733), 864e9, 48 * GiB),
    Accelerator("rtx4090", "NVIDIA GeForce RTX 4090 24GB",
                _tf(fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2, fp8=330.3, int8=660.6),
                1008e9, 24 * GiB, ("4090",)),
    Accelerator("mi300x", "AMD Instinct MI300X 192GB",
                _tf(fp32=163.4, tf32=653.7, bf16=1307.4, fp16=1307.4, fp8=2614.9, int8=2614.9),
                5.3e12, 192 * GiB),
    Accelerator("v100", "NVIDIA V100 SXM2 32GB",
                _tf(fp32=15.7, fp16=125), 900e9, 32 * GiB),
)

_BY_KEY = {a.key: a for a in ACCELERATORS} | {alias: a for a in ACCELERATORS for alias in a.aliases}


def accelerator(key: str) -> Accelerator:
    """Look up by key or alias (case-insensitive): h100, h100-sxm, a100-80gb, b200, ..."""
    found = _BY_KEY.get(key.lower().replace("_", "-"))
    if found is None:
        known = ", ".join(a.key for a in ACCELERATORS)
        raise ArchplanError(f"unknown GPU '{key}'; known: {known}")
    return found


def match_device_name(name: str) -> Accelerator | None:
    """Map a torch device name ('NVIDIA H200', 'NVIDIA A100-SXM4-80GB') to a table entry, if any."""
    lowered = name.lower()
    for probe, key in (("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100-sxm"),
                       ("b200", "b200"), ("a100", "a100-80gb" if "80" in lowered else "a100-40gb"),
                       ("l40s", "l40s"), ("l4", "l4"), ("4090", "rtx4090"), ("mi300x", "mi300x"),
                       ("v100", "v100")):
        if probe in lowered:
            return _BY_KEY[key]
    return None
