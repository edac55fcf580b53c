"""crosscheck: its bookkeeping, every preset on meta, the real-instance checks, and that it catches
a disagreement when one is planted."""

from __future__ import annotations

import dataclasses

import pytest

from archplan import crosscheck as cc
from archplan.analytic import FlopCount, ParamCount, count_params
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


def test_suspicious_op_is_matmul_like_without_formula() -> None:
    assert cc.OpCount("aten._scaled_dot_product_flash_attention_for_cpu", 2, 0, False).suspicious
    assert not cc.OpCount("aten.mm", 2, 100, True).suspicious
    assert not cc.OpCount("aten.add", 9, 0, False).suspicious


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_verifies_on_meta(preset: str) -> None:
    plan = resolve(load_spec(preset))
    result = cc.crosscheck(plan, seq_len=64, batch=1, backward=False, real=False)
    assert [r for r in result.params if not r.ok] == []
    assert [r for r in result.flops if not r.ok] == []
    assert result.suspicious_ops == ()
    assert result.params_built == count_params(plan).total
    assert result.ok


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
    assert fv is not None
    assert fv.error is None, fv.error
    # fvcore skips SDPA and grouped_mm (flagged incomplete); every component it fully sees agrees
    assert [r for r in fv.rows if r.status == "mismatch"] == []
    incomplete = {op for r in fv.rows if r.status == "incomplete" for op in r.skipped}
    assert incomplete <= {"aten::scaled_dot_product_attention", "aten::_grouped_mm"}
    assert any(r.component.endswith(".ffn") or r.component.endswith(".shared") for r in fv.rows if r.status == "ok")
    assert result.ok


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
    assert fv.error is None, fv.error
    # mixer (in_proj, conv, x_proj/dt_proj or SSD einsums, out_proj), FFN, head: all fvcore-visible,
    # so multiply-adds x 2 == the analytic counted FLOPs, component by component
    assert all(row.status == "ok" for row in fv.rows), [r for r in fv.rows if r.status != "ok"]
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

    def more_flops(plan: ModelPlan, seq_len: int, batch: int = 1) -> FlopCount:
        fc = real_flops(plan, seq_len, batch)
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


def test_fvcore_blind_spots_are_reported_as_incomplete_not_hidden() -> None:
    spec = Spec.model_validate({
        "name": "tiny-ssm-moe", "vocab_size": 32, "d_model": 16, "n_layers": 2, "max_seq_len": 32,
        "ssm": {"kind": "mamba1", "d_state": 4}, "layout": {"mixers": "M"},
        "moe": {"n_experts": 4, "top_k": 2, "expert": {"kind": "glu", "d_ff": 8},
                "shared": {"d_ff": 8, "gate": True}},
    })
    result = cc.crosscheck(resolve(spec), seq_len=8, backward=False, real=True)
    assert result.real is not None and result.real.fvcore is not None
    fv = result.real.fvcore
    assert fv.error is None, fv.error
    status = {row.component: row for row in fv.rows}
    # fvcore has no handle for aten::_grouped_mm: the experts are flagged, everything else agrees
    for i in range(2):
        experts = status[f"layers.{i}.ffn.experts"]
        assert experts.status == "incomplete" and "aten::_grouped_mm" in experts.skipped
        assert status[f"layers.{i}.ffn.router"].status == "ok"
        assert status[f"layers.{i}.ffn.shared"].status == "ok"
    assert [r.component for r in fv.rows if r.status != "ok"] == ["layers.0.ffn.experts", "layers.1.ffn.experts"]
    assert fv.ok and result.ok
