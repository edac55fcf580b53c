"""Dense FFNs: the two-matrix MLP and the gated GLU family (SwiGLU, GeGLU, ReGLU).

Also the building block of MoE shared experts (one FFN of width n·d_ff, as HF builds them).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import assert_never

from archplan.resolve import FFNPlan

Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]


def activation(name: Activation) -> Callable[[Tensor], Tensor]:
    """gelu = exact erf GELU (Hendrycks & Gimpel 2016); gelu_tanh = its tanh approximation (GPT-2)."""
    match name:
        case "relu":
            return F.relu
        case "gelu":
            return F.gelu
        case "gelu_tanh":
            return partial(F.gelu, approximate="tanh")
        case "silu":
            return F.silu
        case _:
            assert_never(name)


class MLP(nn.Module):
    """down(act(up(x))) (Vaswani et al. 2017 eq. 2): 2·D·F (+ F + D with bias)."""

    def __init__(self, plan: FFNPlan, d_model: int) -> None:
        super().__init__()
        self.act = activation(plan.activation)
        self.up_proj = nn.Linear(d_model, plan.d_ff, bias=plan.bias)
        self.down_proj = nn.Linear(plan.d_ff, d_model, bias=plan.bias)

    def forward(self, x_BTD: Tensor) -> Tensor:
        return self.down_proj(self.act(self.up_proj(x_BTD)))


class GLU(nn.Module):
    """down(act(gate(x)) ⊙ up(x)) (Shazeer 2020, eq. 5-6): 3·D·F (+ 2·F + D with bias)."""

    def __init__(self, plan: FFNPlan, d_model: int) -> None:
        super().__init__()
        self.act = activation(plan.activation)
        self.gate_proj = nn.Linear(d_model, plan.d_ff, bias=plan.bias)
        self.up_proj = nn.Linear(d_model, plan.d_ff, bias=plan.bias)
        self.down_proj = nn.Linear(plan.d_ff, d_model, bias=plan.bias)

    def forward(self, x_BTD: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


def build_ffn(plan: FFNPlan, d_model: int) -> MLP | GLU:
    match plan.kind:
        case "mlp":
            return MLP(plan, d_model)
        case "glu":
            return GLU(plan, d_model)
        case _:
            assert_never(plan.kind)
