"""The Hyena operator (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language
Models"; HazyResearch/safari `src/models/sequence/hyena.py`) and StripedHyena's hyena mixer
(togethercomputer/stripedhyena `model.py` ParallelHyenaFilter, projections and out_filter_dense),
as built by `archplan.modules.hyena` and `archplan.modules.stripedhyena`.

Hyena, order N_o, width D, filter MLP width F and depth M, positional features E, short filter k:
  in_proj (N_o+1)·D×D + bias, out_proj D×D + bias, short depthwise conv over (N_o+1)·D channels
  (k taps + bias), filter bias D·(N_o−1), positional features z (l_max × E; parameter or buffer),
  implicit MLP Linear(E, F) + bias, M × Linear(F, F) + bias, Linear(F, D·(N_o−1)) no bias, one Sin
  frequency (1, F) shared by every Sin (safari builds a single `Sin` module), modulation deltas
  (a buffer). N_o = 2, k = 3, F = 64, E = 33, M = 2, l_max = 2048: 4D² + 81D + 78,144.
StripedHyena: projections 3D×D + bias, out_filter_dense D×D + bias, D skip (D), short FIR (3D × k)
  + bias (optional), poles and residues (D/g, S, 1, 2) each.
FFT convention: `archplan.analytic.s4` (length 2T; 2.5·n·⌈log2 n⌉ per real FFT).
"""

from __future__ import annotations

from dataclasses import dataclass

from archplan.analytic.s4 import fft_conv_backward_bytes, fft_conv_flops, fft_length
from archplan.resolve import HyenaPlan, StripedHyenaPlan

_SIN = 4  # sin(freq·x): our estimate, as for the other transcendental activations


# ------------------------------------------------------------------------------------------ Hyena
def hyena_filter_channels(m: HyenaPlan, d_model: int) -> int:
    return d_model * (m.order - 1)


def hyena_matmul_params(m: HyenaPlan, d_model: int) -> int:
    """in_proj and out_proj: what every token multiplies (the filter MLP runs per position, not per token)."""
    return (m.order + 1) * d_model * d_model + d_model * d_model


def hyena_filter_mlp_params(m: HyenaPlan, d_model: int) -> int:
    f = m.filter_order
    return (m.emb_dim * f + f) + m.filter_depth * (f * f + f) + f * hyena_filter_channels(m, d_model) + f


def hyena_params(m: HyenaPlan, d_model: int) -> int:
    inner = (m.order + 1) * d_model
    params = hyena_matmul_params(m, d_model)
    params += (inner + d_model) if m.bias else 0
    params += inner * m.short_filter + inner  # depthwise short conv + its bias
    params += hyena_filter_channels(m, d_model)  # the long convolution's skip bias
    params += hyena_filter_mlp_params(m, d_model)
    params += m.l_max * m.emb_dim if m.trainable_positions else 0
    return params


def hyena_buffer_elements(m: HyenaPlan, d_model: int) -> int:
    """Positional table z (when not trainable), its time axis t (l_max), modulation deltas."""
    z = 0 if m.trainable_positions else m.l_max * m.emb_dim
    return z + m.l_max + (hyena_filter_channels(m, d_model) if m.modulation else 0)


def _filter_mlp_flops(m: HyenaPlan, d_model: int, positions: int) -> int:
    f = m.filter_order
    per_position = m.emb_dim * f + m.filter_depth * f * f + f * hyena_filter_channels(m, d_model)
    return 2 * positions * per_position


def hyena_counted_flops(m: HyenaPlan, d_model: int, batch: int, seq_len: int) -> int:
    rows = batch * seq_len
    inner = (m.order + 1) * d_model
    short = 2 * rows * inner * m.short_filter
    r2c, c2r = fft_conv_flops(d_model, d_model, batch, seq_len)
    long_convs = (m.order - 1) * (r2c + c2r)
    return (
        2 * rows * hyena_matmul_params(m, d_model) + short
        + _filter_mlp_flops(m, d_model, seq_len) + long_convs
    )


def hyena_backward_adjust(m: HyenaPlan, d_model: int, batch: int, seq_len: int) -> int:
    """Backward minus 2 × forward: each irfft's gradient is 1 × its forward (see s4_backward_adjust);
    with buffer positional features the MLP's first Linear has no input gradient (1 × forward)."""
    _, c2r = fft_conv_flops(d_model, d_model, batch, seq_len)
    adjust = -(m.order - 1) * c2r
    if not m.trainable_positions:
        adjust -= 2 * seq_len * m.emb_dim * m.filter_order
    return adjust


def hyena_elementwise(m: HyenaPlan, d_model: int, batch: int, seq_len: int) -> int:
    """Our estimate: Sin after every filter MLP layer (per position), the modulation (exp and
    product), per order the gate v·x_i, the skip v·bias, the spectrum product, and the final gate."""
    channels = hyena_filter_channels(m, d_model)
    per_position = _SIN * m.filter_order * (1 + m.filter_depth) + (3 * channels if m.modulation else 0)
    bins = fft_length(seq_len) // 2 + 1
    per_order = batch * seq_len * d_model * 3 + 6 * batch * d_model * bins
    return seq_len * per_position + (m.order - 1) * per_order + batch * seq_len * d_model


def hyena_decode_counted_flops(m: HyenaPlan, d_model: int, context: int) -> int:
    """One new token of one sequence at `context` (itself included), counted: in_proj and out_proj,
    the short conv over (N_o+1)·D channels, and each long convolution as the direct sum
    Σ_j h[t − j]·v_j over the `context` cached inputs (one bmm, 2·D·context). The filters were
    computed when the cache was made (modules/hyena.py `new_state`), never per step."""
    inner = (m.order + 1) * d_model
    long_convs = (m.order - 1) * 2 * d_model * context
    return 2 * hyena_matmul_params(m, d_model) + 2 * inner * m.short_filter + long_convs


def hyena_decode_elementwise(m: HyenaPlan, d_model: int) -> int:
    """Our estimate per sequence and step: per order the gate v·x_i and the skip v·bias + add (3·D),
    and the final gate (D), as in `hyena_elementwise` per token."""
    return (m.order - 1) * 3 * d_model + d_model


def hyena_cache_per_token(m: HyenaPlan, d_model: int) -> int:
    """Inputs of the order−1 long convolutions: (N_o − 1)·D values per past token (a growing cache)."""
    return hyena_filter_channels(m, d_model)


def hyena_filter_cache_per_token(m: HyenaPlan, d_model: int) -> int:
    """The long filters' taps, (N_o − 1)·D per cached position: fp32, computed once per cache and
    shared by the batch (they depend on no input), so no decode step reruns the filter MLP."""
    return hyena_filter_channels(m, d_model)


def hyena_state_elements(m: HyenaPlan, d_model: int) -> int:
    """The short conv's last k − 1 inputs over (N_o+1)·D channels."""
    return (m.order + 1) * d_model * (m.short_filter - 1)


@dataclass(frozen=True)
class HyenaFilterActs:
    """What one forward of a Hyena layer keeps of its implicit filters, whatever the batch (the
    filters depend on the positions alone): our count of eager autograd over
    `archplan.modules.hyena.HyenaFilter`."""

    spectra: int  # the filters' fp32 spectra (complex64, fft_length / 2 + 1 bins a channel)
    window: int  # the modulation's fp32 decay window exp(−t·|δ|) (T × channels), saved by h · window
    trunk: int  # the filter MLP's linear output, freq · it and its Sin (T × F each, per MLP layer)

    @property
    def total(self) -> int:
        return self.spectra + self.window + self.trunk


def hyena_filter_activation_bytes(m: HyenaPlan, d_model: int, seq_len: int, act_bytes: int) -> HyenaFilterActs:
    channels = hyena_filter_channels(m, d_model)
    bins = fft_length(seq_len) // 2 + 1
    return HyenaFilterActs(
        spectra=8 * channels * bins,
        window=4 * seq_len * channels if m.modulation else 0,
        trunk=3 * (m.filter_depth + 1) * act_bytes * seq_len * m.filter_order,
    )


def hyena_activation_bytes(m: HyenaPlan, d_model: int, batch: int, seq_len: int, act_bytes: int) -> int:
    """Our count of what eager autograd keeps: in_proj input and output, short conv output, per
    order the gated input (in its own dtype: the fp32 skip product promotes it), the input's fp32
    spectrum and the conv output, out_proj input; and, once per forward, the filters
    (`hyena_filter_activation_bytes`)."""
    tokens = batch * seq_len
    inner = (m.order + 1) * d_model
    bins = fft_length(seq_len) // 2 + 1
    per_order = act_bytes * tokens * 2 * d_model + 8 * batch * d_model * bins
    filters = hyena_filter_activation_bytes(m, d_model, seq_len, act_bytes).total
    return act_bytes * tokens * (d_model + 2 * inner + d_model) + (m.order - 1) * per_order + filters


# ----------------------------------------------------------------------------------- StripedHyena
def striped_filters(m: StripedHyenaPlan, d_model: int) -> int:
    """Distinct modal filters: one per `filter_groups` channels."""
    return d_model // m.filter_groups


def striped_matmul_params(d_model: int) -> int:
    return 3 * d_model * d_model + d_model * d_model


def striped_params(m: StripedHyenaPlan, d_model: int) -> int:
    params = striped_matmul_params(d_model) + 3 * d_model + d_model  # + projection biases
    params += d_model  # D skip
    params += 3 * d_model * m.short_filter + (3 * d_model if m.short_filter_bias else 0)
    params += 2 * striped_filters(m, d_model) * m.state_size * 2  # poles, residues (real pairs)
    return params


def striped_counted_flops(m: StripedHyenaPlan, d_model: int, batch: int, seq_len: int) -> int:
    """Projections, the short FIR (3D channels, left padded), the modal filter h = [Re r, −Im r]·
    [|p|^t cos tθ; |p|^t sin tθ] (one bmm, 2·(D/g)·2S·T), the FFT convolution (D/g kernels), out dense."""
    rows = batch * seq_len
    short = 2 * rows * 3 * d_model * m.short_filter
    modal = 2 * striped_filters(m, d_model) * 2 * m.state_size * seq_len
    r2c, c2r = fft_conv_flops(d_model, striped_filters(m, d_model), batch, seq_len)
    return 2 * rows * striped_matmul_params(d_model) + short + modal + r2c + c2r


def striped_backward_adjust(m: StripedHyenaPlan, d_model: int, batch: int, seq_len: int) -> int:
    _, c2r = fft_conv_flops(d_model, striped_filters(m, d_model), batch, seq_len)
    return -c2r


def striped_elementwise(m: StripedHyenaPlan, d_model: int, batch: int, seq_len: int) -> int:
    """Our estimate: the modal basis (pow, cos, sin, products: 6 per pole and position), x1·v, the
    spectrum product, D skip and the x2 gate."""
    basis = 6 * striped_filters(m, d_model) * m.state_size * seq_len
    bins = fft_length(seq_len) // 2 + 1
    return basis + 6 * batch * d_model * bins + 4 * batch * seq_len * d_model


def striped_decode_counted_flops(m: StripedHyenaPlan, d_model: int) -> int:
    """One step of one sequence, counted: projections, out_filter_dense and the short FIR over its k
    taps on 3D channels (stripedhyena engine `step_fir`). The modal update is elementwise."""
    return 2 * striped_matmul_params(d_model) + 2 * 3 * d_model * m.short_filter


def striped_decode_elementwise(m: StripedHyenaPlan, d_model: int) -> int:
    """Our estimate per sequence and step (stripedhyena engine `step_iir`): the modal update
    x ← p·x + u (8 per complex pole) and y = Re Σ r·x (4 per pole) per channel, x1·v, D skip and
    the x2 gate (4 per channel)."""
    return 12 * d_model * m.state_size + 4 * d_model


def striped_state_elements(m: StripedHyenaPlan, d_model: int) -> tuple[int, int]:
    """(FIR tail in the activation dtype, modal state in fp32): 3D·(k−1) and D·S complex = 2·D·S floats."""
    return 3 * d_model * (m.short_filter - 1), 2 * d_model * m.state_size


def striped_activation_bytes(m: StripedHyenaPlan, d_model: int, batch: int, seq_len: int,
                             act_bytes: int) -> int:
    """Our estimate: projections input and output (3D), FIR output (3D), x1·v, both fp32 spectra,
    the conv output, out_filter_dense input."""
    tokens = batch * seq_len
    bins = fft_length(seq_len) // 2 + 1
    return (act_bytes * tokens * (d_model + 3 * d_model + 3 * d_model + 3 * d_model) + 8 * batch * d_model * bins
            + striped_filter_once_bytes(m, d_model, seq_len))


def striped_filter_once_bytes(m: StripedHyenaPlan, d_model: int, seq_len: int) -> int:
    """The modal filters' fp32 spectra (complex64, fft_length / 2 + 1 bins a filter), made once a
    forward whatever the batch (they depend on the parameters and the length alone)."""
    return 8 * striped_filters(m, d_model) * (fft_length(seq_len) // 2 + 1)


def hyena_backward_bytes(d_model: int, batch: int, seq_len: int) -> int:
    """What a Hyena mixer holds at the peak of its backward beyond what the layer kept: its long
    convolutions' FFT moment (`s4.fft_conv_backward_bytes`, D channels and D filters each, one
    order at a time), net of what is freed by then, 2 bytes a token and channel in all. The filter
    MLP's backward (plain autograd, positions × its width) is not priced: it holds less than the
    convolutions where the MLP is narrower than the channels, as in every preset (a 512-wide MLP
    at d_model 16 holds about three times this). No source gives the net term: a fit to a
    live-bytes trace of the mixer's backward over 8 shapes (batch, length, width and order varied)
    and both dtypes, −5.7% … +16.8% (tests/test_memory.py). It prices from above where the batch
    and the length are small: 1.2 at 1 × 256 tokens, d_model 64, and 1.5–2.6 at 1 × 128, a few
    percent of such a model's step peak (0.97 at d_model 256 and 128 tokens)."""
    tokens = batch * seq_len * d_model
    return fft_conv_backward_bytes(batch, d_model, d_model, seq_len) - 2 * tokens


def striped_backward_bytes(m: StripedHyenaPlan, d_model: int, batch: int, seq_len: int, act_bytes: int,
                           autocast: bool) -> int:
    """What StripedHyena's mixer holds at the peak of its backward beyond what the layer kept: the
    FFT convolution's moment (`s4.fft_conv_backward_bytes`) beside the gated skip's gradients (the
    convolution output's in fp32, x1's, v's and x2's in the activation dtype) and net of what is
    freed by then, (2·act − 1) bytes a token and channel in all; or the modal filter unit's
    (`modules.stripedhyena._ModalFilter`, which keeps only poles and residues) where that is
    larger: its backward recomputes the basis [Re; Im] p^t, W = 4·G·2S·T bytes in fp32 for G
    filters of S poles, with its powers, cos, sin, products and (under autocast) the bmm's casts
    alive: 6.5·W under autocast, 6·W in fp32, net of the tensors freed by then. No source gives it:
    the filter's terms are a fit to a live-bytes trace of the mixer's backward over 8 shapes (batch,
    length, width, poles and groups varied) and both dtypes; the mixer's peak is priced within
    −2.3% … +5.4% of that trace (tests/test_memory.py)."""
    d, t = d_model, seq_len
    g = striped_filters(m, d)
    tokens = batch * t * d
    fft = fft_conv_backward_bytes(batch, d, g, t) + (2 * act_bytes - 1) * tokens
    basis = 4 * g * 2 * m.state_size * t
    if autocast:
        filt = (13 * basis - 9 * tokens - 3 * d * t) // 2 - 7 * g * t
    else:
        filt = 6 * basis - tokens // 2 - d * t - 5 * g * t
    return max(fft, filt)
