"""FlopCounterMode formulas for `aten._fft_r2c`, `_fft_c2r` and `_fft_c2c`, which torch 2.13 counts as 0.

Convention (stated beside every FFT figure, docs/architecture.md "FLOPs convention"): a real FFT of
length n (rfft or irfft) costs 2.5·n·⌈log2 n⌉ FLOPs, a complex one 5·n·⌈log2 n⌉ (the radix-2
Cooley-Tukey count; log2 rounded up for lengths that are not powers of two), times the number of
transforms in the batch. A multi-dimensional transform counts n as the product of its sizes.
Registered once per process on import, like `flop_formulas` for `_grouped_mm`; the shapes alone
decide, so meta and real devices count alike. In the backward, rfft's gradient is a complex FFT
and irfft's a real one (torch `fft_r2c_backward`, `fft_c2r_backward`), counted by the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

_R2C = torch.ops.aten._fft_r2c
_C2R = torch.ops.aten._fft_c2r
_C2C = torch.ops.aten._fft_c2c


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


def _transforms(shape: Sequence[int], dim: Sequence[int]) -> tuple[int, int]:
    """(transform length n, number of transforms) of an FFT over `dim` of a tensor of `shape`."""
    n = math.prod(shape[d] for d in dim)
    return n, math.prod(shape) // max(n, 1)


def fft_r2c_flop(self_shape: Sequence[int], dim: Sequence[int], normalization: int, onesided: bool,
                 *, out_shape: Sequence[int] | None = None) -> int:
    n, count = _transforms(self_shape, dim)
    return count * (5 * n * _ceil_log2(n) // 2)


def fft_c2r_flop(self_shape: Sequence[int], dim: Sequence[int], normalization: int, last_dim_size: int,
                 *, out_shape: Sequence[int]) -> int:
    n, count = _transforms(out_shape, dim)
    return count * (5 * n * _ceil_log2(n) // 2)


def fft_c2c_flop(self_shape: Sequence[int], dim: Sequence[int], normalization: int, forward: bool,
                 *, out_shape: Sequence[int] | None = None) -> int:
    n, count = _transforms(self_shape, dim)
    return count * 5 * n * _ceil_log2(n)


def register() -> None:
    """Register the three formulas unless formulas exist (idempotent, import-safe)."""
    for op, formula in ((_R2C, fft_r2c_flop), (_C2R, fft_c2r_flop), (_C2C, fft_c2c_flop)):
        if op not in flop_registry:
            register_flop_formula(op)(formula)


register()
