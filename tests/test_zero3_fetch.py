"""ZeRO-3 fetched module by module (`planning/zero3_fetch.py`, `--states deepspeed`): DeepSpeed's
reuse-distance release, its one prefetch at a time under the live-parameter cap, its device-wide
synchronisation, and the records and compute the layout model builds on them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from benchmark_scripts import load_benchmark

from archplan.hardware import accelerator, kernel_efficiency
from archplan.loader import load_spec
from archplan.planning.cluster import DEEPSPEED, ZERO, fetch_trace, model_data, rank_memory, step_collectives
from archplan.planning.layout import Layout
from archplan.planning.parallel import interconnect, network
from archplan.planning.pricing import Pricer, price, rates_for
from archplan.planning.zero3_fetch import Module, Op, step_seconds
from archplan.resolve import resolve
from test_plan import run

pytestmark = pytest.mark.xdist_group("test_layout_validation")  # shares the benchmark's plans


def _gpt(name: str) -> Any:
    bench = load_benchmark("published_runs")
    data = bench.load()
    return bench.plan_for(name, data["models"], data["gpt_sizes"])


def _counts(plan: Any, layout: Layout, layer: int) -> dict[str, int]:
    counts = fetch_trace(model_data(plan, 2048), layout, 0)[1]
    prefix = f"layers.{layer}."
    return {k.removeprefix(prefix): v for k, v in counts.items() if k.startswith(prefix)}


def test_reuse_distance_regathers_all_but_the_last_projection_of_a_large_layer() -> None:
    """GPT-3 175B (h 12,288): under full recompute a module's recompute and backward uses are
    twice the elements of the modules after it apart; above 10⁹ it is released and gathered a
    third time. Only the FFN's last projection (nothing after it) stays."""
    plan = _gpt("gpt-175b")
    full = _counts(plan, Layout(dp=8, zero=3, recompute="full"), 5)
    assert full == {"mixer.q_proj": 3, "mixer.k_proj": 3, "mixer.v_proj": 3, "mixer.o_proj": 3,
                    "ffn.up_proj": 3, "ffn.down_proj": 2}
    # without recompute the backward is the only other use: twice, as in FSDP
    assert set(_counts(plan, Layout(dp=8, zero=3, recompute="none"), 5).values()) == {2}
    # a small layer (1.7B, h 2,304) is kept from its recompute to its backward
    assert set(_counts(_gpt("gpt-1.7b"), Layout(dp=8, zero=3, recompute="full"), 5).values()) == {2}


def test_records_follow_the_fetch_counts() -> None:
    plan = _gpt("gpt-175b")
    layout = Layout(dp=64, zero=3, recompute="full")
    m = 2
    ours = [r for r in step_collectives(plan, layout, 2048, microbatches=m, states=DEEPSPEED)
            if r.what.startswith("layers.5 ")]
    flat = [r for r in step_collectives(plan, layout, 2048, microbatches=m, states=ZERO)
            if r.what.startswith("layers.5 ")]
    gathered = 12 * 12288 * 12288  # every weight; the biases are persistent (under 10⁵ elements)
    regathered = gathered - 4 * 12288 * 12288  # all but the FFN's down projection
    gathers = sum(r.bytes * r.count for r in ours if r.kind == "all_gather")
    assert gathers == 2 * m * (2 * gathered + regathered)
    assert [r for r in ours if r.kind != "all_gather"] == [r for r in flat if r.kind != "all_gather"]


def _module(name: str, gathered: int = 1000) -> Module:
    return Module(name, gathered, gathered, False)


def test_each_gather_hides_behind_the_compute_queued_before_it() -> None:
    """The host reaches b's fetch right after a's synchronisation, so b's gather runs during a."""
    a, b = _module("a"), _module("b")
    ops = [Op(a, 1.0, False), Op(b, 1.0, False)]
    assert step_seconds(ops, lambda m: 0.0, lambda m: 0.0) == 2.0
    assert step_seconds(ops, lambda m: 0.5, lambda m: 0.0) == pytest.approx(0.5 + 1.0 + 1.0)
    assert step_seconds(ops, lambda m: 2.0, lambda m: 0.0) == pytest.approx(2.0 + 2.0 + 1.0)
    # a module still gathered (reused within the distance) is not fetched again
    again = [Op(a, 1.0, False), Op(a, 1.0, False)]
    assert step_seconds(again, lambda m: 0.5, lambda m: 0.0) == pytest.approx(0.5 + 2.0)


def test_a_blocking_fetch_waits_for_the_gradient_reduction_in_flight() -> None:
    """`torch.cuda.synchronize()` waits for every stream: b's parameters arrived long before, but b
    starts only when a's reduce-scatter (queued after a's backward) is done."""
    a, b = _module("a"), _module("b")
    ops = [Op(a, 1.0, True), Op(b, 1.0, False)]
    # a's gather 0-0.5; b's 0.5-1.0; a computes 0.5-1.5; its reduction 1.5-3.5; b 3.5-4.5
    assert step_seconds(ops, lambda m: 0.5, lambda m: 2.0) == pytest.approx(4.5)


@pytest.mark.parametrize("name", ["7b", "gemma-2b", "mixtral-8x7b", "mamba-2.8b", "deepseek-v3"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_fetch_ops_carry_the_ranks_compute(name: str, recompute: str) -> None:
    """Per module GEMMs and the rest of each layer's work add up to the rank's micro-batch."""
    plan = resolve(load_spec(name))
    gpu = accelerator("h100")
    eff, _ = kernel_efficiency(gpu)
    data = model_data(plan, 1024)
    pricer = Pricer(data, rates_for(gpu, eff, None, "bf16"))
    layout = Layout(dp=8, zero=3, recompute=recompute, pp=2)  # type: ignore[arg-type]
    for stage in (0, 1):
        ops = pricer.fetch_ops(layout, stage, "flash")
        assert sum(op.compute for op in ops) == pytest.approx(pricer.stage(layout, stage, "flash").total)
        assert all(op.compute >= 0 for op in ops)


def test_deepspeed_fetch_is_slower_than_whole_layer_prefetch_when_communication_binds() -> None:
    plan = _gpt("gpt-175b")
    gpu = accelerator("a100-80gb")
    eff, _ = kernel_efficiency(gpu)
    data = model_data(plan, 2048)
    pricer = Pricer(data, rates_for(gpu, eff, None, "bf16"))
    layout = Layout(dp=1536, zero=3, recompute="full", mb=1)
    times = {}
    for states in (ZERO, DEEPSPEED):
        memory = {0: rank_memory(plan, layout, 2048, microbatches=1, states=states)}
        time, _ = price(data, pricer, layout, 1, network(interconnect(gpu), eff.ring_nics), states, "eager", 2,
                        "all_gather", frozenset({"dp"}), memory)
        times[states.key] = time
    assert times["deepspeed"].dp > times["zero"].dp > 0
    assert times["deepspeed"].gemm == times["zero"].gemm


def test_plan_takes_states_deepspeed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run(capsys, monkeypatch, "plan", "gpt2", "--gpus", "8", "--gpu", "a100-80gb",
                         "--states", "deepspeed", "--json",
                         "--layout", "tp=1,cp=1,pp=1,dp=8,ep=1,zero=3,recompute=full,mb=1")
    assert code == 0, err
    data = json.loads(out)
    assert data["states"]["convention"] == "deepspeed"
    assert data["layouts"][0]["step_time"]["dp"] > 0


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_below_zero_3_deepspeed_is_zero(zero: int) -> None:
    """Module fetching is ZeRO-3's; below it `deepspeed` prices and records exactly as `zero`."""
    plan = _gpt("gpt-1.7b")
    gpu = accelerator("a100-80gb")
    eff, _ = kernel_efficiency(gpu)
    data = model_data(plan, 2048)
    pricer = Pricer(data, rates_for(gpu, eff, None, "bf16"))
    layout = Layout(dp=32, zero=zero, recompute="full", mb=2)
    found = []
    for states in (ZERO, DEEPSPEED):
        memory = {0: rank_memory(plan, layout, 2048, microbatches=4, states=states)}
        found.append((price(data, pricer, layout, 4, network(interconnect(gpu), eff.ring_nics), states, "eager", 2, "all_gather",
                            frozenset({"dp"}), memory),
                      step_collectives(plan, layout, 2048, microbatches=4, states=states)))
    assert found[0] == found[1]


def test_deepspeed_runs_pipelines_with_zero_0_or_1_only(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed's PipelineEngine asserts ZeRO < 2: a given layout asking for more is a one-line
    error, and the search never ranks one."""
    args = ("plan", "llama-3-70b", "--gpus", "512", "--gpu", "h100", "--states", "deepspeed")
    code, out, err = run(capsys, monkeypatch, *args, "--layout", "pp=4,zero=3")
    assert code == 2 and "ZeRO 0-1 only" in err and "Traceback" not in err
    code, out, _ = run(capsys, monkeypatch, *args, "--json")
    assert code == 0
    layouts = [row["layout"] for row in json.loads(out)["layouts"]]
    assert layouts and not any("pp=1," not in lay and ("zero=2" in lay or "zero=3" in lay) for lay in layouts)


def test_deepspeed_holds_the_modules_its_rules_keep_not_two_layers() -> None:
    """GPT-3 175B under full recompute: the most gathered at once is the last layer's FFN down
    projection running while the tied embedding (51,200 × h) arrives for the head; a layer's up
    and down projections (2 × 4h²) come next. FSDP holds two whole layers."""
    plan = _gpt("gpt-175b")
    layout = Layout(dp=64, zero=3, recompute="full")
    h = 12288
    peak = 4 * h * h + 51200 * h
    assert fetch_trace(model_data(plan, 2048), layout, 0)[2] == peak > 2 * 4 * h * h
    ours = rank_memory(plan, layout, 2048, microbatches=1, states=DEEPSPEED)
    flat = rank_memory(plan, layout, 2048, microbatches=1, states=ZERO)
    assert ours.temporary == 2 * peak < flat.temporary
    assert (ours.parameters, ours.gradients, ours.optimizer) == (flat.parameters, flat.gradients, flat.optimizer)
