"""Mamba-2 / SSD mixer (Dao & Gu 2024) in pure PyTorch, with its constant decode state.

Parameter layout is state-spaces/mamba `mamba2.Mamba2` (no d_mlp split): in_proj D → [z, x, B, C, dt]
= 2·I + 2·G·N + Hs, depthwise conv1d over X = I + 2·G·N channels, dt_bias / A_log / D of Hs each,
the gated RMSNorm `norm` (I), out_proj I → D.

The SSD layer runs chunked as `ssd_minimal.py` (Dao & Gu 2024 §6, Listing 1) with the matmuls
written out so the counter sees exactly what docs/architecture.md counts per chunk of q tokens:
C·Bᵀ per group (2·q²·N·G), (C·Bᵀ ∘ L)·X per head (2·q²·P·Hs), chunk states (2·q·N·P·Hs),
state → output (2·q·N·P·Hs); the recurrence between chunks is an elementwise loop. `ssd_reference` is
the token-by-token recurrence (`Mamba2.step`), kept beside it so a test proves them equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archplan.modules.cache import LayerState
from archplan.modules.mamba1 import causal_depthwise_conv, into_state
from archplan.modules.recompute import forward_autocast, input_grads, leaves, recomputed
from archplan.resolve import Mamba2Plan

# mamba2.Mamba2 defaults: A ~ U(1, 16), Δ ~ logU(1e-3, 1e-1) floored at 1e-4.
_A_MIN, _A_MAX = 1.0, 16.0
_DT_MIN, _DT_MAX, _DT_FLOOR = 1e-3, 1e-1, 1e-4


@dataclass(eq=False)
class Mamba2State(LayerState):
    """Constant decode state (`Mamba2.allocate_inference_cache`): the last W conv inputs over the
    X = I + 2·G·N conv channels (B, X, W) and the SSM state (B, Hs, P, N)."""

    conv_BXW: Tensor
    ssm_BHsPN: Tensor
    seen: int = 0

    def tensors(self) -> list[Tensor]:
        return [self.conv_BXW, self.ssm_BHsPN]


class GatedRMSNorm(nn.Module):
    """rmsnorm(y ⊙ SiLU(z)) · w over groups of I/G channels (mamba_ssm `RMSNormGated` with
    norm_before_gate=False and group_size = d_inner / ngroups, as `mamba2.Mamba2` builds it)."""

    def __init__(self, dim: int, n_groups: int, eps: float) -> None:
        super().__init__()
        self.n_groups = n_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y_BTI: Tensor, z_BTI: Tensor) -> Tensor:
        # one unit keeping only y, z and the weight, which recomputes the rest (all elementwise,
        # nothing counted), as mamba_ssm's fused `RMSNormGated` (layernorm_gated.py `LayerNormFn`
        # saves x, weight, z and the per-row rstd); plain autograd would keep four fp32 copies of
        # the d_inner-wide activations
        return recomputed(partial(_gated_rms_norm, n_groups=self.n_groups, eps=self.eps), y_BTI, z_BTI, self.weight)


def _gated_rms_norm(y_BTI: Tensor, z_BTI: Tensor, weight_I: Tensor, n_groups: int, eps: float) -> Tensor:
    g = (y_BTI.float() * F.silu(z_BTI.float())).unflatten(-1, (n_groups, -1))
    g = F.rms_norm(g, (g.shape[-1],), None, eps).flatten(-2)
    return (g * weight_I.float()).to(y_BTI.dtype)


def segsum(x: Tensor) -> Tensor:
    """(..., q) → (..., q, q): out[i, j] = Σ_{k=j+1..i} x_k for i ≥ j, −inf above the diagonal.

    The stable cumulative-sum form of ssd_minimal.py `segsum` (no difference of two cumsums, so
    no cancellation); exp of it is the causal decay matrix L of Dao & Gu 2024 eq. 4. The sums run
    along the last, contiguous dim (rows j, columns i) and the result is returned transposed:
    a cumsum over a strided dim is several times slower on CPU.
    """
    q = x.shape[-1]
    x_JI = x[..., None, :].expand(*x.shape, q)
    after_j = torch.triu(torch.ones(q, q, dtype=torch.bool, device=x.device), diagonal=1)
    sums_JI = torch.cumsum(x_JI.masked_fill(~after_j, 0), dim=-1)
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device), diagonal=0)
    return sums_JI.transpose(-1, -2).masked_fill(~causal, -torch.inf)


def ssd_chunked(
    x_BTHsP: Tensor,
    dt_BTHs: Tensor,
    A_Hs: Tensor,
    B_BTGN: Tensor,
    C_BTGN: Tensor,
    chunk_size: int,
    h0_BHsPN: Tensor | None,
    D_Hs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SSD, chunked (ssd_minimal.py `ssd_minimal_discrete` with X·Δ, A·Δ): y (B, T, Hs, P), plus
    the D skip x·D when `D_Hs` is given (inside, as `mamba_chunk_scan_combined`'s D), computed in
    fp32 and returned in x's dtype as that kernel's `out` is (`_chunk_scan_fwd` allocates it like
    x), and the final state (B, Hs, P, N), fp32.

    q = min(chunk_size, T); T is padded with Δ = 0 to n_c·q tokens (decay 1, input 0: the state
    passes through unchanged), as docs/architecture.md counts it. Heads are kept as (G, Hs/G) so
    B and C are contracted per group without being repeated per head.

    As one autograd unit (`_ChunkedSSD`) it keeps its inputs and the outputs of two of its four
    contractions (C·Bᵀ, the chunk states but the last) for the backward, and recomputes the rest
    there; plain autograd would also keep the (q × q) decay and C·Bᵀ∘L blocks of every head and
    the chunk states twice.
    """
    if torch.jit.is_tracing():
        # fvcore counts a jit trace, to which an autograd Function is one opaque prim::PythonOp
        y_BTHsP, state_BHsPN, _, _ = _ssd(x_BTHsP, dt_BTHs, A_Hs, B_BTGN, C_BTGN, chunk_size, h0_BHsPN)
        return _with_skip(y_BTHsP, x_BTHsP, D_Hs), state_BHsPN
    return _ChunkedSSD.apply(x_BTHsP, dt_BTHs, A_Hs, B_BTGN, C_BTGN, h0_BHsPN, D_Hs, chunk_size)


def _with_skip(y_BTHsP: Tensor, x_BTHsP: Tensor, D_Hs: Tensor | None) -> Tensor:
    """The fp32 scan output plus the D skip, in x's dtype (the kernel's `out`)."""
    return (y_BTHsP + _skip(x_BTHsP, D_Hs) if D_Hs is not None else y_BTHsP).to(x_BTHsP.dtype)


def _skip(x_BTHsP: Tensor, D_Hs: Tensor) -> Tensor:
    return x_BTHsP.float() * D_Hs.float()[:, None]


@dataclass(frozen=True)
class _Operands:
    """Everything elementwise between SSD's inputs and its four contractions' operands."""

    b: int
    t: int
    q: int
    n_chunks: int
    x_BCGJLP: Tensor  # X·Δ per chunk
    B_BCGLN: Tensor
    C_BCGLN: Tensor
    decay_BCGJLS: Tensor  # L = exp(segsum(Δ·A)), Dao & Gu 2024 eq. 4
    xd_BCG_JP_L: Tensor  # X·Δ decayed to the chunk's end, heads of a group stacked as rows
    chunk_decay_BCGJ: Tensor
    Cd_BCGJLN: Tensor  # C decayed from the chunk's start, per head

    @classmethod
    def of(cls, x_BTHsP: Tensor, dt_BTHs: Tensor, A_Hs: Tensor, B_BTGN: Tensor, C_BTGN: Tensor,
           chunk_size: int) -> _Operands:
        b, t, hs, p = x_BTHsP.shape
        g, n = B_BTGN.shape[-2:]
        q = min(chunk_size, t)
        n_chunks = math.ceil(t / q)
        pad = n_chunks * q - t
        dt = F.pad(dt_BTHs.float(), (0, 0, 0, pad))
        x_BCLGJP = F.pad(x_BTHsP.float() * dt[:, :t, :, None], (0, 0, 0, 0, 0, pad)).reshape(
            b, n_chunks, q, g, hs // g, p
        )
        # log-decays Δ·A laid out (B, c, G, J, l) once (a small tensor), so the q×q decay matrices and
        # everything derived from them come out contiguous in the layout their matmuls read
        a_BCLGJ = (dt * A_Hs.float()).reshape(b, n_chunks, q, g, hs // g)
        a_BCGJL = a_BCLGJ.permute(0, 1, 3, 4, 2).contiguous()
        B_BCLGN = F.pad(B_BTGN.float(), (0, 0, 0, 0, 0, pad)).reshape(b, n_chunks, q, g, n)
        C_BCLGN = F.pad(C_BTGN.float(), (0, 0, 0, 0, 0, pad)).reshape(b, n_chunks, q, g, n)
        a_cum_BCGJL = torch.cumsum(a_BCGJL, dim=-1)
        x_BCGJLP = x_BCLGJP.permute(0, 1, 3, 4, 2, 5)
        C_BCGLN = C_BCLGN.permute(0, 1, 3, 2, 4)
        # each chunk's final state from its own inputs weighs X_s by exp(A_cum[-1] − A_cum[s])
        to_end_BCGJL = torch.exp(a_cum_BCGJL[..., -1:] - a_cum_BCGJL)
        xd_BCG_JP_L = (x_BCGJLP * to_end_BCGJL[..., None]).transpose(-1, -2).reshape(b, n_chunks, g, -1, q)
        # the entering state reaches output l decayed by exp(A_cum[l]), applied to C (per head)
        # rather than to the contraction's output, whose backward would then need that output
        Cd_BCGJLN = C_BCGLN[:, :, :, None] * torch.exp(a_cum_BCGJL)[..., None]
        return cls(b, t, q, n_chunks, x_BCGJLP, B_BCLGN.permute(0, 1, 3, 2, 4), C_BCGLN,
                   torch.exp(segsum(a_BCGJL)), xd_BCG_JP_L, torch.exp(a_cum_BCGJL[..., -1]), Cd_BCGJLN)

    def entering(self, states_BCG_JP_N: Tensor, h0_BHsPN: Tensor | None) -> tuple[Tensor, Tensor]:
        """The states entering each chunk (B, c, G, J, N, P), transposed as the output contraction
        reads them, and the final state (B, G, J, P, N): an elementwise recurrence over chunks."""
        b, c, g, _, n = states_BCG_JP_N.shape
        j = self.chunk_decay_BCGJ.shape[-1]
        states_BCGJPN = states_BCG_JP_N.reshape(b, c, g, j, -1, n)
        # The first entering state is h0 (or zero) written as 0·states[0] (+ h0): with n_c = 1 the
        # chunk states would otherwise feed only the returned final state, and plain autograd
        # (the traced path) would skip their backward when only y is differentiated: a
        # forward+backward would count less than 3× the forward. This way all four contractions
        # are differentiated whatever n_c, as the fused kernels do (mamba_chunk_scan_combined).
        state_BGJPN = states_BCGJPN[:, 0] * 0.0
        if h0_BHsPN is not None:
            state_BGJPN = state_BGJPN + h0_BHsPN.float().reshape(state_BGJPN.shape)
        entering = []
        for k in range(c):
            entering.append(state_BGJPN)
            state_BGJPN = torch.addcmul(states_BCGJPN[:, k], self.chunk_decay_BCGJ[:, k, ..., None, None], state_BGJPN)
        return torch.stack(entering, dim=1).transpose(-1, -2), state_BGJPN

    def output(self, y_BCGJLP: Tensor) -> Tensor:
        """(B, c, G, J, q, P) → (B, T, Hs, P)."""
        b, c, g, j, q, p = y_BCGJLP.shape
        return y_BCGJLP.permute(0, 1, 4, 2, 3, 5).reshape(b, c * q, g * j, p)[:, : self.t]

    def per_chunk(self, y_BTHsP: Tensor) -> Tensor:
        """(B, T, Hs, P) → (B, c, G, J, q, P), zero-padded: the inverse of `output`."""
        g, j = self.decay_BCGJLS.shape[2:4]
        padded = F.pad(y_BTHsP, (0, 0, 0, 0, 0, self.n_chunks * self.q - self.t))
        return padded.reshape(self.b, self.n_chunks, self.q, g, j, -1).permute(0, 1, 3, 4, 2, 5)


def _ssd(
    x_BTHsP: Tensor, dt_BTHs: Tensor, A_Hs: Tensor, B_BTGN: Tensor, C_BTGN: Tensor, chunk_size: int,
    h0_BHsPN: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, the final state (B, Hs, P, N), and the outputs of the first and third contractions
    (C·Bᵀ per group and the chunk states), which `_ChunkedSSD` keeps for its backward.

    Contractions are matmuls, never einsum: torch.einsum turns a contraction over a size-1 dim
    (q = 1 when decoding, N = 1) into an uncounted elementwise product; matmul always reaches bmm.
    """
    ops = _Operands.of(x_BTHsP, dt_BTHs, A_Hs, B_BTGN, C_BTGN, chunk_size)
    # 1. within chunks (diagonal blocks): Y = (C·Bᵀ ∘ L)·X
    cb_BCGLS = torch.matmul(ops.C_BCGLN, ops.B_BCGLN.transpose(-1, -2))
    y_diag_BCGJLP = torch.matmul(cb_BCGLS[:, :, :, None] * ops.decay_BCGJLS, ops.x_BCGJLP)
    # 2. each chunk's final state from its own inputs, B contracted once per group
    states_BCG_JP_N = torch.matmul(ops.xd_BCG_JP_L, ops.B_BCGLN)
    # 3. states entering each chunk, and 4. entering state → outputs
    entering_BCGJNP, state_BGJPN = ops.entering(states_BCG_JP_N, h0_BHsPN)
    y_off_BCGJLP = torch.matmul(ops.Cd_BCGJLN, entering_BCGJNP)
    b, hs, p, n = ops.b, x_BTHsP.shape[2], x_BTHsP.shape[3], B_BTGN.shape[-1]
    return ops.output(y_diag_BCGJLP + y_off_BCGJLP), state_BGJPN.reshape(b, hs, p, n), cb_BCGLS, states_BCG_JP_N


class _ChunkedSSD(torch.autograd.Function):
    """SSD keeping its inputs, C·Bᵀ (B, c, G, q, q) and the chunk states but the last (B, c − 1,
    Hs·P, N), fp32, for the backward, which recomputes every elementwise tensor and differentiates each of the four
    contractions by the two matmuls autograd would run for it: a forward + backward executes the
    same counted ops as plain autograd (backward = 2 × the forward's contractions) and gives the
    same gradients, within rounding. mamba_ssm's `mamba_chunk_scan_combined` also recomputes C·Bᵀ
    and the chunk states (`_mamba_chunk_scan_combined_bwd`); here they are kept, since
    recomputing them would count two of the contractions a fourth time."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x_BTHsP: Tensor, dt_BTHs: Tensor, A_Hs: Tensor,
        B_BTGN: Tensor, C_BTGN: Tensor, h0_BHsPN: Tensor | None, D_Hs: Tensor | None, chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        y, state, cb, states = _ssd(x_BTHsP, dt_BTHs, A_Hs, B_BTGN, C_BTGN, chunk_size, h0_BHsPN)
        # the last chunk's states feed only the final state, whose backward does not read them
        ctx.save_for_backward(x_BTHsP, dt_BTHs, A_Hs, B_BTGN, C_BTGN, h0_BHsPN, D_Hs, cb, states[:, :-1].clone())
        ctx.chunk_size, ctx.autocast = chunk_size, forward_autocast(x_BTHsP)
        return _with_skip(y, x_BTHsP, D_Hs), state

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dy_BTHsP: Tensor, dstate_BHsPN: Tensor
    ) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad[:7]
        *saved, cb_saved, states_saved = ctx.saved_tensors
        with torch.enable_grad(), ctx.autocast:
            inputs = leaves(saved, needs)
            x, dt, A, B, C, h0, D = inputs
            cb_BCGLS = cb_saved.detach().requires_grad_()
            states_BCG_JP_N = torch.cat([states_saved, states_saved.new_zeros(
                (states_saved.shape[0], 1, *states_saved.shape[2:]))], dim=1).requires_grad_()
            ops = _Operands.of(x, dt, A, B, C, ctx.chunk_size)
            cbl_BCGJLS = cb_BCGLS[:, :, :, None] * ops.decay_BCGJLS
            entering_BCGJNP, state_BGJPN = ops.entering(states_BCG_JP_N, h0)
            dy_BCGJLP = ops.per_chunk(dy_BTHsP.float())
            # y = (C·Bᵀ∘L)·X + Cd·entering: each matmul's backward, dA = dY·Bᵀ and dB = Aᵀ·dY
            dcbl = torch.matmul(dy_BCGJLP, ops.x_BCGJLP.transpose(-1, -2))
            dx = torch.matmul(cbl_BCGJLS.detach().transpose(-1, -2), dy_BCGJLP)
            dCd = torch.matmul(dy_BCGJLP, entering_BCGJNP.detach().transpose(-1, -2))
            dentering = torch.matmul(ops.Cd_BCGJLN.detach().transpose(-1, -2), dy_BCGJLP)
            dcb, dstates = torch.autograd.grad(
                (cbl_BCGJLS, entering_BCGJNP, state_BGJPN), (cb_BCGLS, states_BCG_JP_N),
                (dcbl, dentering, dstate_BHsPN.float().reshape(state_BGJPN.shape)), retain_graph=True,
            )
            # C·Bᵀ and the chunk states xd·B; B's two gradients go to autograd apart, which sums them
            # in B's dtype as plain autograd does (under autocast each product has its own bf16 copy of B)
            dC_cb = torch.matmul(dcb, ops.B_BCGLN)
            dB_cb = torch.matmul(dcb.transpose(-1, -2), ops.C_BCGLN)
            dxd = torch.matmul(dstates, ops.B_BCGLN.transpose(-1, -2))
            dB_states = torch.matmul(ops.xd_BCG_JP_L.detach().transpose(-1, -2), dstates)
            skip = [_skip(x, D)] if D is not None else []
            found = input_grads(
                (*skip, cbl_BCGJLS, entering_BCGJNP, state_BGJPN, ops.x_BCGJLP, ops.Cd_BCGJLN, ops.C_BCGLN,
                 ops.B_BCGLN, ops.B_BCGLN, ops.xd_BCG_JP_L),
                (*(dy_BTHsP.float() for _ in skip), dcbl, dentering, dstate_BHsPN.float().reshape(state_BGJPN.shape), dx,
                 dCd, dC_cb, dB_cb, dB_states, dxd),
                inputs, needs,
            )
        return (*found, None)


def ssd_reference(
    x_BTHsP: Tensor,
    dt_BTHs: Tensor,
    A_Hs: Tensor,
    B_BTGN: Tensor,
    C_BTGN: Tensor,
    h0_BHsPN: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Token by token, as `Mamba2.step`: h = exp(Δ·A)·h + Δ·x ⊗ B, y = h·C (tests only)."""
    b, t, hs, p = x_BTHsP.shape
    g, n = B_BTGN.shape[-2:]
    per_group = hs // g
    h = (h0_BHsPN.float() if h0_BHsPN is not None
         else torch.zeros(b, hs, p, n, device=x_BTHsP.device, dtype=torch.float32))
    ys = []
    for s in range(t):
        dt = dt_BTHs[:, s].float()
        Bh = B_BTGN[:, s].float().repeat_interleave(per_group, dim=1)
        Ch = C_BTGN[:, s].float().repeat_interleave(per_group, dim=1)
        dx = x_BTHsP[:, s].float() * dt[..., None]
        h = torch.exp(dt * A_Hs.float())[..., None, None] * h + dx[..., None] * Bh[:, :, None, :]
        ys.append((h * Ch[:, :, None, :]).sum(-1))
    return torch.stack(ys, dim=1), h


class Mamba2Mixer(nn.Module):
    """mamba2.Mamba2: in_proj → [z, xBC, dt]; causal conv + SiLU on xBC → x, B, C; SSD with
    Δ = softplus(dt + dt_bias) and the D skip; gated RMSNorm with z; out_proj."""

    def __init__(self, plan: Mamba2Plan, d_model: int) -> None:
        super().__init__()
        self.plan = plan
        i, hs = plan.d_inner, plan.n_heads
        gn = plan.n_groups * plan.d_state
        self.in_proj = nn.Linear(d_model, 2 * i + 2 * gn + hs, bias=plan.proj_bias)
        x = plan.conv_dim
        self.conv1d = nn.Conv1d(x, x, plan.d_conv, groups=x, bias=plan.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(hs))
        self.A_log = nn.Parameter(torch.empty(hs))
        self.D = nn.Parameter(torch.empty(hs))
        self.norm = GatedRMSNorm(i, plan.n_groups, plan.norm.eps)
        self.out_proj = nn.Linear(i, d_model, bias=plan.proj_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba2.Mamba2.__init__: dt_bias = softplus⁻¹(Δ), Δ ~ logU(dt_min, dt_max); A ~ U(1, 16)
        stored as log; D = 1."""
        with torch.no_grad():
            dt = torch.exp(
                torch.rand_like(self.dt_bias) * (math.log(_DT_MAX) - math.log(_DT_MIN)) + math.log(_DT_MIN)
            ).clamp(min=_DT_FLOOR)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(_A_MIN, _A_MAX)))
            self.D.fill_(1.0)
        self.norm.reset_parameters()

    def new_state(
        self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> Mamba2State:
        """Constant in `max_len` (kept for the common `new_state` signature)."""
        plan = self.plan
        return Mamba2State(
            conv_BXW=torch.zeros(batch, plan.conv_dim, plan.d_conv, device=device, dtype=dtype),
            ssm_BHsPN=torch.zeros(
                batch, plan.n_heads, plan.head_dim, plan.d_state, device=device, dtype=dtype
            ),
        )

    def forward(self, x_BTD: Tensor, state: Mamba2State | None = None) -> Tensor:
        """Full sequence (state=None) or continuation of `state` (prefill fills it, T=1 decodes)."""
        plan = self.plan
        i, hs, p, g, n = plan.d_inner, plan.n_heads, plan.head_dim, plan.n_groups, plan.d_state
        z_BTI, xbc_BTX, dt_BTHs = self.in_proj(x_BTD).split([i, plan.conv_dim, hs], dim=-1)
        # the scan's tokens: under context parallelism in_proj's output is the whole sequence of
        # the rank's heads, not the T/cp tokens it read (distributed/context.py `mamba_context`)
        b, t, _ = xbc_BTX.shape
        conv_state, ssm_state = (state.conv_BXW, state.ssm_BHsPN) if state is not None else (None, None)
        conv_BXT = into_state(causal_depthwise_conv(xbc_BTX.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                                    conv_state), conv_state)
        x_BTI, B_BTGN, C_BTGN = F.silu(conv_BXT.transpose(1, 2)).split([i, g * n, g * n], dim=-1)
        x_BTHsP = x_BTI.reshape(b, t, hs, p)
        dt_BTHs = F.softplus(dt_BTHs.float() + self.dt_bias.float())
        A_Hs = -torch.exp(self.A_log.float())
        y_BTHsP = into_state(ssd_chunked(
            x_BTHsP,
            dt_BTHs,
            A_Hs,
            B_BTGN.reshape(b, t, g, n),
            C_BTGN.reshape(b, t, g, n),
            plan.chunk_size,
            ssm_state,
            self.D,
        ), ssm_state)
        y_BTI = self.norm(y_BTHsP.reshape(b, t, i), z_BTI)
        if state is not None:
            state.advance(t)
        return self.out_proj(y_BTI)
