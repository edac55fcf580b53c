"""S4D (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space Models")
and S4 with a diagonal-plus-low-rank A (Gu et al. 2022, "Efficiently Modeling Long Sequences with
Structured State Spaces"), as built by `archplan.modules.s4`.

Layer over H = d_model channels, N' = N/2 complex modes (conjugate pairs), S = n_ssm copies of
(A, B, P) (state-spaces/s4 `models/s4/s4.py`, `register(name, tensor, lr)`: lr 0.0 = buffer):
  trainable always:   D (H), C (H, N', 2), output Linear(H, 2H) + bias (GLU halves it back to H)
  trainable or buffer (`ssm_buffers`): log Δ (H), B (S, N', 2), log(−Re A) and Im A (S, N') each,
                      P (S, N', 2) for S4 (rank 1)
Counted FLOPs of one forward (docs/architecture.md "FLOPs convention"; FFTs: docs/formulas.md, the
registered convention 2.5·n·⌈log2 n⌉ per real FFT of length n, 5·n·⌈log2 n⌉ per complex FFT):
  kernel: S4D K = 2·[Re C̃, −Im C̃]·V with V (H, N, T) the real and imaginary parts of B̄·Ā^l:
          2·H·N·T, as bmm of the chunk starts' rows with a √T-position basis (l = s·c + j). S4 builds V = [B̄, Ā·B̄, Ā²·B̄, …] by doubling on the real (N × N) block
          form of the dense Ā: T − 1 columns of matrix-vector work (2·H·N²·(T−1)) and ⌈log2 T⌉ − 1
          squarings (2·H·N³ each), then the same C contraction.
  conv:   rfft(u) (B·H transforms) and rfft(K) (H), irfft (B·H), all of length n = 2T.
  output: Linear(H, 2H), 2·B·T·H·2H.
"""

from __future__ import annotations

from archplan.resolve import S4Plan

# GELU on the SSM output (ffn.ACTIVATION_FLOPS's estimate) and the GLU's sigmoid + product.
_GELU = 8
_GLU = 5


def fft_length(seq_len: int) -> int:
    """FFT length of a causal long convolution over T tokens: 2T (no circular wrap-around)."""
    return 2 * seq_len


def log2_ceil(n: int) -> int:
    return (n - 1).bit_length()


def real_fft_flops(n: int) -> int:
    """One real FFT (rfft or irfft) of length n: 2.5·n·⌈log2 n⌉ (the usual radix-2 count)."""
    return 5 * n * log2_ceil(n) // 2


def fft_conv_flops(channels: int, kernels: int, batch: int, seq_len: int) -> tuple[int, int]:
    """(r2c FLOPs, c2r FLOPs) of y = irfft(rfft(u)·rfft(k)) over `channels` input channels per
    sequence and `kernels` distinct filters."""
    one = real_fft_flops(fft_length(seq_len))
    return (batch * channels + kernels) * one, batch * channels * one


def s4_ssm_params(m: S4Plan, d_model: int) -> int:
    """The tensors `ssm_buffers` turns into buffers: log Δ, B, A (real and imaginary), P."""
    per_copy = 2 * m.modes + 2 * m.modes + (2 * m.modes if m.dplr else 0)
    return d_model + m.n_ssm * per_copy


def s4_matmul_params(d_model: int) -> int:
    """The output Linear(H, 2H) before the GLU."""
    return d_model * 2 * d_model


def s4_params(m: S4Plan, d_model: int) -> int:
    h = d_model
    params = h + 2 * h * m.modes + s4_matmul_params(h) + 2 * h  # D, C, output linear + bias
    return params + (0 if m.ssm_buffers else s4_ssm_params(m, d_model))


def s4_buffer_elements(m: S4Plan, d_model: int) -> int:
    """Elements held as buffers (not parameters) when `ssm_buffers`, else 0."""
    return s4_ssm_params(m, d_model) if m.ssm_buffers else 0


def _doubling_flops(m: S4Plan, d_model: int, seq_len: int) -> int:
    """S4: V_l = Ā^l·B̄ for l < T by doubling on the real N × N block form (see the module docstring)."""
    n = m.d_state
    squarings = max(log2_ceil(seq_len) - 1, 0)
    return 2 * d_model * n * n * (seq_len - 1) + squarings * 2 * d_model * n**3


def s4_kernel_flops(m: S4Plan, d_model: int, seq_len: int) -> int:
    contraction = 2 * d_model * m.d_state * seq_len
    return contraction + (_doubling_flops(m, d_model, seq_len) if m.dplr else 0)


def s4_counted_flops(m: S4Plan, d_model: int, batch: int, seq_len: int) -> int:
    r2c, c2r = fft_conv_flops(d_model, d_model, batch, seq_len)
    output = 2 * batch * seq_len * s4_matmul_params(d_model)
    return s4_kernel_flops(m, d_model, seq_len) + r2c + c2r + output


def s4_backward_adjust(m: S4Plan, d_model: int, batch: int, seq_len: int) -> int:
    """Backward counted FLOPs minus 2 × forward. irfft's gradient is one rfft (1 × its forward,
    torch `fft_c2r_backward`); rfft's is one complex FFT (2 ×). With `ssm_buffers` the kernel basis
    needs no gradient: the C contraction's backward is 1 × its forward, S4's doubling has none."""
    _, c2r = fft_conv_flops(d_model, d_model, batch, seq_len)
    adjust = -c2r
    if m.ssm_buffers:
        adjust -= 2 * d_model * m.d_state * seq_len
        if m.dplr:
            adjust -= 2 * _doubling_flops(m, d_model, seq_len)
    return adjust


def s4_elementwise(m: S4Plan, d_model: int, batch: int, seq_len: int) -> int:
    """Our estimate: kernel generation (the basis' and chunk starts' exp, cos, sin and products,
    O(H·M·√T) since the two-level split, bounded here by 8 per mode, position and channel), the spectrum product (6 per complex bin), D skip
    (2), GELU and GLU per token and channel."""
    h = d_model
    basis = 8 * h * m.modes * seq_len
    bins = fft_length(seq_len) // 2 + 1
    spectrum = 6 * batch * h * bins
    return basis + spectrum + batch * seq_len * h * (2 + _GELU + _GLU)


def s4_decode_counted_flops(d_model: int) -> int:
    """One decode step of one sequence, counted: the output Linear(H, 2H) only. The recurrence is
    elementwise for both S4D (diagonal Ā) and S4 (Ā applied in O(N) as a⊙x + q·2·Re(rᵀx)), and a single
    token into a fresh state steps too (modules/s4.py), so no kernel or FFT runs while decoding."""
    return 2 * s4_matmul_params(d_model)


def s4_decode_elementwise(m: S4Plan, d_model: int, batch: int) -> int:
    """Our estimate of one decode step, elementwise. Per sequence, channel and complex mode: the
    update a⊙x + B̄·u (10: a complex product, a complex-by-real product, an add) and the output
    Re Σ C·x (8: a complex product and the complex sum); S4 adds q·2·Re(rᵀx) (12: a complex
    product and the complex sum, a complex-by-real product, an add). Per sequence and channel: D skip (2),
    GELU, GLU. Once for the batch: the discretisation Ā, B̄ from (Δ, A, B, P), recomputed each step,
    exp and a complex division per mode (S4D, 20) or the Woodbury terms (S4, 60)."""
    h = d_model
    per_mode = 18 + (12 if m.dplr else 0)
    discretise = (60 if m.dplr else 20) * h * m.modes
    return batch * h * (per_mode * m.modes + 2 + _GELU + _GLU) + discretise


def s4_state_fp32_elements(m: S4Plan, d_model: int) -> int:
    """Decode state (B = 1): N/2 complex modes per channel held in fp32 whatever the model dtype,
    H·N floats = 4·H·N bytes (s4.py `default_state`, complex64)."""
    return d_model * m.d_state


def s4_activation_bytes(m: S4Plan, d_model: int, batch: int, seq_len: int, act_bytes: int,
                        autocast: bool = False) -> int:
    """Saved for the backward (our count of eager autograd): the layer input and its fp32 copy,
    the input's spectrum (complex64, n/2 + 1 bins), the conv output, GELU input and output, GLU
    input (2H); and the kernel's spectrum and generation (`s4_kernel_once_bytes`), once a
    micro-batch whatever its size."""
    h, tokens = d_model, batch * seq_len
    bins = fft_length(seq_len) // 2 + 1
    return (act_bytes * tokens * (h + h + h + 2 * h) + 4 * tokens * h + 8 * batch * h * bins
            + s4_kernel_once_bytes(m, h, seq_len, autocast))


def s4_kernel_once_bytes(m: S4Plan, d_model: int, seq_len: int, autocast: bool) -> int:
    """What one forward keeps of S4's kernel, whatever the batch (the kernel depends on the
    parameters and the length alone): its fp32 spectrum (complex64, n/2 + 1 bins a channel) and
    its generation: S4's (`s4_kernel_activation_bytes`), or the per-channel inputs S4D's kernel
    unit saves, log(−Re A), Im A and B repeated from the SSM copies to every channel in fp32 (4·M
    floats a channel; log Δ and C are the parameters themselves). Every term is per channel."""
    bins = fft_length(seq_len) // 2 + 1
    kernel = s4_kernel_activation_bytes(m, d_model, seq_len, autocast) if m.dplr else 4 * d_model * 4 * m.modes
    return 8 * d_model * bins + kernel


def _doubling_steps(seq_len: int) -> list[tuple[int, int]]:
    """S4's doubling (`modules.s4.S4Mixer._dplr_basis`), step by step: the columns of the basis
    built before the step and the columns it adds, min(cols, T − cols), until T."""
    steps, cols = [], 1
    while cols < seq_len:
        need = min(cols, seq_len - cols)
        steps.append((cols, need))
        cols += need
    return steps


def s4_kernel_activation_bytes(m: S4Plan, d_model: int, seq_len: int, autocast: bool) -> int:
    """What S4's (DPLR) kernel generation keeps for the backward, per channel H of d_model, with
    N = 2·M real rows for its M complex modes (`S4Mixer._dplr_basis`, `_discrete`). S4D's kernel
    is one autograd unit keeping only its inputs (`_S4DKernel`): nothing here.

    - C's gradient reads the basis [Re; Im] Ā^l·B̄, l < T: H·N·T values, as the matmul saw them
      (fp32, as `_per_channel` casts the SSM's tensors; their bf16 casts under autocast). With
      `ssm_buffers` only C trains, and that is all.
    - Otherwise the doubling's steps keep their operands: each step multiplies Ā^(2^k) (H, N, N) by
      the basis so far. In fp32 the operand is a view of the whole basis built so far (its storage:
      Σ cols before each step); under autocast it is its bf16 cast, of the columns read (Σ need).
    - The Woodbury discretisation (`_discrete`) keeps 11 complex64 and 3 fp32 (H, M) tensors, and
      8 fp32 and one complex64 values per channel: 100·M + 40 bytes. Ā's real block
      (`_Discrete.real_block`) keeps its rank-one term's two fp32 factors (H, N): 16·M. C's row
      keeps 8·M in fp32, its bf16 cast 4·M under autocast, which also casts the (H, N, N) block
      twice more once a step squares it (16·M²).
    Counted by tracing autograd's saved tensors, for T ≥ 2 (tests/test_modules_s4.py holds the sum
    exactly over widths, modes, lengths and both dtypes)."""
    h, modes, t = d_model, m.modes, seq_len
    n = 2 * modes
    act_bytes = 2 if autocast else 4
    basis = act_bytes * h * n * t
    if m.ssm_buffers:
        return basis
    steps = _doubling_steps(t)
    kept = sum(need if autocast else cols for cols, need in steps)
    doubling = act_bytes * h * n * kept + act_bytes * h * n * n * len(steps)
    # autocast's bf16 casts of the (H, N, N) block: two beside the steps' own once it is squared
    squared = 16 * modes * modes if len(steps) >= 2 else 0
    c_row = 4 * modes + squared if autocast else 8 * modes
    discrete = h * (100 * modes + 40) + h * (16 * modes + c_row)
    return basis + doubling + discrete


def fft_conv_backward_bytes(batch: int, channels: int, filters: int, seq_len: int) -> int:
    """What the FFT convolution's backward (`modules.s4._FFTConv`) holds at its peak beyond its two
    saved spectra, over `channels` channels per sequence and `filters` distinct filters: the larger
    of two moments, each while an inverse complex FFT of length n = 2T runs on a zero-extended
    spectrum (torch's `fft_r2c_backward`), that spectrum and the FFT's output complex64 side by side.
    The input's gradient: the pair at (B, C, n), beside the output gradient's spectrum and its
    product with the filters' (B, C, n/2 + 1 each). The filters' gradient: the pair at (K, n), beside
    the output gradient's spectrum, the filters' gradient spectrum (K, n/2 + 1) and the finished
    input gradient ((B, C, T), counted at 4 bytes: S4's and StripedHyena's convolution input is
    fp32; Hyena's net term absorbs its 16-bit one under autocast). Counted from the unit's code and
    checked, with each mixer's own terms (`s4_backward_bytes`, `hyena.hyena_backward_bytes`,
    `hyena.striped_backward_bytes`), against a live-bytes trace."""
    n = fft_length(seq_len)
    bins = n // 2 + 1
    spectrum = 8 * batch * channels * bins
    inputs = 2 * 8 * batch * channels * n + 2 * spectrum
    kernel = 4 * batch * channels * seq_len + spectrum + 8 * filters * bins + 2 * 8 * filters * n
    return max(inputs, kernel)


def s4d_basis_chunk(seq_len: int) -> int:
    """S4D's kernel splits T positions into chunks of c, a power of two near √T (its module's
    two-level Vandermonde product: one basis of c powers and ⌈T/c⌉ chunk starts)."""
    return 1 << (seq_len.bit_length() // 2)


def s4d_kernel_backward_bytes(m: S4Plan, d_model: int, seq_len: int, autocast: bool) -> int:
    """What S4D's kernel unit (`modules.s4._S4DKernel`, which keeps only its (H, M) inputs) holds at
    the peak of its backward: it recomputes the chunk starts' rows and the basis as one autograd
    graph, runs the chunk contraction's two bmm backwards and differentiates that graph with its
    gradients alive. In H channels, M = N/2 modes, c = `s4d_basis_chunk(T)` and S = ⌈T/c⌉ chunks,
    with X = 8·H·M·c (one complex64 (H, M, c) tensor: the basis, its powers, their cos, sin and
    products), Y = 8·H·M·S (the same at the chunk starts) and Z = 8·H·M (one complex64 (H, M)
    tensor of the discretisation): 4.5·X + 11.5·Y + 2·H·T bytes under autocast (the bmm's 16-bit
    casts), 4·X + 11·Y + 4·H·T in fp32, plus 4·Z and the fp32 exponent ranges, 4·(c + S), with
    whole chunks, or 2·X where a partial last chunk makes a second bmm. With `ssm_buffers` only C
    needs a gradient: the recomputation runs without a graph for Δ, A and B, X + 6.5·Y + 2·H·T − Z
    under autocast, X + 6·Y + 4·H·T − Z in fp32. No source gives it: read off a live-bytes trace
    of the unit alone over 27 shapes (H 128 … 512, M 8 … 64, T 256 … 8,192, chunks whole and
    partial); the Z terms from short sequences (H 64 … 512, M 8 … 64, T 5 … 2,048), where X and
    Y are small and the forms without them read 0.90 … 0.99 of the trace (1.01 … 1.07 with `ssm_buffers`). Whole chunks are then exact in
    both dtypes; partial ones −6.9% at T = 5, −1.8% … +3.8% from T = 12; `ssm_buffers` exact
    (tests/test_memory.py holds 24 of the shapes). state-spaces/s4's Vandermonde CUDA kernel
    holds none of this (it recomputes the powers on chip)."""
    c = s4d_basis_chunk(seq_len)
    chunks = -(-seq_len // c)
    x = 8 * d_model * m.modes * c
    y = 8 * d_model * m.modes * chunks
    z = 8 * d_model * m.modes
    if m.ssm_buffers:
        return x + (13 * y // 2 + 2 * d_model * seq_len if autocast else 6 * y + 4 * d_model * seq_len) - z
    beyond = 2 * x if seq_len % c else 4 * z + 4 * (c + chunks)
    if autocast:
        return (9 * x + 23 * y) // 2 + 2 * d_model * seq_len + beyond
    return 4 * x + 11 * y + 4 * d_model * seq_len + beyond


def s4_backward_bytes(m: S4Plan, d_model: int, batch: int, seq_len: int, act_bytes: int, autocast: bool) -> int:
    """What an S4 layer's mixer holds at the peak of its backward beyond what the layer kept: the
    FFT convolution's moment (`fft_conv_backward_bytes`) beside the output gradient and D·u's (fp32,
    (B, H, T) each) and without the GLU's input and the GELU's output and input, freed by then
    ((3·act + 4) bytes a token and channel); for S4D the kernel unit's backward
    (`s4d_kernel_backward_bytes`) where that is larger, net of those freed tensors and of the
    convolution's gradient read by then (a fit: (3·act + 7)·B·H·T + 6·H·T); for S4 (DPLR) its
    doubling's backward where that is larger (`s4_doubling_backward_bytes`). These are archplan's
    kernel generations, whose kept tensors `s4_activation_bytes` counts too (state-spaces/s4's
    Cauchy and Vandermonde CUDA kernels hold neither: no figure here is theirs). Against a
    live-bytes trace of the mixer's backward, S4D over 10 shapes (T 16 … 2,048) and both dtypes
    (7 of them in tests/test_memory.py): −3.2% … +6.2%; with `ssm_buffers`, over the 6 from
    T = 256 on, −1.1% … +9.8%, and over more at short T under autocast (+11% … +22% from 64
    down to 16 tokens: the fit's freed tensors are larger than what the peak still holds);
    S4 over 20 shapes −2.1% … +9.0% but one, +25% (1 × 128 tokens, d_model 256, 16 states,
    autocast)."""
    h, t = d_model, seq_len
    tokens = batch * t * h
    fft = fft_conv_backward_bytes(batch, h, h, t) + (8 - (3 * act_bytes + 4)) * tokens
    if m.dplr:
        return max(fft, s4_doubling_backward_bytes(m, h, batch, t, act_bytes, autocast))
    kernel = s4d_kernel_backward_bytes(m, h, t, autocast) - (3 * act_bytes + 7) * tokens - 6 * h * t
    return max(fft, kernel)


def s4_generation_transient_bytes(m: S4Plan, d_model: int, seq_len: int, autocast: bool) -> int:
    """What S4's (DPLR) kernel generation holds at its forward's peak beyond what it keeps
    (`s4_kernel_activation_bytes`), counted from the code of `modules.s4.S4Mixer._dplr_basis`, in
    H channels of N real rows, P = H·N² (Ā complex is 2·P bytes, its real block form 4·P in fp32):
    the largest of its moments,
    - building the block: Ā, the block's two (H, N/2, N) halves (2·P each) and the block (4·P);
    - each doubling step's concatenation: the basis so far (fp32, `cols` columns), the step's
      product (`add` columns: fp32; under autocast the matmul's bf16 result and the fp32 copy the
      concatenation promotes it to) and the new basis, beside the block and the last power
      (bf16 under autocast, where the squarings return bf16); Ā's complex form is gone by then
      (`_Discrete.real_block` builds the block from it and adds the rank-one term in place);
    - each squaring between steps: the old and the new power beside the block and the basis so
      far (under autocast the first one casts the block to bf16 twice).
    What autograd keeps of these differs by mode. In fp32 its matmuls keep their operands, the
    bases so far and the powers: the last step's product is the transient, or, with one step or
    none, the block's halves and Ā where the later bases are not made yet. Under autocast they
    keep their bf16 casts, so the fp32 bases and the block are transient, less what is
    kept only later (the steps' casts after it, the squaring's casts of the block, the basis'
    cast C's matmul saves). With `ssm_buffers` no graph is kept, everything is transient but the
    basis, and the discretisation's (H, N/2) tensors stay in the frame, 16·H·N bytes.
    With autograd the block's moment also holds the discretisation's B̄ (complex (H, N/2); with
    its bf16 cast under autocast): 4·H·N or 6·H·N bytes. Not priced: the discretisation's Ā
    diagonal and r (complex (H, N/2) each, 8·H·N bytes), which the step's `_Discrete` holds and
    no gradient saves. Against a live-bytes trace of the mixer's forward read at the generation's
    peak over the 17 shapes of tests/test_memory.py (T 1 … 1,024, whole and partial doublings,
    N 16 … 256, H 64 … 256, batch 1–4): exact with `ssm_buffers`, −1.4% … +0.6% with autograd
    (−8·H·N in fp32 and −10·H·N under autocast where a step is the peak, +4·H·N where the block
    is). Before S4's rank-one term spanned both conjugate halves (2026-12-07) the same trace over
    64 shapes gave −2.8% … 0%.
    The forms before this priced the last step alone: 0.27 (T = 1) and 0.60 … 0.96 of the trace
    where N is large against T (the block or a squaring the peak), and under autocast up to 1.14
    over."""
    h, n, t = d_model, m.d_state, seq_len
    p = h * n * n
    steps = _doubling_steps(t)
    if m.ssm_buffers:
        # a power's bytes (bf16 under autocast, where the squarings return bf16), and the step's
        # product's bytes per element (under autocast its bf16 result and its fp32 promotion)
        power, product_bytes = (2 * p, 6) if autocast else (4 * p, 4)
        moments = [10 * p]
        for k, (cols, add) in enumerate(steps):
            moments.append(4 * p + (power if k else 0) + h * n * (4 * cols + product_bytes * add + 4 * (cols + add)))
            if k < len(steps) - 1:
                # the power squared: the block itself at the first squaring (cast twice under autocast)
                old = power if k else (4 * p if autocast else 0)
                moments.append(4 * p + power + old + 4 * h * n * (cols + add))
        return max(moments) + 16 * h * n - (2 if autocast else 4) * h * n * t
    if autocast:
        kept = 2 * h * n * (t + sum(add for _, add in steps)) + 2 * p * len(steps) + (4 * p if len(steps) >= 2 else 0)
        moments = [10 * p + 6 * h * n - kept]
        for k, (cols, add) in enumerate(steps):
            later = 2 * h * n * t + sum(2 * h * n * a + 2 * p for _, a in steps[k + 1:])
            later += 4 * p if k == 0 and len(steps) >= 2 else 0
            moments.append(h * n * (4 * cols + 6 * add + 4 * (cols + add)) + 4 * p - later)
        return max(moments)
    need = steps[-1][1] if steps else 0
    not_yet = 4 * h * n * (t + sum(cols for cols, _ in steps)) + 4 * p * max(len(steps) - 1, 0)
    block = 6 * p + (0 if steps else 4 * p) + 4 * h * n - not_yet
    return max(4 * h * n * need, block)


def s4_doubling_backward_bytes(m: S4Plan, d_model: int, batch: int, seq_len: int, act_bytes: int,
                               autocast: bool) -> int:
    """What S4's (DPLR) kernel generation holds in its backward beyond what the layer kept, net of
    the layer's tensors freed by then: the doubling (`modules.s4.S4Mixer._dplr_basis`) is plain
    autograd, and its backward runs through every step's concatenation with the basis' fp32
    gradient (H, N, T) alive. In fp32 that gradient is the peak, 4·H·N·T; under autocast the last
    step's, whose slice of the first `prev` columns (the columns before that step) is
    zero-extended and summed into them in fp32 beside its 16-bit gradient: 10·H·N·prev. Net of
    the GLU's, GELU's and the convolution's tensors freed by then, 5.5·act (fp32) or 9·act
    (autocast) bytes a token and channel. No source gives it: a fit to a live-bytes trace of the
    mixer's backward over 20 shapes (batch 1–4, T 96 … 2,048 whole and partial doublings, H
    32 … 256, N 16 … 64) and both dtypes. At large batches it is negative, the FFT convolution's
    moment then the larger: it is only read beside that one (`s4_backward_bytes`)."""
    h, n, t = d_model, m.d_state, seq_len
    prev = _doubling_steps(t)[-1][0] if t > 1 else 0
    tokens = batch * t * h
    if autocast:
        return 10 * h * n * prev - 9 * act_bytes * tokens
    return 4 * h * n * t - 11 * act_bytes * tokens // 2
