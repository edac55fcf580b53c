"""RMSNorm and LayerNorm (with or without bias), and the per-head variant used by qk-norm.

Computed in fp32 and cast back, as HF `LlamaRMSNorm` does, so bf16 models normalise stably.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import assert_never

from archplan.resolve import NormPlan


class RMSNorm(nn.Module):
    """x / rms(x) · w (Zhang & Sennrich 2019, eq. 4): `dim` parameters (none when not affine)."""

    def __init__(self, dim: int, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.shape = (dim,)
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        return F.rms_norm(x.float(), self.shape, weight, self.eps).type_as(x)


class LayerNorm(nn.Module):
    """(x − mean) / std · w (+ b) (Ba et al. 2016): `dim` or `2·dim` parameters; none when not
    affine (OLMo-1 `OlmoLayerNorm`)."""

    def __init__(self, dim: int, eps: float, bias: bool, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.shape = (dim,)
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and affine else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.shape, weight, bias, self.eps).type_as(x)


class HeadwiseNorm(nn.Module):
    """One norm per head over the last dim (StableLM-2 `StableLmLayerNormPerHead`).

    Weights (and bias) of shape (heads, head_dim); input (..., heads, T, head_dim).
    """

    def __init__(self, heads: int, head_dim: int, plan: NormPlan) -> None:
        super().__init__()
        self.kind = plan.kind
        self.eps = plan.eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim)) if plan.affine else None
        has_bias = plan.kind == "layernorm" and plan.bias and plan.affine
        self.bias = nn.Parameter(torch.zeros(heads, head_dim)) if has_bias else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x_BHTDh: Tensor) -> Tensor:
        dh = (x_BHTDh.shape[-1],)
        x = x_BHTDh.float()
        match self.kind:
            case "rmsnorm":
                y = F.rms_norm(x, dh, None, self.eps)
            case "layernorm":
                y = F.layer_norm(x, dh, None, None, self.eps)
            case _:
                assert_never(self.kind)
        if self.weight is not None:
            y = y * self.weight.float()[:, None, :]
        if self.bias is not None:
            y = y + self.bias.float()[:, None, :]
        return y.type_as(x_BHTDh)


def build_norm(plan: NormPlan, dim: int) -> RMSNorm | LayerNorm:
    match plan.kind:
        case "rmsnorm":
            return RMSNorm(dim, plan.eps, plan.affine)
        case "layernorm":
            return LayerNorm(dim, plan.eps, plan.bias, plan.affine)
        case _:
            assert_never(plan.kind)
