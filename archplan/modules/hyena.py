"""The Hyena operator (Poli et al. 2023, "Hyena Hierarchy", §3, Alg. 1-3), in the layout of
HazyResearch/safari `src/models/sequence/hyena.py` (HyenaOperator, HyenaFilter, PositionalEmbedding,
Sin, ExponentialModulation).

    u = in_proj(x)                                  (B, (N_o+1)·D, T)
    u = short causal depthwise conv(u)              k taps, left padded (exactly T outputs)
    x_0 … x_{N_o−1}, v = split(u)
    for o, x_i in enumerate(reversed(x_1 … x_{N_o−1})):
        v = v·x_i;  v = h_o ∗ v + bias_o·v          FFT convolution of length 2T
    y = out_proj(v·x_0)
The filters h (N_o−1 of width D) come from an MLP over positional features z = [t, cos(f·w), −sin(f·w)]
(E = 1 + 2·bands), with Sin(freq·x) activations (one `Sin`, hence one frequency vector, shared by
every layer of the MLP, as safari builds it), times an exponential decay window exp(−t·|δ|); their
rows interleave the orders (`order_channels`).

Decoding: Hyena has no constant-size state. The cache keeps the short conv's last k − 1 inputs and
the inputs of each long convolution, (N_o − 1)·D values per past token, so a continuation convolves
the whole history with the filter (exact); it grows with the context like a KV cache. The filters
depend on no input, so `new_state` computes them once for the cache's max_len positions (fp32,
shared by the batch, stored reversed) and no forward with a cache runs the filter MLP again. One
new token at position p is the direct convolution y_p = Σ_{j ≤ p} h[p − j]·v_j: one bmm of the
p + 1 cached inputs with the p + 1 reversed taps, 2·D·(p + 1) FLOPs per channel group and
sequence; several tokens (a prefill, a chunk) convolve the cached history by FFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archplan.errors import ArchplanError
from archplan.modules.cache import LayerState
from archplan.modules.s4 import fft_causal_conv
from archplan.resolve import HyenaPlan

def order_channels(o: int, order: int) -> slice:
    """Order o's rows of the (N_o−1)·D filters, biases and decays: channel c of order o is row
    c·(N_o−1) + o, as safari's HyenaOperator reads them (`rearrange(k, 'c l (v o) -> c o v l')`).
    The decays are a fixed linspace over all rows, so interleaving gives every order the whole range
    of rates; blocks of D rows would give the first order only the slow ones."""
    return slice(o, None, order - 1)


# safari ExponentialModulation defaults
_FAST_DECAY_PCT, _SLOW_DECAY_PCT, _TARGET = 0.3, 1.5, 1e-2


def causal_short_conv(
    x_BCT: Tensor, weight_C1K: Tensor, bias_C: Tensor | None, tail_BCJ: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv with exactly T outputs, and its next tail (the last k − 1 inputs, J = k − 1).

    Left padding by k − 1 columns (zeros, or the tail a previous call left) makes the counted
    convolution the true one; safari pads both sides and slices (T + k − 1 outputs computed)."""
    k = weight_C1K.shape[-1]
    if tail_BCJ is None:
        x_pad = F.pad(x_BCT, (k - 1, 0))
    else:
        x_pad = torch.cat([tail_BCJ.to(x_BCT.dtype), x_BCT], dim=-1)
    y_BCT = F.conv1d(x_pad, weight_C1K, bias_C, groups=x_BCT.shape[1])
    return y_BCT, x_pad[..., x_pad.shape[-1] - (k - 1):]


def positional_features(length: int, emb_dim: int, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    """safari PositionalEmbedding: z (1, L, E) = [t, cos(f·w), −sin(f·w)] and t (1, L, 1) in [0, 1]."""
    bands = (emb_dim - 1) // 2
    t_L = torch.linspace(0, 1, length, device=device)
    w_L = 2 * math.pi * torch.arange(length, device=device, dtype=torch.float32) / length
    f_F = torch.linspace(1e-4, bands - 1, bands, device=device)
    fw_LF = w_L[:, None] * f_F[None, :]
    z_LE = torch.cat([t_L[:, None], torch.cos(fw_LF), -torch.sin(fw_LF)], dim=-1)
    return z_LE[None], t_L[None, :, None]


@dataclass(eq=False)
class HyenaState(LayerState):
    """Short conv tail (B, (N_o+1)·D, k − 1), the long convolutions' inputs (B, (N_o−1)·D, L), and
    their filters reversed ((N_o−1)·D, L), fp32, once for the batch: filter_rev[:, L − 1 − l] = h[l]."""

    tail_BCJ: Tensor
    history_BCL: Tensor
    filter_rev_CL: Tensor
    seen: int = 0

    def tensors(self) -> list[Tensor]:
        return [self.tail_BCJ, self.history_BCL, self.filter_rev_CL]

    def convolve(self, channels: slice, t: int) -> Tensor:
        """Long convolution of one order's channels for the t newest cached inputs, fp32 (B, D, t)."""
        end = self.seen + t
        history_BDP = self.history_BCL[:, channels, :end].float()
        taps_DP = self.filter_rev_CL[channels, self.filter_rev_CL.shape[-1] - end:]
        if t == 1:
            # Σ_j h[p − j]·v_j as a (D, B, P) × (D, P, 1) bmm: the real work of a step, counted
            return (history_BDP.transpose(0, 1) @ taps_DP[:, :, None]).permute(1, 0, 2)
        return fft_causal_conv(history_BDP, taps_DP.flip(-1))[..., self.seen:]


class HyenaFilter(nn.Module):
    """Implicit long filters: MLP(z) · decay window; `bias` is the long convolution's skip term."""

    def __init__(self, plan: HyenaPlan, channels: int) -> None:
        super().__init__()
        self.plan = plan
        f = plan.filter_order
        if plan.trainable_positions:
            self.z = nn.Parameter(torch.empty(1, plan.l_max, plan.emb_dim))
        else:
            self.register_buffer("z", torch.empty(1, plan.l_max, plan.emb_dim), persistent=False)
        self.register_buffer("t", torch.empty(1, plan.l_max, 1), persistent=False)
        self.mlp_in = nn.Linear(plan.emb_dim, f)
        self.mlp_inner = nn.ModuleList(nn.Linear(f, f) for _ in range(plan.filter_depth))
        self.mlp_out = nn.Linear(f, channels, bias=False)
        self.freq = nn.Parameter(torch.empty(1, f))  # safari Sin(dim=F, w), train_freq=True
        self.register_buffer("deltas", torch.empty(1, 1, channels) if plan.modulation else None)
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.bias)
            nn.init.constant_(self.freq, self.plan.sin_freq)
            if isinstance(self.z, nn.Parameter):
                self.z.copy_(positional_features(self.plan.l_max, self.plan.emb_dim, self.z.device)[0])
            if self.deltas is not None:
                max_decay = math.log(_TARGET) / _FAST_DECAY_PCT
                min_decay = math.log(_TARGET) / _SLOW_DECAY_PCT
                channels = self.deltas.shape[-1]
                self.deltas.copy_(torch.linspace(min_decay, max_decay, channels, device=self.deltas.device)[None, None])
        self.reset_buffers()

    def reset_buffers(self) -> None:
        z, t = positional_features(self.plan.l_max, self.plan.emb_dim, self.t.device)
        self.t = t.to(self.t.dtype)
        if not isinstance(self.z, nn.Parameter):
            self.z = z.to(self.z.dtype)

    def forward(self, length: int) -> Tensor:
        """The filters (C, L) for positions 0 … length − 1, fp32."""
        h_1LF = torch.sin(self.freq * self.mlp_in(self.z[:, :length]))
        for layer in self.mlp_inner:
            h_1LF = torch.sin(self.freq * layer(h_1LF))
        h_1LC = self.mlp_out(h_1LF).float()
        if self.deltas is not None:
            h_1LC = h_1LC * torch.exp(-self.t[:, :length].float() * self.deltas.float().abs())
        return h_1LC[0].transpose(0, 1)


class HyenaMixer(nn.Module):
    def __init__(self, plan: HyenaPlan, d_model: int) -> None:
        super().__init__()
        self.plan = plan
        self.d_model = d_model
        inner = (plan.order + 1) * d_model
        self.in_proj = nn.Linear(d_model, inner, bias=plan.bias)
        self.short_filter = nn.Conv1d(inner, inner, plan.short_filter, groups=inner, bias=True)
        self.filter = HyenaFilter(plan, d_model * (plan.order - 1))
        self.out_proj = nn.Linear(d_model, d_model, bias=plan.bias)

    def new_state(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> HyenaState:
        if max_len > self.plan.l_max:
            raise ArchplanError(f"cache length {max_len} exceeds the Hyena filter length l_max {self.plan.l_max}")
        inner = (self.plan.order + 1) * self.d_model
        with torch.no_grad():
            filter_rev_CL = self.filter(max_len).flip(-1).to(device)
        return HyenaState(
            tail_BCJ=torch.zeros(batch, inner, self.plan.short_filter - 1, device=device, dtype=dtype),
            history_BCL=torch.zeros(batch, (self.plan.order - 1) * self.d_model, max_len, device=device, dtype=dtype),
            filter_rev_CL=filter_rev_CL,
        )

    def forward(self, x_BTD: Tensor, state: HyenaState | None = None) -> Tensor:
        d = self.d_model
        seen = state.seen if state is not None else 0
        u_BCT = self.in_proj(x_BTD).transpose(1, 2)
        # the projection's dtype (autocast's 16 bits over fp32 weights), which the gated products
        # keep: the residual stream's (fp32 under autocast) would double them
        act_dtype = u_BCT.dtype
        t = u_BCT.shape[2]  # the length convolved: the whole sequence under context parallelism
        if seen + t > self.plan.l_max:
            raise ArchplanError(f"position {seen + t - 1} is beyond the Hyena filter length l_max {self.plan.l_max}")
        tail = state.tail_BCJ if state is not None else None
        u_BCT, next_tail = causal_short_conv(u_BCT, self.short_filter.weight, self.short_filter.bias, tail)
        *xs, v_BDT = u_BCT.split(d, dim=1)
        h_CL = self.filter(t) if state is None else None
        bias_C = self.filter.bias
        for o, x_BDT in enumerate(reversed(xs[1:])):
            channels = order_channels(o, self.plan.order)
            v_BDT = v_BDT * x_BDT
            if h_CL is not None:
                conv_BDT = fft_causal_conv(v_BDT, h_CL[channels])
            else:
                assert state is not None
                state.history_BCL[:, channels, seen:seen + t] = v_BDT.detach()
                conv_BDT = state.convolve(channels, t)
            # the skip term in fp32 by type promotion, as safari's fftconv_ref (`u * D`): the
            # product keeps the gated input in its own dtype, where an explicit fp32 copy is kept
            v_BDT = (conv_BDT + v_BDT * bias_C[channels, None].float()).to(act_dtype)
            # the convolution's output is a view of its fp32 2T-column result, read by the sum
            # alone: freed here, not held by this frame through the next order and out_proj
            del conv_BDT
        # the filters are read by the convolutions (which keep their spectra) and nothing after
        del h_CL
        if state is not None:
            state.tail_BCJ.copy_(next_tail.detach())
            state.advance(t)
        # contiguous for out_proj, which from batch 2 on would save a contiguous copy of its
        # transposed input: a re-run stopped inside out_proj would hold both
        return self.out_proj((v_BDT * xs[0]).transpose(1, 2).contiguous())
