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
        return rms_norm(x.float(), weight, self.eps).type_as(x)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """`F.rms_norm` over x's last dim, keeping for the backward what CUDA keeps on every device.

    On CUDA `rms_norm` runs the fused `_fused_rms_norm` (pytorch PR 153666), whose backward reads
    the input and the per-row rstd. Elsewhere (the CPU, the fake runs of `verify --layout`) torch
    takes the composite `rms_norm`, whose autograd also keeps the normalised x·rstd for the
    weight's gradient: a third full-width fp32 tensor per norm that the activation terms, and a
    CUDA run, do not hold. Under a jit trace (fvcore) the plain op runs: a trace sees an autograd
    Function as one opaque op."""
    if x.is_cuda or torch.jit.is_tracing():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _RMSNormKeepingInput.apply(x, weight, eps)


class _RMSNormKeepingInput(torch.autograd.Function):
    """The composite `rms_norm`'s ops, forward and backward, in torch's order (so DTensor places
    the same collectives: a norm over a sharded width all-reduces the same (.., 1) partial sums),
    saving x and rstd only; the backward re-forms x·rstd from them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor | None, eps: float
    ) -> Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, rstd, weight)
        y = x * rstd
        return y if weight is None else y * weight

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        d_weight = None
        d_y = d_out
        if weight is not None:
            if ctx.needs_input_grad[1]:
                d_weight = (d_out * (x * rstd)).sum_to_size(weight.shape)
            d_y = d_out * weight
        # autograd's formulas for y = x·rstd, rstd = (mean(x²) + eps)^(-1/2): mul, rsqrt, mean, pow
        d_rstd = (d_y * x).sum(-1, keepdim=True)
        d_x = d_y * rstd
        d_mean_sq = d_rstd * (rstd.pow(3) * -0.5)
        d_x = d_x + d_mean_sq.expand(x.shape).div(x.shape[-1]) * (x.pow(1.0) * 2.0)
        return d_x, d_weight, None


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
