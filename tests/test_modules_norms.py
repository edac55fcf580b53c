"""The norms' autograd units: what they keep for the backward (what a fused kernel keeps: the input
in its own dtype and the per-row statistics), and their values and gradients against plain
autograd's `F.rms_norm` / `F.layer_norm`. The fake runs' exact collective counts
(test_distributed.py) cover what DTensor places for them over a sharded width or sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autograd_units import saved_during, storages
from archplan.modules.norms import LayerNorm, RMSNorm, normalise_with, rms_norm, width_moments


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_keeps_input_and_rstd_with_plain_autograd_gradients(affine: bool) -> None:
    """The composite `rms_norm` also keeps x·rstd (a third full-width fp32 tensor); the unit keeps
    the input and the per-row rstd, and gives F.rms_norm's values and gradients (fp64), exactly."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True) if affine else None
    wanted = [x] + ([w] if w is not None else [])
    unit, saved = saved_during(lambda: rms_norm(x, w, 1e-5))
    plain, plain_saved = saved_during(lambda: F.rms_norm(x, (16,), w, 1e-5))
    assert torch.equal(unit, plain)
    full_width = [t for t in saved if t.shape == x.shape]
    assert storages(full_width) == storages([x])
    assert sorted(t.shape for t in saved if t.shape not in (x.shape, (16,))) == [(2, 5, 1)]
    if affine:
        assert len(storages([t for t in plain_saved if t.shape == x.shape])) == 2  # x and x·rstd
    probe = torch.randn_like(unit)
    for got, want in zip(torch.autograd.grad((unit * probe).sum(), wanted),
                         torch.autograd.grad((plain * probe).sum(), wanted)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: rms_norm(t[0], t[1] if affine else None, 1e-5), tuple(wanted))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_forward_holds_one_fp32_copy_past_its_statistics(dtype: torch.dtype) -> None:
    """The unit's forward normalises x's fp32 copy in place where the copy is new (a narrower x):
    at most two fp32 tensors of x's size alive at once (the copy and its square, for the mean),
    where out of place held three at its end (the copy, x̂ and x̂·w), and a full-recompute re-run
    ending in a norm (an MTP module's final norm) peaked there. An fp32 x is not written."""
    from live_bytes import LiveBytes

    torch.manual_seed(0)
    x = torch.randn(4, 256, 64, dtype=dtype)
    kept = x.clone()
    w = torch.randn(64, dtype=dtype)
    fp32_size = 4 * x.numel()
    tracer = LiveBytes()
    with tracer:
        y = rms_norm(x, w, 1e-5)
    assert tracer.peak <= 2 * fp32_size + 4 * 4 * 256  # and the per-row statistics
    assert torch.equal(x, kept)
    assert torch.equal(y, F.rms_norm(x.float(), (64,), w.float(), 1e-5))


def test_rms_norm_weight_that_broadcasts_wider_or_promotes_is_applied_out_of_place() -> None:
    """A weight whose broadcast grows the output, or whose dtype is wider than the fp32 output,
    is applied out of place, as before the in-place forward (no module passes one today)."""
    from archplan.modules.norms import _RMSNormKeepingInput

    torch.manual_seed(0)
    x = torch.randn(2, 1, 5, 8)
    w = torch.randn(4, 1, 8)
    assert torch.equal(_RMSNormKeepingInput.apply(x, w, 1e-5), F.rms_norm(x, (8,), None, 1e-5) * w)
    wide = torch.randn(8, dtype=torch.float64)
    assert _RMSNormKeepingInput.apply(x.bfloat16(), wide, 1e-5).dtype == torch.float64


@pytest.mark.parametrize("norm", [
    RMSNorm(32, 1e-5), LayerNorm(32, 1e-5, bias=True), LayerNorm(32, 1e-5, bias=False),
    LayerNorm(32, 1e-5, bias=True, affine=False),
], ids=["rms", "layer", "layer_no_bias", "layer_no_affine"])
def test_bf16_norm_keeps_its_bf16_input_once_with_plain_autograds_values(norm: RMSNorm | LayerNorm) -> None:
    """A bf16 model's norm computes in fp32 but keeps its bf16 input, not the fp32 copy plain
    autograd keeps (twice the bytes), beside the per-row statistics and its weights; its output and
    gradients are plain autograd's, bit for bit. The LayerNorm unit's weight-only and parameterless
    forms pass None for the missing tensors through `native_layer_norm` and its backward's mask:
    a weight dropped when there is no bias, a gradient returned for an absent weight or bias, or a
    wrong input gradient without them fails here."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    norm = norm.bfloat16()
    x = torch.randn(3, 4, 32, dtype=torch.bfloat16, requires_grad=True)
    y, saved = saved_during(lambda: norm(x))
    assert y.dtype == torch.bfloat16
    full_width = [t for t in saved if t.shape == x.shape]
    assert storages(full_width) == storages([x])
    assert {t.dtype for t in saved if t.shape == (3, 4, 1)} == {torch.float32}
    # the bf16 weight and bias are kept as stored (FSDP2's gather), not as fp32 copies: 4 B per
    # width per norm and micro-batch in flight that `verify --layout` measured and no term prices
    width = [t for t in saved if t.shape == (32,)]
    assert storages(width) <= storages(list(norm.parameters())) and all(t.dtype == torch.bfloat16 for t in width)
    weight = norm.weight.float() if norm.weight is not None else None
    plain_x = x.detach().requires_grad_()
    if isinstance(norm, RMSNorm):
        plain = F.rms_norm(plain_x.float(), (32,), weight, 1e-5).type_as(x)
    else:
        bias = norm.bias.float() if norm.bias is not None else None
        plain = F.layer_norm(plain_x.float(), (32,), weight, bias, 1e-5).type_as(x)
    assert torch.equal(y, plain)
    probe = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *norm.parameters()], probe)
    want = torch.autograd.grad(plain, [plain_x, *norm.parameters()], probe)
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, want):
        assert torch.equal(a, b)



@pytest.mark.parametrize(("affine", "copies"), [(True, 4), (False, 3.5)])
def test_bf16_rms_norms_backward_holds_three_fp32_copies_beside_its_gradient(affine: bool, copies: float) -> None:
    """The bf16 RMSNorm's backward, the cast's included, holds at its peak the fp32 gradient the
    cast hands it and three more fp32 tensors of x's size (x·rstd, the weighted gradient, one
    product being summed; without a weight, the bf16 result in its place), plus per-row and
    per-weight figures. Autograd's op-by-op formulas held seven (six without a weight): at one
    layer per pipeline stage that was the step's peak (`verify --layout`, tiny-llama's middle
    stage at full recompute)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    norm = RMSNorm(256, 1e-5, affine).bfloat16()
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    y = norm(x)
    probe = torch.randn_like(y)
    tracker = MemTracker()
    with tracker:
        y.backward(probe)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    fp32_copy = x.numel() * 4
    assert 0 <= peak - copies * fp32_copy <= 4 << 10

@pytest.mark.parametrize("centred", [False, True], ids=["rms", "layer"])
def test_norm_from_width_moments_is_the_norm_and_keeps_the_bf16_input(centred: bool) -> None:
    """The statistics and the normalisation a norm over a tp-sharded width is built from
    (`distributed.plans.width_sharded_norm`): on one rank's whole width they are F.rms_norm /
    F.layer_norm (fp64 values and gradcheck), and on a bf16 input keep that input, not its fp32
    copy and the normalised x."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True) if centred else None

    def norm(x: torch.Tensor, w: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        moments = width_moments(x, centred) / x.shape[-1]
        mean, mean_sq = moments.split(1, -1) if centred else (None, moments)
        return normalise_with(x, mean, mean_sq, w, bias[0] if bias else None, 1e-5)

    args = (x, w) + ((b,) if b is not None else ())
    plain = F.layer_norm(x, (8,), w, b, 1e-5) if centred else F.rms_norm(x, (8,), w, 1e-5)
    torch.testing.assert_close(norm(*args), plain, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(norm, args)
    x16 = x.detach().bfloat16().requires_grad_()
    _, saved = saved_during(lambda: norm(x16, w.detach().float()))
    assert storages([t for t in saved if t.shape == x16.shape]) == storages([x16])


def test_rms_norm_under_fvcores_trace_is_the_plain_op() -> None:
    """fvcore counts a jit trace, to which an autograd Function would be one opaque prim::PythonOp:
    the trace sees `aten::rms_norm` and fvcore reports no unsupported Python op."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    analysis = fvcore_nn.FlopCountAnalysis(RMSNorm(8, 1e-5), (torch.randn(2, 8),))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.total()
    assert set(analysis.unsupported_ops()) == {"aten::rms_norm"}


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_per_head_norm_keeps_its_bf16_input_once(kind: str) -> None:
    """StableLM-2's per-head qk-norm (weights and bias per head, broadcast over the tokens) keeps
    its bf16 input and the per-row statistics, not the fp32 copy and the normalised x plain
    autograd keeps for the per-head weights' gradients; values and gradients are plain autograd's
    (fp64 gradcheck; bf16 within one rounding)."""
    from archplan.modules.norms import HeadwiseNorm
    from archplan.resolve import NormPlan

    torch.manual_seed(0)
    norm = HeadwiseNorm(3, 8, NormPlan(kind=kind, eps=1e-5, bias=True, affine=True))
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()

    def plain(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype != torch.float64 else x
        y = F.rms_norm(x32, (8,), None, 1e-5) if kind == "rmsnorm" else F.layer_norm(x32, (8,), None, None, 1e-5)
        y = y * norm.weight.to(y.dtype)[:, None, :]
        if norm.bias is not None:
            y = y + norm.bias.to(y.dtype)[:, None, :]
        return y.type_as(x)

    x16 = torch.randn(2, 3, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    y, saved = saved_during(lambda: norm(x16))
    assert storages([t for t in saved if t.shape == x16.shape]) == storages([x16])
    torch.testing.assert_close(y, plain(x16))
    # bf16 weights (FSDP2's gather) are kept as stored, views of the parameters, not fp32 copies
    wide = HeadwiseNorm(3, 8, NormPlan(kind=kind, eps=1e-5, bias=True, affine=True)).bfloat16()
    _, saved = saved_during(lambda: wide(x16))
    per_head = [t for t in saved if t.numel() == 3 * 8]
    assert per_head and storages(per_head) <= storages(list(wide.parameters()))
    # the units on per-head weights, in fp64: gradcheck, and plain autograd's values
    from archplan.modules.norms import _LayerNormKeepingInput, _RMSNormKeepingInput

    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(3, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    if kind == "rmsnorm":
        assert torch.autograd.gradcheck(lambda x, w: _RMSNormKeepingInput.apply(x, w, 1e-5), (x, w))
        want = F.rms_norm(x, (8,), None, 1e-5) * w
        got = _RMSNormKeepingInput.apply(x, w, 1e-5)
    else:
        assert torch.autograd.gradcheck(lambda x, w, b: _LayerNormKeepingInput.apply(x, w, b, 1e-5), (x, w, b))
        want = F.layer_norm(x, (8,), None, None, 1e-5) * w + b
        got = _LayerNormKeepingInput.apply(x, w, b, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", [RMSNorm(16, 1e-5), LayerNorm(16, 1e-5, bias=True)], ids=["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fp64_weights_apply_as_fp32_at_any_input(norm: RMSNorm | LayerNorm, dtype: torch.dtype) -> None:
    """A model built in fp64 (reference checks) runs its norms: the weights apply in fp32 as the
    input's fp32 copy is scaled (`F.layer_norm` refused fp64 weights beside an fp32 input), and
    their gradients come back in fp64."""
    norm = norm.double()
    x = torch.randn(2, 3, 16, dtype=dtype, requires_grad=True)
    y = norm(x)
    y.sum().backward()
    assert y.dtype == dtype and x.grad is not None and x.grad.dtype == dtype
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in norm.parameters())
