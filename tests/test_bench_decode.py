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
)
from archplan.bench.roofline import kind_counts
from archplan.bench.runner import decode_context, start_decode
from archplan.modules.model import build_model
from archplan.modules.positions import RotaryEmbedding
from archplan.resolve import resolve
from archplan.spec import Spec
from test_bench import MLA_TINY, TINY, TINY_HYBRID

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


ROPE_GQA = dict(TINY, name="tiny-rope", n_layers=2)


@pytest.mark.parametrize("raw", [TINY_HYBRID, MLA_TINY, ROPE_GQA])
def test_a_step_recorded_at_another_context_leaves_the_decode_alone(raw: dict) -> None:
    """bench records the step it prices at the median timed step's context, before the timed steps
    (`start_decode`): the recorded step attends that many keys (its calls are what the replays
    time), and bench's decode after it is the decode without it, bit for bit, token for token (the
    recorded writes went into the replays' private copies, the counters were set back, the first
    step starts from the prompt's own next token): KV cache, MLA latent, Mamba conv/SSM state, MoE
    routing; and the rotary tables kept for the last positions are the plain decode's."""
    plan = resolve(Spec.model_validate(raw))
    torch.manual_seed(0)
    model = build_model(plan, device="cpu", dtype=torch.float32).eval()
    prompt = torch.randint(0, 256, (2, 16))
    fed: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda _m, args: fed.append(args[0].clone()))

    def tables() -> list[list[object]]:
        return [list(m.tables.built) for m in model.modules() if isinstance(m, RotaryEmbedding)]

    with torch.inference_mode():
        cache = model.new_cache(2, 16 + 5)
        token = model(prompt, cache=cache)[:, -1:].argmax(-1)
        plain, plain_tables = [], []
        for _ in range(4):
            plain.append(model(token, cache=cache))
            token = plain[-1][:, -1:].argmax(-1)
            plain_tables.append(tables())
        plain_fed = fed[1:]  # the prompt aside
        fed.clear()
        step, recorded = start_decode(model, plan, prompt, decode_tokens=4)
        assert tables() == plain_tables[0]  # the timed steps find the positions' tables a decode has
        outputs = []
        logits = model.register_forward_hook(lambda _m, _a, out: outputs.append(out))
        for _ in range(3):
            step()
        logits.remove()
    hook.remove()
    # the prompt, the recorded step, then the untimed first step and the timed ones: the plain decode's 4
    assert torch.equal(torch.cat(fed[2:]), torch.cat(plain_fed))
    assert torch.equal(torch.cat(outputs), torch.cat(plain[1:]))
    assert tables() == plain_tables[-1]
    assert recorded.built == kind_counts(plan)
    kind = next(k for k in recorded.built if k.startswith(("gqa", "mla")))
    calls = recorded.calls[kind]["attention"] + recorded.calls[kind]["others"]
    lengths = {a.shape[-2] for call in calls for a in call.args if isinstance(a, torch.Tensor) and a.dim() == 4}
    context = decode_context(16, 4)
    assert context in lengths and 17 not in lengths


def test_the_recorded_writes_share_one_buffer_per_layout() -> None:
    """A cache write's target is a one-position view whose strides span the layer's cache: a private
    copy per call held a second cache for the recording. One buffer per layout holds one layer's."""
    plan = resolve(Spec.model_validate(dict(TINY, n_layers=4)))
    model = build_model(plan, device="cpu", dtype=torch.float32).eval()
    with torch.inference_mode():
        _, recorded = start_decode(model, plan, torch.randint(0, 256, (2, 16)), decode_tokens=64)
        cache = model.new_cache(2, 16 + 65)
    written = {}
    for groups in recorded.calls.values():
        for call in (call for calls in groups.values() for call in calls):
            names = {arg.name for arg in call.func._schema.arguments if arg.alias_info and arg.alias_info.is_write}
            for arg, schema in zip(call.args, call.func._schema.arguments):
                if schema.name in names and isinstance(arg, torch.Tensor):
                    written[arg.untyped_storage().data_ptr()] = arg.untyped_storage().nbytes()
    per_layer = cache.layers[0].tensors()[0].untyped_storage().nbytes()  # one layer's K
    assert per_layer / 2 < max(written.values()) <= per_layer  # a cache write's copy spans most of it
    assert sum(written.values()) < 2 * per_layer  # where a copy per call held 8 of them (K and V of 4 layers)


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
