"""Dense FFNs: two-matrix MLP and gated three-matrix GLU (SwiGLU/GeGLU).

Parameters docs/formulas.md §1.5: MLP 2·D·F (+F+D biases), GLU 3·D·F (+2F+D biases) (Shazeer 2020; Megatron
`theoretical_memory_usage.py` dense_mlp_params). Counted FLOPs: 2 per weight per token.
"""

from __future__ import annotations

from typing_extensions import assert_never

from archplan.resolve import FFNPlan

# Elementwise FLOPs per activation element: our estimates, counting exp/tanh/erf as one operation.
# relu max(x,0) 1; silu x·σ(x) = exp, add, divide, multiply 4; gelu x·Φ(x) via erf ≈ 5 (erf, add,
# two multiplies, scale); gelu_tanh 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) ≈ 8.
ACTIVATION_FLOPS: dict[str, int] = {"relu": 1, "silu": 4, "gelu": 5, "gelu_tanh": 8}


def n_matrices(f: FFNPlan) -> int:
    match f.kind:
        case "mlp":
            return 2
        case "glu":
            return 3
        case _:
            assert_never(f.kind)


def ffn_matmul_params(f: FFNPlan, d_model: int) -> int:
    return n_matrices(f) * d_model * f.d_ff


def ffn_bias_params(f: FFNPlan, d_model: int) -> int:
    """Biases of the up (and gate) projections, F each, and of the down projection, D."""
    return (n_matrices(f) - 1) * f.d_ff + d_model if f.bias else 0


def ffn_params(f: FFNPlan, d_model: int) -> int:
    return ffn_matmul_params(f, d_model) + ffn_bias_params(f, d_model)


def ffn_elementwise_per_token(f: FFNPlan) -> int:
    """The activation over F, plus the gate product act(gate)·up for a GLU."""
    gate_product = f.d_ff if f.kind == "glu" else 0
    return ACTIVATION_FLOPS[f.activation] * f.d_ff + gate_product
