"""Mamba-1 selective-SSM mixer (Gu & Dao 2023) in pure PyTorch, with its constant decode state.

Parameter layout is state-spaces/mamba `mamba_simple.Mamba` exactly (in_proj, conv1d, x_proj,
dt_proj, A_log, D, out_proj), plus Jamba's RMSNorms on dt, B and C (HF `JambaMambaMixer`
dt_layernorm / b_layernorm / c_layernorm) when `inner_norms`.

The scan h_t = exp(Δ_t·A) ⊙ h_{t−1} + Δ_t·B_t·x_t, y_t = C_t·h_t (Gu & Dao 2023, eq. 2a-2b
discretised with zero-order hold on A and Euler on B, Alg. 2) runs as a two-level chunked scan
(`selective_scan`; one token, a decode step, as one step without the chunking);
`selective_scan_reference` is the per-timestep loop of mamba's `selective_scan_ref`, kept beside
it so a test proves them equal.

Counted FLOPs (docs/architecture.md): the Linears, the depthwise conv on a left-padded input
(exactly T outputs: 2·B·T·I·W) and the scan's output contraction y_t = h_t·C_t, i.e.
einsum('btin,btn->bti', h, C) (2·B·T·I·N). Every other scan op is elementwise. Contractions are
written as `matmul`, never `einsum`: torch.einsum turns a contraction over a size-1 dim (N = 1)
into an uncounted elementwise product, matmul always reaches bmm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archplan.modules.cache import LayerState
from archplan.modules.norms import RMSNorm
from archplan.modules.recompute import forward_autocast, input_grads, leaves, recomputed
from archplan.resolve import Mamba1Plan

# mamba_simple.Mamba defaults for the Δ initialisation (Gu & Dao 2023 §3.6, "Δ init").
_DT_MIN, _DT_MAX, _DT_FLOOR = 1e-3, 1e-1, 1e-4


@dataclass(eq=False)
class Mamba1State(LayerState):
    """Constant decode state (mamba_simple `allocate_inference_cache`): the last W conv inputs
    (B, I, W) and the SSM state (B, I, N), whatever the context length."""

    conv_BIW: Tensor
    ssm_BIN: Tensor
    seen: int = 0

    def tensors(self) -> list[Tensor]:
        return [self.conv_BIW, self.ssm_BIN]


def into_state(result: tuple[Tensor, Tensor], state: Tensor | None) -> Tensor:
    """The output of a (output, what the decode state takes next) pair, the latter copied into
    `state` when there is one. Dropped here otherwise, not held by the caller's frame: a checkpoint
    that stops a layer's re-run early (torch ≥ 2.1, non-reentrant) raises out of it, and the frames
    the exception crosses stay alive until it is caught, with their locals (a conv's next context
    is a view of its whole padded input; measured at the re-run's peak by verify --layout)."""
    out, following = result
    if state is not None:
        state.copy_(following.detach())
    return out


def causal_depthwise_conv(
    x_BCT: Tensor, weight_C1W: Tensor, bias_C: Tensor | None, context_BCW: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv producing exactly T outputs, and the last W inputs (next context).

    The input is left-padded by W−1 columns — zeros for a fresh sequence, or the columns a
    previous call left in the decode state — so the counted convolution is the true one (not T+W−1
    outputs sliced to T, which is how mamba_simple pads; docs/architecture.md "Counting conventions").
    """
    w = weight_C1W.shape[-1]
    if context_BCW is None:
        x_pad = F.pad(x_BCT, (w - 1, 0))
        if torch.jit.is_tracing():
            # fvcore counts a jit trace, to which an autograd Function is one opaque prim::PythonOp
            return F.conv1d(x_pad, weight_C1W, bias_C, groups=x_BCT.shape[1]), x_pad[..., -w:]
        return _LeftPaddedConv.apply(x_BCT, weight_C1W, bias_C), x_pad[..., -w:]
    x_pad = torch.cat([context_BCW[..., 1:].to(x_BCT.dtype), x_BCT], dim=-1)
    return F.conv1d(x_pad, weight_C1W, bias_C, groups=x_BCT.shape[1]), x_pad[..., -w:]


class _LeftPaddedConv(torch.autograd.Function):
    """The causal depthwise conv of a fresh sequence keeping its unpadded input (a view of the
    projection's output, already kept) instead of the padded copy plain autograd's conv saves; the
    backward pads it again and runs the same `convolution_backward` (same counted FLOPs and
    gradients). mamba_ssm's fused paths keep only the projection's output too (`mamba_inner_fn`'s
    xz, `mamba_split_conv1d_scan_combined`'s zxbcdt) and recompute the conv in the backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x_BCT: Tensor, weight_C1W: Tensor, bias_C: Tensor | None
    ) -> Tensor:
        ctx.save_for_backward(x_BCT, weight_C1W)
        ctx.has_bias = bias_C is not None
        y_BCT = F.conv1d(F.pad(x_BCT, (weight_C1W.shape[-1] - 1, 0)), weight_C1W, bias_C, groups=x_BCT.shape[1])
        # the dtype the conv ran in (autocast's, when on), which its backward must run in too:
        # `convolution_backward` is not an autocast op and refuses bf16 gradients beside fp32 operands
        ctx.dtype = y_BCT.dtype
        return y_BCT

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dy_BCT: Tensor
    ) -> tuple[Tensor | None, ...]:
        x_BCT, weight_C1W = (t.to(ctx.dtype) for t in ctx.saved_tensors)
        w = weight_C1W.shape[-1]
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        dx_pad, dw, db = torch.ops.aten.convolution_backward(
            dy_BCT, F.pad(x_BCT, (w - 1, 0)), weight_C1W, [weight_C1W.shape[0]] if ctx.has_bias else None,
            [1], [0], [1], False, [0], x_BCT.shape[1], mask,
        )
        return (dx_pad[..., w - 1:] if mask[0] else None), (dw if mask[1] else None), (db if mask[2] else None)


def scan_chunk_len(seq_len: int) -> int:
    """Chunk length ⌈√T⌉: the two sequential loops then take ⌈√T⌉ + T/⌈√T⌉ ≈ 2√T steps."""
    return math.isqrt(max(seq_len, 1) - 1) + 1


def selective_scan(
    u_BTI: Tensor, dt_BTI: Tensor, A_IN: Tensor, B_BTN: Tensor, C_BTN: Tensor, h0_BIN: Tensor | None,
    *, D_I: Tensor | None = None, dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """y (B, T, I), plus the D skip u·D when `D_I` is given, and the final state (B, I, N); fp32.
    Δ is `dt_BTI`, or softplus(dt_BTI) with `dt_softplus` (mamba_ssm `selective_scan_fn`'s
    delta_softplus, which the mixer uses so the scan's saved Δ is the dt_proj output). One token
    with no gradient to keep for (a decode step) by `selective_step`, else by `chunked_scan`,
    whose backward recomputes the states that a one-token training step through
    `selective_step` would keep (`bench --train --seq 1` measured more than at 2 tokens)."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (u_BTI, dt_BTI, A_IN, B_BTN, C_BTN))
    if u_BTI.shape[1] == 1 and not needs_grad:
        y_B1I, h_BIN = selective_step(u_BTI, _delta(dt_BTI, dt_softplus), A_IN, B_BTN, C_BTN, h0_BIN)
        return _with_skip(y_B1I, u_BTI, D_I), h_BIN
    return chunked_scan(u_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h0_BIN, D_I=D_I, dt_softplus=dt_softplus)


def _delta(dt_BTI: Tensor, softplus: bool) -> Tensor:
    return F.softplus(dt_BTI.float()) if softplus else dt_BTI


def _with_skip(y_BTI: Tensor, u_BTI: Tensor, D_I: Tensor | None) -> Tensor:
    return y_BTI + u_BTI.float() * D_I.float() if D_I is not None else y_BTI


def chunked_scan(
    u_BTI: Tensor, dt_BTI: Tensor, A_IN: Tensor, B_BTN: Tensor, C_BTN: Tensor, h0_BIN: Tensor | None,
    *, D_I: Tensor | None = None, dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fast selective scan: y (B, T, I) (with the D skip and Δ as in `selective_scan`), and the
    final state (B, I, N); fp32.

    Two-level chunked form of the linear recurrence h_t = a_t ⊙ h_{t−1} + b_t with a = exp(Δ·A),
    b = Δ·x·B (`_ChunkedScan`). As one autograd unit it keeps only its inputs for the backward and
    recomputes the states there, as mamba_ssm's fused `selective_scan` does (Gu & Dao 2023
    §3.3.2): plain autograd would keep exp(Δ·A) and the new state of every step, 2·B·T·I·N fp32.
    """
    if torch.jit.is_tracing():
        # fvcore counts a jit trace, to which an autograd Function is one opaque prim::PythonOp
        return _scan(u_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h0_BIN, D_I, dt_softplus)
    return _ChunkedScan.apply(u_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h0_BIN, D_I, dt_softplus)


def _scan(
    u_BTI: Tensor, dt_BTI: Tensor, A_IN: Tensor, B_BTN: Tensor, C_BTN: Tensor, h0_BIN: Tensor | None,
    D_I: Tensor | None, dt_softplus: bool,
) -> tuple[Tensor, Tensor]:
    """The scan as plain ops: what `_ChunkedScan` runs forward (and autograd would differentiate)."""
    chunks = _Chunks.of(u_BTI.shape[1])
    # one step's states at a time: without autograd (the unit's forward) each is freed once
    # contracted, √T·I·N alive rather than T·I·N
    states, state_BIN = _each_state(chunks, u_BTI, _delta(dt_BTI, dt_softplus), A_IN, B_BTN, h0_BIN)
    return _with_skip(_contract(chunks, states, C_BTN), u_BTI, D_I), state_BIN


@dataclass(frozen=True)
class _Chunks:
    """T cut into n_c chunks of L = ⌈√T⌉ tokens, the last padded by `pad`."""

    t: int
    length: int
    count: int
    pad: int

    @classmethod
    def of(cls, t: int) -> _Chunks:
        length = scan_chunk_len(t)
        count = math.ceil(t / length)
        return cls(t, length, count, count * length - t)

    def split(self, x_BTK: Tensor) -> Tensor:
        """(B, T, K) → (B, n_c, L, K) in fp32, padded with zeros."""
        return F.pad(x_BTK.float(), (0, 0, 0, self.pad)).reshape(x_BTK.shape[0], self.count, self.length, -1)

    def real(self, j: int) -> int:
        """Chunks holding a real token at step j: the last one only up to position t − 1."""
        return self.count if j < self.length - self.pad else self.count - 1


def _scan_states(
    chunks: _Chunks, u_BTI: Tensor, dt_BTI: Tensor, A_IN: Tensor, B_BTN: Tensor, h0_BIN: Tensor | None
) -> tuple[list[Tensor], Tensor]:
    """The state after each step j of every chunk (L tensors (B, n_c, I, N)) and the final state.

    Every step works on all chunks at once, so there are ≈ 3√T Python steps instead of T, each
    on a (B, n_c, I, N) tensor small enough to stay in cache:
      1. each chunk's state at its end, starting from zero (L steps);
      2. the state entering each chunk (n_c steps on (B, I, N)); a chunk's total decay is
         Π exp(Δ_t·A) = exp((Σ Δ_t)·A);
      3. the L steps again from the true entering states.
    Only decays ≤ 1 are multiplied (never exp(−cumsum), as the log-space trick needs), so it is
    exact for any Δ. Padding T up to n_c·L with Δ = 0 gives a = 1, b = 0: padded steps leave the
    state unchanged. Elementwise only: the one contraction is `_contract`'s.
    """
    states, state_BIN = _each_state(chunks, u_BTI, dt_BTI, A_IN, B_BTN, h0_BIN)
    return list(states), state_BIN


def _entering_states(
    chunks: _Chunks, u_BTI: Tensor, dt_BTI: Tensor, A_IN: Tensor, B_BTN: Tensor, h0_BIN: Tensor | None
) -> tuple[Callable[[int, Tensor], Tensor], Tensor, Tensor]:
    """Passes 1 and 2 of `_scan_states`: its step j, the state entering each chunk (B, n_c, I, N)
    and the final state."""
    A = A_IN.float()
    dt_BCLI = chunks.split(dt_BTI)
    dtu_BCLI = chunks.split(dt_BTI * u_BTI)
    B_BCLN = chunks.split(B_BTN)

    def step(j: int, h_BCIN: Tensor) -> Tensor:
        # a and b of step j for every chunk, rebuilt in each pass rather than kept: holding all
        # of them would be (B, T, I, N) twice, and fresh memory of that size costs more than the
        # recomputation (page faults dominate CPU elementwise throughput at that size)
        a_BCIN = torch.exp(dt_BCLI[:, :, j, :, None] * A)
        b_BCIN = dtu_BCLI[:, :, j, :, None] * B_BCLN[:, :, j, None, :]
        return torch.addcmul(b_BCIN, a_BCIN, h_BCIN)

    b, i = u_BTI.shape[0], u_BTI.shape[2]
    h_BCIN = torch.zeros(b, chunks.count, i, A.shape[1], device=u_BTI.device, dtype=torch.float32)
    for j in range(chunks.length):
        h_BCIN = step(j, h_BCIN)

    chunk_decay_BCIN = torch.exp(dt_BCLI.sum(dim=2)[..., None] * A)
    state_BIN = h0_BIN.float() if h0_BIN is not None else torch.zeros_like(h_BCIN[:, 0])
    entering = []
    for c in range(chunks.count):
        entering.append(state_BIN)
        state_BIN = torch.addcmul(h_BCIN[:, c], chunk_decay_BCIN[:, c], state_BIN)

    return step, torch.stack(entering, dim=1), state_BIN


def _each_state(
    chunks: _Chunks, u_BTI: Tensor, dt_BTI: Tensor, A_IN: Tensor, B_BTN: Tensor, h0_BIN: Tensor | None
) -> tuple[Iterator[Tensor], Tensor]:
    """`_scan_states`' states one step j at a time, each dropped when the caller moves on, and the
    final state."""
    step, h_BCIN, state_BIN = _entering_states(chunks, u_BTI, dt_BTI, A_IN, B_BTN, h0_BIN)
    return _steps(chunks, step, h_BCIN), state_BIN


def _steps(chunks: _Chunks, step: Callable[[int, Tensor], Tensor], h_BCIN: Tensor) -> Iterator[Tensor]:
    for j in range(chunks.length):
        h_BCIN = step(j, h_BCIN)
        yield h_BCIN


def _contract(chunks: _Chunks, states: Iterable[Tensor], C_BTN: Tensor) -> Tensor:
    """y_t = h_t·C_t (B, T, I): one matmul per step over the chunks holding a real token there, so
    padded steps are never contracted and the count is exactly 2·B·T·I·N."""
    C_BCLN = chunks.split(C_BTN)
    ys = []
    for j, h_BCIN in enumerate(states):
        real = chunks.real(j)
        y_BcI = torch.matmul(h_BCIN[:, :real], C_BCLN[:, :real, j, :, None]).squeeze(-1)
        ys.append(F.pad(y_BcI, (0, 0, 0, chunks.count - real)))
    b, i = y_BcI.shape[0], y_BcI.shape[2]
    return torch.stack(ys, dim=2).reshape(b, chunks.count * chunks.length, i)[:, : chunks.t]


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan saving only its inputs; the backward recomputes the states (elementwise)
    and differentiates the contraction by the two matmuls autograd would run for it, so a forward +
    backward executes the same counted ops as plain autograd (docs/architecture.md: backward =
    2 × the forward's contraction) and the same gradients, within rounding.

    The states are never all alive in the backward. Recomputed at once, with their graph and
    gradients, they came to eight times (B, T, I, N) fp32 at the step's peak (tiny-mamba at 128
    tokens: 4.05 MiB of temporaries beside 1.9 MiB of model states); mamba_ssm's kernel keeps
    them on chip, chunk by chunk (Gu & Dao 2023 §3.3.2). Here:
    - dC = Σ hᵀ·dy, a contraction over the channels, runs over all of them, one step's states at
      a time (`_each_state`), as plain autograd runs it (bit for bit under bf16 autocast, where a
      contraction split by channel would round each part);
    - the rest runs over blocks of ⌈I/N⌉ channels (`channel_blocks`), whose recurrences are
      independent: a block's states are as large as one fp32 (B, T, I) tensor. dh = dy·Cᵀ has
      one term per channel, so the blocks' matmuls count the same FLOPs. dB sums over channels:
      the blocks' parts are summed in fp32 and rounded to B's dtype once (plain autograd's value
      within fp32 summation order).
    On the meta device, which allocates nothing, one block holds every channel: the same ops in
    one sixteenth of the calls at I = 16·N, each a Python meta kernel there (`verify` of
    Mamba-2.8B took 103 s and takes 12 s, docs/benchmarks.md), and the same FLOPs op by op
    (tested against the blocks on CPU)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        u_BTI: Tensor, dt_BTI: Tensor, A_IN: Tensor, B_BTN: Tensor, C_BTN: Tensor, h0_BIN: Tensor | None,
        D_I: Tensor | None, dt_softplus: bool,
    ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(u_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h0_BIN, D_I)
        ctx.dt_softplus, ctx.autocast = dt_softplus, forward_autocast(u_BTI)
        ctx.set_materialize_grads(False)
        return _scan(u_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h0_BIN, D_I, dt_softplus)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dy_BTI: Tensor | None, dstate_BIN: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad[:7]
        saved = ctx.saved_tensors  # once: a checkpointed layer's saved tensors unpack once
        u_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h0_BIN, D_I = saved
        dC_BTN = _output_weight_grad(ctx, saved, dy_BTI) if needs[4] and dy_BTI is not None else None
        per_block = (needs[0], needs[1], needs[2], needs[3], False, needs[5], needs[6])
        if not any(per_block):
            return None, None, None, None, dC_BTN, None, None, None
        # B in fp32 (as the scan reads it): each block's dB is a partial sum over channels, which
        # summed in B's 16-bit dtype would round each part
        B_fp32 = B_BTN.float()
        blocks = [
            _block_grads(ctx, per_block, [u_BTI[..., c], dt_BTI[..., c], A_IN[c], B_fp32, C_BTN,
                                          None if h0_BIN is None else h0_BIN[:, c],
                                          None if D_I is None else D_I[c]],
                         None if dy_BTI is None else dy_BTI[..., c], None if dstate_BIN is None else dstate_BIN[:, c])
            for c in channel_blocks(A_IN.shape[0], A_IN.shape[1], A_IN.device)
        ]
        du, ddt, dA, dB, _, dh0, dD = (_join([g[k] for g in blocks], dim) for k, dim in
                                       enumerate((2, 2, 0, None, None, 1, 0)))
        return du, ddt, dA, None if dB is None else dB.to(B_BTN.dtype), dC_BTN, dh0, dD, None


def channel_blocks(channels: int, d_state: int, device: torch.device) -> list[slice]:
    """The scan backward's blocks of ⌈I/N⌉ channels (`_ChunkedScan`); one of them all on the meta
    device, where no state takes memory."""
    size = channels if device.type == "meta" else -(-channels // d_state)
    return [slice(start, min(start + size, channels)) for start in range(0, channels, size)]


def _join(grads: list[Tensor | None], dim: int | None) -> Tensor | None:
    """The blocks' gradients of one input: concatenated along its channel dim, or summed (`dim`
    None: B, which every block reads); None where the blocks did not compute it."""
    found = [g for g in grads if g is not None]
    if len(found) < len(grads):
        return None
    if dim is None:
        return torch.stack(found).sum(0) if len(found) > 1 else found[0]
    return torch.cat(found, dim=dim)


def _output_weight_grad(ctx: torch.autograd.function.FunctionCtx, saved: tuple[Tensor | None, ...],
                        dy_BTI: Tensor) -> Tensor:
    """C's gradient: matmul(h (B, c, I, N), C (B, c, N, 1))'s dC = hᵀ·dy at each step j over every
    channel, the states recomputed one step at a time, then back through C's split."""
    u_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h0_BIN, _ = saved
    chunks = _Chunks.of(u_BTI.shape[1])
    with torch.no_grad(), ctx.autocast:
        dy_BCLI = chunks.split(dy_BTI)
        dC = []
        states, _ = _each_state(chunks, u_BTI, _delta(dt_BTI, ctx.dt_softplus), A_IN, B_BTN, h0_BIN)
        for j, h_BCIN in enumerate(states):
            real = chunks.real(j)
            dC_BcN = torch.matmul(h_BCIN[:, :real].transpose(-1, -2), dy_BCLI[:, :real, j, :, None]).squeeze(-1)
            dC.append(F.pad(dC_BcN, (0, 0, 0, chunks.count - real)))
    with torch.enable_grad():
        (C_leaf,) = leaves([C_BTN], [True])
        (dC_BTN,) = torch.autograd.grad(chunks.split(C_leaf), C_leaf, torch.stack(dC, dim=2))
    return dC_BTN


def _block_grads(ctx: torch.autograd.function.FunctionCtx, needs: tuple[bool, ...], saved: list[Tensor | None],
                 dy_BTI: Tensor | None, dstate_BIN: Tensor | None) -> tuple[Tensor | None, ...]:
    """The gradients of one channel block's inputs but C: its states recomputed, dh = dy·Cᵀ (the
    contraction's other matmul), the rest by autograd."""
    with torch.enable_grad(), ctx.autocast:
        inputs = leaves(saved, needs)
        u_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h0_BIN, D_I = inputs
        chunks = _Chunks.of(u_BTI.shape[1])
        states, state_BIN = _scan_states(chunks, u_BTI, _delta(dt_BTI, ctx.dt_softplus), A_IN, B_BTN, h0_BIN)
        outputs: list[Tensor] = []
        grads: list[Tensor] = []
        if dy_BTI is not None:
            if D_I is not None:
                outputs.append(u_BTI.float() * D_I.float())  # the D skip
                grads.append(dy_BTI)
            C_BCLN = chunks.split(C_BTN)
            dy_BCLI = chunks.split(dy_BTI)
            for j, h_BCIN in enumerate(states):
                real = chunks.real(j)
                dh_BcIN = torch.matmul(dy_BCLI[:, :real, j, :, None], C_BCLN[:, :real, j, None, :])
                outputs.append(h_BCIN)
                grads.append(F.pad(dh_BcIN, (0, 0, 0, 0, 0, chunks.count - real)))
        if dstate_BIN is not None:
            outputs.append(state_BIN)
            grads.append(dstate_BIN)
        return input_grads(outputs, grads, inputs, needs)


def silu_gate(y_BTI: Tensor, z_BTI: Tensor) -> Tensor:
    """y ⊙ SiLU(z), the Mamba gate, as one unit keeping y and z (a view of in_proj's output, kept
    anyway) where plain autograd keeps SiLU(z) too, a (B, T, I) copy: mamba_ssm's
    `selective_scan_fn(..., z=z)` saves z and the ungated output and recomputes the gate in its
    backward (selective_scan_interface.py `SelectiveScanFn`)."""
    return recomputed(_silu_gate, y_BTI, z_BTI)


def _silu_gate(y_BTI: Tensor, z_BTI: Tensor) -> Tensor:
    return y_BTI * F.silu(z_BTI)


def selective_step(
    u_B1I: Tensor, dt_B1I: Tensor, A_IN: Tensor, B_B1N: Tensor, C_B1N: Tensor, h0_BIN: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token of the scan: h = exp(Δ·A) ⊙ h0 + Δ·x·B, y = h·C; fp32, as `selective_scan`.

    The chunked form at T = 1 computes the same values through the same ops, plus work that is a
    no-op there (padding by 0, a first pass from a zero state, the chunk-decay pass repeating the
    step, stacks of one chunk): about twice the ops of a decode step, each paid in full at one
    token. Bit-identical to it (tests/test_decode.py).
    """
    A = A_IN.float()
    a_BIN = torch.exp(dt_B1I.float()[:, 0, :, None] * A)
    b_BIN = (dt_B1I * u_B1I).float()[:, 0, :, None] * B_B1N.float()[:, 0, None, :]
    h0 = h0_BIN.float() if h0_BIN is not None else torch.zeros_like(b_BIN)
    h_BIN = torch.addcmul(b_BIN, a_BIN, h0)
    y_B1I = torch.matmul(h_BIN[:, None], C_B1N.float()[:, :, :, None]).squeeze(-1)
    return y_B1I, h_BIN


def selective_scan_reference(
    u_BTI: Tensor, dt_BTI: Tensor, A_IN: Tensor, B_BTN: Tensor, C_BTN: Tensor, h0_BIN: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One timestep at a time, as state-spaces/mamba `selective_scan_ref` (tests only)."""
    b, t, i = u_BTI.shape
    A = A_IN.float()
    h = (h0_BIN.float() if h0_BIN is not None
         else torch.zeros(b, i, A.shape[1], device=u_BTI.device, dtype=torch.float32))
    ys = []
    for s in range(t):
        dt = dt_BTI[:, s].float()
        dtu = (dt * u_BTI[:, s].float())[..., None]
        h = torch.exp(dt[..., None] * A) * h + dtu * B_BTN[:, s, None].float()
        ys.append((h * C_BTN[:, s, None].float()).sum(-1))
    return torch.stack(ys, dim=1), h


class Mamba1Mixer(nn.Module):
    """mamba_simple.Mamba: in_proj → causal conv + SiLU → x_proj (dt, B, C) → dt_proj + softplus →
    selective scan + D skip → gate SiLU(z) → out_proj."""

    def __init__(self, plan: Mamba1Plan, d_model: int) -> None:
        super().__init__()
        self.plan = plan
        i, n, r = plan.d_inner, plan.d_state, plan.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * i, bias=plan.proj_bias)
        self.conv1d = nn.Conv1d(i, i, plan.d_conv, groups=i, bias=plan.conv_bias)
        self.x_proj = nn.Linear(i, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, i, bias=True)
        self.A_log = nn.Parameter(torch.empty(i, n))
        self.D = nn.Parameter(torch.empty(i))
        self.out_proj = nn.Linear(i, d_model, bias=plan.proj_bias)
        self.dt_layernorm = RMSNorm(r, plan.norm.eps) if plan.inner_norms else None
        self.b_layernorm = RMSNorm(n, plan.norm.eps) if plan.inner_norms else None
        self.c_layernorm = RMSNorm(n, plan.norm.eps) if plan.inner_norms else None
        # B and C, which every channel's scan reads: under tensor parallelism each rank's channels
        # contribute a part of their gradients (`distributed.plans.mamba1_plan`)
        self.bc = nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba_simple.Mamba.__init__: S4D-real A = −(1..N) per channel, D = 1, dt_proj weight
        U(±dt_rank^−½) and its bias the inverse softplus of Δ ~ logU(dt_min, dt_max)."""
        n = self.plan.d_state
        nn.init.uniform_(self.dt_proj.weight, -self.plan.dt_rank**-0.5, self.plan.dt_rank**-0.5)
        with torch.no_grad():
            dt = torch.exp(
                torch.rand_like(self.dt_proj.bias) * (math.log(_DT_MAX) - math.log(_DT_MIN))
                + math.log(_DT_MIN)
            ).clamp(min=_DT_FLOOR)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            a = torch.arange(1, n + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(a).expand_as(self.A_log))
            self.D.fill_(1.0)

    def new_state(
        self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> Mamba1State:
        """Constant in `max_len` (kept for the common `new_state` signature): an SSM's state does not grow."""
        i = self.plan.d_inner
        return Mamba1State(
            conv_BIW=torch.zeros(batch, i, self.plan.d_conv, device=device, dtype=dtype),
            ssm_BIN=torch.zeros(batch, i, self.plan.d_state, device=device, dtype=dtype),
        )

    def forward(self, x_BTD: Tensor, state: Mamba1State | None = None) -> Tensor:
        """Full sequence (state=None) or continuation of `state` (prefill fills it, T=1 decodes)."""
        n, r = self.plan.d_state, self.plan.dt_rank
        t = x_BTD.shape[1]
        x_BTI, z_BTI = self.in_proj(x_BTD).chunk(2, dim=-1)
        conv_state, ssm_state = (state.conv_BIW, state.ssm_BIN) if state is not None else (None, None)
        conv_BIT = into_state(causal_depthwise_conv(x_BTI.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                                    conv_state), conv_state)
        # token-major once: SiLU keeps this copy, and x_proj and the scan read its output as a
        # view, where a transposed SiLU output was copied again by x_proj's matmul at batch > 1;
        # the channel-major original goes at once, not at the return: a full-recompute re-run
        # that stops early inside out_proj kept it alive in this frame (verify --layout,
        # mamba-2.8b: a d_inner/tp × T tensor a layer's re-run)
        x_BTI = conv_BIT.transpose(1, 2).contiguous()
        del conv_BIT
        x_BTI = F.silu(x_BTI)
        dt_BTR, b_BTN, c_BTN = self.x_proj(x_BTI).split([r, n, n], dim=-1)
        if self.dt_layernorm is not None and self.b_layernorm is not None and self.c_layernorm is not None:
            dt_BTR, b_BTN, c_BTN = self.dt_layernorm(dt_BTR), self.b_layernorm(b_BTN), self.c_layernorm(c_BTN)
        b_BTN, c_BTN = self.bc(b_BTN), self.bc(c_BTN)
        A_IN = -torch.exp(self.A_log.float())
        # softplus and the D skip inside the scan, as mamba_ssm's selective_scan_fn(delta_softplus=True)
        y_BTI = into_state(selective_scan(x_BTI, self.dt_proj(dt_BTR), A_IN, b_BTN, c_BTN, ssm_state, D_I=self.D,
                                          dt_softplus=True), ssm_state)
        # in the projections' dtype (autocast's 16 bits over fp32 weights), as mamba_ssm's scan
        # returns its input's: the gate keeps it for the backward
        y_BTI = silu_gate(y_BTI.to(z_BTI.dtype), z_BTI)
        if state is not None:
            state.advance(t)
        return self.out_proj(y_BTI)
