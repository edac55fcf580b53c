"""Hyena operator and StripedHyena mixer: the safari / stripedhyena closed forms, convolution mode
≡ cached / recurrent mode (prefill then step), causality, gradients, cache bytes, FLOPs on meta."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from autograd_units import assert_bf16_autocast_backward, assert_same_backward, saved_during, storages
from archplan.analytic.hyena import (
    hyena_buffer_elements,
    hyena_cache_per_token,
    hyena_counted_flops,
    hyena_decode_counted_flops,
    hyena_filter_cache_per_token,
    hyena_params,
    hyena_state_elements,
    striped_counted_flops,
    striped_decode_counted_flops,
    striped_params,
    striped_state_elements,
)
from archplan.errors import ArchplanError
from archplan.modules import fft_flops  # noqa: F401  registers the FFT formulas
from archplan.modules.hyena import HyenaMixer, causal_short_conv, positional_features
from archplan.modules.stripedhyena import StripedHyenaMixer, _gated_skip, _ModalFilter, _modal_filter, gated_skip
from archplan.resolve import HyenaPlan, StripedHyenaPlan

D = 8


def hyena(order: int = 2, trainable: bool = True, modulation: bool = True, short: int = 3) -> HyenaPlan:
    return HyenaPlan(order=order, filter_order=6, filter_depth=2, emb_dim=5, short_filter=short, l_max=32,
                     trainable_positions=trainable, modulation=modulation, bias=True, sin_freq=1.0)


def striped(groups: int = 1, state: int = 3, short: int = 3, bias: bool = True) -> StripedHyenaPlan:
    return StripedHyenaPlan(short_filter=short, short_filter_bias=bias, state_size=state, filter_groups=groups)


def build(plan: HyenaPlan | StripedHyenaPlan, seed: int = 0) -> HyenaMixer | StripedHyenaMixer:
    torch.manual_seed(seed)
    if isinstance(plan, HyenaPlan):
        return HyenaMixer(plan, D)
    m = StripedHyenaMixer(plan, D)
    with torch.no_grad():  # poles well inside the unit circle, D skip on, so every term shows
        m.poles.copy_(0.6 * torch.rand_like(m.poles) + 0.2)
        m.D.normal_()
    return m


PLANS = [hyena(), hyena(order=3, trainable=False, modulation=False, short=1), striped(),
         striped(groups=2, short=1, bias=False), striped(groups=4, state=1, short=4)]


def test_hyena_closed_form() -> None:
    """4D² + 81D + 78,144 per operator for the safari LM configs (order 2, k 3, F 64, E 33, M 2, l_max 2048)."""
    p = HyenaPlan(order=2, filter_order=64, filter_depth=2, emb_dim=33, short_filter=3, l_max=2048,
                  trainable_positions=True, modulation=True, bias=True, sin_freq=14.0)
    for d in (64, 768, 864):
        assert hyena_params(p, d) == 4 * d * d + 81 * d + 78_144
        with torch.device("meta"):
            assert sum(t.numel() for t in HyenaMixer(p, d).parameters()) == hyena_params(p, d)


def test_stripedhyena_7b_mixer_count() -> None:
    """StripedHyena-7B hyena block 243,380,224 = mixer + two RMSNorms (2D) + gated MLP 3·D·14336."""
    d = 4096
    assert striped_params(striped(state=2), d) + 2 * d + 3 * d * 14336 == 243_380_224


@pytest.mark.parametrize("plan", PLANS, ids=repr)
def test_params_match_analytic(plan: HyenaPlan | StripedHyenaPlan) -> None:
    count = hyena_params(plan, D) if isinstance(plan, HyenaPlan) else striped_params(plan, D)
    assert sum(t.numel() for t in build(plan).parameters()) == count


def test_positional_features_are_safari_s() -> None:
    """z = [t, Re e^{−i f w}, Im e^{−i f w}], w = 2π·l/L, f = linspace(1e-4, bands − 1, bands)."""
    z, t = positional_features(16, 5, "cpu")
    w = 2 * torch.pi * torch.arange(16) / 16
    f = torch.linspace(1e-4, 1, 2)
    e = torch.exp(-1j * f[None] * w[:, None])
    torch.testing.assert_close(z[0], torch.cat([torch.linspace(0, 1, 16)[:, None], e.real, e.imag], -1))
    torch.testing.assert_close(t[0, :, 0], torch.linspace(0, 1, 16))


def test_short_conv_is_causal_left_padded() -> None:
    x, w = torch.randn(1, 2, 6), torch.randn(2, 1, 3)
    y, tail = causal_short_conv(x, w, None, None)
    ref = torch.nn.functional.conv1d(x, w, padding=2, groups=2)[..., :6]  # safari: pad both sides, keep T
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(tail, x[..., -2:])


@pytest.mark.parametrize("plan", PLANS, ids=repr)
@pytest.mark.parametrize("schedule", [(11,), (4, 1, 6), (1,) * 11])
def test_cached_mode_equals_full_forward(plan: HyenaPlan | StripedHyenaPlan, schedule: tuple[int, ...]) -> None:
    """Prefill then steps ≡ one forward (StripedHyena: FFT prefill, then the modal recurrence)."""
    m = build(plan)
    x = torch.randn(2, sum(schedule), D)
    full = m(x)
    state = m.new_state(2, sum(schedule), "cpu", torch.float32)
    outs, start = [], 0
    for n in schedule:
        outs.append(m(x[:, start:start + n], state))
        start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)


def _direct_causal_conv(v_BDT: torch.Tensor, h_DT: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_{s≤t} h_{t−s}·v_s per channel, the long convolution without an FFT."""
    t = v_BDT.shape[-1]
    return torch.stack([(h_DT[:, :i + 1].flip(-1) * v_BDT[..., :i + 1]).sum(-1) for i in range(t)], dim=-1)


@pytest.mark.parametrize("order", [2, 3])
def test_hyena_operator_against_safari_written_out(order: int) -> None:
    """safari's HyenaOperator.forward (Poli et al. 2023, Algorithm 1) with plain ops: in_proj →
    causal short conv → split x_0 … x_{N−1}, v → for x_{N−1} down to x_1: v = h_o ∗ (v·x) +
    bias_o·(v·x) → y = v·x_0 → out_proj. The filters are the module's own (their closed form is
    tested above); the order of the gates, the skip and the convolution, and which filter rows each
    order reads (safari's `(v o)`: interleaved, so every order gets the whole range of decays),
    are what this pins."""
    torch.manual_seed(8)
    mixer = HyenaMixer(hyena(order=order), D)
    with torch.no_grad():
        mixer.filter.bias.normal_()
    t = 11
    x = torch.randn(2, t, D)
    with torch.no_grad():
        u = (x @ mixer.in_proj.weight.T + mixer.in_proj.bias).transpose(1, 2)
        k = mixer.short_filter.weight.shape[-1]
        u = torch.nn.functional.conv1d(torch.nn.functional.pad(u, (k - 1, 0)), mixer.short_filter.weight,
                                       mixer.short_filter.bias, groups=u.shape[1])
        *xs, v = u.split(D, dim=1)
        # safari: rearrange(k, 'c l (v o) -> c o v l') and rearrange(bias, '(v o) -> o v')
        h_OVL = mixer.filter(t).unflatten(0, (D, order - 1)).transpose(0, 1)
        bias_OV = mixer.filter.bias.unflatten(0, (D, order - 1)).T
        for o, gate in enumerate(reversed(xs[1:])):
            v = v * gate
            v = _direct_causal_conv(v, h_OVL[o]) + v * bias_OV[o, :, None]
        expected = (v * xs[0]).transpose(1, 2) @ mixer.out_proj.weight.T + mixer.out_proj.bias
        torch.testing.assert_close(mixer(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_stripedhyena_mixer_against_its_engine_written_out(groups: int) -> None:
    """stripedhyena's ParallelGatedConvBlock mixer (`parallel_fir` then `parallel_iir`) with plain ops:
    projections → causal short conv → split x2, x1, v → u = x1·v → y = h ∗ u with h_c the modal
    filter Re Σ_s r_s·p_s^t of filter c // g (`hyena_filter_groups` channels share one) → x2·(y + D·u)
    → out_filter_dense."""
    m = build(striped(groups=groups), seed=9)
    t = 10
    x = torch.randn(2, t, D)
    with torch.no_grad():
        z = (x @ m.projections.weight.T + m.projections.bias).transpose(1, 2)
        k = m.short_filter_weight.shape[-1]
        z = torch.nn.functional.conv1d(torch.nn.functional.pad(z, (k - 1, 0)), m.short_filter_weight,
                                       m.short_filter_bias, groups=3 * D)
        x2, x1, v = z.split(D, dim=1)
        poles = torch.view_as_complex(m.poles[:, :, 0].contiguous())
        residues = torch.view_as_complex(m.residues[:, :, 0].contiguous())
        h = torch.stack([(residues * poles**i).sum(-1).real for i in range(t)], -1)
        u = x1 * v
        y = _direct_causal_conv(u, h.repeat_interleave(groups, dim=0))
        out = (x2 * (y + m.D[:, None] * u)).transpose(1, 2)
        expected = out @ m.out_filter_dense.weight.T + m.out_filter_dense.bias
        torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-5)


def test_stripedhyena_filter_is_the_modal_sum() -> None:
    """h(t) = Re Σ_s r_s·p_s^t (stripedhyena `compute_filter`), against complex powers."""
    m = build(striped(groups=2))
    r = m.residues.detach()[:, :, 0]
    h = _modal_filter(m.poles.detach()[:, :, 0], r, 9)
    p = torch.view_as_complex(m.poles.detach()[:, :, 0].contiguous())
    rc = torch.view_as_complex(r.contiguous())
    ref = torch.stack([(rc * p**t).sum(-1).real for t in range(9)], -1)
    torch.testing.assert_close(h.detach(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("plan", PLANS, ids=repr)
def test_causal(plan: HyenaPlan | StripedHyenaPlan) -> None:
    m = build(plan)
    x = torch.randn(1, 10, D)
    y = m(x)
    x2 = x.clone()
    x2[:, 6:] += torch.randn(1, 4, D)
    torch.testing.assert_close(m(x2)[:, :6], y[:, :6], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(m(x2)[:, 6:], y[:, 6:])


@pytest.mark.parametrize("plan", PLANS, ids=repr)
def test_gradients_reach_every_parameter(plan: HyenaPlan | StripedHyenaPlan) -> None:
    m = build(plan)
    x = torch.randn(2, 9, D, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("plan", PLANS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_match_analytic(plan: HyenaPlan | StripedHyenaPlan, dtype: torch.dtype) -> None:
    size = torch.finfo(dtype).bits // 8
    state = build(plan).new_state(3, 20, "cpu", dtype)
    if isinstance(plan, HyenaPlan):
        expected = 3 * (20 * hyena_cache_per_token(plan, D) + hyena_state_elements(plan, D)) * size
        expected += 20 * hyena_filter_cache_per_token(plan, D) * 4  # the filters: fp32, once for the batch
    else:
        fir, modal = striped_state_elements(plan, D)
        expected = 3 * (fir * size + modal * 4)  # the modal state is fp32 (complex64) whatever the dtype
    assert state.nbytes() == expected


def test_hyena_beyond_l_max_is_a_user_error() -> None:
    m = build(hyena())
    with pytest.raises(ArchplanError, match="l_max"):
        m.new_state(1, 33, "cpu", torch.float32)
    with pytest.raises(ArchplanError, match="l_max"):
        m(torch.zeros(1, 33, D))


@pytest.mark.parametrize("plan", PLANS, ids=repr)
@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_flops_on_meta_match_analytic(plan: HyenaPlan | StripedHyenaPlan, seq_len: int) -> None:
    with torch.device("meta"):
        m = HyenaMixer(plan, D) if isinstance(plan, HyenaPlan) else StripedHyenaMixer(plan, D)
    with FlopCounterMode(display=False) as counter:
        m(torch.zeros(2, seq_len, D, device="meta"))
    if isinstance(plan, HyenaPlan):
        assert counter.get_total_flops() == hyena_counted_flops(plan, D, 2, seq_len)
    else:
        assert counter.get_total_flops() == striped_counted_flops(plan, D, 2, seq_len)


@pytest.mark.parametrize("modulation", [False, True])
def test_hyena_filter_is_the_sin_mlp_times_the_decay_window(modulation: bool) -> None:
    """h = MLP(z)·exp(−t·|δ|) (safari HyenaFilter.filter + ExponentialModulation, shift 0), with one
    shared Sin frequency initialised to `sin_freq`."""
    p = HyenaPlan(order=2, filter_order=6, filter_depth=1, emb_dim=5, short_filter=3, l_max=32,
                  trainable_positions=False, modulation=modulation, bias=True, sin_freq=14.0)
    m = build(p)
    f = m.filter
    assert torch.equal(f.freq.detach(), torch.full((1, 6), 14.0))
    z, t = positional_features(32, 5, "cpu")
    h = torch.sin(f.freq * f.mlp_in(z[:, :9]))
    h = torch.sin(f.freq * f.mlp_inner[0](h))
    h = f.mlp_out(h)
    if modulation:
        h = h * torch.exp(-t[:, :9] * f.deltas.abs())
    torch.testing.assert_close(f(9).detach(), h[0].T.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("plan", [*PLANS, "s4d", "s4"], ids=repr)
def test_cuda_cached_mode_equals_full_forward(plan: HyenaPlan | StripedHyenaPlan | str) -> None:
    """On CUDA (cuFFT, fp32): prefill + steps ≡ one forward, for every long-conv mixer."""
    from archplan.modules.s4 import S4Mixer
    from archplan.resolve import S4Plan

    torch.manual_seed(0)
    if isinstance(plan, str):
        m = S4Mixer(S4Plan(dplr=plan == "s4", d_state=8, n_ssm=2, ssm_buffers=False), D).cuda()
    else:
        m = build(plan).cuda()
    x = torch.randn(2, 11, D, device="cuda")
    full = m(x)
    state = m.new_state(2, 11, "cuda", torch.float32)
    out = torch.cat([m(x[:, :6], state), m(x[:, 6:7], state), m(x[:, 7:], state)], 1)
    torch.testing.assert_close(out, full, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("plan", [hyena(), hyena(trainable=False), hyena(modulation=False)], ids=repr)
def test_hyena_buffers_match_analytic(plan: HyenaPlan) -> None:
    """Buffers (positional table when not trained, its time axis, modulation deltas) are stated apart."""
    assert sum(b.numel() for b in build(plan).buffers()) == hyena_buffer_elements(plan, D)


@pytest.mark.parametrize("plan", PLANS, ids=repr)
@pytest.mark.parametrize("prefill", [0, 1, 6])
def test_a_decode_step_counts_what_analytic_says(plan: HyenaPlan | StripedHyenaPlan, prefill: int) -> None:
    """One token after `prefill` tokens (none: a fresh state). Hyena: projections, short conv and one
    bmm over the prefill + 1 cached inputs, no filter MLP (the cache holds the filters); StripedHyena:
    projections and FIR, the modal step is elementwise."""
    with torch.device("meta"):
        m = HyenaMixer(plan, D) if isinstance(plan, HyenaPlan) else StripedHyenaMixer(plan, D)
    state = m.new_state(2, 8, "meta", torch.float32)
    if prefill:
        m(torch.zeros(2, prefill, D, device="meta"), state)
    with FlopCounterMode(display=False) as counter:
        m(torch.zeros(2, 1, D, device="meta"), state)
    if isinstance(plan, HyenaPlan):
        assert counter.get_total_flops() == 2 * hyena_decode_counted_flops(plan, D, prefill + 1)
    else:
        assert counter.get_total_flops() == 2 * striped_decode_counted_flops(plan, D)


def test_hyena_cache_holds_the_filters_reversed() -> None:
    m = build(hyena())
    state = m.new_state(2, 20, "cpu", torch.float32)
    torch.testing.assert_close(state.filter_rev_CL.flip(-1), m.filter(20).detach())
    assert not state.filter_rev_CL.requires_grad


@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)])
def test_modal_filter_unit_keeps_poles_and_residues_with_plain_autograd_counts_and_gradients(
        needs: tuple[bool, bool]) -> None:
    """`_ModalFilter` keeps only poles and residues; its backward runs autograd's bmm (one per
    operand needing a gradient) and gives the same gradients (fp64)."""
    torch.manual_seed(0)
    p, r = (torch.randn(4, 2, 2, dtype=torch.float64).mul(0.5).requires_grad_(need) for need in needs)
    unit, saved = saved_during(lambda: _ModalFilter.apply(p, r, 11))
    plain = _modal_filter(p, r, 11)
    torch.testing.assert_close(unit, plain, rtol=0, atol=0)
    assert storages(saved) == storages((p, r))
    wanted = [t for t in (p, r) if t.requires_grad]
    assert_same_backward(unit, plain, wanted, 1e-10)


def test_gated_skip_unit_keeps_its_inputs_with_plain_autograd_gradients() -> None:
    """x2·(y + D·x1·v) keeps its inputs (x2, x1, v: views of the FIR output in the mixer), not the
    fp32 copies and the sum plain autograd keeps; same gradients (fp64)."""
    torch.manual_seed(0)
    fir = torch.randn(2, 9, 7, dtype=torch.float64, requires_grad=True)
    x2, x1, v = fir.split(3, dim=1)
    y = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unit, saved = saved_during(lambda: gated_skip(x2, x1, v, y, D))
    plain = _gated_skip(x2, x1, v, y, D)
    assert torch.equal(unit, plain)
    assert storages(saved) == storages((fir, y, D))
    probe = torch.randn_like(unit)
    for a, b in zip(torch.autograd.grad((unit * probe).sum(), [fir, y, D]),
                    torch.autograd.grad((plain * probe).sum(), [fir, y, D])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_modal_filter_unit_under_bf16_autocast() -> None:
    """Under bf16 autocast the filter's bmm runs in bf16 and its gradient arrives in bf16: the
    backward recomputes the basis under the forward's autocast (it once met that gradient with
    fp32 operands, a dtype error) and gives plain autograd's gradients, near the fp32 ones."""
    torch.manual_seed(0)
    p, r = (torch.randn(4, 2, 2).mul(0.5).requires_grad_() for _ in range(2))
    assert_bf16_autocast_backward(lambda: _ModalFilter.apply(p, r, 11), lambda: _modal_filter(p, r, 11), [p, r])
