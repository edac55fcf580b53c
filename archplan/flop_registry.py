"""The FLOP formulas `verify` adds to what its two counters know, each with its source.

Two counters see the torch model, at two levels, and each has blind spots:

- `FlopCounterMode` (torch/utils/flop_counter.py) counts dispatcher ops (`aten.mm`,
  `aten._grouped_mm`, ...). `COUNTER_FORMULAS` is handed to it as `custom_mapping`: a formula
  for an op it counts as 0, or a corrected one. Its signature is FlopCounterMode's: the operand
  shapes (or the tensors themselves when the function has `_get_raw = True`) and `out_shape`.
- fvcore's `FlopCountAnalysis` counts TorchScript-traced ops (`aten::linear`,
  `aten::scaled_dot_product_attention`, ...) and skips the ones it has no handle for.
  `FVCORE_FORMULAS` prices such a skipped op from its traced input shapes with the same formula
  FlopCounterMode applies, so crosscheck can take exactly that op out of fvcore's comparison
  (its FLOPs are shown apart, as "known") and still check everything else fvcore counts.

Both are registries. An op neither counter prices (the experts' grouped matmul, an FFT) has its
formula in the module that brings it (`modules/flop_formulas.py`, `modules/fft_flops.py`), which
registers it in torch's own `flop_registry` when imported; this module names each such formula,
with its source, with `counter_formula` / `fvcore_formula`, and the op tables of `archplan
verify` print that source. All figures are FLOPs, 2 per
multiply-add (docs/formulas.md §2.7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from archplan.modules import fft_flops
from archplan.modules.flop_formulas import grouped_mm_flop

Shape = Sequence[int]


@dataclass(frozen=True)
class CounterFormula:
    formula: Callable[..., int]
    source: str


# A traced op's inputs (or outputs) as an fvcore formula sees them: a tensor's shape, a constant's
# value (an int, a list of ints, None), or None for anything else (e.g. an int the trace computes).
Traced = list[Any]
TracedFormula = Callable[[Traced, Traced], int]  # (inputs, outputs) -> FLOPs


@dataclass(frozen=True)
class FvcoreFormula:
    formula: TracedFormula
    source: str


COUNTER_FORMULAS: dict[Any, CounterFormula] = {}
FVCORE_FORMULAS: dict[str, FvcoreFormula] = {}


def counter_formula(op: Any, source: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Register a FlopCounterMode formula for `op` (an OpOverloadPacket), replacing torch's."""

    def register(formula: Callable[..., int]) -> Callable[..., int]:
        COUNTER_FORMULAS[op] = CounterFormula(formula, source)
        return formula

    return register


def fvcore_formula(jit_op: str, source: str) -> Callable[[TracedFormula], TracedFormula]:
    """Register the FLOPs of a traced op fvcore has no handle for (`aten::name`)."""

    def register(formula: TracedFormula) -> TracedFormula:
        FVCORE_FORMULAS[jit_op] = FvcoreFormula(formula, source)
        return formula

    return register


def counter_mapping() -> dict[Any, Callable[..., int]]:
    """The registered formulas as FlopCounterMode's `custom_mapping` takes them."""
    return {op: entry.formula for op, entry in COUNTER_FORMULAS.items()}


def formula_source(op: Any) -> str | None:
    """Where the counter's formula for `op` comes from: ours, torch's, or None (counted as 0)."""
    if op in COUNTER_FORMULAS:
        return COUNTER_FORMULAS[op].source
    return "torch.utils.flop_counter" if op in flop_registry else None


counter_formula(
    torch.ops.aten._grouped_mm, "archplan.modules.flop_formulas: 2·M·K·N per grouped product"
)(grouped_mm_flop)

FFT_SOURCE = "archplan.modules.fft_flops: 2.5·n·⌈log2 n⌉ per real FFT, 5·n·⌈log2 n⌉ per complex one"
counter_formula(torch.ops.aten._fft_r2c, FFT_SOURCE)(fft_flops.fft_r2c_flop)
counter_formula(torch.ops.aten._fft_c2r, FFT_SOURCE)(fft_flops.fft_c2r_flop)
counter_formula(torch.ops.aten._fft_c2c, FFT_SOURCE)(fft_flops.fft_c2c_flop)

_TORCH_CONV_BACKWARD = flop_registry[torch.ops.aten.convolution_backward]


@counter_formula(
    torch.ops.aten.convolution_backward,
    "torch's conv_backward_flop with grad_weight divided by groups (pytorch PR 183405)",
)
def conv_backward_flop(
    grad_out: Any, x: Any, w: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
    transposed: bool, output_padding: Any, groups: int, output_mask: list[bool],
    out_val: Any = None, **kwargs: Any,
) -> int:
    """torch's convolution_backward formula with grad_weight divided by `groups`.

    torch 2.13 `conv_backward_flop` computes grad_weight as a conv over transposed shapes that
    lose the group division, so a depthwise conv (Mamba's, groups = channels) has its weight
    gradient counted `channels` times over (fixed upstream in pytorch PR 183405, `// _groups`).
    With the fix the backward of every conv is exactly 2 x its forward, as for matmuls.
    """
    common = (grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = _TORCH_CONV_BACKWARD(*common, [output_mask[0], False], out_val=out_val)
    grad_weight = _TORCH_CONV_BACKWARD(*common, [False, output_mask[1]], out_val=out_val)
    return int(grad_input) + int(grad_weight) // groups


conv_backward_flop._get_raw = True  # type: ignore[attr-defined]  # takes tensors; torch's formula maps shapes


@fvcore_formula(
    "aten::scaled_dot_product_attention",
    "torch.utils.flop_counter.sdpa_flop_count: QKᵀ and AV over the full T×S square",
)
def sdpa_traced_flop(inputs: Traced, outputs: Traced) -> int:
    query, key, value = inputs[:3]
    if query is None or key is None or value is None:
        raise ValueError("scaled_dot_product_attention traced without complete shapes")
    return int(sdpa_flop_count(query, key, value))


@fvcore_formula("aten::_grouped_mm", "archplan.modules.flop_formulas: 2·M·K·N per grouped product")
def grouped_mm_traced_flop(inputs: Traced, outputs: Traced) -> int:
    a, b = inputs[:2]
    if a is None or b is None:
        raise ValueError("_grouped_mm traced without complete shapes")
    return grouped_mm_flop(a, b)


def _fft_axis(inputs: Traced, op: str) -> tuple[Shape, int, int | None]:
    """(input shape, transform axis, n if a constant) of a traced `torch.fft.rfft/irfft(x, n, dim)`."""
    shape, n, dim = inputs[:3]
    if shape is None or not isinstance(dim, int):
        raise ValueError(f"{op} traced without a complete shape or a constant dim")
    return shape, dim % len(shape), n if isinstance(n, int) else None


@fvcore_formula("aten::fft_rfft", FFT_SOURCE)
def rfft_traced_flop(inputs: Traced, outputs: Traced) -> int:
    """The input is zero-padded (or cut) to n along `dim`, then transformed, as `_fft_r2c` counts.

    n computed inside the trace (`2 * x.shape[-1]`) is no constant: it is read off the output's
    n // 2 + 1 bins as the even 2·(bins − 1); an odd n would then differ by one transform point
    and show as a mismatch, never as a match.
    """
    shape, axis, n = _fft_axis(inputs, "fft_rfft")
    out = outputs[0]
    length = n if n is not None else shape[axis] if out is None else 2 * (out[axis] - 1)
    return fft_flops.fft_r2c_flop([*shape[:axis], length, *shape[axis + 1:]], [axis], 0, True)


@fvcore_formula("aten::fft_irfft", FFT_SOURCE)
def irfft_traced_flop(inputs: Traced, outputs: Traced) -> int:
    """A real output of n points along `dim` (its length, or 2·(m − 1) for m complex inputs)."""
    shape, axis, n = _fft_axis(inputs, "fft_irfft")
    out = outputs[0]
    length = n if n is not None else 2 * (shape[axis] - 1) if out is None else out[axis]
    out_shape = [*shape[:axis], length, *shape[axis + 1:]]
    return fft_flops.fft_c2r_flop(shape, [axis], 0, length, out_shape=out_shape)
