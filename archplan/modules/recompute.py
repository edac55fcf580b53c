"""Shared pieces of the autograd units whose backward recomputes from their saved inputs
(`mamba1._ChunkedScan`, `mamba2._ChunkedSSD`, `s4._S4DKernel`, `stripedhyena._ModalFilter`): the
saved inputs as fresh leaves the recomputation is recorded from, the forward's autocast state the
recomputation runs under, a bmm's backward as the two matmuls autograd runs for it, and autograd's
gradients handed back in the inputs' order; and `recomputed`, the whole unit for an elementwise
function (Mamba's gate, Mamba-2's gated norm, StripedHyena's gated skip)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor


def leaves(saved: Sequence[Tensor | None], needs: Sequence[bool]) -> tuple[Tensor | None, ...]:
    """Each saved tensor detached, recording a graph where its gradient is needed."""
    return tuple(None if x is None else x.detach().requires_grad_(need) for x, need in zip(saved, needs))


def forward_autocast(x: Tensor) -> AbstractContextManager[object]:
    """The autocast state on x's device now (in a unit's forward), as a context for its backward to
    recompute under. Autograd runs a backward outside the forward's autocast region: recomputed in
    fp32, the matmuls would meet the bf16 gradients of the forward's bf16 matmuls (a dtype error),
    and their gradients would not be plain autograd's, which differentiates each bf16 matmul in
    bf16. This is `torch.amp.custom_fwd` + `custom_bwd` (torch/amp/autocast_mode.py) for the
    inputs' device, where those fix one device type when the Function is defined; autocast off in
    the forward is replayed as off, so an fp32 forward's backward stays fp32 wherever it is called.
    Meta has no autocast (`torch.amp.is_autocast_available`)."""
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                          enabled=torch.is_autocast_enabled(device_type))


def bmm_backward(left: Tensor, right: Tensor, d_out: Tensor, outputs: list[Tensor], grads: list[Tensor]) -> None:
    """The two matmuls autograd runs for `left @ right`'s backward (d left = d_out·rightᵀ,
    d right = leftᵀ·d_out), each only for an operand needing a gradient, appended as
    (output, gradient) pairs for `input_grads` back to the recomputed operands' inputs."""
    if left.requires_grad:
        outputs.append(left)
        grads.append(d_out @ right.detach().transpose(-1, -2))
    if right.requires_grad:
        outputs.append(right)
        grads.append(left.detach().transpose(-1, -2) @ d_out)


def input_grads(outputs: Sequence[Tensor], grads: Sequence[Tensor], inputs: Sequence[Tensor | None],
                needs: Sequence[bool]) -> tuple[Tensor | None, ...]:
    """The gradient of Σ ⟨output, grad⟩ for each input that needs one, in the inputs' order
    (None where it is not needed or the outputs do not reach it). An output no wanted input
    reaches (no graph: e.g. a scan's states when only its skip weight D needs a gradient)
    contributes nothing and is left out, as autograd would refuse it."""
    pairs = [(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad]
    outputs, grads = [out for out, _ in pairs], [grad for _, grad in pairs]
    wanted = [x for x, need in zip(inputs, needs) if need]
    found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True) if outputs and wanted
                 else [None] * len(wanted))
    return tuple(next(found) if need else None for need in needs)


def recomputed(fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """`fn(*inputs)` as one autograd unit keeping only its inputs, where plain autograd would also
    keep fn's intermediates: the backward recomputes fn and differentiates the ops autograd would
    (the same gradients). Only for elementwise fn, whose recomputation counts no FLOPs. Under a jit
    trace (fvcore) the plain composition runs: a trace sees an autograd Function as one opaque op."""
    if torch.jit.is_tracing():
        return fn(*inputs)
    return _Recomputed.apply(fn, *inputs)


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, fn: Callable[..., Tensor], *inputs: Tensor
    ) -> Tensor:
        ctx.fn, ctx.autocast = fn, forward_autocast(inputs[0])
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad[1:]
        with torch.enable_grad(), ctx.autocast:
            inputs = leaves(ctx.saved_tensors, needs)
            return (None, *input_grads([ctx.fn(*inputs)], [d_out], inputs, needs))
