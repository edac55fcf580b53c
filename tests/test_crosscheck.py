"""crosscheck: its bookkeeping, every preset on meta, the real-instance checks, and that it catches
a disagreement when one is planted."""

from __future__ import annotations

import dataclasses
import sys
import warnings

import pytest
import torch
from torch.utils.flop_counter import flop_registry

from archplan import crosscheck as cc
from archplan.analytic import FlopCount, ParamCount, count_params, kv_cache
from archplan.analytic.kv import KVCache
from archplan.contraction import ContractionDetector, contraction_shaped
from archplan.flop_registry import COUNTER_FORMULAS, FVCORE_FORMULAS
from archplan.loader import load_spec, preset_names
from archplan.resolve import ModelPlan, resolve
from archplan.spec import Spec

TINY = Spec.model_validate({
    "name": "tiny-gqa",
    "vocab_size": 32,
    "d_model": 16,
    "n_layers": 2,
    "max_seq_len": 32,
    "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
    "ffn": {"kind": "glu", "d_ff": 24},
})

TINY_HYBRID = Spec.model_validate({
    "name": "tiny-hybrid",
    "vocab_size": 32,
    "d_model": 16,
    "n_layers": 4,
    "max_seq_len": 32,
    "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "sliding_window": 4},
    "ssm": {"kind": "mamba2", "d_state": 4, "head_dim": 4, "chunk_size": 4},
    "ffn": {"kind": "glu", "d_ff": 24},
    "moe": {"n_experts": 4, "top_k": 2, "expert": {"kind": "glu", "d_ff": 8},
            "shared": {"d_ff": 8, "gate": True}},
    "layout": {"mixers": "MSMA", "moe_every": 2, "moe_offset": 1},
})


def test_component_lookup_takes_the_longest_dotted_prefix() -> None:
    lookup = cc.component_lookup(["layers.1.ffn", "layers.1.ffn.experts", "layers.11.ffn", "embed"])
    assert lookup("layers.1.ffn.experts.w_up_EFD") == "layers.1.ffn.experts"
    assert lookup("layers.1.ffn.up.weight") == "layers.1.ffn"
    assert lookup("layers.11.ffn.up.weight") == "layers.11.ffn"
    assert lookup("layers.1.ffnx.weight") is None  # a prefix must end at a dot
    assert lookup("embed.weight") == "embed"
    assert lookup("embed") == "embed"


def test_exclusive_counts_subtract_the_nearest_counted_descendant() -> None:
    # FlopCounterMode adds each op to every enclosing module; `layers` (a ModuleList) never runs.
    inclusive = {
        "": {"mm": 110, "bmm": 8},
        "layers.0.mixer": {"mm": 40, "bmm": 8},
        "layers.0.mixer.q_proj": {"mm": 10},
        "lm_head": {"mm": 60},
    }
    own = cc.exclusive_counts(inclusive)
    assert own[""] == {"mm": 10}
    assert own["layers.0.mixer"] == {"mm": 30, "bmm": 8}
    assert own["layers.0.mixer.q_proj"] == {"mm": 10}
    assert own["lm_head"] == {"mm": 60}


def test_ordered_follows_the_model() -> None:
    names = ["lm_head", "layers.10.mixer", "layers.2.ffn", "layers.2.norm1", "layers.2.mixer", "embed",
             "final_norm", "(unmapped) x"]
    assert cc.ordered(names) == [
        "embed", "layers.2.norm1", "layers.2.mixer", "layers.2.ffn", "layers.10.mixer", "final_norm",
        "lm_head", "(unmapped) x",
    ]


def test_suspicious_op_is_a_contraction_without_formula() -> None:
    assert cc.OpCount("aten._scaled_dot_product_flash_attention_for_cpu", 2, 0, None, True).suspicious
    assert not cc.OpCount("aten.mm", 2, 100, "torch.utils.flop_counter", True).suspicious
    assert not cc.OpCount("aten.add", 9, 0, None, False).suspicious


@pytest.mark.parametrize(("operands", "outputs"), [
    ([(6, 4), (4, 5)], [(6, 5)]),  # mm
    ([(6, 4), (4,)], [(6,)]),  # mv
    ([(4, 4), (4,)], [(4,)]),  # square mv
    ([(2, 6, 4), (5, 4)], [(2, 6, 5)]),  # linear: x · Wᵀ
    ([(8, 4), (4, 4)], [(8, 4)]),  # x · W with a square W
    ([(3, 6, 4), (3, 4, 5)], [(3, 6, 5)]),  # bmm
    ([(1, 2, 6, 4), (1, 2, 7, 4), (1, 2, 7, 3)], [(1, 2, 6, 3), (1, 2, 6)]),  # attention, S ≠ T
    ([(8, 4), (3, 4, 5)], [(8, 5)]),  # grouped: jagged rows of a
], ids=["mm", "mv", "square-mv", "linear", "square-weight", "bmm", "attention", "grouped"])
def test_contractions_are_recognised_from_shapes(
    operands: list[tuple[int, ...]], outputs: list[tuple[int, ...]]
) -> None:
    assert contraction_shaped(operands, outputs)


def test_an_indexed_update_is_not_a_contraction() -> None:
    # index_put(self (1, 32), [idx (32,)], values (32, 32), accumulate=True): a sum by index,
    # shaped like (1, 32) @ (32, 32) only by coincidence; the integer index tells them apart
    assert contraction_shaped([(1, 32), (32, 32)], [(1, 32)])
    assert not contraction_shaped([(1, 32), (32, 32)], [(1, 32)], indexed=True)
    assert contraction_shaped([(8, 4), (3, 4, 5)], [(8, 5)], indexed=True)  # grouped mm with offsets


def test_a_decomposition_tells_square_attention_from_an_update() -> None:
    """T = S = D: attention's signature is an update's; what the op decomposes into is not."""
    detect = ContractionDetector(flop_registry)
    q_BHTD = torch.empty(1, 2, 4, 4, device="meta")
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert detect(attention, (q_BHTD, q_BHTD, q_BHTD), {}, attention(q_BHTD, q_BHTD, q_BHTD))
    softmax_backward = torch.ops.aten._softmax_backward_data.default
    args = (q_BHTD, q_BHTD, -1, torch.float32)
    assert not detect(softmax_backward, args, {}, softmax_backward(*args))
    mv = torch.ops.aten.mv.default  # decomposes to mul + sum: caught by its shapes
    w, x = torch.empty(6, 4, device="meta"), torch.empty(4, device="meta")
    assert detect(mv, (w, x), {}, mv(w, x))


def test_square_attention_is_caught_inside_verifys_counter() -> None:
    """Inside the counter's own dispatch mode, the decomposition's mode saw SDPA's math kernel as
    one op with no formula, 0 FLOPs: square CPU attention went unlisted, and verify's safety net
    did not fire where it runs."""
    from archplan.crosscheck import _ListingCounter

    class Attention(torch.nn.Module):
        def forward(self, q_BHTD: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_BHTD, q_BHTD, q_BHTD)[0]

    model = Attention()
    with _ListingCounter(model) as counter:
        model(torch.randn(1, 2, 8, 4))
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in counter.log.contracting


@pytest.mark.parametrize(("operands", "outputs"), [
    ([(16, 4), (16, 4)], [(16, 4)]),  # softmax backward: grad and output, same shape
    ([(4, 4), (4, 4)], [(4, 4)]),  # ... square
    ([(2, 8, 16), (16,), (16,)], [(2, 8, 16), (2, 8, 1), (2, 8, 1)]),  # layer norm
    ([(2, 6), (2, 2)], [(2, 6)]),  # scatter_add of top-2 scores into 6 experts, 2 tokens
    ([(32, 16), (32, 16)], [(32, 16)]),  # index_put / copy
    ([(2, 8, 1), (1, 1, 16)], [(2, 8, 16)]),  # broadcast
], ids=["softmax-backward", "square-softmax-backward", "layer-norm", "scatter", "index-put", "broadcast"])
def test_updates_and_elementwise_ops_are_not_contractions(
    operands: list[tuple[int, ...]], outputs: list[tuple[int, ...]]
) -> None:
    assert not contraction_shaped(operands, outputs)


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_verifies_on_meta(preset: str) -> None:
    """Every check that needs no allocated model, on every preset: parameters, forward FLOPs,
    training FLOPs (a real backward on meta) and the cache the model's own cache holds after a
    prefill (meta tensors have their shapes' sizes)."""
    plan = resolve(load_spec(preset))
    result = cc.crosscheck(plan, seq_len=64, batch=1, backward=True, real=False)
    assert [r for r in result.params if not r.ok] == []
    assert [r for r in result.flops if not r.ok] == []
    assert result.training is not None and result.training.ok, result.training
    assert result.suspicious_ops == ()
    assert result.params_built == count_params(plan).total
    assert len(result.kv) == len(plan.layers) and [r for r in result.kv if not r.ok] == []
    assert sum(r.built for r in result.kv) == kv_cache(plan, 64, 1, 2).bytes > 0
    assert {c.name: c.status for c in result.checks} == {
        "parameters": "match", "forward FLOPs": "match", "training FLOPs": "match", "KV cache": "match",
        "fvcore": "not run"}


def test_a_cache_the_analytic_count_misses_is_a_kv_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The meta cache check compares layer by layer: an analytic figure off by one element fails it,
    and the diff names the layer."""
    real_kv = cc.kv_cache

    def off_by_one(plan: ModelPlan, seq_len: int, batch: int, dtype_bytes: int) -> KVCache:
        kv = real_kv(plan, seq_len, batch, dtype_bytes)
        by = dict(kv.by_component)
        by["layers.1.mixer"] += dtype_bytes
        return dataclasses.replace(kv, by_component=by)

    monkeypatch.setattr(cc, "kv_cache", off_by_one)
    result = cc.crosscheck(resolve(TINY), seq_len=8, backward=False, real=False)
    assert {c.name: c.status for c in result.checks}["KV cache"] == "mismatch" and not result.ok
    assert [r.component for r in result.failures] == ["layers.1.mixer"]
    assert [r["ok"] for r in result.to_json()["kv_cache"]].count(False) == 1
    assert [label for label, _ in result.labelled_failures] == ["KV cache bytes (meta, a 2-byte cache)"]


def test_training_flops_of_a_tiny_hybrid_are_three_forwards() -> None:
    result = cc.crosscheck(resolve(TINY_HYBRID), seq_len=12, batch=2, real=False)
    assert result.training is not None
    assert result.training.ok, result.training
    assert result.training.built == 3 * result.flops_counted
    assert result.ok


@pytest.mark.parametrize("spec", [TINY, TINY_HYBRID], ids=lambda s: s.name)
def test_real_instance_measures_the_cache_and_runs_fvcore(spec: Spec) -> None:
    result = cc.crosscheck(resolve(spec), seq_len=10, batch=2, backward=False, real=True)
    assert result.real is not None
    assert result.real.dtype_bytes == 4
    assert len(result.real.kv) == spec.n_layers
    assert all(row.built > 0 for row in result.real.kv)
    assert [r for r in result.real.kv if not r.ok] == []
    fv = result.real.fvcore
    assert fv.not_run is None, fv.not_run
    # every component agrees, attention included: fvcore counts its projections, the SDPA it
    # skips is priced apart ("known") by the counter's formula from the traced shapes
    assert [r for r in fv.rows if not r.ok] == []
    attention = [r for r in fv.rows if "aten::scaled_dot_product_attention" in r.known]
    assert attention and all(0 < r.fvcore < r.analytic for r in attention)
    known = {op for r in fv.rows for op in r.known}
    assert known <= {"aten::scaled_dot_product_attention", "aten::_grouped_mm"}
    assert result.ok
    assert {c.name: c.status for c in result.checks} == {
        "parameters": "match", "forward FLOPs": "match", "training FLOPs": "not run",
        "KV cache": "match", "fvcore": "match",
    }


@pytest.mark.parametrize("ssm", [
    {"kind": "mamba1", "d_state": 4},
    {"kind": "mamba2", "d_state": 4, "head_dim": 4, "chunk_size": 4},
], ids=lambda s: s["kind"])
def test_fvcore_agrees_exactly_on_a_model_it_can_trace(ssm: dict[str, object]) -> None:
    spec = Spec.model_validate({
        "name": "tiny-ssm", "vocab_size": 32, "d_model": 16, "n_layers": 2, "max_seq_len": 32,
        "ssm": ssm, "layout": {"mixers": "M"}, "ffn": {"kind": "glu", "d_ff": 24},
    })
    result = cc.crosscheck(resolve(spec), seq_len=10, batch=2, backward=False, real=True)
    assert result.real is not None and result.real.fvcore is not None
    fv = result.real.fvcore
    assert fv.not_run is None, fv.not_run
    # mixer (in_proj, conv, x_proj/dt_proj or SSD einsums, out_proj), FFN, head: all fvcore-visible,
    # so multiply-adds x 2 == the analytic counted FLOPs, component by component, nothing known apart
    assert all(row.ok and not row.known for row in fv.rows), [r for r in fv.rows if not r.ok]
    by_comp = {row.component: row for row in fv.rows}
    assert by_comp["layers.1.mixer"].fvcore > 0 and by_comp["lm_head"].fvcore > 0
    assert fv.total == result.flops_counted


def test_a_planted_parameter_disagreement_fails_on_that_component(monkeypatch: pytest.MonkeyPatch) -> None:
    real_count = cc.count_params

    def off_by_one(plan: ModelPlan) -> ParamCount:
        pc = real_count(plan)
        by_comp = dict(pc.by_component)
        by_comp["layers.1.mixer"] += 1
        return dataclasses.replace(pc, by_component=by_comp, total=pc.total + 1)

    monkeypatch.setattr(cc, "count_params", off_by_one)
    result = cc.crosscheck(resolve(TINY), seq_len=8, backward=False, real=False)
    assert not result.ok
    assert [(r.component, r.built - r.analytic) for r in result.failures] == [("layers.1.mixer", -1)]
    assert [label for label, _ in result.labelled_failures] == ["parameters"]


def test_a_parameter_outside_every_component_is_a_failure_row(monkeypatch: pytest.MonkeyPatch) -> None:
    real_count = cc.count_params

    def without_final_norm(plan: ModelPlan) -> ParamCount:
        pc = real_count(plan)
        by_comp = {k: v for k, v in pc.by_component.items() if k != "final_norm"}
        return dataclasses.replace(pc, by_component=by_comp)

    monkeypatch.setattr(cc, "count_params", without_final_norm)
    result = cc.crosscheck(resolve(TINY), seq_len=8, backward=False, real=False)
    unmapped = [r for r in result.failures if r.component.startswith(cc.UNMAPPED)]
    assert unmapped and all(r.analytic == 0 and r.built > 0 for r in unmapped)
    assert not result.ok


def test_a_planted_flop_disagreement_fails_with_the_ops_of_that_component(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_flops = cc.forward_flops

    def more_flops(plan: ModelPlan, seq_len: int, batch: int = 1, mtp: bool = False) -> FlopCount:
        fc = real_flops(plan, seq_len, batch, mtp)
        by_comp = dict(fc.counted_by_component)
        by_comp["lm_head"] += 2
        return dataclasses.replace(fc, counted_by_component=by_comp, counted=fc.counted + 2)

    monkeypatch.setattr(cc, "forward_flops", more_flops)
    result = cc.crosscheck(resolve(TINY), seq_len=8, backward=False, real=False)
    (row,) = result.failures
    assert row.component == "lm_head" and row.analytic - row.built == 2
    assert isinstance(row, cc.FlopRow) and set(row.ops) == {"aten.mm"}


def test_ops_list_has_every_dispatched_op_and_zero_for_unknown_ones() -> None:
    result = cc.crosscheck(resolve(TINY), seq_len=8, backward=False, real=False)
    ops = {op.op: op for op in result.ops}
    assert ops["aten.mm"].flops > 0 and ops["aten.mm"].has_formula
    assert ops["aten.bmm"].flops > 0  # SDPA on meta, counted as the full square
    zero = [op for op in result.ops if not op.has_formula]
    assert zero and all(op.flops == 0 for op in zero)
    assert sum(op.flops for op in result.ops) == result.flops_counted


def test_json_shape() -> None:
    result = cc.crosscheck(resolve(TINY), seq_len=8, backward=True, real=False)
    out = result.to_json()
    assert out["ok"] is True
    assert out["params"] == {"analytic": result.params_analytic, "built": result.params_built}
    assert out["flops"] == {"analytic": result.flops_analytic, "counted": result.flops_counted}
    names = [c["component"] for c in out["components"]]
    assert names[0] == "embed" and "layers.1.mixer" in names and names[-1] == "lm_head"
    assert out["training_flops"]["counted"] == 3 * out["flops"]["counted"]


def test_training_flops_per_token_is_the_runs_total_over_its_tokens() -> None:
    """A Hyena layer makes its filters once per batch: at batch 3 the per-token figure was batch
    1's (25% above the total it stood beside, on this width)."""
    spec = Spec.model_validate({
        "name": "hy", "vocab_size": 64, "d_model": 96, "n_layers": 1, "max_seq_len": 2048,
        "position": {"kind": "none"}, "layout": {"mixers": "H"},
        "long_conv": {"kind": "hyena", "order": 2, "filter_order": 64, "emb_dim": 33, "l_max": 2048}})
    for batch in (1, 3):
        out = cc.crosscheck(resolve(spec), seq_len=5, batch=batch, backward=True, real=False).to_json()
        assert out["training_flops"]["analytic_per_token"] == round(out["training_flops"]["analytic"] / (5 * batch))


TINY_SSM_MOE = Spec.model_validate({
    "name": "tiny-ssm-moe", "vocab_size": 32, "d_model": 16, "n_layers": 2, "max_seq_len": 32,
    "ssm": {"kind": "mamba1", "d_state": 4}, "layout": {"mixers": "M"},
    "moe": {"n_experts": 4, "top_k": 2, "expert": {"kind": "glu", "d_ff": 8},
            "shared": {"d_ff": 8, "gate": True}},
})


def test_fvcore_blind_spots_are_priced_apart_and_the_rest_checked() -> None:
    result = cc.crosscheck(resolve(TINY_SSM_MOE), seq_len=8, backward=False, real=True)
    assert result.real is not None
    fv = result.real.fvcore
    assert fv.not_run is None, fv.not_run
    rows = {row.component: row for row in fv.rows}
    # fvcore has no handle for aten::_grouped_mm: the experts' FLOPs are the formula's, shown apart
    for i in range(2):
        experts = rows[f"layers.{i}.ffn.experts"]
        assert experts.fvcore == 0 and experts.known == {"aten::_grouped_mm": experts.analytic}
        assert rows[f"layers.{i}.ffn.router"].ok and not rows[f"layers.{i}.ffn.router"].known
        assert rows[f"layers.{i}.ffn.shared"].ok
    assert all(row.ok for row in fv.rows) and fv.ok and result.ok


@pytest.mark.parametrize("long_conv", [
    {"kind": "s4d", "d_state": 4}, {"kind": "hyena", "order": 2, "l_max": 32}, {"kind": "stripedhyena"},
], ids=lambda c: c["kind"])
def test_fvcore_checks_long_convolutions_with_the_ffts_priced_apart(long_conv: dict[str, object]) -> None:
    spec = Spec.model_validate({"name": "tiny-long-conv", "vocab_size": 32, "d_model": 8, "n_layers": 1,
                                "max_seq_len": 32, "long_conv": long_conv, "layout": {"mixers": "H"}})
    result = cc.crosscheck(resolve(spec), seq_len=10, batch=1, real=True)
    assert result.real is not None
    mixer = next(row for row in result.real.fvcore.rows if row.component == "layers.0.mixer")
    assert set(mixer.known) == {"aten::fft_rfft", "aten::fft_irfft"} and mixer.fvcore > 0
    assert mixer.ok and result.ok
    assert all(c.status == "match" for c in result.checks)


def test_an_fvcore_mismatch_on_attention_fails_that_component(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention is checked, not excused: fvcore's projections + the SDPA formula must add up."""
    sdpa = FVCORE_FORMULAS["aten::scaled_dot_product_attention"]
    monkeypatch.setitem(FVCORE_FORMULAS, "aten::scaled_dot_product_attention",
                        dataclasses.replace(sdpa, formula=lambda ins, outs: sdpa.formula(ins, outs) + 2))
    result = cc.crosscheck(resolve(TINY), seq_len=8, backward=False, real=True)
    assert result.real is not None
    bad = [row for row in result.real.fvcore.rows if not row.ok]
    assert [row.component for row in bad] == ["layers.0.mixer", "layers.1.mixer"]
    # per op: fvcore's own count (the projections) and the formula's share, each shown
    assert all(set(row.ops) == {"linear"} and sum(row.ops.values()) == row.fvcore for row in bad)
    assert not result.ok
    assert {c.name: c.status for c in result.checks}["fvcore"] == "mismatch"


def test_an_absent_fvcore_is_not_run_never_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fvcore.nn", None)  # `from fvcore.nn import ...` raises ImportError
    result = cc.crosscheck(resolve(TINY), seq_len=8, backward=False, real=True)
    assert result.real is not None
    fv = result.real.fvcore
    assert fv.rows == () and fv.not_run is not None and "not installed" in fv.not_run
    statuses = {c.name: c for c in result.checks}
    assert statuses["fvcore"].status == "not run" and "not installed" in statuses["fvcore"].detail
    assert statuses["KV cache"].status == "match"
    assert result.to_json()["real"]["fvcore"]["ran"] is False


def test_a_crashing_fvcore_is_not_run_with_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings():  # fvcore's import scripts with torch.jit, which warns
        warnings.simplefilter("ignore")
        import fvcore.nn

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tracer exploded\nsecond line of a JIT error")

    monkeypatch.setattr(fvcore.nn, "FlopCountAnalysis", crash)
    result = cc.crosscheck(resolve(TINY), seq_len=8, backward=False, real=True)
    assert result.real is not None
    assert result.real.fvcore.not_run == "fvcore failed: RuntimeError: tracer exploded"
    assert {c.name: c.status for c in result.checks}["fvcore"] == "not run"
    assert result.ok  # nothing disagreed; the summary says fvcore did not run


def _linear_with_mv(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear plus a matrix-vector product of 0 weight: same result, FLOPs the counter can't see."""
    extra = torch.mv(self.weight, x.reshape(-1, x.shape[-1])[0]).sum()
    return torch.nn.functional.linear(x, self.weight, self.bias) + 0 * extra


def test_an_unregistered_mv_fails_forward_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.nn.Linear, "forward", _linear_with_mv)
    result = cc.crosscheck(resolve(TINY), seq_len=8, batch=2, real=False)
    assert [op.op for op in result.ops if op.suspicious] == ["aten.mv"]
    assert "aten.mv" in [op.op for op in result.backward_ops if op.suspicious]
    assert not result.ok
    checks = {c.name: c for c in result.checks}
    assert checks["forward FLOPs"].status == "mismatch" and "aten.mv" in checks["forward FLOPs"].detail
    assert checks["training FLOPs"].status == "mismatch"
    assert "aten.mv" in result.to_json()["uncounted_matmul_ops"]
    # `contracting` answers for the ops without a formula only; a counted op's is null, not false
    ops = {op["op"]: op for op in result.to_json()["ops"]}
    assert ops["aten.mv"]["contracting"] is True and ops["aten.mm"]["contracting"] is None
    assert any(op["contracting"] is False for op in ops.values())


@torch.library.custom_op("archplan_test::project", mutates_args=())
def _project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


@_project.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def test_an_unregistered_custom_matmul_op_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        out = _project(x, self.weight)
        return out if self.bias is None else out + self.bias

    monkeypatch.setattr(torch.nn.Linear, "forward", forward)
    result = cc.crosscheck(resolve(TINY), seq_len=8, backward=False, real=False)
    suspicious = [op for op in result.ops if op.suspicious]
    assert [op.op for op in suspicious] == ["archplan_test.project"]
    assert suspicious[0].flops == 0 and not result.ok


def test_backward_ops_are_listed_with_their_formulas() -> None:
    result = cc.crosscheck(resolve(TINY_HYBRID), seq_len=8, batch=2, real=False)
    backward = {op.op: op for op in result.backward_ops}
    assert backward["aten.mm"].formula == "torch.utils.flop_counter"
    assert backward["aten._grouped_mm"].formula == COUNTER_FORMULAS[torch.ops.aten._grouped_mm].source
    assert result.training is not None
    assert sum(op.flops for op in backward.values()) == result.training.built - result.flops_counted
    assert not [op for op in result.backward_ops if op.suspicious]
