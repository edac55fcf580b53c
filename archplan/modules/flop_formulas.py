"""FlopCounterMode formula for `aten._grouped_mm`, which torch 2.13 counts as 0 FLOPs.

MoE experts run through `torch.nn.functional.grouped_mm` (docs/architecture.md, FLOPs convention:
experts 2·B·T·K·(n_matrices·D·F)). Importing this module registers, once per process, the usual
2·M·K·N per multiply (a multiply-add is 2 FLOPs), derived from the operand shapes only, so it
counts the same on meta and on real devices, forward and backward (whose gradients are again
grouped matmuls, torch/_meta_registrations.py `_grouped_mm` and its derivative).

The four layouts of the op (torch.nn.functional.grouped_mm docstring):
  a (M, K)    · b (G, K, N), jagged rows of a      -> out (M, N):    2·M·K·N
  a (G, M, K) · b (G, K, N), dense batch of groups -> out (G, M, N): 2·G·M·K·N
  a (M, K)    · b (K, N), jagged contraction dim   -> out (G, M, N): 2·M·K·N (each K slice once)
  a (G, M, K) · b (K, N), jagged columns of b      -> out (M, N):    2·M·K·N
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

_GROUPED_MM = torch.ops.aten._grouped_mm


def grouped_mm_flop(
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    offs: Sequence[int] | None = None,
    bias: Sequence[int] | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    out_shape: Sequence[int] | None = None,
) -> int:
    """2·M·K·N of the grouped product, whichever operand is jagged (see the module docstring)."""
    match len(a_shape), len(b_shape):
        case 2, 3:
            m, k = a_shape
            n = b_shape[2]
            return 2 * m * k * n
        case 3, 3:
            g, m, k = a_shape
            return 2 * g * m * k * b_shape[2]
        case 2, 2:
            m, k = a_shape
            return 2 * m * k * b_shape[1]
        case 3, 2:
            _, m, k = a_shape
            return 2 * m * k * b_shape[1]
        case ranks:
            raise ValueError(f"aten._grouped_mm with operand ranks {ranks} is not a grouped matmul")


def register() -> None:
    """Register `grouped_mm_flop` unless a formula for the op exists (idempotent, import-safe)."""
    if _GROUPED_MM not in flop_registry:
        register_flop_formula(_GROUPED_MM)(grouped_mm_flop)


register()
