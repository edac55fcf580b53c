"""S4D and S4 (DPLR) layers (Gu et al. 2022) with kernel generation, FFT convolution and a
recurrent step mode, plus the FFT convolution the long-convolution mixers share.

Layout follows state-spaces/s4 `models/s4/s4.py` (FFTConv + SSMKernelDiag / SSMKernelDPLR): over
H = d_model channels, N' = N/2 complex modes stored as real pairs, S = n_ssm copies of (A, B, P);
D skip, GELU, then output Linear(H, 2H) + GLU. `ssm_buffers` registers log Δ, B, A and P as
buffers, as the reference's `register(name, tensor, lr=0.0)` does. One difference: copy s serves the H/S consecutive
channels s·H/S … (s+1)·H/S − 1, so tensor-parallel ranks hold whole copies; the reference tiles
them (`repeat(A, 't n -> (v t) n')`: channel c reads copy c mod S). The same parameters, FLOPs and
family of functions; with 1 < n_ssm < d_model a reference checkpoint's copies load permuted.

Kernel generation (the counted path uses real matmuls only: FlopCounterMode counts a complex
matmul as a real one, about 4 x low):
- S4D (zero-order hold, s4d.py): Ā = exp(Δ·A), B̄ = (Ā − 1)/A · B, elementwise; K_l =
  2·Re Σ C·B̄·Ā^l is the Vandermonde product, split in two levels: l = s·c + j with c ≈ √T, one
  real bmm of the rows [Re w_s, −Im w_s] of every chunk start (w_s = C·B̄·Ā^(s·c)) with the
  basis [Re Ā^j; Im Ā^j], 2·H·N per position in all.
- S4 (bilinear, Gu et al. 2022 App. C.2): Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A) with A = Λ − P·P*, P·P*
  over all N modes (P = [p; p̄]: the rank-one term couples each kept mode with its conjugate, as
  s4.py's Cauchy kernel and linear step do). The inverse of the diagonal-plus-rank-one matrix is
  the Woodbury identity, so Ā, which maps the kept half x to a⊙x + q·2·Re(rᵀx), and B̄ come out
  elementwise, exactly. Instead of the Cauchy kernel at the FFT nodes (which computes the same
  truncated kernel in frequency space), V = [B̄, Ā·B̄, Ā²·B̄, …] is built by doubling on Ā's real
  2N' × 2N' form on [Re x; Im x] (`_Discrete.real_block`): T − 1 matrix-vector columns and
  ⌈log2 T⌉ − 1 squarings, all real bmm; then the same C contraction. Exact in exact arithmetic.
The convolution is y = irfft(rfft(u, 2T)·rfft(K, 2T))[:T] (no wrap-around), then + D·u.

Decode: x ← Ā·x + B̄·u, y = 2·Re(C·x) + D·u, with x (B, H, N', 2) in fp32 (complex64 in the
reference), 4·B·H·N bytes per layer whatever the model dtype. The step is elementwise for both:
S4D's Ā is diagonal, and S4 applies Ā in its DPLR form, a⊙x + q·2·Re(rᵀx), O(N)
per channel (state-spaces/s4 step mode "linear"), never the dense N × N matrix. A prefill of
T > 1 tokens into a fresh state runs the convolution and takes the final state as
Σ_j Ā^(T−1−j)·B̄·u_j (real matmuls over the same basis); a single token, or any continuation,
runs the recurrence token by token (from a zero state one step is the T = 1 convolution, without
building a kernel). S4D's two levels cost O(H·N·√T) exponentials and memory besides the kernel
(H·T), not O(H·N·T).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archplan.modules.cache import LayerState
from archplan.modules.recompute import bmm_backward, forward_autocast, input_grads, leaves
from archplan.resolve import S4Plan

# s4d.py / s4.py defaults: Δ ~ logU(1e-3, 1e-1)
_DT_MIN, _DT_MAX = 1e-3, 1e-1


def basis_chunk(length: int) -> int:
    """S4D positions per chunk c: a power of two near √T. The basis z^j (j < c) costs H·M·c
    exponentials and sines, the chunk starts z^(s·c) H·M·⌈T/c⌉ more, least when c ≈ √T; the
    counted FLOPs are the same whatever c (the contraction is 2·H·N per position)."""
    return 1 << (length.bit_length() // 2)


def _powers(log_z_HM: Tensor, exponents_P: Tensor) -> Tensor:
    """(H, N, P) real rows [Re; Im] of z^p = e^(p·Re log z)·(cos, sin)(p·Im log z), real ops only
    (torch's complex exp is ~3x slower on CPU)."""
    mag_HMP = torch.exp(log_z_HM.real[:, :, None] * exponents_P)
    phase_HMP = log_z_HM.imag[:, :, None] * exponents_P
    return torch.cat([mag_HMP * torch.cos(phase_HMP), mag_HMP * torch.sin(phase_HMP)], dim=1)


def fft_causal_conv(u_BCT: Tensor, k_KT: Tensor, expand: int = 1) -> Tensor:
    """y[..., t] = Σ_{j ≤ t} k[t − j]·u[j] in fp32 by FFTs of length 2T (no circular wrap-around).

    `k_KT` holds K distinct filters; each serves `expand` consecutive channels (C = K·expand), and
    its spectrum (not the filter) is repeated, so rfft runs on K filters only.

    One autograd unit (`_FFTConv`): it keeps the two spectra, which the product's backward reads,
    and nothing else; plain autograd also keeps both inputs zero-padded to 2T in fp32 (rfft's
    `_fft_r2c` saves its input), as large as the spectra again."""
    if torch.jit.is_tracing():
        # fvcore counts a jit trace, to which an autograd Function is one opaque prim::PythonOp
        return _fft_conv(u_BCT, k_KT, expand)[0]
    return _FFTConv.apply(u_BCT, k_KT, expand)


def _fft_conv(u_BCT: Tensor, k_KT: Tensor, expand: int) -> tuple[Tensor, Tensor, Tensor]:
    """y (B, C, T) fp32 and the spectra of u (B, C, T + 1) and of the K filters (K, T + 1)."""
    t = u_BCT.shape[-1]
    n = 2 * t
    u_f = torch.fft.rfft(u_BCT.float(), n=n)
    k_f = torch.fft.rfft(k_KT.float(), n=n)
    return torch.fft.irfft(u_f * _spectra_per_channel(k_f, expand), n=n)[..., :t], u_f, k_f


def _spectra_per_channel(k_f_KF: Tensor, expand: int) -> Tensor:
    """Each filter's spectrum repeated for the `expand` consecutive channels it serves."""
    return k_f_KF.repeat_interleave(expand, dim=0) if expand > 1 else k_f_KF


# torch's fft_norm_mode: rfft's default ("backward") normalises nothing, irfft's by 1/n
_NORM_NONE, _NORM_BY_N = 0, 2


def _rfft_input_grad(d_f: Tensor, n: int, t: int, dtype: torch.dtype) -> Tensor:
    """The gradient of rfft(x, n) with respect to its first t inputs, in x's dtype: torch's
    `fft_r2c_backward` (the half spectrum zero-extended to n bins, one inverse complex FFT, its real
    part) and the padding's backward (a slice). Copied out (`.contiguous()` where the dtype is
    already x's), it does not hold the inverse FFT's complex n-bin storage, four times its size,
    through the rest of the backward."""
    # the zero-extended spectrum is an argument only: freed once the inverse FFT has read it
    inverse = torch.ops.aten._fft_c2c(F.pad(d_f, (0, n - d_f.shape[-1])), [d_f.dim() - 1], _NORM_NONE, False)
    return inverse.real[..., :t].to(dtype).contiguous()


class _FFTConv(torch.autograd.Function):
    """The FFT convolution keeping only the spectra; its backward runs, by hand, the ops plain
    autograd would: irfft's gradient (one rfft, torch `fft_c2r_backward`), the product's (by the
    conjugate spectra), each rfft's (one inverse complex FFT, `fft_r2c_backward`). So a forward +
    backward counts the same FFTs (analytic `s4_backward_adjust`) and gives the same gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, u_BCT: Tensor, k_KT: Tensor, expand: int
    ) -> Tensor:
        y, u_f, k_f = _fft_conv(u_BCT, k_KT, expand)
        ctx.save_for_backward(u_f, k_f)
        ctx.expand, ctx.dtypes = expand, (u_BCT.dtype, k_KT.dtype)
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dy_BCT: Tensor
    ) -> tuple[Tensor | None, ...]:
        u_f, k_f = ctx.saved_tensors
        t = dy_BCT.shape[-1]
        n = 2 * t
        expand = ctx.expand
        # fft_c2r_backward: rfft of the (zero-extended) gradient, the bins irfft counts twice doubled
        dy_BCN = F.pad(dy_BCT.float(), (0, n - t))
        dp_f = torch.ops.aten._fft_r2c(dy_BCN, [dy_BCN.dim() - 1], _NORM_BY_N, True)
        del dy_BCN  # read by the rfft only: not held through the two input gradients
        dp_f[..., 1 : n - dp_f.shape[-1] + 1] *= 2
        du = dk = None
        if ctx.needs_input_grad[0]:
            du = _rfft_input_grad(dp_f * _spectra_per_channel(k_f, expand).conj(), n, t, ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            dk_f = (dp_f * u_f.conj()).sum(0)
            if expand > 1:
                dk_f = dk_f.unflatten(0, (-1, expand)).sum(1)
            dk = _rfft_input_grad(dk_f, n, t, ctx.dtypes[1])
        return du, dk, None


@dataclass(frozen=True)
class _Discrete:
    """The discretised SSM per channel on the kept half of the conjugate modes, complex: Ā x =
    a⊙x + q·2·Re(rᵀx) (S4D: q = r = None) and B̄, and for S4D log a = Δ·A.

    S4's rank-one term lives on all N = 2M modes, P = [p; p̄] (`S4Mixer._discrete`), so it reads a
    kept mode and its conjugate alike: on the kept half it is q·(rᵀx + r̄ᵀx̄) = q·2·Re(rᵀx), a real-
    linear map, not a complex-linear one."""

    a_HM: Tensor
    b_HM: Tensor
    log_a_HM: Tensor | None = None
    q_HM: Tensor | None = None
    r_HM: Tensor | None = None

    def real_block(self) -> Tensor:
        """Ā on the real pairs [Re x; Im x] as (H, 2M, 2M): the diagonal's [[Re a, −Im a], [Im a,
        Re a]] plus, for S4, 2·[Re q; Im q]·[Re r, −Im r] (2·Re(rᵀx) = 2·(Re r·Re x − Im r·Im x))."""
        a = torch.diag_embed(self.a_HM)
        block_HNN = torch.cat([torch.cat([a.real, -a.imag], dim=2), torch.cat([a.imag, a.real], dim=2)], dim=1)
        if self.q_HM is not None and self.r_HM is not None:
            q_HN = torch.cat([self.q_HM.real, self.q_HM.imag], dim=1)
            r_HN = torch.cat([self.r_HM.real, -self.r_HM.imag], dim=1)
            # in place and elementwise: no (H, N, N) outer product beside the block, and no matmul
            # for the FLOP count (the rank-one term is not one of the kernel's counted bmm)
            block_HNN.addcmul_(q_HN[:, :, None], r_HN[:, None, :], value=2)
        return block_HNN

    def step(self, x_BHM: Tensor, u_BH1: Tensor) -> Tensor:
        """x ← Ā·x + B̄·u, elementwise: a⊙x (+ q·2·Re(rᵀx) for S4)."""
        next_BHM = self.a_HM * x_BHM + self.b_HM * u_BH1
        if self.q_HM is not None and self.r_HM is not None:
            next_BHM = next_BHM + self.q_HM * 2 * (self.r_HM * x_BHM).sum(-1, keepdim=True).real
        return next_BHM


def _s4d_discrete(log_dt_H: Tensor, a_log_real_HM: Tensor, a_imag_HM: Tensor, b_HM2: Tensor) -> _Discrete:
    """S4D's zero-order hold (s4d.py): Ā = exp(Δ·A), B̄ = (Ā − 1)/A · B, complex, elementwise."""
    dt_H = torch.exp(log_dt_H.float())
    lam_HM = torch.complex(-torch.exp(a_log_real_HM.float()), a_imag_HM.float())
    dtA_HM = dt_H[:, None] * lam_HM
    dA_HM = torch.exp(dtA_HM)
    return _Discrete(dA_HM, (dA_HM - 1) / lam_HM * torch.view_as_complex(b_HM2.float().contiguous()),
                     log_a_HM=dtA_HM)


def _s4d_rows_and_basis(
    length: int, log_dt_H: Tensor, a_log_real_HM: Tensor, a_imag_HM: Tensor, b_HM2: Tensor, c_HM2: Tensor
) -> tuple[int, Tensor, Tensor, Tensor]:
    """S4D's two-level Vandermonde operands, elementwise (`S4Mixer._kernel_and_state`): the chunk
    length c, the rows [Re w_s, −Im w_s] (H, S, N) of every chunk start w_s = C·B̄·z^(s·c), the
    basis [Re z^j; Im z^j] (H, N, c), and B̄·z^(s·c) (H, M, S)."""
    disc = _s4d_discrete(log_dt_H, a_log_real_HM, a_imag_HM, b_HM2)
    dB_HM, log_dA_HM = disc.b_HM, disc.log_a_HM
    assert log_dA_HM is not None  # S4D
    chunk = basis_chunk(length)
    full, rest = divmod(length, chunk)
    starts_S = torch.arange(full + (rest > 0), device=dB_HM.device, dtype=torch.float32) * chunk
    base_HNC = _powers(log_dA_HM, torch.arange(chunk, device=dB_HM.device, dtype=torch.float32))
    m = dB_HM.shape[-1]
    zs_HNS = _powers(log_dA_HM, starts_S)
    b_zs_HMS = dB_HM[:, :, None] * torch.complex(zs_HNS[:, :m], zs_HNS[:, m:])
    w_HMS = torch.view_as_complex(c_HM2.float().contiguous())[:, :, None] * b_zs_HMS
    rows_HSN = torch.cat([w_HMS.real, -w_HMS.imag], dim=1).transpose(1, 2)
    return chunk, rows_HSN, base_HNC, b_zs_HMS


def _contract_chunks(rows_HSN: Tensor, base_HNC: Tensor, length: int) -> Tensor:
    """K (H, T) = 2·rows·basis: whole chunks in one bmm, a partial last chunk in another,
    2·H·N per position either way."""
    full, rest = divmod(length, int(base_HNC.shape[-1]))  # int(): a 0-d tensor under a jit trace
    ks = [(rows_HSN[:, :full] @ base_HNC).flatten(1)] if full else []
    if rest:
        ks.append((rows_HSN[:, full:] @ base_HNC[:, :, :rest])[:, 0])
    return 2 * torch.cat(ks, dim=-1)


class _S4DKernel(torch.autograd.Function):
    """S4D's kernel K (H, T) keeping only its per-channel inputs (H·N each): the backward recomputes
    the rows and basis (elementwise) and differentiates the chunk contraction by the two bmm
    autograd would run for each of its one or two bmm, so the counted ops and the gradients are
    plain autograd's. Plain autograd keeps about ten (H, N/2, c) and (H, N/2, S) tensors of the
    generation, O(H·N·√T), which state-spaces/s4's Vandermonde CUDA kernel (`log_vandermonde`)
    does not keep either: it saves its inputs and recomputes the powers in the backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, length: int, log_dt_H: Tensor, a_log_real_HM: Tensor,
        a_imag_HM: Tensor, b_HM2: Tensor, c_HM2: Tensor,
    ) -> Tensor:
        inputs = (log_dt_H, a_log_real_HM, a_imag_HM, b_HM2, c_HM2)
        ctx.save_for_backward(*inputs)
        ctx.length, ctx.autocast = length, forward_autocast(log_dt_H)
        _, rows_HSN, base_HNC, _ = _s4d_rows_and_basis(length, *inputs)
        return _contract_chunks(rows_HSN, base_HNC, length)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dk_HT: Tensor
    ) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad[1:]
        with torch.enable_grad(), ctx.autocast:
            inputs = leaves(ctx.saved_tensors, needs)
            chunk, rows_HSN, base_HNC, _ = _s4d_rows_and_basis(ctx.length, *inputs)
            full, rest = divmod(ctx.length, chunk)
            dk_HT = 2 * dk_HT  # K = 2·(rows·basis)
            outputs: list[Tensor] = []
            grads: list[Tensor] = []
            # each bmm's backward, for the operands that need it (with `ssm_buffers` the basis does
            # not, s4_backward_adjust): d rows = dK·basisᵀ, d basis = rowsᵀ·dK
            pieces = []
            if full:
                pieces.append((rows_HSN[:, :full], base_HNC, dk_HT[:, :full * chunk].unflatten(1, (full, chunk))))
            if rest:
                dk_H1R = dk_HT[:, full * chunk:, None].transpose(1, 2)
                pieces.append((rows_HSN[:, full:], base_HNC[:, :, :rest], dk_H1R))
            for rows, basis, dk in pieces:
                bmm_backward(rows, basis, dk, outputs, grads)
            found = input_grads(outputs, grads, inputs, needs)
        return (None, *found)


def _fp32_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32 under any autocast: the prefill's final state, which the cache keeps in fp32
    (and torch.complex takes no bf16), is not rounded to 16 bits on its way there."""
    device = a.device.type
    autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)  # meta has no autocast to leave
    with torch.autocast(device, enabled=False) if autocast else nullcontext():
        return a.float() @ b.float()


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
        # the S copies of (A, B, P), each read by H/S channels: under tensor parallelism with one
        # copy, every rank's channels contribute a part of its gradient (`distributed.plans.s4_plan`)
        self.copies = nn.Identity()
        for name, shape in ssm.items():
            if plan.ssm_buffers:
                self.register_buffer(name, torch.empty(shape))
            else:
                self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """S4D-Lin (Gu et al. 2022, S4D §4.1): A_n = −½ + iπn, B = 1, C ~ N(0, ½) complex, D ~ N(0, 1),
        Δ log-uniform; S4's low-rank P ~ N(0, 1/N') (any P keeps Re(eig A) ≤ −½: P·P* is PSD), which
        is state-spaces/s4's `init='dplr-lin'`, not the S4 paper's HiPPO-LegS (`init='legs'`, its
        default): the same shapes and kernel math, another starting point."""
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
        return self.copies(t_S).float().repeat_interleave(self.d_model // self.plan.n_ssm, dim=0)

    def _s4d_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """S4D's (log Δ (H), log(−Re A) (H, M), Im A (H, M), B (H, M, 2)) per channel."""
        return (self.log_dt, self._per_channel(self.A_log_real), self._per_channel(self.A_imag),
                self._per_channel(self.B))

    def _discrete(self) -> _Discrete:
        """Ā and B̄ from (Δ, A, B, P): complex, elementwise only (never a complex matmul)."""
        if not self.plan.dplr:
            return _s4d_discrete(*self._s4d_inputs())
        dt_H = torch.exp(self.log_dt.float())
        lam_HM = torch.complex(-torch.exp(self._per_channel(self.A_log_real)), self._per_channel(self.A_imag))
        b_HM = torch.view_as_complex(self._per_channel(self.B).contiguous())
        p_HM = torch.view_as_complex(self._per_channel(self.P).contiguous())
        half = (dt_H / 2)[:, None]
        # The state is the M kept modes of N = 2M conjugate pairs, and A = Λ − P·P* on all N, with
        # P = [p; p̄] (state-spaces/s4: `_setup_linear`'s R = I + 2·Re(Q·D·P), and
        # `_step_state_linear` contracts over `_conj(·)`): every sum over the modes is 2·Re of the
        # kept half's. A1 = (I − Δ/2·A)⁻¹ = D0 − c·q·wᵀ (Woodbury), D0 = 1/(1 − Δ/2·Λ), q = D0·p,
        # wᵀ = p*·D0, c = (Δ/2) / (1 + (Δ/2)·s), s = P*·D0·P = 2·Re(wᵀp), real;
        # A0 = diag(a0) − Δ/2·P·P*, a0 = 1 + Δ/2·Λ
        d0_HM = 1 / (1 - half * lam_HM)
        q_HM = d0_HM * p_HM
        w_HM = p_HM.conj() * d0_HM
        s_H1 = 2 * (w_HM * p_HM).sum(-1, keepdim=True).real
        c_H1 = half / (1 + half * s_H1)
        a0_HM = 1 + half * lam_HM
        # Ā = A1·A0 = diag(D0·a0) + Q·Rᵀ, R = [r; r̄], r = −Δ/2·(1 − c·s)·p* − c·w·a0 (expanded by hand)
        r_HM = -half * (1 - c_H1 * s_H1) * p_HM.conj() - c_H1 * w_HM * a0_HM
        dt_b_HM = dt_H[:, None] * b_HM
        dB_HM = d0_HM * dt_b_HM - c_H1 * q_HM * 2 * (w_HM * dt_b_HM).sum(-1, keepdim=True).real
        return _Discrete(d0_HM * a0_HM, dB_HM, q_HM=q_HM, r_HM=r_HM)

    def _dplr_basis(self, length: int) -> Tensor:
        """S4: real (H, N, T), rows [Re; Im] of Ā^l·B̄ for l < T, by doubling (module docstring)."""
        disc = self._discrete()
        block_HNN, dB_HM = disc.real_block(), disc.b_HM
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

        S4D works in chunks of c = basis_chunk(T) positions on one basis z^j, j < c (z = Ā): the
        chunk at s·c is z^(s·c)·z^j, so its kernel is 2·Re((C·B̄·z^(s·c))·z^j), and all chunks are one
        (H, S, N) × (H, N, c) bmm: no (H, N, T) tensor, T·H·N exponentials or per-chunk Python loop
        (at a fixed c = 512 the basis alone was ~40 ms a layer on CPU, whatever T). S4 contracts its
        doubling basis."""
        u_rev_HTB = u_BHT.flip(-1).permute(1, 2, 0) if u_BHT is not None else None
        if self.plan.dplr:
            basis_HNT = self._dplr_basis(length)
            c_HM = torch.view_as_complex(self.C.float().contiguous())
            k_HT = 2 * (self._real_row(c_HM) @ basis_HNT)[:, 0]
            if u_rev_HTB is None:
                return k_HT, None
            x_HNB = _fp32_matmul(basis_HNT, u_rev_HTB)
            m = self.plan.modes
            return k_HT, torch.complex(x_HNB[:, :m], x_HNB[:, m:]).permute(2, 0, 1)
        if u_rev_HTB is None and not torch.jit.is_tracing():
            # fvcore counts a jit trace, to which an autograd Function is one opaque prim::PythonOp
            return _S4DKernel.apply(int(length), *self._s4d_inputs(), self.C), None
        # int(): under torch.jit tracing (fvcore) a size arrives as a 0-d tensor
        chunk, rows_HSN, base_HNC, b_zs_HMS = _s4d_rows_and_basis(int(length), *self._s4d_inputs(), self.C)
        k_HT = _contract_chunks(rows_HSN, base_HNC, int(length))
        if u_rev_HTB is None:
            return k_HT, None
        # x_T = Σ_s B̄·z^(s·c)·Σ_j z^j·u_rev[s·c + j]: the inner sums of every chunk and sequence as
        # one (H, N, c) × (H, c, S·B) bmm (the partial chunk apart), then the S chunk starts
        batch = u_rev_HTB.shape[-1]
        full, rest = divmod(int(length), chunk)
        m = self.plan.modes
        parts = []
        if full:
            u_HCX = u_rev_HTB[:, :full * chunk].unflatten(1, (full, chunk)).transpose(1, 2).flatten(2)
            parts.append(_fp32_matmul(base_HNC, u_HCX).unflatten(2, (full, batch)))
        if rest:
            parts.append(_fp32_matmul(base_HNC[:, :, :rest], u_rev_HTB[:, full * chunk:])[:, :, None])
        part_HNSB = torch.cat(parts, dim=2)
        x_HMB = (b_zs_HMS[..., None] * torch.complex(part_HNSB[:, :m], part_HNSB[:, m:])).sum(2)
        return k_HT, x_HMB.permute(2, 0, 1)

    def kernel(self, length: int) -> Tensor:
        return self._kernel_and_state(length, None)[0]

    # ------------------------------------------------------------------------------ decoding
    def new_state(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> S4State:
        """Constant in `max_len` and fp32 whatever `dtype` (complex64 in the reference)."""
        return S4State(torch.zeros(batch, self.d_model, self.plan.modes, 2, device=device, dtype=torch.float32))

    def _recurrence(self, u_BHT: Tensor, state: S4State) -> Tensor:
        """The step mode, token by token: x ← Ā·x + B̄·u_t, y_t = 2·Re(C·x), all elementwise."""
        disc = self._discrete()
        c_HM = torch.view_as_complex(self.C.float().contiguous())
        x_BHM = torch.view_as_complex(state.x_BHM2)
        ys = []
        for t in range(u_BHT.shape[-1]):
            x_BHM = disc.step(x_BHM, u_BHT[:, :, t, None])
            ys.append(2 * (c_HM * x_BHM).sum(-1).real)
        state.x_BHM2.copy_(torch.view_as_real(x_BHM))
        return torch.stack(ys, dim=-1)

    def forward(self, x_BTD: Tensor, state: S4State | None = None) -> Tensor:
        t = x_BTD.shape[1]
        u_BHT = x_BTD.transpose(1, 2).float()
        # a single token into a fresh state steps too: the recurrence from zero is the T = 1
        # convolution, and decoding costs the same at every position (docs/architecture.md)
        if state is not None and (state.seen > 0 or t == 1):
            y_BHT = self._recurrence(u_BHT, state)
        else:
            k_HT, x_BHM = self._kernel_and_state(t, u_BHT if state is not None else None)
            y_BHT = fft_causal_conv(u_BHT, k_HT)
            # the kernel is read by the convolution (which keeps its spectrum) and nothing after it:
            # freed here, not held by this frame through the GELU and output_linear (fp32, H·T)
            del k_HT
            if state is not None and x_BHM is not None:
                state.x_BHM2.copy_(torch.view_as_real(x_BHM.detach()))
        if state is not None:
            state.advance(t)
        y_BHT = y_BHT + self.D.float()[:, None] * u_BHT
        # contiguous for output_linear, which from batch 2 on would save a contiguous copy of its
        # transposed input beside it: a re-run stopped inside output_linear holds both
        y_BTD = F.gelu(y_BHT).transpose(1, 2).to(x_BTD.dtype).contiguous()
        return F.glu(self.output_linear(y_BTD), dim=-1)
