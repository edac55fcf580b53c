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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archplan.modules.cache import LayerState
from archplan.modules.norms import RMSNorm
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
    else:
        x_pad = torch.cat([context_BCW[..., 1:].to(x_BCT.dtype), x_BCT], dim=-1)
    y_BCT = F.conv1d(x_pad, weight_C1W, bias_C, groups=x_BCT.shape[1])
    return y_BCT, x_pad[..., -w:]


def scan_chunk_len(seq_len: int) -> int:
    """Chunk length ⌈√T⌉: the two sequential loops then take ⌈√T⌉ + T/⌈√T⌉ ≈ 2√T steps."""
    return math.isqrt(max(seq_len, 1) - 1) + 1


def selective_scan(
    u_BTI: Tensor, dt_BTI: Tensor, A_IN: Tensor, B_BTN: Tensor, C_BTN: Tensor, h0_BIN: Tensor | None
) -> tuple[Tensor, Tensor]:
    """y (B, T, I) without the D skip, and the final state (B, I, N); fp32: one token (a decode
    step) by `selective_step`, more by `chunked_scan`."""
    if u_BTI.shape[1] == 1:
        return selective_step(u_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h0_BIN)
    return chunked_scan(u_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h0_BIN)


def chunked_scan(
    u_BTI: Tensor, dt_BTI: Tensor, A_IN: Tensor, B_BTN: Tensor, C_BTN: Tensor, h0_BIN: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Fast selective scan: y (B, T, I) without the D skip, and the final state (B, I, N); fp32.

    Two-level chunked form of the linear recurrence h_t = a_t ⊙ h_{t−1} + b_t with a = exp(Δ·A),
    b = Δ·x·B. T is cut into n_c chunks of L ≈ √T, and every step below works on all chunks at
    once, so there are ≈ 3√T Python steps instead of T, each on a (B, n_c, I, N) tensor small
    enough to stay in cache (no (B, T, I, N) tensor is ever materialised):
      1. each chunk's state at its end, starting from zero (L steps);
      2. the state entering each chunk (n_c steps on (B, I, N)); a chunk's total decay is
         Π exp(Δ_t·A) = exp((Σ Δ_t)·A);
      3. the L steps again from the true entering states, contracting each h_t with C_t.
    Only decays ≤ 1 are multiplied (never exp(−cumsum), as the log-space trick needs), so it is
    exact for any Δ. Padding T up to n_c·L with Δ = 0 gives a = 1, b = 0: padded steps leave the
    state unchanged, and their outputs are neither computed by the contraction nor returned, so
    the contraction counts exactly 2·B·T·I·N.
    """
    b, t, i = u_BTI.shape
    chunk = scan_chunk_len(t)
    n_chunks = math.ceil(t / chunk)
    pad = n_chunks * chunk - t
    A = A_IN.float()
    dt_BCLI = F.pad(dt_BTI.float(), (0, 0, 0, pad)).reshape(b, n_chunks, chunk, i)
    dtu_BCLI = F.pad((dt_BTI * u_BTI).float(), (0, 0, 0, pad)).reshape(b, n_chunks, chunk, i)
    B_BCLN = F.pad(B_BTN.float(), (0, 0, 0, pad)).reshape(b, n_chunks, chunk, -1)
    C_BCLN = F.pad(C_BTN.float(), (0, 0, 0, pad)).reshape(b, n_chunks, chunk, -1)

    def step(j: int, h_BCIN: Tensor) -> Tensor:
        # a and b of step j for every chunk, rebuilt in each pass rather than kept: holding all
        # of them would be (B, T, I, N) twice, and fresh memory of that size costs more than the
        # recomputation (page faults dominate CPU elementwise throughput at that size)
        a_BCIN = torch.exp(dt_BCLI[:, :, j, :, None] * A)
        b_BCIN = dtu_BCLI[:, :, j, :, None] * B_BCLN[:, :, j, None, :]
        return torch.addcmul(b_BCIN, a_BCIN, h_BCIN)

    h_BCIN = torch.zeros(b, n_chunks, i, A.shape[1], device=u_BTI.device)
    for j in range(chunk):
        h_BCIN = step(j, h_BCIN)

    chunk_decay_BCIN = torch.exp(dt_BCLI.sum(dim=2)[..., None] * A)
    state_BIN = h0_BIN.float() if h0_BIN is not None else torch.zeros_like(h_BCIN[:, 0])
    entering = []
    for c in range(n_chunks):
        entering.append(state_BIN)
        state_BIN = torch.addcmul(h_BCIN[:, c], chunk_decay_BCIN[:, c], state_BIN)

    h_BCIN = torch.stack(entering, dim=1)
    ys = []
    for j in range(chunk):
        h_BCIN = step(j, h_BCIN)
        # the last chunk holds real tokens only up to position t − 1; skip its padded steps
        real = n_chunks if j < chunk - pad else n_chunks - 1
        y_BcI = torch.matmul(h_BCIN[:, :real], C_BCLN[:, :real, j, :, None]).squeeze(-1)
        ys.append(F.pad(y_BcI, (0, 0, 0, n_chunks - real)))
    y_BTI = torch.stack(ys, dim=2).reshape(b, n_chunks * chunk, i)[:, :t]
    return y_BTI, state_BIN


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
    h = h0_BIN.float() if h0_BIN is not None else torch.zeros(b, i, A.shape[1], device=u_BTI.device)
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
        context = state.conv_BIW if state is not None else None
        conv_BIT, next_context_BIW = causal_depthwise_conv(
            x_BTI.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, context
        )
        x_BTI = F.silu(conv_BIT.transpose(1, 2))
        dt_BTR, b_BTN, c_BTN = self.x_proj(x_BTI).split([r, n, n], dim=-1)
        if self.dt_layernorm is not None and self.b_layernorm is not None and self.c_layernorm is not None:
            dt_BTR, b_BTN, c_BTN = self.dt_layernorm(dt_BTR), self.b_layernorm(b_BTN), self.c_layernorm(c_BTN)
        b_BTN, c_BTN = self.bc(b_BTN), self.bc(c_BTN)
        dt_BTI = F.softplus(self.dt_proj(dt_BTR).float())
        A_IN = -torch.exp(self.A_log.float())
        h0 = state.ssm_BIN if state is not None else None
        y_BTI, h_BIN = selective_scan(x_BTI, dt_BTI, A_IN, b_BTN, c_BTN, h0)
        y_BTI = y_BTI + x_BTI.float() * self.D.float()
        y_BTI = y_BTI.to(x_BTD.dtype) * F.silu(z_BTI)
        if state is not None:
            state.conv_BIW.copy_(next_context_BIW.detach())
            state.ssm_BIN.copy_(h_BIN.detach())
            state.advance(t)
        return self.out_proj(y_BTI)
