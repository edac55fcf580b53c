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

Both are registries: a module that brings an op neither counter prices (an FFT, a custom
kernel) registers its formula here with `counter_formula` / `fvcore_formula` at import time,
and the op tables of `archplan verify` name the source. All figures are FLOPs, 2 per
multiply-add (docs/formulas.md §2.7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from archplan.modules.flop_formulas import grouped_mm_flop

Shape = Sequence[int]


@dataclass(frozen=True)
class CounterFormula:
    formula: Callable[..., int]
    source: str


@dataclass(frozen=True)
class FvcoreFormula:
    formula: Callable[[list[Shape | None]], int]  # traced input shapes (None: not a tensor)
    source: str


COUNTER_FORMULAS: dict[Any, CounterFormula] = {}
FVCORE_FORMULAS: dict[str, FvcoreFormula] = {}


def counter_formula(op: Any, source: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Register a FlopCounterMode formula for `op` (an OpOverloadPacket), replacing torch's."""

    def register(formula: Callable[..., int]) -> Callable[..., int]:
        COUNTER_FORMULAS[op] = CounterFormula(formula, source)
        return formula

    return register


def fvcore_formula(
    jit_op: str, source: str
) -> Callable[[Callable[[list[Shape | None]], int]], Callable[[list[Shape | None]], int]]:
    """Register the FLOPs of a traced op fvcore has no handle for (`aten::name`)."""

    def register(formula: Callable[[list[Shape | None]], int]) -> Callable[[list[Shape | None]], int]:
        FVCORE_FORMULAS[jit_op] = FvcoreFormula(formula, source)
        return formula

    return register


def formula_source(op: Any) -> str | None:
    """Where the counter's formula for `op` comes from: ours, torch's, or None (counted as 0)."""
    if op in COUNTER_FORMULAS:
        return COUNTER_FORMULAS[op].source
    return "torch.utils.flop_counter" if op in flop_registry else None


counter_formula(
    torch.ops.aten._grouped_mm, "archplan.modules.flop_formulas: 2·M·K·N per grouped product"
)(grouped_mm_flop)

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
def sdpa_traced_flop(shapes: list[Shape | None]) -> int:
    query, key, value = shapes[:3]
    if query is None or key is None or value is None:
        raise ValueError("scaled_dot_product_attention traced without complete shapes")
    return int(sdpa_flop_count(query, key, value))


@fvcore_formula("aten::_grouped_mm", "archplan.modules.flop_formulas: 2·M·K·N per grouped product")
def grouped_mm_traced_flop(shapes: list[Shape | None]) -> int:
    a, b = shapes[:2]
    if a is None or b is None:
        raise ValueError("_grouped_mm traced without complete shapes")
    return grouped_mm_flop(a, b)
