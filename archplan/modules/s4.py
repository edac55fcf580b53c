"""S4D and S4 (DPLR) layers (Gu et al. 2022) with kernel generation, FFT convolution and a
recurrent step mode, plus the FFT convolution the long-convolution mixers share.

Layout follows state-spaces/s4 `models/s4/s4.py` (FFTConv + SSMKernelDiag / SSMKernelDPLR): over
H = d_model channels, N' = N/2 complex modes stored as real pairs, S = n_ssm copies of (A, B, P);
D skip, GELU, then output Linear(H, 2H) + GLU. `ssm_buffers` registers log Δ, B, A and P as
buffers, as the reference's `register(name, tensor, lr=0.0)` does.

Kernel generation (the counted path uses real matmuls only: FlopCounterMode counts a complex
matmul as a real one, about 4 x low):
- S4D (zero-order hold, s4d.py): Ā = exp(Δ·A), B̄ = (Ā − 1)/A · B, elementwise; K_l =
  2·Re Σ C·B̄·Ā^l is the Vandermonde product, one real bmm [Re w, −Im w]·[Re Ā^j; Im Ā^j] per
  chunk of positions (w = C·B̄·Ā^start), 2·H·N per position in all.
- S4 (bilinear, Gu et al. 2022 App. C.2): Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A) with A = Λ − P·P*. The
  inverse of the diagonal-plus-rank-one matrix is the Woodbury identity, so Ā = diag(d) + q·rᵀ and
  B̄ come out elementwise, exactly. Instead of the Cauchy kernel at the FFT nodes (which computes
  the same truncated kernel in frequency space), V = [B̄, Ā·B̄, Ā²·B̄, …] is built by doubling on
  the real 2N' × 2N' block form [[Re Ā, −Im Ā], [Im Ā, Re Ā]]: T − 1 matrix-vector columns and
  ⌈log2 T⌉ − 1 squarings, all real bmm; then the same C contraction. Exact in exact arithmetic.
The convolution is y = irfft(rfft(u, 2T)·rfft(K, 2T))[:T] (no wrap-around), then + D·u.

Decode: x ← Ā·x + B̄·u, y = 2·Re(C·x) + D·u, with x (B, H, N', 2) in fp32 (complex64 in the
reference), 4·B·H·N bytes per layer whatever the model dtype. A prefill into a fresh state runs the
convolution and takes the final state as Σ_j Ā^(T−1−j)·B̄·u_j (real matmuls over the same basis);
a continuation runs the recurrence token by token. S4D works in chunks of BASIS_CHUNK positions,
so its memory is O(H·N·BASIS_CHUNK), not O(H·N·T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archplan.modules.cache import LayerState
from archplan.resolve import S4Plan

# s4d.py / s4.py defaults: Δ ~ logU(1e-3, 1e-1)
_DT_MIN, _DT_MAX = 1e-3, 1e-1
# S4D kernel positions per chunk: the basis is H·N·512 floats (counted FLOPs are the same whatever
# the chunking: the contraction is 2·H·N per position)
BASIS_CHUNK = 512


def fft_causal_conv(u_BCT: Tensor, k_KT: Tensor, expand: int = 1) -> Tensor:
    """y[..., t] = Σ_{j ≤ t} k[t − j]·u[j] in fp32 by FFTs of length 2T (no circular wrap-around).

    `k_KT` holds K distinct filters; each serves `expand` consecutive channels (C = K·expand), and
    its spectrum (not the filter) is repeated, so rfft runs on K filters only."""
    t = u_BCT.shape[-1]
    n = 2 * t
    u_f = torch.fft.rfft(u_BCT.float(), n=n)
    k_f = torch.fft.rfft(k_KT.float(), n=n)
    if expand > 1:
        k_f = k_f.repeat_interleave(expand, dim=0)
    return torch.fft.irfft(u_f * k_f, n=n)[..., :t]


@dataclass(eq=False)
class S4State(LayerState):
    """(B, H, N', 2): the N' = N/2 complex modes of each channel as fp32 (real, imaginary) pairs."""

    x_BHM2: Tensor
    seen: int = 0

    def tensors(self) -> list[Tensor]:
        return [self.x_BHM2]


class S4Mixer(nn.Module):
    """S4D (`plan.dplr` False) or S4 DPLR over d_model channels. Letters: H channels, M = N/2 modes,
    S SSM copies, N = 2M the real size of the state, T positions."""

    def __init__(self, plan: S4Plan, d_model: int) -> None:
        super().__init__()
        self.plan = plan
        h, m, s = d_model, plan.modes, plan.n_ssm
        self.d_model = d_model
        self.D = nn.Parameter(torch.empty(h))
        self.C = nn.Parameter(torch.empty(h, m, 2))
        self.output_linear = nn.Linear(h, 2 * h)
        ssm = {"log_dt": (h,), "B": (s, m, 2), "A_log_real": (s, m), "A_imag": (s, m)}
        if plan.dplr:
            ssm["P"] = (s, m, 2)
        for name, shape in ssm.items():
            if plan.ssm_buffers:
                self.register_buffer(name, torch.empty(shape))
            else:
                self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """S4D-Lin (Gu et al. 2022, S4D §4.1): A_n = −½ + iπn, B = 1, C ~ N(0, ½) complex, D ~ N(0, 1),
        Δ log-uniform; S4's low-rank P ~ N(0, 1/N') (any P keeps Re(eig A) ≤ −½: P·P* is PSD)."""
        m = self.plan.modes
        with torch.no_grad():
            n = torch.arange(m, dtype=torch.float32, device=self.D.device)
            self.A_log_real.copy_(torch.full_like(self.A_log_real, math.log(0.5)))
            self.A_imag.copy_((math.pi * n).expand_as(self.A_imag))
            self.B.copy_(torch.stack([torch.ones_like(self.B[..., 0]), torch.zeros_like(self.B[..., 1])], -1))
            nn.init.normal_(self.C, std=0.5**0.5)
            nn.init.normal_(self.D)
            self.log_dt.copy_(
                torch.rand_like(self.log_dt) * (math.log(_DT_MAX) - math.log(_DT_MIN)) + math.log(_DT_MIN)
            )
            if self.plan.dplr:
                nn.init.normal_(self.P, std=(1.0 / m) ** 0.5)

    # ----------------------------------------------------------------------- discretisation
    def _per_channel(self, t_S: Tensor) -> Tensor:
        """(S, ...) -> (H, ...): each SSM copy serves H / S consecutive channels."""
        return t_S.float().repeat_interleave(self.d_model // self.plan.n_ssm, dim=0)

    def _discrete(self) -> tuple[Tensor, Tensor, Tensor]:
        """(Ā, B̄, log Ā): S4D gives Ā (H, M) diagonal and log Ā = Δ·A; S4 gives Ā (H, M, M) dense
        and no log. Complex, elementwise only (never a complex matmul)."""
        dt_H = torch.exp(self.log_dt.float())
        lam_HM = torch.complex(-torch.exp(self._per_channel(self.A_log_real)), self._per_channel(self.A_imag))
        b_HM = torch.view_as_complex(self._per_channel(self.B).contiguous())
        if not self.plan.dplr:
            dtA_HM = dt_H[:, None] * lam_HM
            dA_HM = torch.exp(dtA_HM)
            return dA_HM, (dA_HM - 1) / lam_HM * b_HM, dtA_HM
        p_HM = torch.view_as_complex(self._per_channel(self.P).contiguous())
        half = (dt_H / 2)[:, None]
        # A1 = (I − Δ/2·(Λ − p p*))⁻¹ = D0 − c·q·wᵀ (Woodbury), D0 = 1/(1 − Δ/2·Λ), q = D0·p,
        # wᵀ = p*·D0, c = (Δ/2) / (1 + (Δ/2)·p*·D0·p); A0 = diag(a0) − Δ/2·p p*, a0 = 1 + Δ/2·Λ
        d0_HM = 1 / (1 - half * lam_HM)
        q_HM = d0_HM * p_HM
        w_HM = p_HM.conj() * d0_HM
        s_H1 = (w_HM * p_HM).sum(-1, keepdim=True)
        c_H1 = half / (1 + half * s_H1)
        a0_HM = 1 + half * lam_HM
        # Ā = A1·A0 = diag(D0·a0) + q·rᵀ, r = −Δ/2·(1 − c·s)·p* − c·w·a0 (expanded by hand)
        r_HM = -half * (1 - c_H1 * s_H1) * p_HM.conj() - c_H1 * w_HM * a0_HM
        dA_HMM = torch.diag_embed(d0_HM * a0_HM) + q_HM[:, :, None] * r_HM[:, None, :]
        dt_b_HM = dt_H[:, None] * b_HM
        dB_HM = d0_HM * dt_b_HM - c_H1 * q_HM * (w_HM * dt_b_HM).sum(-1, keepdim=True)
        return dA_HMM, dB_HM, dA_HMM

    def _dplr_basis(self, length: int) -> Tensor:
        """S4: real (H, N, T), rows [Re; Im] of Ā^l·B̄ for l < T, by doubling (module docstring)."""
        dA, dB_HM, _ = self._discrete()
        block_HNN = torch.cat(
            [torch.cat([dA.real, -dA.imag], dim=2), torch.cat([dA.imag, dA.real], dim=2)], dim=1
        )
        v_HNT = torch.cat([dB_HM.real, dB_HM.imag], dim=1)[:, :, None]
        power_HNN, cols = block_HNN, 1
        while cols < length:
            need = min(cols, length - cols)
            v_HNT = torch.cat([v_HNT, power_HNN @ v_HNT[:, :, :need]], dim=2)
            cols += need
            if cols < length:
                power_HNN = power_HNN @ power_HNN
        return v_HNT

    @staticmethod
    def _real_row(w_HM: Tensor) -> Tensor:
        """(H, 1, N) = [Re w, −Im w]: Re(w·v) = Re w·Re v − Im w·Im v as one real contraction."""
        return torch.cat([w_HM.real, -w_HM.imag], dim=1)[:, None, :]

    def _kernel_and_state(self, length: int, u_BHT: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """K (H, T) = 2·Re(C·Ā^l·B̄), fp32; with `u`, also the state after it from zero,
        x_T = Σ_j Ā^(T−1−j)·B̄·u_j, complex (B, H, M).

        S4D works in chunks of c = BASIS_CHUNK positions on one basis z^j, j < c (z = Ā): the chunk
        at s is z^s·z^j, so its kernel is 2·Re((C·B̄·z^s)·z^j), one (H, 1, N) × (H, N, c) bmm, and
        no (H, N, T) tensor or T·H·N exponentials are ever made. S4 contracts its doubling basis."""
        u_rev_HTB = u_BHT.flip(-1).permute(1, 2, 0) if u_BHT is not None else None
        c_HM = torch.view_as_complex(self.C.float().contiguous())
        if self.plan.dplr:
            basis_HNT = self._dplr_basis(length)
            k_HT = 2 * (self._real_row(c_HM) @ basis_HNT)[:, 0]
            if u_rev_HTB is None:
                return k_HT, None
            x_HNB = basis_HNT @ u_rev_HTB
            m = self.plan.modes
            return k_HT, torch.complex(x_HNB[:, :m], x_HNB[:, m:]).permute(2, 0, 1)
        _, dB_HM, log_dA_HM = self._discrete()
        chunk = min(BASIS_CHUNK, length)
        j_C = torch.arange(chunk, device=dB_HM.device, dtype=torch.float32)
        # z^j = e^(j·Re log z)·(cos, sin)(j·Im log z): real ops (torch's complex exp is ~3x slower on CPU)
        mag_HMC = torch.exp(log_dA_HM.real[:, :, None] * j_C)
        phase_HMC = log_dA_HM.imag[:, :, None] * j_C
        base_HNC = torch.cat([mag_HMC * torch.cos(phase_HMC), mag_HMC * torch.sin(phase_HMC)], dim=1)
        m = self.plan.modes
        ks, x_BHM = [], None
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            b_zs_HM = dB_HM * torch.exp(log_dA_HM * start)
            ks.append(2 * (self._real_row(c_HM * b_zs_HM) @ base_HNC[:, :, :n])[:, 0])
            if u_rev_HTB is not None:
                part_HNB = base_HNC[:, :, :n] @ u_rev_HTB[:, start:start + n]
                part_BHM = (b_zs_HM[:, :, None] * torch.complex(part_HNB[:, :m], part_HNB[:, m:])).permute(2, 0, 1)
                x_BHM = part_BHM if x_BHM is None else x_BHM + part_BHM
        return torch.cat(ks, dim=-1), x_BHM

    def kernel(self, length: int) -> Tensor:
        return self._kernel_and_state(length, None)[0]

    # ------------------------------------------------------------------------------ decoding
    def new_state(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> S4State:
        """Constant in `max_len` and fp32 whatever `dtype` (complex64 in the reference)."""
        return S4State(torch.zeros(batch, self.d_model, self.plan.modes, 2, device=device, dtype=torch.float32))

    def _recurrence(self, u_BHT: Tensor, state: S4State) -> Tensor:
        """The step mode, token by token: x ← Ā·x + B̄·u_t, y_t = 2·Re(C·x)."""
        dA, dB_HM, _ = self._discrete()
        c_HM = torch.view_as_complex(self.C.float().contiguous())
        x_BHM = torch.view_as_complex(state.x_BHM2)
        ys = []
        for t in range(u_BHT.shape[-1]):
            u_BH1 = u_BHT[:, :, t, None]
            if self.plan.dplr:
                x_BHM = (dA @ x_BHM[..., None])[..., 0] + dB_HM * u_BH1
            else:
                x_BHM = dA * x_BHM + dB_HM * u_BH1
            ys.append(2 * (c_HM * x_BHM).sum(-1).real)
        state.x_BHM2.copy_(torch.view_as_real(x_BHM))
        return torch.stack(ys, dim=-1)

    def forward(self, x_BTD: Tensor, state: S4State | None = None) -> Tensor:
        t = x_BTD.shape[1]
        u_BHT = x_BTD.transpose(1, 2).float()
        if state is not None and state.seen > 0:
            y_BHT = self._recurrence(u_BHT, state)
        else:
            k_HT, x_BHM = self._kernel_and_state(t, u_BHT if state is not None else None)
            y_BHT = fft_causal_conv(u_BHT, k_HT)
            if state is not None and x_BHM is not None:
                state.x_BHM2.copy_(torch.view_as_real(x_BHM.detach()))
        if state is not None:
            state.advance(t)
        y_BHT = y_BHT + self.D.float()[:, None] * u_BHT
        y_BTD = F.gelu(y_BHT).transpose(1, 2).to(x_BTD.dtype)
        return F.glu(self.output_linear(y_BTD), dim=-1)
