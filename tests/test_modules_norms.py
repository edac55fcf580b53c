"""RMSNorm's autograd unit: what it keeps for the backward (what CUDA's fused kernel keeps), and its
values and gradients against `F.rms_norm`. The fake runs' exact collective counts
(test_distributed.py) cover what DTensor places for it over a sharded width or sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autograd_units import saved_during, storages
from archplan.modules.norms import RMSNorm, rms_norm


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


def test_rms_norm_module_under_bf16_autocast_keeps_the_fp32_input_once() -> None:
    """A bf16 model's norm: the fp32 copy of its input and the rstd are all it keeps beside its weight."""
    norm = RMSNorm(32, 1e-5).bfloat16()
    x = torch.randn(3, 4, 32, dtype=torch.bfloat16, requires_grad=True)
    y, saved = saved_during(lambda: norm(x))
    assert y.dtype == torch.bfloat16
    kept = {(t.dtype, tuple(t.shape)) for t in saved}
    assert kept == {(torch.float32, (3, 4, 32)), (torch.float32, (3, 4, 1)), (torch.float32, (32,))}
    assert len(storages([t for t in saved if t.shape == x.shape])) == 1


def test_rms_norm_under_fvcores_trace_is_the_plain_op() -> None:
    """fvcore counts a jit trace, to which an autograd Function would be one opaque prim::PythonOp:
    the trace sees `aten::rms_norm` and fvcore reports no unsupported Python op."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    analysis = fvcore_nn.FlopCountAnalysis(RMSNorm(8, 1e-5), (torch.randn(2, 8),))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.total()
    assert set(analysis.unsupported_ops()) == {"aten::rms_norm"}
