"""Mamba-1 / Mamba-2 mixers: fast scans ≡ sequential references (outputs and gradients), decode
≡ full forward, causal conv, constant state bytes, parameter layout and FLOPs on meta."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from autograd_units import assert_bf16_autocast_backward, saved_during, storages
from archplan.analytic.mamba import (
    mamba1_counted_flops,
    mamba1_params,
    mamba1_state_elements,
    mamba2_counted_flops,
    mamba2_params,
    mamba2_state_elements,
)
from archplan.modules.mamba1 import (
    Mamba1Mixer,
    _scan,
    causal_depthwise_conv,
    chunked_scan,
    scan_chunk_len,
    selective_scan,
    selective_scan_reference,
    silu_gate,
)
from archplan.modules.mamba2 import Mamba2Mixer, _gated_rms_norm, _ssd, _with_skip, ssd_chunked, ssd_reference
from archplan.resolve import Mamba1Plan, Mamba2Plan, NormPlan

NORM = NormPlan("rmsnorm", False, 1e-5)


def m1_plan(inner_norms: bool = False, proj_bias: bool = False, conv_bias: bool = True) -> Mamba1Plan:
    return Mamba1Plan(d_inner=12, d_state=4, d_conv=4, dt_rank=3, conv_bias=conv_bias,
                      proj_bias=proj_bias, inner_norms=inner_norms, norm=NORM)


def m2_plan(n_groups: int = 2, chunk_size: int = 4, proj_bias: bool = False) -> Mamba2Plan:
    return Mamba2Plan(d_inner=16, d_state=4, d_conv=4, head_dim=4, n_heads=4, n_groups=n_groups,
                      chunk_size=chunk_size, conv_bias=True, proj_bias=proj_bias, norm=NORM)


def assert_same_grads(fast: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor],
                      inputs: list[torch.Tensor]) -> None:
    probe = torch.randn_like(fast[0])
    g_fast = torch.autograd.grad((fast[0] * probe).sum() + fast[1].sum(), inputs)
    g_ref = torch.autograd.grad((ref[0] * probe).sum() + ref[1].sum(), inputs)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- Mamba-1
@pytest.mark.parametrize("seq_len", [1, 2, 9, 16, 37])
@pytest.mark.parametrize("with_h0", [False, True])
def test_selective_scan_equals_sequential(seq_len: int, with_h0: bool) -> None:
    torch.manual_seed(seq_len)
    b, i, n = 2, 6, 5
    u = torch.randn(b, seq_len, i, requires_grad=True)
    dt = torch.rand(b, seq_len, i).mul(2).requires_grad_()
    A = (-torch.rand(i, n) * 10).requires_grad_()
    B = torch.randn(b, seq_len, n, requires_grad=True)
    C = torch.randn(b, seq_len, n, requires_grad=True)
    h0 = torch.randn(b, i, n, requires_grad=True) if with_h0 else None
    inputs = [u, dt, A, B, C] + ([h0] if h0 is not None else [])
    fast = selective_scan(u, dt, A, B, C, h0)
    ref = selective_scan_reference(u, dt, A, B, C, h0)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-5, atol=1e-5)
    assert_same_grads(fast, ref, inputs)


def test_a_one_token_training_scan_keeps_no_more_than_two_tokens() -> None:
    """One token with gradients goes through the chunked scan, which recomputes its states in the
    backward; the decode step's path kept them, and `bench --train --seq 1` measured more
    activations at one token than at two (7,348 against 5,632 B)."""
    def saved_bytes(seq_len: int) -> int:
        torch.manual_seed(0)
        b, i, n = 2, 6, 5
        leaves = [torch.randn(b, seq_len, i), torch.rand(b, seq_len, i), -torch.rand(i, n),
                  torch.randn(b, seq_len, n), torch.randn(b, seq_len, n)]
        u, dt, A, B, C = (x.requires_grad_() for x in leaves)
        _, saved = saved_during(lambda: selective_scan(u, dt, A, B, C, None, dt_softplus=True))
        kept = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in saved
                if all(x.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr() for leaf in leaves)}
        return sum(kept.values())

    assert saved_bytes(1) <= saved_bytes(2)


@pytest.mark.parametrize("seq_len", [2, 9, 16])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_unit_recomputes_states_with_plain_autograd_gradients(seq_len: int, with_h0: bool) -> None:
    """`chunked_scan` (the autograd unit: saves its inputs, recomputes the states in the backward)
    gives the values and gradients of the same ops under plain autograd, softplus and D skip included,
    and keeps nothing for the backward but its inputs."""
    torch.manual_seed(seq_len)
    b, i, n = 2, 6, 5
    u = torch.randn(b, seq_len, i, requires_grad=True)
    dt = torch.randn(b, seq_len, i, requires_grad=True)
    A = (-torch.rand(i, n) * 10).requires_grad_()
    B = torch.randn(b, seq_len, n, requires_grad=True)
    C = torch.randn(b, seq_len, n, requires_grad=True)
    D = torch.randn(i, requires_grad=True)
    h0 = torch.randn(b, i, n, requires_grad=True) if with_h0 else None
    inputs = [u, dt, A, B, C, D] + ([h0] if h0 is not None else [])
    unit, saved = saved_during(lambda: chunked_scan(u, dt, A, B, C, h0, D_I=D, dt_softplus=True))
    plain = _scan(u, dt, A, B, C, h0, D, True)
    assert torch.equal(unit[0], plain[0]) and torch.equal(unit[1], plain[1])
    assert storages(saved) == storages(inputs)
    probe = torch.randn_like(unit[0])
    g_unit = torch.autograd.grad((unit[0] * probe).sum() + unit[1].sum(), inputs)
    g_plain = torch.autograd.grad((plain[0] * probe).sum() + plain[1].sum(), inputs)
    for a, b_ in zip(g_unit, g_plain):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("wanted", ["h0", "dt,B", "C,h0", "u", "D"])
def test_scan_unit_gradients_of_any_subset_with_the_skip(wanted: str) -> None:
    """With D given, any subset of inputs needing a gradient gets plain autograd's: the D skip
    enters the backward only where u or D needs one (it once raised "does not require grad"
    when only h0, or dt and B, or C and h0 needed gradients)."""
    torch.manual_seed(0)
    b, t, i, n = 2, 9, 7, 3
    tensors = {"u": torch.randn(b, t, i), "dt": torch.rand(b, t, i), "A": -torch.rand(i, n),
               "B": torch.randn(b, t, n), "C": torch.randn(b, t, n), "h0": torch.randn(b, i, n), "D": torch.randn(i)}
    inputs = [tensors[name].requires_grad_() for name in wanted.split(",")]
    args = [tensors[k] for k in ("u", "dt", "A", "B", "C", "h0")]
    unit = chunked_scan(*args, D_I=tensors["D"], dt_softplus=True)
    plain = _scan(*args, tensors["D"], True)
    g_unit = torch.autograd.grad(unit[0].sum() + unit[1].sum(), inputs)
    g_plain = torch.autograd.grad(plain[0].sum() + plain[1].sum(), inputs)
    for a, b_ in zip(g_unit, g_plain):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-6)


def test_scan_unit_sums_dB_over_channel_blocks_in_fp32() -> None:
    """Under bf16 autocast each channel block's dB is a partial sum over channels: summed in fp32
    and rounded once, dB is plain autograd's within fp32 summation order (summed in bf16, 1,668 of
    4,096 elements differed, up to 3.2e-3 of the largest)."""
    torch.manual_seed(1)
    b, t, i, n = 2, 128, 64, 16
    u, B, C = (torch.randn(*shape).bfloat16() for shape in ((b, t, i), (b, t, n), (b, t, n)))
    dt = (torch.randn(b, t, i) - 1).bfloat16()
    A = -torch.arange(1, n + 1.0).expand(i, n).contiguous()
    probe = torch.randn(b, t, i)

    def dB(scan: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        leaf = B.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = scan(leaf)
        (y * probe).sum().backward()
        return leaf.grad

    unit = dB(lambda leaf: chunked_scan(u, dt, A, leaf, C, None, dt_softplus=True)[0])
    plain = dB(lambda leaf: _scan(u, dt, A, leaf, C, None, None, True)[0])
    assert unit.dtype == torch.bfloat16
    assert (unit.float() - plain.float()).abs().max() <= 2e-4 * plain.float().abs().max()
    assert (unit != plain).sum() <= 4


def test_silu_gate_unit_keeps_its_inputs_with_plain_autograd_gradients() -> None:
    torch.manual_seed(0)
    y, z = (torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    unit, saved = saved_during(lambda: silu_gate(y, z))
    plain = y * torch.nn.functional.silu(z)
    assert torch.equal(unit, plain)
    assert storages(saved) == storages((y, z))
    probe = torch.randn_like(unit)
    for a, b_ in zip(torch.autograd.grad((unit * probe).sum(), [y, z]),
                     torch.autograd.grad((plain * probe).sum(), [y, z])):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


def test_selective_scan_stable_for_huge_decay() -> None:
    """Δ·A of −1e4 per step: decays underflow to 0 (the true value), never inf·0 = NaN."""
    b, t, i, n = 1, 20, 3, 2
    u, B, C = torch.randn(b, t, i), torch.randn(b, t, n), torch.randn(b, t, n)
    dt = torch.full((b, t, i), 100.0)
    A = torch.full((i, n), -100.0)
    y, h = selective_scan(u, dt, A, B, C, None)
    y_ref, h_ref = selective_scan_reference(u, dt, A, B, C, None)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)


def test_scan_chunk_len_is_ceil_sqrt() -> None:
    assert [scan_chunk_len(t) for t in (1, 2, 4, 5, 512, 2048)] == [1, 2, 2, 3, 23, 46]


@pytest.mark.parametrize("inner_norms", [False, True])
def test_mamba1_decode_equals_full_forward(inner_norms: bool) -> None:
    torch.manual_seed(0)
    mixer = Mamba1Mixer(m1_plan(inner_norms=inner_norms, proj_bias=True), 8)
    x = torch.randn(2, 11, 8)
    full = mixer(x)
    state = mixer.new_state(2, 64, "cpu", torch.float32)
    pieces = [mixer(x[:, :5], state), mixer(x[:, 5:7], state)]  # prefill, then a 2-token chunk
    pieces += [mixer(x[:, t : t + 1], state) for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert state.seen == 11


def test_the_scans_run_in_fp32_whatever_the_default_dtype() -> None:
    """The scans' zero states are fp32 as their inputs are cast: under a float64 default dtype the
    Mamba-1 chunked scan mixed the two and raised."""
    torch.manual_seed(0)
    mixers = (Mamba1Mixer(m1_plan(), 8), Mamba2Mixer(m2_plan(), 8))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for mixer in mixers:
            assert mixer(torch.randn(2, 9, 8, dtype=torch.float32)).dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM.eps) * weight


@pytest.mark.parametrize("inner_norms", [False, True])
def test_mamba1_mixer_against_mamba_simple_written_out(inner_norms: bool) -> None:
    """The whole mixer as Gu & Dao 2023 Algorithm 2 and mamba_simple.Mamba write it, step by step
    with plain ops: in_proj → causal depthwise conv → SiLU → x_proj (Δ, B, C) [→ Jamba's RMSNorms of
    Δ, B and C, Lieber et al. 2024 §3] → softplus(dt_proj(Δ)) → h_t = exp(Δ·A)·h + Δ·B·x,
    y = C·h + D·x → y·SiLU(z) → out_proj. A, D and the inner norms' weights are random, so a norm on
    the wrong tensor or a skip left out cannot hide behind the init."""
    torch.manual_seed(6)
    p = m1_plan(inner_norms=inner_norms, proj_bias=True)
    mixer = Mamba1Mixer(p, 8)
    with torch.no_grad():
        mixer.A_log.normal_(0.0, 0.5)
        mixer.D.normal_()
        for norm in (mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm):
            if norm is not None:
                norm.weight.normal_()
    b, t, i, n, r = 2, 9, p.d_inner, p.d_state, p.dt_rank
    x = torch.randn(b, t, 8)
    with torch.no_grad():
        u, z = (x @ mixer.in_proj.weight.T + mixer.in_proj.bias).split([i, i], dim=-1)
        padded = F.pad(u.transpose(1, 2), (p.d_conv - 1, 0))
        u = F.silu(F.conv1d(padded, mixer.conv1d.weight, mixer.conv1d.bias, groups=i).transpose(1, 2))
        delta, B, C = (u @ mixer.x_proj.weight.T).split([r, n, n], dim=-1)
        if inner_norms:
            assert mixer.dt_layernorm is not None and mixer.b_layernorm is not None and mixer.c_layernorm is not None
            delta, B, C = (_rms(delta, mixer.dt_layernorm.weight), _rms(B, mixer.b_layernorm.weight),
                           _rms(C, mixer.c_layernorm.weight))
        delta = F.softplus(delta @ mixer.dt_proj.weight.T + mixer.dt_proj.bias)
        A = -torch.exp(mixer.A_log)
        h = torch.zeros(b, i, n)
        ys = []
        for s in range(t):
            h = torch.exp(delta[:, s, :, None] * A) * h + (delta[:, s] * u[:, s])[..., None] * B[:, s, None, :]
            ys.append((h * C[:, s, None, :]).sum(-1) + mixer.D * u[:, s])
        y = torch.stack(ys, dim=1) * F.silu(z)
        expected = y @ mixer.out_proj.weight.T + mixer.out_proj.bias
        torch.testing.assert_close(mixer(x), expected, rtol=1e-5, atol=1e-5)


def test_mamba1_conv_is_causal() -> None:
    torch.manual_seed(0)
    mixer = Mamba1Mixer(m1_plan(), 8)
    x = torch.randn(1, 10, 8)
    y = mixer(x)
    x2 = x.clone()
    x2[:, 6] += 1.0
    y2 = mixer(x2)
    torch.testing.assert_close(y2[:, :6], y[:, :6])
    assert not torch.allclose(y2[:, 6], y[:, 6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba1_state_bytes(dtype: torch.dtype) -> None:
    p = m1_plan()
    state = Mamba1Mixer(p, 8).new_state(3, 1000, "cpu", dtype)
    assert [tuple(t.shape) for t in state.tensors()] == [(3, 12, 4), (3, 12, 4)]
    elems = p.d_inner * p.d_conv + p.d_inner * p.d_state
    assert elems == mamba1_state_elements(p)
    assert state.nbytes() == 3 * elems * dtype.itemsize


def test_mamba1_layout_is_mamba_simple() -> None:
    p = m1_plan(inner_norms=True, proj_bias=True)
    shapes = {n: tuple(t.shape) for n, t in Mamba1Mixer(p, 8).named_parameters()}
    i, n, r, d, w = 12, 4, 3, 8, 4
    assert shapes == {
        "in_proj.weight": (2 * i, d), "in_proj.bias": (2 * i,),
        "conv1d.weight": (i, 1, w), "conv1d.bias": (i,),
        "x_proj.weight": (r + 2 * n, i),
        "dt_proj.weight": (i, r), "dt_proj.bias": (i,),
        "A_log": (i, n), "D": (i,),
        "out_proj.weight": (d, i), "out_proj.bias": (d,),
        "dt_layernorm.weight": (r,), "b_layernorm.weight": (n,), "c_layernorm.weight": (n,),
    }


@pytest.mark.parametrize("plan", [m1_plan(), m1_plan(inner_norms=True, proj_bias=True, conv_bias=False)])
def test_mamba1_params_match_analytic(plan: Mamba1Plan) -> None:
    assert sum(p.numel() for p in Mamba1Mixer(plan, 8).parameters()) == mamba1_params(plan, 8)


def test_mamba1_init_follows_mamba_simple() -> None:
    mixer = Mamba1Mixer(m1_plan(), 8)
    torch.testing.assert_close(-torch.exp(mixer.A_log[0]), -torch.arange(1.0, 5.0))
    assert (mixer.D == 1).all()
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert (dt >= 1e-4 - 1e-7).all() and (dt <= 0.1 + 1e-6).all()


@pytest.mark.parametrize(("seq_len", "d_state"), [(1, 4), (7, 4), (16, 4), (5, 1)])
def test_mamba1_flops_on_meta(seq_len: int, d_state: int) -> None:
    """Exact counts, also for contractions over a size-1 dim (N = 1), which einsum would drop."""
    p = replace(m1_plan(inner_norms=True), d_state=d_state)
    with torch.device("meta"):
        mixer = Mamba1Mixer(p, 8)
    with FlopCounterMode(display=False) as counter:
        y = mixer(torch.empty(2, seq_len, 8, device="meta"))
    assert y.shape == (2, seq_len, 8)
    b, t, d, i, n, w, r = 2, seq_len, 8, 12, d_state, 4, 3
    linears = d * 2 * i + i * (r + 2 * n) + r * i + i * d
    want = 2 * b * t * linears + 2 * b * t * i * w + 2 * b * t * i * n
    assert counter.get_total_flops() == want == mamba1_counted_flops(p, d, b, t)


def forward_and_training_flops(mixer: torch.nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    """FlopCounterMode's counts by op of one forward, and of a forward + backward."""
    with FlopCounterMode(display=False) as counter:
        mixer(x)
    forward = counter.get_flop_counts()["Global"]
    with FlopCounterMode(display=False) as counter:
        mixer(x).sum().backward()
    return forward, counter.get_flop_counts()["Global"]


@pytest.mark.parametrize(("seq_len", "d_state"), [(3, 4), (11, 4), (11, 5), (7, 1)])
def test_mamba1_backward_counts_three_forwards(seq_len: int, d_state: int) -> None:
    """The scan's backward, dC over every channel a step at a time and the rest over blocks of
    ⌈I/N⌉ channels (one block at N = 1, a short last block at I = 12, N = 5), counts its
    contraction's bmm twice the forward's (training = 3 × forward), as the projections' mm do. On
    the meta device (`verify`) the blocks are one, and every op's FLOPs are the same."""
    from archplan.modules.mamba1 import channel_blocks

    p = replace(m1_plan(inner_norms=True), d_state=d_state)
    assert len(channel_blocks(12, d_state, torch.device("cpu"))) == min(d_state, 12) - (d_state == 5)
    assert len(channel_blocks(12, d_state, torch.device("meta"))) == 1
    mixer = Mamba1Mixer(p, 8)
    forward, both = forward_and_training_flops(mixer, torch.randn(2, seq_len, 8, requires_grad=True))
    mm, addmm, bmm = torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm
    assert forward[bmm] == 2 * 2 * seq_len * 12 * d_state and both[bmm] == 3 * forward[bmm]
    assert both[mm] == forward[mm] + 2 * (forward[mm] + forward[addmm])  # addmm's backward runs mm
    meta = forward_and_training_flops(mixer.to("meta"), torch.empty(2, seq_len, 8, device="meta", requires_grad=True))
    assert meta == (forward, both)


def test_mamba1_bf16_runs() -> None:
    mixer = Mamba1Mixer(m1_plan(), 8).to(torch.bfloat16)
    x = torch.randn(1, 6, 8, dtype=torch.bfloat16)
    y = mixer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    ref = Mamba1Mixer(m1_plan(), 8)
    ref.load_state_dict({k: v.float() for k, v in mixer.state_dict().items()})
    torch.testing.assert_close(y.float(), ref(x.float()), rtol=5e-2, atol=5e-2)


def test_mamba2_gated_norm_takes_the_models_eps() -> None:
    """Every module test ran the gated norm at 1e-5, the default, so a norm that ignored the model's
    eps (an imported `layer_norm_epsilon`) passed: at 1e-2 it must be rmsnorm(y ⊙ SiLU(z)) over each
    group of I/G channels with that eps, written out (mamba_ssm `RMSNormGated`, norm_before_gate=False)."""
    plan = replace(m2_plan(), norm=NormPlan("rmsnorm", False, 1e-2))
    mixer = Mamba2Mixer(plan, d_model=8)
    torch.manual_seed(0)
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
    y, z = 0.1 * torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    g = (y * F.silu(z)).unflatten(-1, (2, 8))
    expected = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-2)).flatten(-2) * mixer.norm.weight
    assert mixer.norm.eps == 1e-2
    torch.testing.assert_close(mixer.norm(y, z), expected, rtol=1e-5, atol=1e-6)
    at_default = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2) * mixer.norm.weight
    assert (mixer.norm(y, z) - at_default).abs().max() > 1e-2


# ------------------------------------------------------------------------------------- Mamba-2
@pytest.mark.parametrize(("seq_len", "chunk"), [(8, 4), (13, 4), (3, 8), (1, 4), (16, 16)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_ssd_chunked_equals_sequential(seq_len: int, chunk: int, with_h0: bool) -> None:
    torch.manual_seed(seq_len * chunk)
    b, hs, p, g, n = 2, 4, 3, 2, 5
    x = torch.randn(b, seq_len, hs, p, requires_grad=True)
    dt = torch.rand(b, seq_len, hs).mul(2).requires_grad_()
    A = (-torch.rand(hs) * 5).requires_grad_()
    B = torch.randn(b, seq_len, g, n, requires_grad=True)
    C = torch.randn(b, seq_len, g, n, requires_grad=True)
    h0 = torch.randn(b, hs, p, n, requires_grad=True) if with_h0 else None
    inputs = [x, dt, A, B, C] + ([h0] if h0 is not None else [])
    fast = ssd_chunked(x, dt, A, B, C, chunk, h0)
    ref = ssd_reference(x, dt, A, B, C, h0)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-5, atol=1e-5)
    assert_same_grads(fast, ref, inputs)


@pytest.mark.parametrize(("seq_len", "chunk"), [(8, 4), (13, 4), (3, 8)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_ssd_unit_keeps_inputs_and_two_products_with_plain_autograd_gradients(
        seq_len: int, chunk: int, with_h0: bool) -> None:
    """`ssd_chunked` (the autograd unit) keeps its inputs, C·Bᵀ and the chunk states but the last only, and
    gives the values and gradients (fp64) of the same ops under plain autograd, D skip included, y in x's
    dtype (mamba_ssm's `out`)."""
    torch.manual_seed(seq_len * chunk)
    b, hs, p, g, n = 2, 4, 3, 2, 5
    f64 = torch.float64
    x = torch.randn(b, seq_len, hs, p, dtype=f64, requires_grad=True)
    dt = torch.rand(b, seq_len, hs, dtype=f64).mul(2).requires_grad_()
    A = (-torch.rand(hs, dtype=f64) * 5).requires_grad_()
    B = torch.randn(b, seq_len, g, n, dtype=f64, requires_grad=True)
    C = torch.randn(b, seq_len, g, n, dtype=f64, requires_grad=True)
    D = torch.randn(hs, dtype=f64, requires_grad=True)
    h0 = torch.randn(b, hs, p, n, dtype=f64, requires_grad=True) if with_h0 else None
    inputs = [x, dt, A, B, C, D] + ([h0] if h0 is not None else [])
    unit, saved = saved_during(lambda: ssd_chunked(x, dt, A, B, C, chunk, h0, D))
    y, state, cb, states = _ssd(x, dt, A, B, C, chunk, h0)
    plain = (_with_skip(y, x, D).to(x.dtype), state)
    torch.testing.assert_close(unit[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(unit[1], plain[1], rtol=0, atol=0)
    kept = storages(saved)
    assert storages(inputs) <= kept and len(kept) == len(inputs) + 2
    assert sorted(t.shape for t in saved if t.untyped_storage().data_ptr() not in
                  storages(inputs)) == sorted([cb.shape, states[:, 1:].shape])
    probe = torch.randn_like(unit[0])
    g_unit = torch.autograd.grad((unit[0] * probe).sum() + unit[1].sum(), inputs)
    g_plain = torch.autograd.grad((plain[0] * probe).sum() + plain[1].sum(), inputs)
    for a, b_ in zip(g_unit, g_plain):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


def test_mamba2_under_bf16_autocast_keeps_its_scan_output_in_bf16() -> None:
    """With fp32 weights under bf16 autocast (a training step), the residual stream is fp32; the
    SSD's output comes back in x's dtype, as mamba_ssm's `out` does, and the gated norm keeps it so,
    not cast up to the residual's fp32: every (B, T, d_inner) tensor kept is bf16."""
    plan = m2_plan()
    mixer = Mamba2Mixer(plan, 8)
    x = torch.randn(2, 6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, saved = saved_during(lambda: mixer(x))
    wide = [t for t in saved if tuple(t.shape) == (2, 6, plan.d_inner)]
    assert len(wide) == 2 and {t.dtype for t in wide} == {torch.bfloat16}  # the scan output y and the gate z
    assert y.dtype == torch.bfloat16


def test_gated_norm_unit_keeps_its_inputs_with_plain_autograd_gradients() -> None:
    torch.manual_seed(0)
    norm = Mamba2Mixer(m2_plan(n_groups=2), 8).norm.double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    y, z = (torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    unit, saved = saved_during(lambda: norm(y, z))
    plain = _gated_rms_norm(y, z, norm.weight, 2, norm.eps)
    assert torch.equal(unit, plain)
    kept = storages(saved)
    assert kept == storages((y, z, norm.weight))
    probe = torch.randn_like(unit)
    for a, b_ in zip(torch.autograd.grad((unit * probe).sum(), [y, z, norm.weight]),
                     torch.autograd.grad((plain * probe).sum(), [y, z, norm.weight])):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_decode_equals_full_forward(n_groups: int) -> None:
    torch.manual_seed(0)
    mixer = Mamba2Mixer(m2_plan(n_groups=n_groups, proj_bias=True), 8)
    x = torch.randn(2, 11, 8)
    full = mixer(x)
    state = mixer.new_state(2, 64, "cpu", torch.float32)
    pieces = [mixer(x[:, :6], state), mixer(x[:, 6:8], state)]
    pieces += [mixer(x[:, t : t + 1], state) for t in range(8, 11)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert state.seen == 11


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_mixer_against_mamba2_written_out(n_groups: int) -> None:
    """The whole mixer as Dao & Gu 2024 (§7, Figure 6) and mamba2.Mamba2 write it, as a per-head
    recurrence with plain ops: in_proj → [z, xBC, dt] → causal depthwise conv over xBC → SiLU →
    x, B, C (head h reads group h·G/Hs) → Δ = softplus(dt + dt_bias), scalar A per head →
    h_t = exp(Δ·A)·h + Δ·x_t ⊗ B_t, y = h·C + D·x → rmsnorm(y·SiLU(z)) per group of I/G channels,
    × w → out_proj. A, D, dt_bias and the norm's weight are random."""
    torch.manual_seed(7)
    p = m2_plan(n_groups=n_groups, proj_bias=True)
    mixer = Mamba2Mixer(p, 8)
    with torch.no_grad():
        for param in (mixer.A_log, mixer.D, mixer.dt_bias, mixer.norm.weight):
            param.normal_(0.0, 0.5)
    b, t, i, hs, hp, g, n = 2, 9, p.d_inner, p.n_heads, p.head_dim, n_groups, p.d_state
    x = torch.randn(b, t, 8)
    with torch.no_grad():
        z, xbc, dt = (x @ mixer.in_proj.weight.T + mixer.in_proj.bias).split([i, i + 2 * g * n, hs], dim=-1)
        padded = F.pad(xbc.transpose(1, 2), (p.d_conv - 1, 0))
        conv = F.conv1d(padded, mixer.conv1d.weight, mixer.conv1d.bias, groups=i + 2 * g * n)
        u, B, C = F.silu(conv.transpose(1, 2)).split([i, g * n, g * n], dim=-1)
        u, B, C = u.reshape(b, t, hs, hp), B.reshape(b, t, g, n), C.reshape(b, t, g, n)
        group = torch.arange(hs) * g // hs  # the group each head reads B and C from
        delta = F.softplus(dt + mixer.dt_bias)
        A = -torch.exp(mixer.A_log)
        h = torch.zeros(b, hs, hp, n)
        ys = []
        for s in range(t):
            decay = torch.exp(delta[:, s] * A)[..., None, None]
            h = decay * h + (delta[:, s, :, None] * u[:, s])[..., None] * B[:, s, group, None, :]
            ys.append((h * C[:, s, group, None, :]).sum(-1) + mixer.D[:, None] * u[:, s])
        y = torch.stack(ys, dim=1).reshape(b, t, i) * F.silu(z)
        y = y.unflatten(-1, (g, i // g))
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + NORM.eps)).flatten(-2) * mixer.norm.weight
        expected = y @ mixer.out_proj.weight.T + mixer.out_proj.bias
        torch.testing.assert_close(mixer(x), expected, rtol=1e-5, atol=1e-5)


def test_mamba2_conv_is_causal() -> None:
    torch.manual_seed(0)
    mixer = Mamba2Mixer(m2_plan(), 8)
    x = torch.randn(1, 10, 8)
    x2 = x.clone()
    x2[:, 5] -= 1.0
    y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y2[:, :5], y[:, :5])
    assert not torch.allclose(y2[:, 5], y[:, 5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba2_state_bytes(dtype: torch.dtype) -> None:
    p = m2_plan()
    state = Mamba2Mixer(p, 8).new_state(3, 1000, "cpu", dtype)
    conv_dim = p.d_inner + 2 * p.n_groups * p.d_state
    assert [tuple(t.shape) for t in state.tensors()] == [(3, conv_dim, 4), (3, 4, 4, 4)]
    elems = conv_dim * p.d_conv + p.n_heads * p.head_dim * p.d_state
    assert elems == mamba2_state_elements(p)
    assert state.nbytes() == 3 * elems * dtype.itemsize


def test_mamba2_layout_is_mamba2() -> None:
    p = m2_plan(proj_bias=True)
    shapes = {n: tuple(t.shape) for n, t in Mamba2Mixer(p, 8).named_parameters()}
    i, gn, hs, d, w = 16, 2 * 4, 4, 8, 4
    assert shapes == {
        "in_proj.weight": (2 * i + 2 * gn + hs, d), "in_proj.bias": (2 * i + 2 * gn + hs,),
        "conv1d.weight": (i + 2 * gn, 1, w), "conv1d.bias": (i + 2 * gn,),
        "dt_bias": (hs,), "A_log": (hs,), "D": (hs,),
        "norm.weight": (i,),
        "out_proj.weight": (d, i), "out_proj.bias": (d,),
    }
    assert sum(math.prod(s) for s in shapes.values()) == mamba2_params(p, 8)


def test_mamba2_gated_norm_is_groupwise() -> None:
    """mamba_ssm RMSNormGated(group_size = d_inner / ngroups): each group normalised on its own."""
    mixer = Mamba2Mixer(m2_plan(n_groups=2), 8)
    y, z = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    out = mixer.norm(y, z)
    gated = y * torch.nn.functional.silu(z)
    for g in range(2):
        part = gated[..., 8 * g : 8 * (g + 1)]
        want = part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5)
        torch.testing.assert_close(out[..., 8 * g : 8 * (g + 1)], want)


@pytest.mark.parametrize(
    ("seq_len", "chunk", "d_state"), [(1, 4, 4), (4, 4, 4), (11, 4, 4), (16, 4, 4), (5, 1, 1)]
)
def test_mamba2_flops_on_meta(seq_len: int, chunk: int, d_state: int) -> None:
    """Exact counts, also when q = 1 (decode) or N = 1 makes a contraction dim of size 1."""
    p = replace(m2_plan(chunk_size=chunk), d_state=d_state)
    with torch.device("meta"):
        mixer = Mamba2Mixer(p, 8)
    with FlopCounterMode(display=False) as counter:
        y = mixer(torch.empty(2, seq_len, 8, device="meta"))
    assert y.shape == (2, seq_len, 8)
    b, t, d, i, n, w, hs, pp, g = 2, seq_len, 8, 16, d_state, 4, 4, 4, 2
    q = min(chunk, t)
    n_chunks = math.ceil(t / q)
    conv_dim = i + 2 * g * n
    ssd = b * n_chunks * (2 * q * q * n * g + 2 * q * q * pp * hs + 2 * (2 * q * n * pp * hs))
    want = 2 * b * t * (d * (2 * i + 2 * g * n + hs) + i * d) + 2 * b * t * conv_dim * w + ssd
    assert counter.get_total_flops() == want == mamba2_counted_flops(p, d, b, t)


@pytest.mark.parametrize("seq_len", [3, 11])
def test_mamba2_backward_counts_three_forwards(seq_len: int) -> None:
    """All four SSD contractions are differentiated even with one chunk (training = 3× forward)."""
    with torch.device("meta"):
        mixer = Mamba2Mixer(m2_plan(chunk_size=16), 8)
    forward, both = forward_and_training_flops(mixer, torch.empty(1, seq_len, 8, device="meta", requires_grad=True))
    for op in (torch.ops.aten.mm, torch.ops.aten.bmm):
        assert both[op] == 3 * forward[op]


def test_mamba2_bf16_runs() -> None:
    mixer = Mamba2Mixer(m2_plan(), 8).to(torch.bfloat16)
    x = torch.randn(1, 6, 8, dtype=torch.bfloat16)
    y = mixer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    ref = Mamba2Mixer(m2_plan(), 8)
    ref.load_state_dict({k: v.float() for k, v in mixer.state_dict().items()})
    torch.testing.assert_close(y.float(), ref(x.float()), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_causal_conv_unit_under_bf16_autocast(bias: bool) -> None:
    """The causal conv keeps its unpadded input and runs `convolution_backward` itself, which no
    autocast covers: under bf16 autocast it runs in the forward's bf16, as plain autograd's conv
    does (it once met the bf16 gradient with fp32 operands and raised)."""
    torch.manual_seed(0)
    c, w = 6, 4
    x = torch.randn(2, c, 11, requires_grad=True)
    weight = torch.randn(c, 1, w, requires_grad=True)
    b = torch.randn(c, requires_grad=True) if bias else None
    inputs = [x, weight] + ([b] if b is not None else [])
    assert_bf16_autocast_backward(lambda: causal_depthwise_conv(x, weight, b, None)[0],
                                  lambda: F.conv1d(F.pad(x, (w - 1, 0)), weight, b, groups=c), inputs)


@pytest.mark.parametrize("with_d", [False, True])
def test_scan_unit_under_bf16_autocast(with_d: bool) -> None:
    """The chunked scan's backward recomputes under the forward's autocast: its output contraction
    is differentiated in bf16 as plain autograd does (it once ran in fp32 here), near fp32."""
    torch.manual_seed(0)
    b, t, i, n = 2, 13, 6, 4
    u, dt = (torch.randn(b, t, i, requires_grad=True) for _ in range(2))
    A = (-torch.rand(i, n) * 3).requires_grad_()
    B, C = (torch.randn(b, t, n, requires_grad=True) for _ in range(2))
    h0 = torch.randn(b, i, n, requires_grad=True)
    D = torch.randn(i, requires_grad=True) if with_d else None
    inputs = [u, dt, A, B, C, h0] + ([D] if D is not None else [])
    assert_bf16_autocast_backward(lambda: chunked_scan(u, dt, A, B, C, h0, D_I=D, dt_softplus=True),
                                  lambda: _scan(u, dt, A, B, C, h0, D, True), inputs)


def test_ssd_unit_under_bf16_autocast() -> None:
    """Under bf16 autocast SSD's contractions run in bf16 and C·Bᵀ and the chunk states are kept in
    bf16: the backward recomputes under the forward's autocast (it once multiplied fp32 by those
    bf16 tensors, a dtype error) and gives plain autograd's gradients, near the fp32 ones."""
    torch.manual_seed(0)
    b, t, hs, p, g, n = 2, 13, 4, 3, 2, 5
    x = torch.randn(b, t, hs, p, requires_grad=True)
    dt = torch.rand(b, t, hs).mul(2).requires_grad_()
    A = (-torch.rand(hs) * 5).requires_grad_()
    B, C = (torch.randn(b, t, g, n, requires_grad=True) for _ in range(2))
    D = torch.randn(hs, requires_grad=True)
    h0 = torch.randn(b, hs, p, n, requires_grad=True)

    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        y, state, _, _ = _ssd(x, dt, A, B, C, 4, h0)
        return _with_skip(y, x, D), state

    assert_bf16_autocast_backward(lambda: ssd_chunked(x, dt, A, B, C, 4, h0, D), plain, [x, dt, A, B, C, D, h0])


def test_gated_norm_unit_under_bf16_autocast() -> None:
    """An elementwise unit (`recompute.recomputed`) recomputes under the forward's autocast too."""
    torch.manual_seed(0)
    norm = Mamba2Mixer(m2_plan(n_groups=2), 8).norm
    y, z = (torch.randn(2, 5, 16, requires_grad=True) for _ in range(2))
    assert_bf16_autocast_backward(lambda: norm(y, z), lambda: _gated_rms_norm(y, z, norm.weight, 2, norm.eps),
                                  [y, z, norm.weight])
