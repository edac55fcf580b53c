"""Selective SSM mixers: Mamba-1 (Gu & Dao 2023) and Mamba-2 / SSD (Dao & Gu 2024).

Parameters: docs/formulas.md §1.8 (state-spaces/mamba `mamba_simple.Mamba`; Jamba adds RMSNorms on dt, B, C,
HF `JambaMambaMixer`) and §1.9 (`mamba2.Mamba2`: in_proj order [z, x, B, C, dt], dt_bias/A_log/D of
H each, gated RMSNorm over d_inner). Counted FLOPs follow docs/architecture.md "FLOPs convention".
"""

from __future__ import annotations

import math

from archplan.analytic.norms import norm_flops, norm_params
from archplan.resolve import Mamba1Plan, Mamba2Plan

# Tokens per chunk of mamba_ssm's selective-scan kernel, whose forward saves each chunk's final
# (decay, state) pair for the backward (csrc/selective_scan/selective_scan.cpp
# `n_chunks = (seqlen + 2048 - 1) / 2048`, the fwd kernel's at most 128 threads × 16 items).
SCAN_KERNEL_CHUNK = 2048
FP32_BYTES = 4

# SiLU on a vector element (see ffn.ACTIVATION_FLOPS) and softplus log(1 + exp(x)): our estimates.
_SILU = 4
_SOFTPLUS = 3


# ---------------------------------------------------------------------------------------- Mamba-1
def mamba1_matmul_params(m: Mamba1Plan, d_model: int) -> int:
    """in_proj D×2·d_inner, x_proj d_inner×(R + 2N), dt_proj R×d_inner, out_proj d_inner×D."""
    return (
        d_model * 2 * m.d_inner
        + m.d_inner * (m.dt_rank + 2 * m.d_state)
        + m.dt_rank * m.d_inner
        + m.d_inner * d_model
    )


def mamba1_params(m: Mamba1Plan, d_model: int) -> int:
    params = mamba1_matmul_params(m, d_model)
    params += m.d_inner * m.d_conv + (m.d_inner if m.conv_bias else 0)  # depthwise conv1d
    params += m.d_inner  # dt_proj bias (always present in mamba_simple.py)
    params += m.d_inner * m.d_state + m.d_inner  # A_log, D
    if m.proj_bias:
        params += 2 * m.d_inner + d_model  # in_proj and out_proj biases
    if m.inner_norms:
        params += norm_params(m.norm, m.dt_rank) + 2 * norm_params(m.norm, m.d_state)
    return params


def mamba1_counted_flops(m: Mamba1Plan, d_model: int, batch: int, seq_len: int) -> int:
    """Linears + causal depthwise conv (left padding, T outputs) + the scan's C contraction only."""
    rows = batch * seq_len
    conv = 2 * rows * m.d_inner * m.d_conv
    scan_output = 2 * rows * m.d_inner * m.d_state  # einsum('btdn,btn->btd', h, C)
    return 2 * rows * mamba1_matmul_params(m, d_model) + conv + scan_output


def mamba1_elementwise_per_token(m: Mamba1Plan) -> int:
    """Gu's ~9·d_inner·N for the selective scan (state-spaces/mamba issue #110) minus the 2·d_inner·N
    counted above; D skip and z gate d_inner each (VMamba `flops_selective_scan_fn`, citing #110);
    SiLU on x and z and softplus on dt (our estimates); Jamba's inner norms."""
    flops = 7 * m.d_inner * m.d_state + 2 * m.d_inner
    flops += 2 * _SILU * m.d_inner + _SOFTPLUS * m.d_inner
    if m.inner_norms:
        flops += norm_flops(m.norm, m.dt_rank) + 2 * norm_flops(m.norm, m.d_state)
    return flops


def mamba1_activation_bytes(m: Mamba1Plan, d_model: int, batch: int, seq_len: int, act_bytes: int) -> int:
    """What one Mamba-1 mixer keeps for the backward, as mamba_ssm / HF `JambaMambaMixer` run it
    (the (d_inner × N) states are recomputed in the backward, Gu & Dao 2023 §3.3.2):

    - per token, in the activation dtype: in_proj input, xz, the conv output after SiLU
      (`causal_conv1d_fn` keeps only its input, a view of xz), x_proj output, Δ (dt_proj output),
      the scan output, out_proj input (`selective_scan_fn(..., z)` keeps z, a view of xz, and its
      ungated output); with Jamba's dt/B/C norms, their outputs (their inputs are x_proj's);
    - the kernel's chunk states `x` (B, d_inner, ⌈T/2048⌉, 2N) fp32 (selective_scan.cpp);
    - A = −exp(A_log.float()) (d_inner, N) fp32, saved by the scan, and exp's output, saved by
      autograd's exp (mamba_simple.py `Mamba.forward`): once per forward, whatever the batch.
    """
    di, n, r = m.d_inner, m.d_state, m.dt_rank
    width = d_model + 2 * di + di + (r + 2 * n) + di + di + di
    if m.inner_norms:
        width += r + 2 * n
    return act_bytes * batch * seq_len * width + _scan_kernel_states(m, batch, seq_len) + mamba1_a_bytes(m)


def mamba1_a_bytes(m: Mamba1Plan) -> int:
    """A = −exp(A_log.float()) (d_inner, N) fp32, saved by the scan, and exp's output, saved by
    autograd's exp: once per forward, whatever the batch (mamba_simple.py `Mamba.forward`)."""
    return 2 * FP32_BYTES * m.d_inner * m.d_state


def _scan_kernel_states(m: Mamba1Plan, batch: int, seq_len: int) -> int:
    """mamba_ssm's selective-scan chunk states `x`, (B, d_inner, ⌈T/2048⌉, 2N) fp32
    (selective_scan.cpp), kept for its backward."""
    chunks = math.ceil(seq_len / SCAN_KERNEL_CHUNK)
    return FP32_BYTES * batch * m.d_inner * chunks * 2 * m.d_state


def mamba1_unit_bytes(m: Mamba1Plan, batch: int, seq_len: int, act_bytes: int) -> int:
    """What archplan's torch Mamba-1 unit (`modules.mamba1`) keeps beyond mamba_ssm's kernels
    (`mamba1_activation_bytes`; negative where it keeps less), read off its autograd graph's saved
    tensors: the conv's output before the SiLU, which SiLU's backward reads (mamba_ssm's fused
    conv and SiLU recompute it from the conv's input), d_inner per token; and not the kernel's
    chunk states, which the chunked scan recomputes in its backward. mamba_ssm's figure is
    `size`'s; this is `bench --train`'s (`units="torch"`)."""
    return act_bytes * batch * seq_len * m.d_inner - _scan_kernel_states(m, batch, seq_len)


def _scan_chunks(seq_len: int) -> tuple[int, int]:
    """archplan's chunked scan cuts T into n_c chunks of L = ⌈√T⌉ tokens (the last padded): (L, n_c)."""
    length = math.isqrt(max(seq_len, 1) - 1) + 1
    return length, math.ceil(seq_len / length)


def mamba1_scan_backward_bytes(m: Mamba1Plan, batch: int, seq_len: int, input_bytes: int, autocast: bool) -> int:
    """Bytes archplan's torch Mamba-1 scan (`modules.mamba1._ChunkedScan`) holds at the peak of its
    mixer's backward beyond what the layer kept. It keeps only its inputs and recomputes the
    states in its backward: first dC over every channel one step at a time, then the other
    gradients over blocks of ⌈I/N⌉ channels, each block's states, graph and step gradients alive
    at once (one block's states are about one fp32 (B, T, I) tensor), the finished blocks'
    gradients held until they are joined. mamba_ssm's kernel keeps its states on chip (Gu & Dao
    2023 §3.3.2) and holds none of this; `size` prices that, this is `bench --train`'s and the
    torch engine's.

    No source gives it: it is read off a live-bytes trace of the mixer's backward (every op's
    outputs until their storages are freed, docs/figures.md §5.3), where the peak falls at one of
    three phases (dC's pass, a block's backward, the join), each a fixed count of tensors of these
    shapes (b = batch, T = seq_len, L, n_c and T' = n_c·L the chunks, I = d_inner, N = d_state,
    c = ⌈I/N⌉ a block's channels, the last block's c' ≤ c):
      u: b·T·I; all: b·n_c·I·N (one step's states over every channel); st: b·n_c·c·N or b·n_c·c'·N
      (one step's states over a block's channels); tn: b·T·N (B, C and their gradients).
    Beside them, from the gate's backward: the scan's fp32 output gradient and the gate input's
    gradient (`input_bytes`), net of the scan output and out_proj's input it freed (`input_bytes`
    each, kept by the layer). `input_bytes`: the unit's inputs' dtype, 2 under bf16 autocast or
    with bf16 weights (the torch engine), 4 in fp32; under autocast the step gradients' matmuls
    run in bf16 and are cast back. Against the trace over 17 shapes (batch, length, width and
    state size varied; 6 of them in tests/test_memory.py, one with a narrow last block): −0.8% …
    +0.9% with bf16 weights, +0.9% … +4.0% under autocast, +0.0% … +1.6% in fp32."""
    length, n_chunks = _scan_chunks(seq_len)
    padded = n_chunks * length
    i, n = m.d_inner, m.d_state
    block = -(-i // n)
    blocks = -(-i // block)
    last = i - (blocks - 1) * block
    u, every, tn = batch * seq_len * i, batch * n_chunks * i * n, batch * seq_len * n
    f32 = FP32_BYTES
    gate = (f32 - input_bytes) * u
    # a finished block's du and dΔ (the inputs' dtype), dB (fp32, B read in fp32), dA and dD
    finished = 2 * input_bytes * batch * seq_len * block + f32 * (tn + block * n + block)

    def block_backward(channels: int, done: int) -> int:
        """A block of `channels` channels: its recomputed states and decays (two passes), step
        gradients and chunk splits, beside dC, B in fp32 and `done` finished blocks' gradients."""
        step = batch * n_chunks * channels * n
        return (f32 * (2 * tn + (5 * length + 4) * step + 7 * batch * padded * channels + 3 * batch * padded * n
                       + 3 * batch * seq_len * channels) + 6 * tn + done * finished
                + (2 * length * step if autocast else 0))

    return gate + max(
        # dC's pass: every channel's chunk-entering states stacked, beside the fp32 chunk splits
        # of Δ, Δ·u, the output gradient and B, and Δ itself
        f32 * (4 * every + batch * i * n + 3 * batch * padded * i + batch * padded * n + u),
        # the last block's, after every other; where it is narrower than the rest, the last full
        # one's, one finished block fewer beside it, can be larger
        block_backward(last, blocks - 1),
        block_backward(block, blocks - 2) if blocks > 1 else 0,
        # the blocks' gradients joined: du and dΔ concatenated, dB's parts stacked and summed
        f32 * (2 * tn + (blocks + 1) * tn + i * n) + blocks * finished + 2 * input_bytes * u,
    )


def mamba1_state_elements(m: Mamba1Plan) -> int:
    """conv_state d_inner×d_conv + ssm_state d_inner×N per sequence (docs/formulas.md §6.2)."""
    return m.d_inner * m.d_conv + m.d_inner * m.d_state


# ---------------------------------------------------------------------------------------- Mamba-2
def mamba2_matmul_params(m: Mamba2Plan, d_model: int) -> int:
    """in_proj D×(2·d_inner + 2·G·N + H) and out_proj d_inner×D."""
    in_out = 2 * m.d_inner + 2 * m.n_groups * m.d_state + m.n_heads
    return d_model * in_out + m.d_inner * d_model


def mamba2_params(m: Mamba2Plan, d_model: int) -> int:
    params = mamba2_matmul_params(m, d_model)
    params += m.conv_dim * m.d_conv + (m.conv_dim if m.conv_bias else 0)
    params += 3 * m.n_heads  # dt_bias, A_log, D
    params += norm_params(m.norm, m.d_inner)  # gated RMSNorm before out_proj
    if m.proj_bias:
        params += 2 * m.d_inner + 2 * m.n_groups * m.d_state + m.n_heads + d_model
    return params


def ssd_chunks(m: Mamba2Plan, seq_len: int) -> tuple[int, int]:
    """(q, n_c): chunk length min(chunk_size, T) and the number of chunks of the padded sequence."""
    q = min(m.chunk_size, seq_len)
    return q, math.ceil(seq_len / q)


def ssd_counted_flops(m: Mamba2Plan, batch: int, seq_len: int) -> int:
    """The four einsums of `ssd_minimal.py` per chunk (Dao & Gu 2024 §6, Listing 1):
    C·Bᵀ 2q²NG, (CBᵀ∘L)·X 2q²PH, chunk states 2qNPH, state → output 2qNPH."""
    q, n_chunks = ssd_chunks(m, seq_len)
    n, p, h, g = m.d_state, m.head_dim, m.n_heads, m.n_groups
    per_chunk = 2 * q * q * n * g + 2 * q * q * p * h + 2 * q * n * p * h + 2 * q * n * p * h
    return batch * n_chunks * per_chunk


def ssd_backward_bytes(m: Mamba2Plan, batch: int, seq_len: int, autocast: bool) -> int:
    """Bytes archplan's torch SSD unit (`modules.mamba2._ChunkedSSD`) holds at the peak of its
    backward beyond what the layer kept: it recomputes every elementwise operand in fp32 as one
    autograd graph and differentiates it with all of its gradients alive, net of the two
    d_inner-wide tensors the layer's backward has freed by then (the scan output and out_proj's
    input, kept in the activation dtype). mamba_ssm's fused kernels hold none of this; `size`
    prices those and this applies to `bench --train` only (`units="torch"`).

    No source gives it: it is read off a live-bytes trace of the unit's backward (every op's
    outputs until their storages are freed, docs/figures.md §5.3), where the peak falls at one of
    three moments, each a fixed count of tensors of these shapes (b = batch, T = seq_len, T' = the
    padded n_c·q, Hs heads of P, G groups, N = d_state, I = Hs·P):
      x: b·T·I (the input's own length) and b·T'·I (padded, per chunk); decay: b·T'·Hs·q (the q×q
      decay blocks L per head); cd: b·T'·Hs·N (C decayed per head); bn: b·T'·G·N (B, C per
      chunk); states: b·n_c·I·N; state: b·I·N (one chunk's); cb: b·T'·G·q (C·Bᵀ per group).
    Under autocast the matmuls' 16-bit operand casts (2 B) join the fp32 (4 B) recomputation;
    without it the recomputation's shapes differ and there are no casts. Against the trace over 26
    shapes: −0.5% … +1.6% under autocast, −6.1% … +1.5% in fp32 (tests/test_memory.py)."""
    q, n_chunks = ssd_chunks(m, seq_len)
    padded = n_chunks * q
    i, hs, g, n = m.d_inner, m.n_heads, m.n_groups, m.d_state
    x_t, x_p = batch * seq_len * i, batch * padded * i
    decay, cd, bn = batch * padded * hs * q, batch * padded * hs * n, batch * padded * g * n
    states, state, cb = batch * n_chunks * i * n, batch * i * n, batch * padded * g * q
    f32 = FP32_BYTES
    if autocast:
        casts = 2 * (3 * x_p + cd + 3 * bn + 3 * states + cb + decay)
        return max(
            # the decay blocks' backward through segsum's cumsum (flip, cumsum, flip)
            f32 * (7 * decay + 2 * x_t + 5 * x_p + 2 * cd + 6 * bn + 2 * states + 2 * state) + casts + 2 * 3 * x_t,
            # the chunk-state recurrence's backward, every chunk's entering state still alive
            f32 * (3 * decay + 5 * x_t + 5 * x_p + 2 * cd + 6 * bn + 3 * states + state) + casts + 2 * 2 * x_t,
            # the decayed C's backward, summed over each group's heads
            f32 * (3 * decay + 2 * x_t + 5 * x_p + 4 * cd + 7 * bn + 2 * states + 2 * state) + casts + 2 * 3 * x_t,
        )
    return f32 * max(
        7 * decay + 2 * x_t + 6 * x_p + 2 * cd + 6 * bn + 4 * states + 2 * state + cb,
        3 * decay + 2 * x_t + 6 * x_p + 4 * cd + 7 * bn + 4 * states + 2 * state + cb,
        # the chunk states' gradients accumulating
        3 * decay + 5 * x_p + 2 * cd + 2 * bn + 7 * states + 3 * state,
    )


def mamba2_counted_flops(m: Mamba2Plan, d_model: int, batch: int, seq_len: int) -> int:
    rows = batch * seq_len
    conv = 2 * rows * m.conv_dim * m.d_conv
    return 2 * rows * mamba2_matmul_params(m, d_model) + conv + ssd_counted_flops(m, batch, seq_len)


def mamba2_elementwise(m: Mamba2Plan, batch: int, seq_len: int) -> int:
    """Our estimate of what `ssd_minimal.py` does outside the einsums, for B sequences of T tokens.

    Per chunk: exp(segsum) and the mask product on the q×q×H decay matrix (2·q²·H) and the
    inter-chunk recurrence on H·P·N states (2 each). Per token: softplus(dt + dt_bias) and dt·A (4·H),
    dt·x (d_inner), D skip (2·d_inner), SiLU on the conv output, gate SiLU(z)·y (5·d_inner) and the
    gated RMSNorm (4·d_inner).
    """
    q, n_chunks = ssd_chunks(m, seq_len)
    per_chunk = 2 * q * q * m.n_heads + 2 * m.n_heads * m.head_dim * m.d_state
    per_token = (_SOFTPLUS + 1) * m.n_heads + 3 * m.d_inner + _SILU * m.conv_dim
    per_token += (_SILU + 1) * m.d_inner + norm_flops(m.norm, m.d_inner)
    return batch * (n_chunks * per_chunk + seq_len * per_token)


def mamba2_state_elements(m: Mamba2Plan) -> int:
    """conv_state conv_dim×d_conv + ssm_state H×P×N per sequence (docs/formulas.md §6.2)."""
    return m.conv_dim * m.d_conv + m.n_heads * m.head_dim * m.d_state
