"""Normalisation layers: parameters and the (analytic-only) elementwise FLOPs of one application.

RMSNorm (Zhang & Sennrich 2019) holds a weight of the normalised width; LayerNorm (Ba et al. 2016)
a weight and a bias unless the bias is switched off (docs/formulas.md §1.6; Megatron
`theoretical_memory_usage.py` norm_size = 1 for RMSNorm, 2 for LayerNorm).
"""

from __future__ import annotations

from typing_extensions import assert_never

from archplan.resolve import NormPlan


def norm_params(norm: NormPlan, width: int) -> int:
    if not norm.affine:  # OLMo-1 `OlmoLayerNorm`: F.layer_norm(x, shape, None, None)
        return 0
    return width * (2 if norm.bias else 1)


def norm_flops(norm: NormPlan, width: int) -> int:
    """Elementwise FLOPs to normalise one vector of `width`.

    LayerNorm: 5 per element with an affine transform (fvcore `norm_flop_counter`, "5 is just a rough
    estimate": mean, subtract, square, variance, scale); RMSNorm skips the mean and the bias: square,
    sum, rescale, weight = 4 per element (our estimate on the same basis).
    """
    match norm.kind:
        case "layernorm":
            return 5 * width
        case "rmsnorm":
            return 4 * width
        case _:
            assert_never(norm.kind)
