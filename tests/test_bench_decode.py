"""`bench/decode.py`: what a decode step dispatches and how it is re-issued. Behaviour, never speed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archplan.bench.decode import (
    Call,
    RecordedStep,
    Replay,
    WeightStreams,
    _weight_bytes,
    count_pass,
    decode_rates,
    record_step,
    record_step_at,
)
from archplan.modules.model import build_model
from archplan.resolve import resolve
from archplan.spec import Spec
from test_bench import MLA_TINY, TINY_HYBRID

CPU = torch.device("cpu")


def _decode(replay: bool) -> tuple[torch.Tensor, RecordedStep]:
    """Three decode steps of the tiny hybrid after a recorded one; with `replay`, the recorded calls
    are re-issued after each step, as bench does between its timed steps."""
    plan = resolve(Spec.model_validate(TINY_HYBRID))
    torch.manual_seed(0)
    model = build_model(plan, device="cpu", dtype=torch.float32).eval()
    logits = []
    with torch.inference_mode():
        cache = model.new_cache(2, 32)
        state = {"token": model(torch.randint(0, 256, (2, 16)), cache=cache)[:, -1:].argmax(-1)}

        def step() -> None:
            out = model(state["token"], cache=cache)
            logits.append(out)
            state["token"] = out[:, -1:].argmax(-1)

        recorded = record_step(model, plan, step)
        sampler = Replay(recorded, CPU)
        for _ in range(3):
            step()
            if replay:
                sampler.sample()
    return torch.cat(logits), recorded


def test_replay_leaves_the_model_state_alone() -> None:
    """Cache writes and in-place SSM state updates replay into private copies: the decode that follows
    is the decode without replays, bit for bit (KV cache, Mamba conv/SSM state, MoE routing)."""
    plain, _ = _decode(replay=False)
    replayed, recorded = _decode(replay=True)
    assert torch.equal(plain, replayed)
    assert recorded.built == {"embed+head": 1, "mamba1+dense": 2, "gqa+moe": 2}


@pytest.mark.parametrize("raw", [TINY_HYBRID, MLA_TINY])
def test_a_step_recorded_at_another_context_leaves_the_decode_alone(raw: dict) -> None:
    """bench records the step it prices at the median timed step's context, before the timed steps:
    the recorded step attends that many keys (its calls are what the replays time), and the decode
    after it is the decode without it, bit for bit (the recorded writes went into the replays'
    private copies, the counters were set back): KV cache, MLA latent, Mamba conv/SSM state."""
    plan = resolve(Spec.model_validate(raw))
    torch.manual_seed(0)
    model = build_model(plan, device="cpu", dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 40))

    def decode(context: int | None) -> tuple[torch.Tensor, RecordedStep | None]:
        logits, recorded = [], None
        with torch.inference_mode():
            cache = model.new_cache(2, 40)

            def step() -> torch.Tensor:
                return model(tokens[:, cache.seen:cache.seen + 1], cache=cache)

            model(tokens[:, :16], cache=cache)
            if context is not None:
                recorded = record_step_at(model, plan, cache, step, context)
                assert cache.seen == 16 and all(state.seen == 16 for state in cache.layers)
            logits = [step() for _ in range(4)]
        return torch.cat(logits), recorded

    plain, _ = decode(None)
    after, recorded = decode(30)
    assert torch.equal(plain, after)
    assert recorded is not None
    kind = next(k for k in recorded.built if k.startswith(("gqa", "mla")))
    attention = recorded.calls[kind]["attention"] + recorded.calls[kind]["others"]
    lengths = {a.shape[-2] for call in attention for a in call.args if isinstance(a, torch.Tensor) and a.dim() == 4}
    assert 30 in lengths and 17 not in lengths


def test_recorded_groups() -> None:
    """Weight matmuls are the calls reading a parameter: each Linear once per layer, the experts'
    grouped matmuls; attention is one SDPA per attention layer; everything else is 'others'."""
    _, recorded = _decode(replay=False)
    ops = recorded.ops()
    assert ops["gqa+moe"].attention == 1 and ops["mamba1+dense"].attention == 0
    # embed+head: the head's one matmul (untied); the lookup is not a matmul
    assert ops["embed+head"].matmuls == 1
    # attention q/k/v/o (4), router (1), experts' up/gate/down as grouped_mm (3)
    assert ops["gqa+moe"].matmuls == 8
    names = {c.func.overloadpacket.__name__ for c in recorded.calls["gqa+moe"]["matmuls"]}
    assert "_grouped_mm" in names
    for kind in recorded.built:
        assert all(c.weight is not None for c in recorded.calls[kind]["matmuls"])
        assert all(c.weight is None for g in ("attention", "others") for c in recorded.calls[kind][g])


def test_counting_a_pass_counts_what_recording_it_records() -> None:
    """`count_pass` (a prefill's calls, for CUDA's host floor) groups and averages calls as
    `record_step` does, and keeps none of them: the same forward counted and recorded agree."""
    plan = resolve(Spec.model_validate(TINY_HYBRID))
    torch.manual_seed(0)
    model = build_model(plan, device="cpu", dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 16))
    with torch.inference_mode():
        counted = count_pass(model, plan, lambda: model(tokens))
        recorded = record_step(model, plan, lambda: model(tokens)).ops()
    assert counted == recorded
    assert counted["gqa+moe"].attention == 1 and counted["gqa+moe"].matmuls == 8
    assert counted["mamba1+dense"].others > 0


def test_grouped_mm_reads_only_the_experts_that_own_rows() -> None:
    w = torch.zeros(4, 8, 16)  # 4 experts of 8×16
    x = torch.zeros(3, 8)
    offs = torch.tensor([1, 1, 3, 3], dtype=torch.int32)  # experts 0 and 2 own rows; 1 and 3 none
    call = Call(torch.ops.aten._grouped_mm.default, (x, w, offs), {}, 1)
    assert _weight_bytes(call) == 2 * 8 * 16 * 4
    dense = Call(torch.ops.aten.mm.default, (x, torch.zeros(8, 16).t().t()), {}, 1)
    assert _weight_bytes(dense) == 8 * 16 * 4
    assert F.grouped_mm(x, w, offs=offs).shape == (3, 16)


def test_decode_rates_on_cpu() -> None:
    """Every kind gets a bandwidth from its own weight matmuls; CPU folds the call cost into it."""
    _, recorded = _decode(replay=False)
    sampler, streams = Replay(recorded, CPU), WeightStreams(recorded, CPU)
    sampler.sample()
    streams.sample()
    # one stream per distinct weight call: the two attention layers' q/k/v/o share their shapes
    assert len(streams.streams) < sum(len(g["matmuls"]) for g in recorded.calls.values())
    rates = decode_rates(recorded, sampler, streams)
    assert set(rates.gemv_bandwidth) == set(recorded.built)
    assert all(v > 0 for v in rates.gemv_bandwidth.values())
    assert rates.matmul_seconds == 0 and not rates.overlap
    assert rates.attention_seconds["gqa+moe"] > 0 and rates.attention_seconds["mamba1+dense"] == 0
    assert all(rates.op_seconds[kind] > 0 for kind in recorded.built)


def test_decode_extrapolated_from_each_timed_step() -> None:
    """--layers 1 of a model with two layers of each kind: every timed step is extrapolated from its
    own blocks (rest + 2 × blocks, more than the step and less than twice it), so the median of those
    lies between the built step's median and twice it; the prediction is for the full depth."""
    from dataclasses import replace

    from archplan.bench.runner import BenchConfig, run_bench
    from archplan.dtypes import DType

    plan = resolve(Spec.model_validate(TINY_HYBRID))
    cfg = BenchConfig(device="cpu", dtype=DType.fp32, batch=1, seq=8, decode_tokens=3, warmup=1, iters=1)
    result = run_bench(plan, replace(cfg, layers=1))
    assert result.decode is not None and result.decode_seconds_per_token is not None
    built = result.decode.median
    assert built < result.decode_seconds_per_token < 2 * built
    assert result.predicted_decode is not None
    assert {r.kind: r.count for r in result.predicted_decode.rows} == {"embed+head": 1, "mamba1+dense": 2,
                                                                       "gqa+moe": 2}
