"""StripedHyena's hyena mixer (Poli et al. 2023, StripedHyena; togethercomputer/stripedhyena
`model.py` ParallelGatedConvBlock's projections / ParallelHyenaFilter / out_filter_dense, `engine.py`
parallel_fir, parallel_iir, step_fir, step_iir). The block's two RMSNorms and gated MLP are the
layer's `norm1`, `norm2` and GLU `ffn` (archplan/modules/block.py), attention blocks are `A` layers.

    z = projections(x)                                       (B, 3D, T)
    z = short FIR (depthwise, k taps, optional bias)         left padded
    x2, x1, v = split(z);  u = x1·v
    y = x2 · (h ∗ u + D·u),  h(t) = Re Σ_s r_s·p_s^t           FFT convolution of length 2T
    out = out_filter_dense(y)
Modal filter: poles p and residues r are (D/g, S, 1, 2) real pairs; filter c serves channels
c·g … c·g + g − 1 (g = filter_groups). h is built as [Re r, −Im r]·[|p|^t cos tθ; |p|^t sin tθ],
one real bmm. (`column_split_hyena` only permutes checkpoint columns; it changes no shape.)

Decode (stripedhyena RecurrentInferenceParams): the FIR's last k − 1 inputs (B, 3D, k − 1) and the
modal state x (B, D, S) complex, fp32 pairs: x ← p·x + u, y = x2·(Re Σ r·x + D·u). A prefill into
a fresh state runs the FFT path and takes x_T = Σ_j p^(T−1−j)·u_j (one matmul with the same basis),
as the reference's `prefill_via_modal_fft` does by FFT; a single token, or any continuation,
steps token by token (from a zero state one step is the T = 1 convolution, without a filter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archplan.modules.cache import LayerState
from archplan.modules.hyena import causal_short_conv
from archplan.modules.recompute import bmm_backward, forward_autocast, input_grads, leaves, recomputed
from archplan.modules.s4 import fft_causal_conv
from archplan.resolve import StripedHyenaPlan


@dataclass(eq=False)
class StripedHyenaState(LayerState):
    fir_BCJ: Tensor  # (B, 3D, k − 1), activation dtype
    modal_BDS2: Tensor  # (B, D, S, 2), fp32 (complex64 in the reference)
    seen: int = 0

    def tensors(self) -> list[Tensor]:
        return [self.fir_BCJ, self.modal_BDS2]


def _modal_basis(p_GS2: Tensor, length: int) -> Tensor:
    """(G, 2S, T): rows [Re; Im] of p_s^t, fp32 (0^0 = 1, so a zero pole is a one-tap filter)."""
    mag_GS1 = torch.hypot(p_GS2[..., 0], p_GS2[..., 1])[..., None]
    angle_GS1 = torch.atan2(p_GS2[..., 1], p_GS2[..., 0])[..., None]
    t_T = torch.arange(length, device=p_GS2.device, dtype=torch.float32)
    power_GST = torch.pow(mag_GS1, t_T)
    return torch.cat([power_GST * torch.cos(angle_GS1 * t_T), power_GST * torch.sin(angle_GS1 * t_T)], dim=1)


def _residue_row(r_GS2: Tensor) -> Tensor:
    """(G, 1, 2S) = [Re r, −Im r]: Re(r·p^t) as one real contraction with the basis."""
    return torch.cat([r_GS2[..., 0], -r_GS2[..., 1]], dim=1)[:, None, :]


def _modal_filter(p_GS2: Tensor, r_GS2: Tensor, length: int) -> Tensor:
    """h (G, T) = Re Σ_s r_s·p_s^t, one (G, 1, 2S) × (G, 2S, T) bmm."""
    return (_residue_row(r_GS2) @ _modal_basis(p_GS2, length))[:, 0]


class _ModalFilter(torch.autograd.Function):
    """The modal filter keeping only poles and residues (G·S each): the backward recomputes the
    basis (elementwise) and runs the bmm autograd would for each operand needing a gradient, so the
    counted ops and the gradients are plain autograd's. Plain autograd keeps about five (G, S, T)
    tensors of the basis, as large as the layer's token activations at G = d_model."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, p_GS2: Tensor, r_GS2: Tensor, length: int
    ) -> Tensor:
        ctx.save_for_backward(p_GS2, r_GS2)
        ctx.length, ctx.autocast = length, forward_autocast(p_GS2)
        return _modal_filter(p_GS2, r_GS2, length)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dh_GT: Tensor
    ) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad[:2]
        with torch.enable_grad(), ctx.autocast:
            p_GS2, r_GS2 = inputs = leaves(ctx.saved_tensors, needs)
            row_G1N, basis_GNT = _residue_row(r_GS2), _modal_basis(p_GS2, ctx.length)
            dh_G1T = dh_GT[:, None]
            # the bmm's backward: d row = dh·basisᵀ, d basis = rowᵀ·dh
            outputs: list[Tensor] = []
            grads: list[Tensor] = []
            bmm_backward(row_G1N, basis_GNT, dh_G1T, outputs, grads)
            found = input_grads(outputs, grads, inputs, needs)
        return (*found, None)


def gated_skip(x2_BDT: Tensor, x1_BDT: Tensor, v_BDT: Tensor, y_BDT: Tensor, D_D: Tensor) -> Tensor:
    """x2 · (y + D·u), u = x1·v, in fp32 (the reference's `parallel_iir` epilogue), as one unit
    keeping x2, x1 and v (views of the FIR's output, which x1·v keeps anyway), the conv output y
    (fp32) and D; plain autograd keeps fp32 copies of x2 and u and the sum y + D·u, three
    (B, D, T) fp32 tensors for the one it needs. y is the first T columns of the FFT
    convolution's 2T output: kept as it is, it would hold that output's storage, so a copy is."""
    return recomputed(_gated_skip, x2_BDT, x1_BDT, v_BDT, y_BDT.contiguous(), D_D)


def _gated_skip(x2_BDT: Tensor, x1_BDT: Tensor, v_BDT: Tensor, y_BDT: Tensor, D_D: Tensor) -> Tensor:
    return x2_BDT.float() * (y_BDT + D_D.float()[:, None] * (x1_BDT * v_BDT).float())


class StripedHyenaMixer(nn.Module):
    """Letters: D channels, G = D/g filters, S poles, T positions."""

    def __init__(self, plan: StripedHyenaPlan, d_model: int) -> None:
        super().__init__()
        self.plan = plan
        self.d_model = d_model
        filters = d_model // plan.filter_groups
        self.projections = nn.Linear(d_model, 3 * d_model)
        self.short_filter_weight = nn.Parameter(torch.empty(3 * d_model, 1, plan.short_filter))
        self.short_filter_bias = nn.Parameter(torch.empty(3 * d_model)) if plan.short_filter_bias else None
        self.D = nn.Parameter(torch.empty(d_model))
        self.poles = nn.Parameter(torch.empty(filters, plan.state_size, 1, 2))
        self.residues = nn.Parameter(torch.empty(filters, plan.state_size, 1, 2))
        self.out_filter_dense = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """stripedhyena ParallelHyenaFilter.__init__: FIR and its bias N(0, 1), D = 0, poles
        (1e-2·N, 1e-3·N) (real, imaginary), residues N(0, 1)."""
        with torch.no_grad():
            nn.init.normal_(self.short_filter_weight)
            if self.short_filter_bias is not None:
                nn.init.normal_(self.short_filter_bias)
            nn.init.zeros_(self.D)
            nn.init.normal_(self.poles[..., 0], std=1e-2)
            nn.init.normal_(self.poles[..., 1], std=1e-3)
            nn.init.normal_(self.residues)

    def new_state(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> StripedHyenaState:
        d, p = self.d_model, self.plan
        return StripedHyenaState(
            fir_BCJ=torch.zeros(batch, 3 * d, p.short_filter - 1, device=device, dtype=dtype),
            modal_BDS2=torch.zeros(batch, d, p.state_size, 2, device=device, dtype=torch.float32),
        )

    def _recurrence(self, u_BDT: Tensor, state: StripedHyenaState) -> Tensor:
        """stripedhyena engine `step_iir`, token by token: x ← p·x + u_t, y_t = Re Σ r·x."""
        g = self.plan.filter_groups
        p_DS = torch.view_as_complex(self.poles.float()[:, :, 0].contiguous()).repeat_interleave(g, dim=0)
        r_DS = torch.view_as_complex(self.residues.float()[:, :, 0].contiguous()).repeat_interleave(g, dim=0)
        x_BDS = torch.view_as_complex(state.modal_BDS2)
        ys = []
        for t in range(u_BDT.shape[-1]):
            x_BDS = p_DS * x_BDS + u_BDT[:, :, t, None]
            ys.append((r_DS * x_BDS).sum(-1).real)
        state.modal_BDS2.copy_(torch.view_as_real(x_BDS))
        return torch.stack(ys, dim=-1)

    def forward(self, x_BTD: Tensor, state: StripedHyenaState | None = None) -> Tensor:
        d, g = self.d_model, self.plan.filter_groups
        z_BCT = self.projections(x_BTD).transpose(1, 2)
        t = z_BCT.shape[2]  # the length convolved: the whole sequence under context parallelism
        tail = state.fir_BCJ if state is not None else None
        z_BCT, next_tail = causal_short_conv(z_BCT, self.short_filter_weight, self.short_filter_bias, tail)
        x2_BDT, x1_BDT, v_BDT = z_BCT.split(d, dim=1)
        u_BDT = (x1_BDT * v_BDT).float()
        # a single token into a fresh state steps too: decoding costs the same at every position
        if state is not None and (state.seen > 0 or t == 1):
            y_BDT = self._recurrence(u_BDT, state)
        else:
            p_GS2, r_GS2 = self.poles.float()[:, :, 0], self.residues.float()[:, :, 0]
            if torch.jit.is_tracing():
                # fvcore counts a jit trace, to which an autograd Function is one opaque prim::PythonOp
                h_GT = _modal_filter(p_GS2, r_GS2, t)
            else:
                h_GT = _ModalFilter.apply(p_GS2, r_GS2, t)
            y_BDT = fft_causal_conv(u_BDT, h_GT, expand=g)
            del h_GT
            if state is not None:
                basis_GNT = _modal_basis(p_GS2, t)
                # x_T = Σ_j p^(T−1−j)·u_j per channel: the basis read backwards, contracted with u
                basis_DNT = basis_GNT.repeat_interleave(g, dim=0).flip(-1)
                x_DNB = basis_DNT @ u_BDT.permute(1, 2, 0)
                s = self.plan.state_size
                state.modal_BDS2.copy_(x_DNB.reshape(d, 2, s, -1).permute(3, 0, 2, 1).detach())
        # u and the filter are read by the convolution (which keeps their spectra) and nothing
        # after it: freed here, not held by this frame through the skip and out_filter_dense (a
        # re-run that stops early inside out_filter_dense kept them, fp32 at T×D/tp and G×T)
        del u_BDT
        if state is not None:
            state.fir_BCJ.copy_(next_tail.detach())
            state.advance(t)
        # the skip's fp32 output is only cast: not held through out_filter_dense
        gated_BTD = gated_skip(x2_BDT, x1_BDT, v_BDT, y_BDT, self.D).transpose(1, 2).to(x_BTD.dtype)
        del y_BDT
        return self.out_filter_dense(gated_BTD)
