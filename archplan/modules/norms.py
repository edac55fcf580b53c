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
        return rms_norm(x, for_unit(self.weight), self.eps).type_as(x)


def _wide(x: Tensor) -> Tensor:
    """x in the dtype a norm computes in: fp32, or x's own where wider."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _wide_or_none(t: Tensor | None) -> Tensor | None:
    return None if t is None else _wide(t)


def _fp32_or_none(t: Tensor | None) -> Tensor | None:
    """A weight or bias for a plain op over the input's fp32 copy (the traced and fused paths)."""
    return None if t is None else t.float()


def for_unit(t: Tensor | None) -> Tensor | None:
    """A module's weight or bias as it hands it to a unit: a 16-bit one as stored (FSDP2's bf16
    gather), which the unit casts to fp32 in its forward and again in its backward; a wider one in
    fp32, as the input's fp32 copy it scales (a model built in fp64 for reference checks)."""
    return t if t is None or t.dtype.itemsize < 4 else t.float()


def _stored(grad: Tensor | None, weight: Tensor | None) -> Tensor | None:
    """A weight's gradient, computed in fp32, in the dtype the weight is stored in."""
    return None if grad is None or weight is None else grad.to(weight.dtype)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """`F.rms_norm` of x in fp32 over its last dim, keeping for the backward x in its own dtype
    and the per-row rstd: what a fused norm kernel keeps (Megatron-Core's Transformer Engine
    RMSNorm reads the bf16 input and keeps it with the fp32 rsigma) and what the activation terms
    count (`analytic.memory`, the norms' inputs at the residual stream's dtype). A 16-bit weight
    (FSDP2's bf16 gather) is cast to fp32 in the forward and again in the backward, not kept as
    an fp32 copy between them (4 B per width per norm and micro-batch in flight, which no
    activation term prices: `verify --layout` measured it on a one-token model), as
    `moe._Fp32Gating` does for the router.

    An fp32 input (autocast over fp32 weights) on CUDA runs the fused `_fused_rms_norm` (pytorch
    PR 153666), which keeps exactly that. Elsewhere torch's composite `rms_norm` would also keep
    the normalised x·rstd for the weight's gradient, and a lower-precision input would be kept as
    the fp32 copy the norm computes from: twice its bytes. Under a jit trace (fvcore) the plain op
    runs: a trace sees an autograd Function as one opaque op."""
    if torch.jit.is_tracing() or (x.is_cuda and x.dtype == torch.float32):
        return F.rms_norm(x.float(), (x.shape[-1],), _fp32_or_none(weight), eps)
    return _RMSNormKeepingInput.apply(x, weight, eps)


class _RMSNormKeepingInput(torch.autograd.Function):
    """The composite `rms_norm`'s forward on x's fp32 copy, saving x in its own dtype and rstd
    only. The backward re-forms x·rstd from them and works in place on the fp32 tensors it owns,
    so that at most three of x's size are alive beside its incoming gradient, where autograd's
    op-by-op formulas hold about six (a fused kernel holds none). Its reductions are the
    composite's (a row sum for rstd's gradient, `sum_to_size` for the weight's), so DTensor places
    the same collectives. Its gradient comes back in x's dtype, as the cast's would."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor | None, eps: float
    ) -> Tensor:
        x32 = _wide(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, rstd, weight)
        # in place on x's own fp32 copy (a new tensor only where x is narrower): one fp32 tensor of
        # x's size alive after rstd, where out of place held three (x32, x̂ and x̂·w) at the end
        y = x32.mul_(rstd) if x32 is not x else x32 * rstd
        if weight is None:
            return y
        w = _wide(weight)
        fits = torch.broadcast_shapes(y.shape, w.shape) == y.shape
        return y.mul_(w) if fits and torch.promote_types(y.dtype, w.dtype) == y.dtype else y * w

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        w = _wide_or_none(weight)
        # a copy even where x is already wide: it is overwritten below
        normed = x.to(torch.promote_types(x.dtype, torch.float32), copy=True).mul_(rstd)
        d_weight = None
        if w is not None and ctx.needs_input_grad[1]:
            d_weight = _stored((d_out * normed).sum_to_size(w.shape), weight)
        # y = x̂·w, x̂ = x·rstd: dx = rstd·(dx̂ − x̂·mean(dx̂·x̂)), dx̂ = dy·w
        d_normed = d_out * w if w is not None else None
        d_dot = d_out if d_normed is None else d_normed
        mean_dot = (d_dot * normed).sum(-1, keepdim=True).div(x.shape[-1])
        # out of place: mean_dot may be a partial sum (DTensor), which x̂ in place could not take
        correction = normed * mean_dot
        del normed
        d_x = d_dot - correction if d_normed is None else d_normed.sub_(correction)
        return d_x.mul_(rstd).to(x.dtype), d_weight, None


def width_moments(x: Tensor, centred: bool) -> Tensor:
    """Per row of x, in fp32: [Σx, Σx²] (`centred`, LayerNorm's) or [Σx²] (RMSNorm's), a norm's
    statistics over the part of its width x holds (`distributed.plans.width_sharded_norm` sums
    them over the ranks), keeping x in its own dtype for the backward."""
    return _Moments.apply(x, centred)


def normalise_with(x: Tensor, mean: Tensor | None, mean_sq: Tensor, weight: Tensor | None,
                   bias: Tensor | None, eps: float) -> Tensor:
    """x normalised in fp32 by the given per-row statistics (of the whole width): (x − mean)·rstd
    with rstd = (mean_sq − mean² + eps)^(-1/2) (LayerNorm), or x·(mean_sq + eps)^(-1/2) when mean
    is None (RMSNorm); then · weight + bias. Keeps x in its own dtype and rstd, where plain
    autograd keeps x's fp32 copy and the normalised x for the weight's gradient; the weight and
    bias as stored, cast to fp32 where used (`rms_norm`)."""
    return _FromMoments.apply(x, mean, mean_sq, weight, bias, eps)


class _Moments(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, centred: bool) -> Tensor:  # type: ignore[override]
        x32 = _wide(x)
        ctx.save_for_backward(x)
        ctx.centred = centred
        squares = x32.pow(2).sum(-1, keepdim=True)
        return torch.cat([x32.sum(-1, keepdim=True), squares], -1) if centred else squares

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, d_moments: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        x32 = _wide(x)
        d_x = d_moments[..., -1:] * (x32 * 2.0)
        if ctx.centred:
            d_x = d_x + d_moments[..., :1]
        return d_x.to(x.dtype), None


class _FromMoments(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, mean: Tensor | None, mean_sq: Tensor,
        weight: Tensor | None, bias: Tensor | None, eps: float,
    ) -> Tensor:
        x32 = _wide(x)
        centred = x32 if mean is None else x32 - mean
        var = mean_sq if mean is None else mean_sq - mean.pow(2)
        rstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        y = centred * rstd
        if weight is not None:
            y = y * _wide(weight)
        return y if bias is None else y + _wide(bias)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_out: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None, None]:
        x, mean, rstd, weight, bias = ctx.saved_tensors
        w = _wide_or_none(weight)
        centred = _wide(x) if mean is None else _wide(x) - mean
        d_weight = _stored((d_out * (centred * rstd)).sum_to_size(w.shape), weight) if w is not None else None
        d_bias = _stored(d_out.sum_to_size(bias.shape), bias) if bias is not None else None
        d_norm = d_out * w if w is not None else d_out
        d_centred = d_norm * rstd
        # rstd = (var + eps)^(-1/2): d var = d rstd · (−rstd³/2); var = mean_sq (− mean²)
        d_var = (d_norm * centred).sum(-1, keepdim=True) * (rstd.pow(3) * -0.5)
        d_mean = None
        if mean is not None:
            d_mean = -d_centred.sum(-1, keepdim=True) - 2.0 * mean * d_var
        return d_centred.to(x.dtype), d_mean, d_var, d_weight, d_bias, None


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
        if torch.jit.is_tracing() or _wide(x) is x:
            # fvcore's trace, or an input the norm computes in as it is: plain autograd keeps x,
            # mean and rstd, as the unit does
            return F.layer_norm(x.float(), self.shape, _fp32_or_none(self.weight), _fp32_or_none(self.bias),
                                self.eps).type_as(x)
        return _LayerNormKeepingInput.apply(x, for_unit(self.weight), for_unit(self.bias), self.eps).type_as(x)


class _LayerNormKeepingInput(torch.autograd.Function):
    """`native_layer_norm` (the op `F.layer_norm`'s autograd runs, and its backward, so DTensor
    places the same collectives) of x's fp32 copy, keeping x in its own dtype beside the per-row
    mean and rstd, as a fused kernel does (Transformer Engine's LayerNorm keeps the bf16 input
    with mu and rsigma); plain autograd would keep the fp32 copy, twice the bytes of a bf16 input.
    A weight and bias of the normalised width go into the op; broadcast ones (one per head,
    `HeadwiseNorm`) are applied after it, and their gradients re-form the normalised x, where
    plain autograd would keep it. The gradient comes back in x's dtype, as the cast's would; the
    weight and bias are kept as stored and cast to fp32 where used (`rms_norm`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor | None, bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        width = [x.shape[-1]]
        inside = weight is None or list(weight.shape) == width
        w, b = _wide_or_none(weight), _wide_or_none(bias)
        y, mean, rstd = torch.ops.aten.native_layer_norm(
            _wide(x), width, w if inside else None, b if inside else None, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.inside = inside
        if not inside:
            y = y * w if b is None else torch.addcmul(b, y, w)
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, mean, rstd, weight, bias = ctx.saved_tensors
        w, b = _wide_or_none(weight), _wide_or_none(bias)
        x32, width = _wide(x), [x.shape[-1]]
        if ctx.inside:
            mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            d_x, d_weight, d_bias = torch.ops.aten.native_layer_norm_backward(
                d_out, x32, width, mean, rstd, w, b, mask)
        else:
            assert w is not None  # not inside: a weight of another shape than the width
            d_weight = (d_out * ((x32 - mean) * rstd)).sum_to_size(w.shape)
            d_bias = d_out.sum_to_size(b.shape) if b is not None else None
            d_x, _, _ = torch.ops.aten.native_layer_norm_backward(
                d_out * w, x32, width, mean, rstd, None, None, [True, False, False])
        return d_x.to(x.dtype) if d_x is not None else None, _stored(d_weight, weight), _stored(d_bias, bias), None


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
        weight = for_unit(self.weight[:, None, :]) if self.weight is not None else None
        bias = for_unit(self.bias[:, None, :]) if self.bias is not None else None
        if torch.jit.is_tracing():
            # fvcore's trace: the plain ops (an autograd Function would be one opaque op)
            x = x_BHTDh.float()
            dh = (x.shape[-1],)
            y = F.rms_norm(x, dh, None, self.eps) if self.kind == "rmsnorm" else F.layer_norm(x, dh, None, None, self.eps)
            y = y * weight.float() if weight is not None else y
            return (y + bias.float() if bias is not None else y).type_as(x_BHTDh)
        match self.kind:
            case "rmsnorm":
                y = _RMSNormKeepingInput.apply(x_BHTDh, weight, self.eps)
            case "layernorm":
                y = _LayerNormKeepingInput.apply(x_BHTDh, weight, bias, self.eps)
            case _:
                assert_never(self.kind)
        return y.type_as(x_BHTDh)


def build_norm(plan: NormPlan, dim: int) -> RMSNorm | LayerNorm:
    match plan.kind:
        case "rmsnorm":
            return RMSNorm(dim, plan.eps, plan.affine)
        case "layernorm":
            return LayerNorm(dim, plan.eps, plan.bias, plan.affine)
        case _:
            assert_never(plan.kind)
