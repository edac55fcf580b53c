"""S4D and S4 (DPLR) layers: kernel generation ≡ the closed forms computed naively, convolution
mode ≡ recurrent mode (prefill, then step), causality, gradients, state bytes, FFT FLOP formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from autograd_units import assert_bf16_autocast_backward, assert_same_backward, saved_during, storages
from archplan.analytic.s4 import (
    real_fft_flops,
    s4_buffer_elements,
    s4_counted_flops,
    s4_decode_counted_flops,
    s4_kernel_activation_bytes,
    s4_params,
    s4_state_fp32_elements,
)
from archplan.modules import fft_flops  # noqa: F401  registers the FFT formulas
from archplan.modules import s4 as s4_module
from archplan.modules.s4 import S4Mixer, fft_causal_conv
from archplan.resolve import S4Plan

D_MODEL = 6


def plan(dplr: bool, d_state: int = 8, n_ssm: int = 3, buffers: bool = False) -> S4Plan:
    return S4Plan(dplr=dplr, d_state=d_state, n_ssm=n_ssm, ssm_buffers=buffers)


def mixer(p: S4Plan, seed: int = 0) -> S4Mixer:
    torch.manual_seed(seed)
    m = S4Mixer(p, D_MODEL)
    with torch.no_grad():
        if p.dplr:  # a larger low-rank term than the init, so its effect is visible
            m.P.mul_(3.0)
    return m


def test_fft_causal_conv_is_the_direct_convolution() -> None:
    torch.manual_seed(0)
    u, k = torch.randn(2, 3, 11), torch.randn(3, 11)
    direct = torch.stack(
        [sum(k[:, j] * u[..., t - j] for j in range(t + 1)) for t in range(11)], dim=-1
    )
    torch.testing.assert_close(fft_causal_conv(u, k), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dplr", [False, True])
def test_layer_against_state_spaces_written_out(dplr: bool) -> None:
    """state-spaces/s4 `S4Block` as the LM configs run it, with plain ops: y = K ∗ u + D·u per
    channel (K the layer's own kernel, whose closed form is tested below), GELU, then the output
    linear to 2·H and a GLU. A random D, so the skip shows."""
    m = mixer(plan(dplr), seed=10)
    with torch.no_grad():
        m.D.normal_()
    t = 9
    x = torch.randn(2, t, D_MODEL)
    with torch.no_grad():
        k = m._kernel_and_state(t, None)[0]
        u = x.transpose(1, 2)
        y = torch.stack([(k[:, :i + 1].flip(-1) * u[..., :i + 1]).sum(-1) for i in range(t)], dim=-1)
        y = torch.nn.functional.gelu(y + m.D[:, None] * u).transpose(1, 2)
        a, gate = (y @ m.output_linear.weight.T + m.output_linear.bias).chunk(2, dim=-1)
        torch.testing.assert_close(m(x), a * torch.sigmoid(gate), rtol=1e-4, atol=1e-5)


def _conj(z: torch.Tensor) -> torch.Tensor:
    """The N = 2M modes from the M kept ones: [z; z̄] along the last axis."""
    return torch.cat([z, z.conj()], dim=-1)


def _per_channel(m: S4Mixer, name: str) -> torch.Tensor:
    """A (copies, M, 2) SSM tensor as (H, M) complex128, each copy serving H / copies channels."""
    return torch.view_as_complex(getattr(m, name).detach().double().contiguous()).repeat_interleave(
        D_MODEL // m.plan.n_ssm, 0)


def _channels(m: S4Mixer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Δ, Λ, B, C) per channel on the M kept modes, float64 / complex128."""
    lam = torch.complex(-torch.exp(m.A_log_real.detach().double()), m.A_imag.detach().double())
    return (torch.exp(m.log_dt.detach()).double(), lam.repeat_interleave(D_MODEL // m.plan.n_ssm, 0),
            _per_channel(m, "B"), torch.view_as_complex(m.C.detach().double().contiguous()))


def _s4_full_space(m: S4Mixer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """S4's system on all N = 2M modes, complex128, by dense linear algebra: (Δ, Ā, B̄, C, Λ·Δ) with
    A = diag(Λ, Λ̄) − P·P*, P = [p; p̄], B = [b; b̄], C = [c; c̄] (state-spaces/s4 keeps the first
    half and reaches the rest by `_conj`)."""
    dt, lam, b, c = _channels(m)
    pf = _conj(_per_channel(m, "P"))
    a = torch.diag_embed(_conj(lam)) - pf[:, :, None] * pf.conj()[:, None, :]
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    half = (dt / 2)[:, None, None]
    inv = torch.linalg.inv(eye - half * a)
    return dt, inv @ (eye + half * a), (inv @ (dt[:, None] * _conj(b))[..., None])[..., 0], _conj(c), lam * dt[:, None]


@pytest.mark.parametrize("dplr", [False, True])
def test_kernel_equals_the_naive_closed_form(dplr: bool) -> None:
    """S4D: K_l = 2·Re Σ C·B̄·Ā^l (ZOH); S4: K_l = C·Ā^l·B̄ on all N modes, Ā = (I − Δ/2·A)⁻¹(I +
    Δ/2·A), A = diag(Λ, Λ̄) − P·P*, P = [p; p̄], by dense complex linear algebra (torch.linalg),
    against the Woodbury + doubling path on the kept half. The rank-one term on the kept half
    alone (two uncoupled halves) was 19% off in one channel here."""
    m = mixer(plan(dplr))
    length = 13
    if dplr:
        _, da, db, c, _ = _s4_full_space(m)
        ref = torch.stack([(c * (torch.linalg.matrix_power(da, l) @ db[..., None])[..., 0]).sum(-1).real
                           for l in range(length)], dim=-1)
    else:
        dt, lam, b, c = _channels(m)
        da = torch.exp(dt[:, None] * lam)
        db = (da - 1) / lam * b
        ref = torch.stack([2 * (c * db * da**l).sum(-1).real for l in range(length)], dim=-1)
    torch.testing.assert_close(m.kernel(length).double(), ref, rtol=1e-4, atol=1e-5)


def test_s4_kernel_is_state_spaces_cauchy_kernel() -> None:
    """The kernel state-spaces/s4's `SSMKernelDPLR` computes in frequency space (Gu et al. 2022,
    Alg. 1): at the roots of unity ω, z = 2(1 − ω)/(1 + ω), the Cauchy sums k(z) = Σ over all N
    modes of v/(z − ΛΔ), v = Δ·C̃·B etc., the rank-one Woodbury correction
    k_CB − k_CP·k_QB/(1 + k_QP), times 2/(1 + ω), then an inverse FFT. Its C̃ is C·(I − Ā^L),
    which the truncated kernel's generating function needs."""
    m = mixer(plan(True), seed=3)
    length = 16
    dt, da, _, c, lam_dt = _s4_full_space(m)
    b, p = _per_channel(m, "B"), _per_channel(m, "P")
    modes = b.shape[-1]
    c_tilde = (c - (torch.linalg.matrix_power(da, length).transpose(-1, -2) @ c[..., None])[..., 0])[:, :modes]
    omega = torch.exp(-2j * math.pi * torch.arange(length // 2 + 1, dtype=torch.float64) / length)
    z = 2 * (1 - omega) / (1 + omega)

    def cauchy(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        v = _conj(left * right * dt[:, None])
        return (v[..., None] / (z - _conj(lam_dt)[..., None])).sum(-2)

    k_f = cauchy(c_tilde, b) - cauchy(c_tilde, p) * cauchy(p.conj(), b) / (1 + cauchy(p.conj(), p))
    ref = torch.fft.irfft(k_f * 2 / (1 + omega), n=length)
    torch.testing.assert_close(m.kernel(length).double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dplr", [False, True])
@pytest.mark.parametrize("schedule", [(12,), (5, 1, 6), (1,) * 12, (7, 5)])
def test_convolution_mode_equals_recurrent_mode(dplr: bool, schedule: tuple[int, ...]) -> None:
    """Prefill (convolution into a fresh state), then steps (the recurrence), ≡ the full forward."""
    m = mixer(plan(dplr))
    x = torch.randn(2, sum(schedule), D_MODEL)
    full = m(x)
    state = m.new_state(2, sum(schedule), "cpu", torch.float32)
    outs, start = [], 0
    for n in schedule:
        outs.append(m(x[:, start:start + n], state))
        start += n
    assert state.seen == sum(schedule)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dplr", [False, True])
def test_causal(dplr: bool) -> None:
    m = mixer(plan(dplr))
    x = torch.randn(1, 10, D_MODEL)
    y = m(x)
    x2 = x.clone()
    x2[:, 6:] += torch.randn(1, 4, D_MODEL)
    torch.testing.assert_close(m(x2)[:, :6], y[:, :6])
    assert not torch.allclose(m(x2)[:, 6:], y[:, 6:])


@pytest.mark.parametrize("dplr", [False, True])
@pytest.mark.parametrize("buffers", [False, True])
def test_gradients_reach_every_parameter(dplr: bool, buffers: bool) -> None:
    m = mixer(plan(dplr, buffers=buffers))
    x = torch.randn(2, 9, D_MODEL, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    names = {name for name, _ in m.named_parameters()}
    ssm = {"log_dt", "B", "A_log_real", "A_imag"} | ({"P"} if dplr else set())
    assert (ssm & names == set()) if buffers else ssm <= names


@pytest.mark.parametrize("dplr", [False, True])
@pytest.mark.parametrize("buffers", [False, True])
def test_params_match_analytic(dplr: bool, buffers: bool) -> None:
    p = plan(dplr, n_ssm=2, buffers=buffers)
    assert sum(t.numel() for t in S4Mixer(p, D_MODEL).parameters()) == s4_params(p, D_MODEL)


def test_reference_s4_block_count() -> None:
    """state-spaces/s4 standalone S4 block, H = 256, N = 64, n_ssm = H: 197,632 parameters (built)."""
    assert s4_params(S4Plan(dplr=True, d_state=64, n_ssm=256, ssm_buffers=False), 256) == 197_632


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_is_fp32_4_bytes_per_h_n(dtype: torch.dtype) -> None:
    """4·B·H·N bytes per layer whatever the model dtype (complex64 N/2 modes)."""
    p = plan(False)
    state = S4Mixer(p, D_MODEL).new_state(3, 100, "cpu", dtype)
    assert state.nbytes() == 4 * 3 * D_MODEL * p.d_state == 4 * 3 * s4_state_fp32_elements(p, D_MODEL)


@pytest.mark.parametrize("dplr", [False, True])
@pytest.mark.parametrize("seq_len", [1, 2, 7, 16])
def test_flops_on_meta_match_analytic(dplr: bool, seq_len: int) -> None:
    p = plan(dplr)
    with torch.device("meta"):
        m = S4Mixer(p, D_MODEL)
    x = torch.zeros(2, seq_len, D_MODEL, device="meta")
    with FlopCounterMode(display=False) as counter:
        m(x)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counter.get_total_flops() == s4_counted_flops(p, D_MODEL, 2, seq_len)
    assert counts["aten._fft_r2c"] == (2 * D_MODEL + D_MODEL) * real_fft_flops(2 * seq_len)


def test_fft_convention() -> None:
    """2.5·n·log2 n per real FFT, 5·n·log2 n per complex one; log2 rounded up off powers of two.
    The analytic count and the formulas registered with FlopCounterMode, each against the rule."""
    assert real_fft_flops(4096) == 2.5 * 4096 * 12
    assert real_fft_flops(6) == 5 * 6 * math.ceil(math.log2(6)) // 2
    counter = FlopCounterMode(display=False)
    with counter:
        torch.fft.fft(torch.randn(3, 4096, dtype=torch.complex64))
        torch.fft.rfft(torch.randn(2, 6))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["aten._fft_c2c"] == 3 * 5 * 4096 * 12
    assert counts["aten._fft_r2c"] == 2 * real_fft_flops(6)


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 16])
def test_s4d_chunked_basis_changes_neither_values_nor_counted_flops(monkeypatch: pytest.MonkeyPatch,
                                                                     chunk: int) -> None:
    """The basis made `chunk` positions at a time (whole chunks, a partial one, a single one): same
    kernel, prefill state and FLOPs as the default √T chunks."""
    m = mixer(plan(False))
    x = torch.randn(2, 11, D_MODEL)
    whole_state = m.new_state(2, 11, "cpu", torch.float32)
    whole = m(x, whole_state)
    monkeypatch.setattr(s4_module, "basis_chunk", lambda length: chunk)
    chunked_state = m.new_state(2, 11, "cpu", torch.float32)
    torch.testing.assert_close(m(x, chunked_state), whole)
    torch.testing.assert_close(chunked_state.x_BHM2, whole_state.x_BHM2)
    with torch.device("meta"):
        meta = S4Mixer(plan(False), D_MODEL)
    with FlopCounterMode(display=False) as counter:
        meta(torch.zeros(2, 11, D_MODEL, device="meta"))
    assert counter.get_total_flops() == s4_counted_flops(plan(False), D_MODEL, 2, 11)


def test_s4d_basis_chunk_is_near_the_square_root() -> None:
    for length in (1, 2, 11, 2048, 4096, 16384, 1 << 20):
        chunk = s4_module.basis_chunk(length)
        assert chunk & (chunk - 1) == 0 and chunk * chunk <= 2 * length and length < 2 * chunk * chunk


def test_verify_lists_the_fft_ops_with_their_formulas() -> None:
    """The op table shows the FFTs with registered formulas; without one they would be flagged."""
    from archplan.crosscheck import crosscheck
    from archplan.resolve import resolve
    from archplan.spec import Spec

    spec = Spec(name="t", vocab_size=32, d_model=8, n_layers=1, max_seq_len=32,
                long_conv={"kind": "s4d", "d_state": 4}, layout={"mixers": "H"})
    result = crosscheck(resolve(spec), seq_len=10, batch=1, real=False)
    ops = {op.op: op for op in result.ops}
    for name in ("aten._fft_r2c", "aten._fft_c2r"):
        assert ops[name].has_formula and ops[name].flops > 0 and not ops[name].suspicious
    assert result.ok
    assert result.training is not None and "aten._fft_c2c" in result.training_ops  # rfft's backward


@pytest.mark.parametrize("dplr", [False, True])
@pytest.mark.parametrize("buffers", [False, True])
def test_buffers_match_analytic(dplr: bool, buffers: bool) -> None:
    p = plan(dplr, n_ssm=2, buffers=buffers)
    assert sum(b.numel() for b in S4Mixer(p, D_MODEL).buffers()) == s4_buffer_elements(p, D_MODEL)


def test_dplr_step_is_the_dense_step() -> None:
    """S4's step applies Ā in O(N) (a⊙x + q·2·Re(rᵀx)): equal to the dense Ā of all N modes on the
    conjugate-extended state [x; x̄], kept half, and to the real block the kernel's basis doubles."""
    m = mixer(plan(True))
    disc = m._discrete()  # fp32, as the module always computes it
    _, da, db, _, _ = _s4_full_space(m)
    modes = m.plan.modes
    x = torch.randn(2, D_MODEL, modes, dtype=torch.complex64)
    u = torch.randn(2, D_MODEL, 1)
    dense = ((da @ _conj(x.to(torch.complex128))[..., None])[..., 0][..., :modes] + db[:, :modes] * u.double()).to(torch.complex64)
    torch.testing.assert_close(disc.step(x, u).detach(), dense, rtol=1e-5, atol=1e-6)
    pairs = disc.real_block().detach() @ torch.cat([x.real, x.imag], dim=-1)[..., None]
    torch.testing.assert_close(torch.complex(pairs[..., :modes, 0], pairs[..., modes:, 0]) + disc.b_HM.detach() * u,
                               dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dplr", [False, True])
@pytest.mark.parametrize("prefill", [0, 5])
def test_a_decode_step_counts_the_output_linear_only(dplr: bool, prefill: int) -> None:
    """One token, into a fresh state or after a prefill, steps the recurrence (elementwise): the
    counter sees the output Linear(H, 2H) alone, `s4_decode_counted_flops` per sequence."""
    with torch.device("meta"):
        m = S4Mixer(plan(dplr), D_MODEL)
    state = m.new_state(3, 8, "meta", torch.float32)
    if prefill:
        m(torch.zeros(3, prefill, D_MODEL, device="meta"), state)
    with FlopCounterMode(display=False) as counter:
        m(torch.zeros(3, 1, D_MODEL, device="meta"), state)
    assert counter.get_total_flops() == 3 * s4_decode_counted_flops(D_MODEL) == 3 * 2 * D_MODEL * 2 * D_MODEL


@pytest.mark.parametrize("expand", [1, 3])
def test_fft_conv_unit_keeps_the_spectra_with_plain_autograd_ffts_and_gradients(expand: int) -> None:
    """`fft_causal_conv` (the autograd unit) keeps the two spectra only, and its hand-written
    backward runs the FFTs plain autograd runs, with the same (here bit-identical) gradients."""
    torch.manual_seed(expand)
    u = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6 // expand, 9, dtype=torch.float64, requires_grad=True)
    unit, saved = saved_during(lambda: fft_causal_conv(u, k, expand))
    plain, u_f, k_f = s4_module._fft_conv(u, k, expand)
    assert torch.equal(unit, plain)
    assert [t.shape for t in saved] == [u_f.shape, k_f.shape] and all(t.is_complex() for t in saved)
    assert_same_backward(unit, plain, [u, k], 1e-12)


@pytest.mark.parametrize("length", [9, 16])
@pytest.mark.parametrize("buffers", [False, True])
def test_s4d_kernel_unit_keeps_its_inputs_with_plain_autograd_counts_and_gradients(length: int, buffers: bool) -> None:
    """S4D's kernel generation (`_S4DKernel`) keeps only its per-channel inputs; the backward's
    bmm are plain autograd's (one per operand needing a gradient), gradients equal (fp64)."""
    m = mixer(plan(False, buffers=buffers)).double()
    inputs = [t.double() for t in m._s4d_inputs()] + [m.C]
    unit, saved = saved_during(lambda: s4_module._S4DKernel.apply(length, *inputs))
    _, rows, basis, _ = s4_module._s4d_rows_and_basis(length, *inputs)
    plain = s4_module._contract_chunks(rows, basis, length)
    torch.testing.assert_close(unit, plain, rtol=0, atol=0)
    assert storages(saved) == storages(inputs)
    wanted = [t for t in inputs if t.requires_grad]
    assert_same_backward(unit, plain, wanted, 1e-10)


@pytest.mark.parametrize("length", [9, 16])
def test_s4d_kernel_unit_under_bf16_autocast(length: int) -> None:
    """Under bf16 autocast the kernel's chunk contraction runs in bf16 and its gradient arrives in
    bf16: the backward recomputes under the forward's autocast (it once met that gradient with fp32
    operands, a dtype error) and gives plain autograd's gradients, near the fp32 ones."""
    m = mixer(plan(False))
    inputs = [*m._s4d_inputs(), m.C]

    def plain() -> torch.Tensor:
        _, rows, basis, _ = s4_module._s4d_rows_and_basis(length, *inputs)
        return s4_module._contract_chunks(rows, basis, length)

    assert_bf16_autocast_backward(lambda: s4_module._S4DKernel.apply(length, *inputs), plain,
                                  [t for t in inputs if t.requires_grad])


@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("d_state", [4, 8, 16])
@pytest.mark.parametrize("autocast", [False, True])
def test_s4_kernel_generation_keeps_what_the_analytic_count_says(buffers: bool, d_state: int, autocast: bool) -> None:
    """What autograd keeps while S4 (DPLR) builds its kernel, byte for byte against
    `s4_kernel_activation_bytes`: its basis, the doubling's operands and powers, the
    discretisation's intermediates. Unpriced, they made bench --train's S4 activations 1.5x to 4.4x
    the analytic figure."""
    m = mixer(plan(True, d_state=d_state, buffers=buffers))
    own = storages([*m.parameters(), *m.buffers()])
    for length in (2, 3, 7, 16, 33):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, saved = saved_during(lambda: m.kernel(length))
        kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        measured = sum(n for ptr, n in kept.items() if ptr not in own)
        assert measured == s4_kernel_activation_bytes(m.plan, D_MODEL, length, autocast), (length, measured)


@pytest.mark.parametrize("dplr", [False, True])
def test_a_prefill_into_a_state_runs_under_bf16_autocast(dplr: bool) -> None:
    """The prefill's final state came out of a bf16 matmul under autocast and torch.complex refused
    it: a cached generation under autocast failed at its first chunk. The state is built in fp32,
    and the chunked run equals the whole forward to bf16's rounding."""
    m = mixer(plan(dplr))
    x = torch.randn(2, 9, D_MODEL)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = m(x)
        state = m.new_state(2, 16, "cpu", torch.float32)
        chunked = torch.cat([m(x[:, :6], state), m(x[:, 6:], state)], dim=1)
    assert state.x_BHM2.dtype == torch.float32
    torch.testing.assert_close(chunked.float(), whole.float(), rtol=2e-2, atol=2e-2)
