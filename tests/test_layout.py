"""The layout model (`planning/shards.py`, `cluster.py`, `pricing.py`, `parallel.py`): every tensor
of a rank, model states under each convention, activations under TP/SP/CP/PP/recompute/kernels,
every collective of a step, the step-time terms, and the `--layout` CLI contract."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from archplan.analytic import count_params
from archplan.analytic.mamba import mamba1_a_bytes
from archplan.analytic.memory import activation_memory
from archplan.errors import ArchplanError
from archplan.hardware import (
    FP8_TN_ONLY,
    KERNEL_EFFICIENCY,
    accelerator,
    fp8_attention_speed,
    kernel_efficiency,
    matmul_ratio,
)
from archplan.loader import PRESETS_DIR, load_spec
from archplan.planning import cluster, spec_data
from archplan.planning.cluster import (
    DEEPSPEED,
    FSDP2,
    MEGATRON,
    ZERO,
    StatesConvention,
    in_flight,
    model_data,
    most_loaded_stage,
    rank_memory,
    step_collectives,
)
from archplan.planning.layout import Layout, PartialLayout, layout_problem, parse_layout, pipeline_chunks
from archplan.planning.parallel import Evaluator, Settings, interconnect, network, rails, search
from archplan.planning.pricing import (
    Pricer,
    Rates,
    _gemm_shape,
    _head_micro,
    bias_grad_bytes,
    collective_time,
    fp8_cast_bytes,
    gemm_time,
    members_per_node,
    rates_for,
    spans_nodes,
    tensor_gemm,
    tp_overlap_cost,
)
from archplan.planning.records import Collective, MeshDim, tally
from archplan.planning.shards import first_tensors, fp8_weight, last_tensors, layer_tensors
from archplan.resolve import AttentionPlan, MLAPlan, ModelPlan, MoEPlan, StripedHyenaPlan, resolve
from archplan.spec import MLA, S4, S4D, Hyena, Spec, StripedHyena
from strategies import Case, cases
from test_plan import run

H100 = accelerator("h100")
NET = interconnect(H100)
PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _plan(name: str) -> Any:
    return resolve(load_spec(name))


def _all_tensors(plan: Any) -> list[Any]:
    return (first_tensors(plan) + [t for layer in plan.trained_layers for t in layer_tensors(layer, plan)]
            + last_tensors(plan, tied_copy=False))


# ------------------------------------------------------------------------------ tensor inventory
@pytest.mark.parametrize("name", PRESETS)
def test_tensor_inventory_sums_to_the_parameter_count(name: str) -> None:
    plan = _plan(name)
    params = count_params(plan)
    assert sum(t.numel for t in _all_tensors(plan)) == params.total
    for layer in plan.layers:
        counted = sum(v for k, v in params.by_component.items() if k.startswith(layer.path + "."))
        assert sum(t.numel for t in layer_tensors(layer, plan)) == counted


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_tensor_names_and_shapes_are_the_torch_modules(case: Case) -> None:
    """Same names and shapes as archplan's torch model (built on meta), tensor by tensor."""
    torch = pytest.importorskip("torch")
    from archplan.modules.model import build_model

    plan = resolve(case.spec)
    built = {n: tuple(p.shape) for n, p in build_model(plan, device="meta").named_parameters()}
    assert isinstance(torch.Size((1,)), tuple)
    assert {t.name: t.shape for t in _all_tensors(plan)} == built


LONG_CONV_PRESETS = ("hyena-153m", "stripedhyena-7b", "s4d-lm")


@pytest.mark.parametrize("name", LONG_CONV_PRESETS)
def test_long_conv_preset_tensors_are_the_torch_modules(name: str) -> None:
    pytest.importorskip("torch")
    from archplan.modules.model import build_model

    plan = _plan(name)
    built = {n: tuple(p.shape) for n, p in build_model(plan, device="meta").named_parameters()}
    assert {t.name: t.shape for t in _all_tensors(plan)} == built


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
@pytest.mark.parametrize("member", [S4D, S4, Hyena, StripedHyena])
def test_long_conv_tensors_are_the_torch_modules(member: Any, data: Any) -> None:
    """Every long-conv option (S4 DPLR, trainable vs buffer SSM tensors and positions, filter
    groups, FIR bias) against the torch model built on meta."""
    pytest.importorskip("torch")
    from archplan.modules.model import build_model

    plan = resolve(data.draw(cases(only={"long_conv": member})).spec)
    built = {n: tuple(p.shape) for n, p in build_model(plan, device="meta").named_parameters()}
    assert {t.name: t.shape for t in _all_tensors(plan)} == built


def test_long_conv_tensor_parallel_shards() -> None:
    """Channels split over tp; shared filter-MLP trunk replicated; one modal filter per channel."""
    sh = _plan("stripedhyena-7b")  # d 4096, state_size 2, filter_groups 1
    layer = next(l for l in sh.layers if isinstance(l.mixer, StripedHyenaPlan))
    local = {t.name.split(".", 2)[-1]: t.local_shape(8) for t in layer_tensors(layer, sh)}
    assert local["mixer.projections.weight"] == (3 * 4096 // 8, 4096)
    assert local["mixer.short_filter_weight"] == (3 * 4096 // 8, 1, 3)
    assert local["mixer.poles"] == (4096 // 8, 2, 1, 2) == local["mixer.residues"]
    assert local["mixer.D"] == (512,)
    assert local["mixer.out_filter_dense.weight"] == (4096, 512)
    assert local["mixer.out_filter_dense.bias"] == (4096,)
    hy = _plan("hyena-153m")  # d 864, order 2, filter order 64, emb_dim 33
    local = {t.name.split(".", 2)[-1]: t for t in layer_tensors(hy.layers[0], hy)}
    assert local["mixer.in_proj.weight"].local_shape(4) == (3 * 864 // 4, 864)
    assert local["mixer.filter.mlp_in.weight"].local_shape(4) == (64, 33)  # replicated trunk
    assert local["mixer.filter.mlp_out.weight"].local_shape(4) == (864 // 4, 64)
    assert local["mixer.filter.mlp_out.weight"].per_position
    assert not local["mixer.in_proj.weight"].per_position
    s4 = _plan("s4d-lm")
    local = {t.name.split(".", 2)[-1]: t.local_shape(4) for t in layer_tensors(s4.layers[0], s4)}
    assert local["mixer.C"] == (768 // 4, 32, 2)
    assert local["mixer.output_linear.weight"] == (2 * 768, 768 // 4)  # row-parallel before the GLU
    assert local["mixer.B"] == (1, 32, 2)  # the single SSM copy on every rank


def test_tensor_parallel_shards() -> None:
    plan = _plan("llama-3.1-405b")  # 128 query heads, 8 KV heads of 128, d 16384, d_ff 53248
    local = {t.name.split(".", 2)[-1]: t.local_shape(16) for t in layer_tensors(plan.layers[0], plan)}
    assert local["mixer.q_proj.weight"] == (128 * 128 // 16, 16384)
    # 8 KV heads over 16 ranks: k and v split by rows, half a head a rank (Megatron-Core's fused
    # QKV weight split evenly; the layer gathers the output)
    assert local["mixer.k_proj.weight"] == (8 * 128 // 16, 16384)
    assert local["mixer.o_proj.weight"] == (16384, 128 * 128 // 16)
    assert local["ffn.down_proj.weight"] == (16384, 53248 // 16)
    assert local["norm1.weight"] == (16384,)
    embed = first_tensors(plan)[0]
    assert embed.local_shape(8) == (math.ceil(128256 / 8), 16384)  # torch.chunk: rank 0's rows
    moe = _plan("deepseek-v3")
    experts = {t.name.rsplit(".", 1)[-1]: t.local_shape(2, 64) for t in layer_tensors(moe.layers[3], moe)
               if t.expert}
    # expert tensor parallelism 1: E/ep whole experts on every tp rank
    assert experts["w_up_EFD"] == (4, 2048, 7168) and experts["w_down_EDF"] == (4, 7168, 2048)


# ---------------------------------------------------------------------------------- model states
def test_tied_embedding_counted_once_at_pp1() -> None:
    """gemma-2b TP1 DP8: the stage holds 2.51 B parameters (the tied head is the embedding)."""
    plan = _plan("gemma-2b")
    layout = Layout(tp=1, pp=1, dp=8, zero=0)
    mem = rank_memory(plan, layout, 8192, microbatches=1, states=ZERO)
    assert mem.parameters == 2 * count_params(plan).total
    assert mem.parameters / 2 == pytest.approx(2.51e9, rel=0.002)
    # across stages the last one holds a copy of the tied embedding (Megatron's shared embedding)
    two = Layout(tp=1, pp=2, dp=4, zero=0)
    stages = [rank_memory(plan, two, 8192, microbatches=4, stage=s, states=ZERO).parameters / 2
              for s in (0, 1)]
    assert sum(stages) == count_params(plan).total + 256000 * 2048


@pytest.mark.parametrize("states,per_param", [(ZERO, 16), (MEGATRON, 18), (FSDP2, 16)])
def test_bytes_per_param_of_each_convention(states: Any, per_param: int) -> None:
    plan = _plan("llama-3-8b")
    zero = 2 if states is FSDP2 else 0
    dp = 1
    mem = rank_memory(plan, Layout(dp=dp, zero=zero), 4096, microbatches=1, states=states)
    assert states.bytes_per_param == per_param
    assert mem.model_states == per_param * count_params(plan).total


def test_flat_and_fsdp2_shards_pad_as_their_frameworks() -> None:
    """ZeRO/Megatron: ceil(N/d) of one flat buffer; FSDP2: ceil(dim0/d) rows of every tensor."""
    plan = _plan("gpt2")
    dp = 7
    tensors = _all_tensors(plan)
    n = sum(t.numel for t in tensors)
    flat = rank_memory(plan, Layout(dp=dp, zero=3), 1024, microbatches=1, states=ZERO)
    assert flat.parameters == 2 * math.ceil(n / dp)
    fsdp = rank_memory(plan, Layout(dp=dp, zero=3), 1024, microbatches=1, states=FSDP2)
    rows = sum(math.ceil(t.shape[0] / dp) * math.prod(t.shape[1:]) for t in tensors)
    assert fsdp.parameters == 4 * rows and fsdp.gradients == 4 * rows and fsdp.optimizer == 8 * rows
    assert rows > math.ceil(n / dp)  # the padding is real
    # FSDP2's ZeRO-1: gradients whole while they accumulate over micro-batches, sharded with one
    z1 = rank_memory(plan, Layout(dp=dp, zero=1), 1024, microbatches=2, states=FSDP2)
    assert (z1.parameters, z1.gradients, z1.optimizer) == (4 * rows, 4 * n, 8 * rows)
    assert rank_memory(plan, Layout(dp=dp, zero=1), 1024, microbatches=1, states=FSDP2).gradients == 4 * rows
    # FSDP2's replicate (zero 0): everything whole
    z0 = rank_memory(plan, Layout(dp=dp, zero=0), 1024, microbatches=1, states=FSDP2)
    assert (z0.parameters, z0.gradients, z0.optimizer) == (4 * n, 4 * n, 8 * n)


def test_fp8_primary_weights_are_the_linears_and_the_expert_banks() -> None:
    """An expert bank (experts × rows × columns) is an expert-parallel linear's weight, kept in fp8;
    the rule asked for two dimensions and left every routed expert bf16, while counting a per-head
    qk-norm's weights, Mamba-1's A_log and an expert bias in fp8."""
    mixtral = _plan("mixtral-8x7b")
    picked = {t.name.rsplit(".", 1)[-1] for t in layer_tensors(mixtral.layers[0], mixtral) if fp8_weight(t)}
    assert picked == {"weight", "w_gate_EFD", "w_up_EFD", "w_down_EDF"}
    layer = mixtral.layers[0]
    experts = 3 * 8 * 4096 * 14336
    fp8 = MEGATRON.with_fp8_weights()
    layout = Layout(dp=8, ep=8, zero=1)
    bf16 = rank_memory(mixtral, layout, 4096, microbatches=1, states=MEGATRON)
    kept = rank_memory(mixtral, layout, 4096, microbatches=1, states=fp8)
    attention = 32 * 4096 * (2 * 4096 + 2 * 1024)
    assert bf16.parameters - kept.parameters == attention + 32 * experts // 8
    assert layer.ffn is not None
    for name in ("mamba-2.8b", "qwen3-30b-a3b"):
        plan = _plan(name)
        others = [t.name for t in layer_tensors(plan.layers[0], plan) if fp8_weight(t) and t.role != "linear"
                  and t.role != "experts"]
        assert others == [] and not any(fp8_weight(t) for t in layer_tensors(plan.layers[0], plan)
                                        if t.name.endswith(("A_log", "norm.weight", "router.weight")))
    # Hyena's filter MLP runs in bf16 once per position: its weights are no fp8 GEMM's
    hyena = _plan("hyena-153m")
    filters = [t for t in layer_tensors(hyena.layers[0], hyena) if t.per_position]
    assert filters and not any(fp8_weight(t) for t in filters)
    assert any(fp8_weight(t) for t in layer_tensors(hyena.layers[0], hyena))


def test_fp8_primary_weights_keep_the_gemm_weights_in_one_byte() -> None:
    """Megatron-Core's FP8 primary weights (`--fp8-params`): Llama 3 8B's 32 layers hold 7 GEMM weight
    matrices each (q, k, v, o, gate, up, down), kept and gathered in fp8; the embedding, the head and
    the norms stay bf16, and the gradients and optimizer states do not change."""
    plan = _plan("llama-3-8b")
    h, kv, ff = 4096, 1024, 14336
    gemm = 32 * (2 * h * h + 2 * h * kv + 3 * h * ff)
    fp8 = MEGATRON.with_fp8_weights()
    layout = Layout(dp=8, zero=1)
    bf16 = rank_memory(plan, layout, 4096, microbatches=1, states=MEGATRON)
    kept = rank_memory(plan, layout, 4096, microbatches=1, states=fp8)
    assert bf16.parameters - kept.parameters == gemm
    assert (kept.gradients, kept.optimizer, kept.activations) == (bf16.gradients, bf16.optimizer, bf16.activations)
    sharded = Layout(dp=8, zero=3)
    assert (rank_memory(plan, sharded, 4096, microbatches=1, states=MEGATRON).parameters
            - rank_memory(plan, sharded, 4096, microbatches=1, states=fp8).parameters) == 32 * math.ceil(
        (2 * h * h + 2 * h * kv + 3 * h * ff) / 8)

    def gathered(states: StatesConvention) -> int:
        return sum(c.bytes for c in step_collectives(plan, layout, 4096, microbatches=1, states=states)
                   if c.kind == "all_gather" and c.mesh_dim == "dp")

    assert gathered(MEGATRON) - gathered(fp8) == sum(8 * math.ceil(n / 8) for n in [gemm // 32] * 32)
    # on a GPU whose fp8 GEMMs take only "TN" (Hopper), each fp8 weight keeps its transpose: two
    # bytes at rest, as in bf16, though it is still gathered in one
    hopper = fp8.on_gpu(accelerator("h100"))
    assert rank_memory(plan, layout, 4096, microbatches=1, states=hopper).parameters == bf16.parameters
    assert gathered(hopper) == gathered(fp8) and MEGATRON.on_gpu(accelerator("h100")) is MEGATRON
    assert fp8.on_gpu(accelerator("b200")) is fp8
    assert "h100-sxm" in FP8_TN_ONLY and "b200" not in FP8_TN_ONLY and "gb200" not in FP8_TN_ONLY
    with pytest.raises(ArchplanError, match="--states megatron"):
        FSDP2.with_fp8_weights()
    with pytest.raises(ArchplanError, match="remainders"):
        MEGATRON.with_optimizer(4, True).with_fp8_weights()
    with pytest.raises(ArchplanError, match="--precision fp8"):
        Settings(fp8_params=True)
    fp8_settings = Settings(precision="fp8", fp8_params=True)
    assert fp8_settings.states.fp8_weights
    again = replace(fp8_settings, ring_nics="one")  # re-runs __post_init__ on the converted states
    assert again.states == fp8_settings.states


def test_fsdp2_compute_copies_are_temporary() -> None:
    plan = _plan("llama-3-8b")
    keep = rank_memory(plan, Layout(dp=8, zero=2), 4096, microbatches=1, states=FSDP2)
    reshard = rank_memory(plan, Layout(dp=8, zero=3), 4096, microbatches=1, states=FSDP2)
    # the whole stage, bf16, and a layer's reduction (`_unit_reduction`): its fp32 reduce-scatter
    # input (no padding over 8 ranks here) beside its bf16 gradient
    layer = count_params(plan).by_component
    one_layer = sum(v for k, v in layer.items() if k.startswith("layers.0."))
    assert keep.temporary == 2 * count_params(plan).total + (4 + 2) * one_layer
    assert 0 < reshard.temporary < keep.temporary / 5  # two layers and a layer's reduction


def test_experts_shard_over_ep_and_their_dp_group() -> None:
    plan = _plan("mixtral-8x7b")
    one = rank_memory(plan, Layout(dp=8, ep=1, zero=1), 4096, microbatches=1)
    eight = rank_memory(plan, Layout(dp=8, ep=8, zero=1), 4096, microbatches=1)
    assert eight.parameters < one.parameters / 4


# ----------------------------------------------------------------------------------- activations
def test_korthikanti_table2_rows_on_a_gpt_layer() -> None:
    """sbh(10 + 24/t) replicated-input row vs 34·sbh/t with SP (no dropout: 34 → 34 − 5, masks)."""
    data = model_data(_plan("gpt2"), 1024)
    acts = data.acts[0]
    from archplan.planning.cluster import _layer_act

    t = 4
    sp = _layer_act(acts, Layout(tp=t, sp=True), "selective", "eager", "megatron")
    no_sp = _layer_act(acts, Layout(tp=t, sp=False), "selective", "eager", "megatron")
    assert sp == acts.kept["selective"] / t
    assert no_sp == acts.replicated + (acts.kept["selective"] - acts.replicated) / t
    assert _layer_act(acts, Layout(tp=t, sp=True), "full", "eager", "megatron") == acts.block_input / t
    assert _layer_act(acts, Layout(tp=1), "none", "eager", "megatron") == acts.kept["none"]


def test_megatron_moe_layer_weights_routed_copies_inside_the_experts() -> None:
    """A Qwen3-30B-A3B layer under Megatron-Core with TE's fusions and flash attention, no
    recompute, counted by hand from what its modules save (per token, bytes): the QKV input, Q, K,
    V and the output projection's input, bf16, (2048 + 4096 + 2·512 + 4096)·2 = 22,528 (4 KV heads
    of 128); the q/k norms' inputs (4096 + 512)·2 = 9,216; the fp32 log-sum-exp 32·4 = 128; the router's input,
    probabilities and top-k weights (2048 + 128 + 8)·2 = 4,368; per routed copy (8) the dispatched
    input, [gate | up] and the product, (2048 + 2·768 + 768)·2 = 8,704, and its fp32 routing
    probability, 4 (`weighted_bias_swiglu_impl`). No expert output: the probabilities are applied
    before the down projection, so the un-permute saves nothing."""
    from archplan.planning.cluster import _layer_act

    seq = 4096
    data = model_data(_plan("qwen3-30b-a3b"), seq)
    per_token = 22_528 + 9_216 + 128 + 4_368 + 8 * (8_704 + 4)
    assert _layer_act(data.acts[0], Layout(dp=8, ep=8), "none", "flash", "megatron") == seq * per_token
    # the torch engine's MoE weights the experts' outputs in its combine, which keeps all eight
    assert data.acts[0].weighting == seq * 8 * (4 - 2 * 2048)
    # experts without Megatron-Core's fused weighted SwiGLU keep the activation's output the
    # probabilities multiply (GELU MLP experts, top-1)
    gelu = model_data(_plan("gpt-4-rumored"), 1024)
    layer = next(i for i, acts in enumerate(gelu.acts) if acts.weighting)
    moe = gelu.plan.layers[layer].ffn
    assert gelu.acts[layer].weighting == 1024 * moe.top_k * (4 + 2 * moe.expert.d_ff - 2 * gelu.plan.d_model)


def test_flash_keeps_no_seq_squared_term() -> None:
    plan = _plan("llama-3-8b")
    layout = Layout(tp=8, dp=1, recompute="none")
    small, big = (rank_memory(plan, layout, s, microbatches=1, attention_kernel=k).activations
                  for s, k in ((2048, "flash"), (4096, "flash")))
    assert big == 2 * small  # integer bytes, linear in the sequence: exactly twice
    eager = [rank_memory(plan, layout, s, microbatches=1, attention_kernel="eager").activations
             for s in (2048, 4096)]
    assert eager[1] > 2.2 * eager[0]


def test_context_parallelism_splits_the_sequence() -> None:
    plan = _plan("llama-3-8b")
    one = rank_memory(plan, Layout(tp=8, cp=1, dp=2, recompute="none"), 32768, microbatches=1)
    two = rank_memory(plan, Layout(tp=8, cp=2, dp=1, recompute="none"), 32768, microbatches=1)
    assert two.activations < 0.55 * one.activations


def test_interleaved_in_flight_matches_korthikanti() -> None:
    """Rank 0 of p with v virtual stages holds p·(1 + (p − 1)/(p·v)) micro-batches' worth."""
    for p, v in ((4, 2), (8, 3), (16, 4)):
        counts = in_flight(Layout(pp=p, vpp=v), 10 * p, 0)
        assert sum(counts) / v == pytest.approx(p * (1 + (p - 1) / (p * v)))
    assert in_flight(Layout(pp=4), 16, 0) == (4,) and in_flight(Layout(pp=4), 2, 1) == (2,)


def _schedule(p: int, v: int, m: int, n: int, stage: int) -> list[tuple[str, int]]:
    """The interleaved schedule event by event, written out here as Megatron-LM runs it
    (`get_schedule_table`, `get_model_chunk_id`): forwards in rounds of n micro-batches through
    chunk 0, then 1, … (the last round takes the rest), backwards in the same rounds with the
    chunks reversed; 2·(p − stage − 1) + (v − 1)·n warm-up forwards, then one forward and one
    backward alternately, then the remaining backwards."""
    sizes = [min(n, m - start) for start in range(0, m, n)]
    forward = [c for size in sizes for c in range(v) for _ in range(size)]
    backward = [c for size in sizes for c in reversed(range(v)) for _ in range(size)]
    warmup = min(m * v, 2 * (p - stage - 1) + (v - 1) * n)
    events = [("F", c) for c in forward[:warmup]]
    for f, b in zip(forward[warmup:], backward):
        events += [("F", f), ("B", b)]
    return events + [("B", c) for c in backward[m * v - warmup:]]


def _replayed(p: int, v: int, m: int, n: int, stage: int) -> tuple[set[cluster.PipelineMoment], tuple[bool, ...]]:
    """The interleaved schedule of m micro-batches replayed whole: the moments before backwards
    (held counts, the chunk that ran forward, the next backward's chunk) and whether each chunk's
    last backward pops a forward index other than 0 (the prefetch `fsdp2_stale_prefetch` prices)."""
    events = _schedule(p, v, m, n, stage)
    counts, moments = [0] * v, set()
    stacks: list[list[int]] = [[] for _ in range(v)]
    recorded, popped = [0] * v, [0] * v
    for i, (op, c) in enumerate(events):
        counts[c] += 1 if op == "F" else -1
        if op == "F":
            stacks[c].append(recorded[c])
            recorded[c] += 1
        else:
            popped[c] = stacks[c].pop()
        if i + 1 < len(events) and events[i + 1][0] == "B":
            moments.add(cluster.PipelineMoment(tuple(counts), c if op == "F" else None, events[i + 1][1]))
    return moments, tuple(last != 0 for last in popped)


def _peaks(moments: set[cluster.PipelineMoment] | tuple[cluster.PipelineMoment, ...], v: int,
           seed: int) -> list[float]:
    """The peak over the moments of random functions of the form a rank's activations take
    (`cluster._rank_activations`): bytes per held micro-batch of each chunk, plus a term for the
    chunk just run forward and the next backward's, which a forward only adds to (the head's
    tensors, a combine's rows)."""
    rng = random.Random(seed)
    peaks = []
    for _ in range(8):
        weights = [rng.random() for _ in range(v)]
        after_backward = [rng.random() * 4 for _ in range(v)]
        beside = {(f, b): after_backward[b] + (0 if f is None else rng.random() * 4)
                  for f in (None, *range(v)) for b in range(v)}
        peaks.append(max(sum(w * c for w, c in zip(weights, moment.counts)) + beside[moment.forward, moment.backward]
                         for moment in moments))
    return peaks


def test_interleaved_schedule_is_priced_at_the_moments_that_can_peak() -> None:
    """The schedule is replayed in runs of one forward chunk and one backward chunk
    (`cluster._interleaved_segments`), over the fewest micro-batches congruent to m modulo the
    round that hold every phase of m's (`cluster._steady_microbatches`), and only each run's ends
    are kept. On every stage that gives what the whole schedule, event by event, gives: the same
    stale prefetches, a subset of its moments, and the same peak of any function linear in the
    held counts. `plan llama-3-8b --gpus 8 --gpu h100 --seq 1` (125,000 micro-batches) took 305 s
    and a round of 10⁵ micro-batches (`--layout pp=4,vpp=2,group=100000`) 34 s; both take under
    1 s on a 2-core host."""
    checked = 0
    for p in range(2, 6):
        for v in range(2, 4):
            for n in range(p, 2 * p + 1):
                for m in range(n, 10 * n):
                    short = cluster._steady_microbatches(p, v, m, n)
                    assert short <= m and (m - short) % n == 0
                    for stage in range(p):
                        whole, stale = _replayed(p, v, m, n, stage)
                        priced = cluster._interleaved_moments(p, v, m, n, stage)
                        assert set(priced) <= whole
                        assert cluster._stale_prefetch(p, v, m, n, stage) == stale
                        assert _peaks(priced, v, checked) == _peaks(whole, v, checked)
                        checked += 1
    assert checked > 3000
    assert cluster._steady_microbatches(2, 2, 125_000, 2) < 20
    assert len(cluster._interleaved_moments(4, 2, 100_000_000, 100_000, 0)) < 20


def test_most_loaded_stage_is_searched_exactly() -> None:
    plan = _plan("llama-3.1-405b")
    layout = Layout(tp=8, pp=16, dp=128, zero=1, recompute="none")
    every = [rank_memory(plan, layout, 8192, microbatches=16, stage=s).total for s in range(16)]
    stage = most_loaded_stage(plan, layout, 8192, microbatches=16)
    assert every[stage] == max(every)
    assert stage in model_data(plan, 8192).representative_stages(16, 1)
    assert [len(r) for r in pipeline_chunks(126, 16)[0]] == [7]  # the first stage holds one fewer


@pytest.mark.parametrize(("pp", "vpp"), [(32, 1), (8, 4)])
def test_a_rank_of_dense_layers_does_not_stand_for_the_moe_ranks(pp: int, vpp: int) -> None:
    """DeepSeek-V3's first three layers are dense. At PP32 pipeline rank 1 holds two of them, and
    ranks of the same chunk sizes were taken as alike: rank 1 stood for ranks 2-30, whose MoE layers
    need several times its memory (22 GiB against 74 GiB at TP4 PP32 DP2 EP8, 4,096 tokens). The
    most loaded of every rank is the one found."""
    plan = _plan("deepseek-v3")
    layout = Layout(tp=4, pp=pp, vpp=vpp, dp=256 // (4 * pp), ep=8, zero=1, recompute="none")
    every = [rank_memory(plan, layout, 4096, microbatches=2 * pp, stage=s).total for s in range(pp)]
    stage = most_loaded_stage(plan, layout, 4096, microbatches=2 * pp)
    assert every[stage] == max(every) and every[stage] > 1.2 * every[1]


def test_one_layer_a_chunk_leaves_the_embedding_and_the_head_alone() -> None:
    """Llama Team 2024 §3.3.2: "the first model chunk on the first stage has only the embedding, and
    the last model chunk on the last stage has only output projection and loss calculation": 126
    layers on PP16 at v = 8, 128 chunks. The search offers it, and counts down to one layer a chunk
    when n itself divides."""
    from archplan.planning.parallel import _vpps

    chunks = pipeline_chunks(126, 16, 8)
    sizes = [len(chunks[c % 16][c // 16]) for c in range(128)]
    assert sizes[0] == sizes[-1] == 0 and set(sizes[1:-1]) == {1}
    assert [layer for c in range(128) for layer in chunks[c % 16][c // 16]] == list(range(126))
    assert _vpps(126, 16) == [1, 2, 4, 8]
    assert 4 in _vpps(32, 8) and _vpps(6, 2) == [1, 2, 3, 4]


@given(n=st.integers(1, 200), pp=st.integers(1, 64), vpp=st.integers(1, 8))
def test_the_heads_chunk_never_holds_more_layers_than_another(n: int, pp: int, vpp: int) -> None:
    """Where the layers do not divide the chunks, the embedding and the head count as a layer each
    and the extra layers go first (torchtitan's `generate_llm_fqn_per_model_part`); where they
    divide, every chunk holds as many (Megatron-LM's default)."""
    chunks = pp * vpp
    assume(chunks <= n + 2)  # `layout_problem`'s bound
    split = pipeline_chunks(n, pp, vpp)
    sizes = [len(split[c % pp][c // pp]) for c in range(chunks)]
    assert [layer for c in range(chunks) for layer in split[c % pp][c // pp]] == list(range(n))
    assert sizes[-1] == min(sizes)
    if n % chunks == 0:
        assert set(sizes) == {n // chunks}
    else:  # the embedding and the head a layer each: no chunk's work more than one above another's
        work = [size + (c == 0) + (c == chunks - 1) for c, size in enumerate(sizes)]
        assert max(work) - min(work) <= 1


def test_a_model_with_more_work_is_not_priced_faster_on_the_same_layout(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSeek-V3 with its multi-token-prediction module does 4% more work a token than without.
    When 61 layers split over 16 stages with the extra ones on the last stages, the plain model's
    head sat beside four layers there and its step came out slower than the MTP model's (the MTP
    split keeps the last stage light); with the head counted as a layer both bottlenecks are a
    four-layer stage."""
    steps = {}
    for preset in ("deepseek-v3", "deepseek-v3-mtp"):
        code, out, _ = run(capsys, monkeypatch, "plan", preset, "--gpus", "1024", "--gpu", "h100",
                           "--seq", "4096", "--global-batch-tokens", "16M", "--headroom", "0", "--json",
                           "--layout", "tp=2,cp=1,pp=16,vpp=1,dp=32,ep=32,zero=1,recompute=none,mb=1")
        assert code == 0
        steps[preset] = json.loads(out)["layouts"][0]["step_time"]["total"]
    assert steps["deepseek-v3-mtp"] >= steps["deepseek-v3"]


# ----------------------------------------------------------------------------------- collectives
def _by(records: tuple[Any, ...], mesh: str) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for r in records:
        if r.mesh_dim == mesh:
            calls, size = out.get(r.kind, (0, r.bytes))
            out[r.kind] = (calls + r.count, r.bytes)
    return out


def test_tp_collectives_with_and_without_sp() -> None:
    plan = _plan("llama-3-8b")  # 32 layers, one stage
    m, s, h = 4, 4096, 4096
    act = 2 * s * h
    no_sp = _by(step_collectives(plan, Layout(tp=8, sp=False), s, microbatches=m), "tp")
    # 2 sub-blocks × 32 layers × (forward + backward), + embedding output + LM-head input grad
    assert no_sp["all_reduce"][0] == m * (64 * 2 + 2) + 3 * m
    sp = _by(step_collectives(plan, Layout(tp=8, sp=True), s, microbatches=m), "tp")
    assert sp["all_gather"] == (m * (64 * 3 + 2), act)
    assert sp["reduce_scatter"] == (m * (64 * 2 + 2), act)
    full = _by(step_collectives(plan, Layout(tp=8, sp=True, recompute="full"), s, microbatches=m), "tp")
    assert full["all_gather"][0] == sp["all_gather"][0] + m * 64


def _tp_records(plan: Any, layout: Layout, s: int, m: int, states: Any) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for r in step_collectives(plan, layout, s, microbatches=m, states=states):
        if r.mesh_dim == "tp":
            out[(r.kind, r.bytes)] = out.get((r.kind, r.bytes), 0) + r.count
    return out


def test_sp_engines_megatron_and_torch() -> None:
    """What `verify --layout` measured on torch (docs/distributed.md) beside Megatron-LM's SP."""
    plan = _plan("llama-3-8b")  # 32 layers, 2 norms each + the final norm, one stage
    m, s, h = 4, 4096, 4096
    act = 2 * s * h
    layout = Layout(tp=8, sp=True, zero=3)
    meg = _tp_records(plan, layout, s, m, MEGATRON)
    torch_ = _tp_records(plan, layout, s, m, FSDP2)
    # Megatron re-gathers the column input in the backward; DTensor saved it gathered
    assert meg[("all_gather", act)] == m * (64 * 3 + 2)
    assert torch_[("all_gather", act)] == m * (64 * 2 + 2)
    # norm-weight gradients summed over tp: Megatron once per step in fp32 main grads, DTensor
    # each norm's bf16 Partial gradient per micro-batch
    assert meg[("all_reduce", 65 * h * MEGATRON.grad_bytes)] == 1
    assert torch_[("all_reduce", 2 * h)] == m * 65
    # full recompute: torch's non-reentrant checkpoint stops before each layer's last reduction
    full = replace(layout, recompute="full")
    assert (_tp_records(plan, full, s, m, FSDP2)[("reduce_scatter", act)]
            == _tp_records(plan, full, s, m, MEGATRON)[("reduce_scatter", act)] - m * 32)
    # activations: DTensor keeps each sub-block's gathered input, b·s·h bf16 not split over tp
    no_rc = replace(layout, recompute="none")
    gap = (rank_memory(plan, no_rc, s, microbatches=1, states=FSDP2).activations
           - rank_memory(plan, no_rc, s, microbatches=1, states=ZERO).activations)
    assert gap > 64 * act * (1 - 1 / 8)


def test_fewer_kv_heads_than_tp_gather_the_kv_projection_output() -> None:
    """Megatron-Core's `num_query_groups < world_size` branch: an all-gather of the whole fused QKV
    output per attention layer and forward (again under full recompute), reduce-scattered in the
    backward; none where the KV heads split whole. The torch engine gathers K and V apart."""
    plan = _plan("qwen3-235b-a22b")  # 94 layers, 64 query / 4 KV heads of 128
    m, s = 2, 4096
    fused = 2 * s * (64 + 2 * 4) * 128
    layout = Layout(tp=8, pp=2, dp=8, ep=8, sp=True)

    def qkv(layout: Layout, states: Any) -> dict[str, int]:
        records = step_collectives(plan, layout, s, microbatches=m, stage=0, states=states)
        return {r.kind: r.count for r in records if "fused QKV" in r.what and r.bytes == fused}

    assert qkv(layout, MEGATRON) == {"all_gather": m * 47, "reduce_scatter": m * 47}
    assert qkv(replace(layout, recompute="full"), MEGATRON) == {"all_gather": 2 * m * 47, "reduce_scatter": m * 47}
    assert qkv(replace(layout, tp=4), MEGATRON) == {}
    # the torch engine gathers K and V apart (`distributed.plans.KVHeads`), 4 heads of 128 each
    kv = 2 * s * 4 * 128
    torch_ = {(r.kind, r.bytes): r.count for r in step_collectives(plan, layout, s, microbatches=m, stage=0, states=FSDP2)
              if "K and V outputs" in r.what}
    assert torch_ == {("all_gather", kv): 2 * m * 47, ("reduce_scatter", kv): 2 * m * 47}


def test_tied_ends_one_fsdp_unit_under_torch() -> None:
    plan = _plan("gemma-2b")
    layout = Layout(tp=1, dp=8, zero=3)
    kw: dict[str, Any] = {"microbatches": 1}
    torch_ = [r for r in step_collectives(plan, layout, 512, states=FSDP2, **kw) if "embedding" in r.what]
    meg = [r for r in step_collectives(plan, layout, 512, states=ZERO, **kw)
           if "embedding" in r.what or "LM head" in r.what]
    assert len(torch_) == 2 and len(meg) == 4  # gather + reduce-scatter, one unit vs two
    assert sum(r.bytes for r in torch_ if r.kind == "all_gather") > max(r.bytes for r in meg if r.kind == "all_gather")


@pytest.mark.parametrize("comm", ["all_gather", "ring"])
def test_cp_exchanges_k_and_v(comm: str) -> None:
    plan = _plan("llama-3-8b")  # 8 KV heads of 128
    s, cp, m = 32768, 4, 2
    records = step_collectives(plan, Layout(tp=8, cp=cp, dp=1), s, microbatches=m, cp_comm=comm)  # type: ignore[arg-type]
    kv = 2 * 2 * s * 1 * 128  # K and V of the rank's one KV head over the whole sequence
    got = _by(records, "cp")
    if comm == "all_gather":
        assert got["all_gather"] == (m * 32 * 2, kv) and got["reduce_scatter"] == (m * 32, kv)
    else:
        assert got["send"] == (m * 32 * (cp - 1) * 3, kv // cp) == got["recv"]


def test_cp_mla_gathers_the_latent_under_torch_and_expanded_kv_under_megatron() -> None:
    """DeepSeek-V3's MLA under CP: the torch engine (verify's) all-gathers [c_kv | k_pe], 512 + 64
    per token on every tp rank; Megatron (Transformer Engine) the expanded K/V of the rank's heads."""
    plan = _plan("deepseek-v3")
    s, tp, cp, m = 32768, 8, 4, 1
    mla = sum(isinstance(layer.mixer, MLAPlan) for layer in plan.layers)
    layout = Layout(tp=tp, cp=cp, pp=1, dp=1, ep=1)
    torch_ = _by(step_collectives(plan, layout, s, microbatches=m, states=FSDP2), "cp")
    megatron = _by(step_collectives(plan, layout, s, microbatches=m, states=ZERO), "cp")
    assert torch_["all_gather"] == (m * mla, 2 * s * (512 + 64))
    assert megatron["all_gather"] == (m * mla * 2, 2 * s * (128 // tp) * (192 + 128))
    assert torch_["reduce_scatter"][1] * 8 < megatron["reduce_scatter"][1]


def test_pp_sends_a_tp_shard_per_chunk_boundary() -> None:
    plan = _plan("llama-3-8b")
    m, s = 8, 4096
    layout = Layout(tp=2, pp=4, vpp=2, dp=1)
    middle = _by(step_collectives(plan, layout, s, microbatches=m, stage=1), "pp")
    assert middle["send"] == (2 * 2 * m, 2 * s * 4096 // 2)  # 2 chunks × (fwd out, bwd grad)
    first = _by(step_collectives(plan, layout, s, microbatches=m, stage=0), "pp")
    assert first["send"][0] == 3 * m  # chunk 0 has no input to receive


def test_ep_all_to_all_moves_the_routed_copies() -> None:
    plan = _plan("mixtral-8x7b")  # top-2, d 4096, 32 MoE layers
    m, s = 2, 4096
    got = _by(step_collectives(plan, Layout(dp=8, ep=8), s, microbatches=m), "ep")
    assert got["all_to_all"] == (m * 32 * 4, 2 * s * 2 * 4096)


@pytest.mark.parametrize("zero,kinds", [
    (0, {"all_reduce": 1}), (1, {"reduce_scatter": 1, "all_gather": 1}),
    (2, {"reduce_scatter": 4, "all_gather": 1}), (3, {"reduce_scatter": 4, "all_gather": 8}),
])
def test_dp_collectives_per_zero_stage(zero: int, kinds: dict[str, int]) -> None:
    plan = _plan("llama-3-8b")
    records = [r for r in step_collectives(plan, Layout(dp=8, zero=zero), 4096, microbatches=4,
                                           states=ZERO) if r.mesh_dim == "dp"]
    per_layer = [r for r in records if r.what.startswith("layers.5 ")]
    assert {r.kind: r.count for r in per_layer} == kinds
    n = sum(t.numel for t in layer_tensors(plan.layers[5], plan))
    grads = next(r for r in per_layer if r.kind != "all_gather")
    padded = math.ceil(n / 8) * 8
    assert grads.bytes == 2 * (n if zero == 0 else padded)
    fp32 = step_collectives(plan, Layout(dp=8, zero=zero), 4096, microbatches=4, states=ZERO,
                            grad_reduce=4)
    assert sum(r.bytes for r in fp32 if "gradients" in r.what) == 2 * sum(
        r.bytes for r in records if "gradients" in r.what)
    assert all(r.overlappable for r in records)


def _moved(records: list[Collective]) -> Counter[tuple[str, str, int]]:
    """Bytes moved (bytes per call times calls) by kind, mesh dimension and group size."""
    total: Counter[tuple[str, str, int]] = Counter()
    for r in records:
        total[r.kind, r.mesh_dim, r.group_size] += r.bytes * r.count
    return total


def test_per_layer_and_per_chunk_records_price_the_same() -> None:
    from archplan.planning.cluster import _collectives

    plan = _plan("deepseek-v3")
    layout = Layout(pp=16, dp=128, ep=64, zero=1)
    data = model_data(plan, 4096)
    args = (data, layout, 3, 16, MEGATRON, 4, "all_gather", frozenset({"dp"}), False)
    fine, coarse = _collectives(*args, per_layer=True), _collectives(*args, per_layer=False)
    # the same integer bytes per kind, mesh dimension and group, hence the same wire bytes (a fixed
    # share per kind and group): exact in floats too, every group here a power of two
    assert _moved(fine) == _moved(coarse)
    assert sum(r.wire_bytes * r.count for r in fine) == sum(r.wire_bytes * r.count for r in coarse)
    assert sum(tally(fine).values()) > sum(tally(coarse).values())


def test_s4_tp_collectives_reduce_2d_before_the_glu() -> None:
    """S4 has no column projection: row-parallel output_linear (2·d_model) and the input's channel
    slices (shards._s4); its FFN sub-block keeps Megatron's pattern."""
    plan = _plan("s4d-lm")  # 12 S4D layers + GELU MLP, d 768
    n, m, s, h, tp = len(plan.layers), 2, 2048, 768, 4
    act = 2 * s * h
    no_sp = _by(step_collectives(plan, Layout(tp=tp, sp=False), s, microbatches=m), "tp")
    # all-reduces: FFN fwd + bwd per layer, S4 forward, embedding, LM-head input grad, 3 for the CE,
    # and once per step the gradients of the one SSM copy every rank's channels read (Megatron)
    assert no_sp["all_reduce"][0] == m * (2 * n + n + 2) + 3 * m + 1
    assert no_sp["all_gather"] == (m * n, act)  # the S4 input gradient's channel slices
    sp = _by(step_collectives(plan, Layout(tp=tp, sp=True), s, microbatches=m), "tp")
    assert sp["all_to_all"] == (m * n * 2, act // tp)
    assert sp["reduce_scatter"][0] == m * (2 * n + 1 + 1) + m * n
    records = step_collectives(plan, Layout(tp=tp, sp=True), s, microbatches=m)
    assert any(r.bytes == 2 * act and r.kind == "reduce_scatter" for r in records)


def test_s4_glu_input_stays_whole_without_sp() -> None:
    plan = _plan("s4d-lm")
    data = model_data(plan, 2048)
    layer = data.acts[0]
    assert layer.replicated == 2 * 2048 * 768 * (len(plan.layers[0].norms) + 1 + 2)


def test_cp_moves_long_conv_channels_by_all_to_all() -> None:
    plan = _plan("stripedhyena-7b")  # HA: 16 StripedHyena + 16 attention layers, d 4096
    s, cp, tp, m = 32768, 4, 2, 2
    records = step_collectives(plan, Layout(tp=tp, cp=cp, dp=1), s, microbatches=m)
    got = [r for r in records if r.mesh_dim == "cp" and r.kind == "all_to_all"]
    tokens = s // cp
    hyena = sum(isinstance(l.mixer, StripedHyenaPlan) for l in plan.layers)
    # in: the 3D FIR channels, out: D, forward and backward
    assert {(r.bytes, r.count) for r in got} == {(2 * tokens * 3 * 4096 // tp, m * hyena * 2),
                                                 (2 * tokens * 4096 // tp, m * hyena * 2)}
    assert _by(records, "cp")["all_gather"][0] == m * (len(plan.layers) - hyena) * 2  # K/V of the A layers


# ------------------------------------------------------------------------------------ step time
def _evaluate(name: str, text: str, seq: int = 4096, batch: float = 4e6, **kw: Any) -> Any:
    fixed = parse_layout(text)
    layout = fixed.complete()
    assert layout is not None
    result = search(_plan(name), H100, layout.world, seq=seq, global_batch_tokens=batch, net=NET,
                    fixed=fixed, keep_unfit=True, settings=Settings(**kw))
    return result.ranked[0]


def test_bubble_is_p_minus_1_over_v_slots() -> None:
    base = "tp=2,cp=1,pp=4,dp=1,ep=1,zero=0,recompute=none,mb=1"
    one = _evaluate("llama-3-8b", base + ",vpp=1", batch=16 * 4096)
    two = _evaluate("llama-3-8b", base + ",vpp=2", batch=16 * 4096)
    slot = (one.time.total - one.time.bubble - one.time.dp - one.time.optimizer) / one.microbatches
    assert one.time.bubble == pytest.approx(3 * slot)
    assert two.time.bubble < 0.6 * one.time.bubble


def test_overlap_hides_dp_and_tp_traffic() -> None:
    text = "tp=8,cp=1,pp=1,dp=16,ep=1,zero=1,recompute=none,mb=1"
    hidden = _evaluate("llama-3-70b", text)
    exposed = _evaluate("llama-3-70b", text, overlap=frozenset())
    assert hidden.time.dp < exposed.time.dp
    with_tp = _evaluate("llama-3-70b", text, overlap=frozenset({"dp", "tp"}))
    assert with_tp.time.tp < hidden.time.tp
    assert hidden.time.compute == exposed.time.compute


def test_sequence_parallelism_saves_elementwise_time() -> None:
    text = "tp=8,cp=1,pp=1,dp=16,ep=1,zero=1,recompute=none,mb=1,sp="
    on, off = _evaluate("llama-3-70b", text + "on"), _evaluate("llama-3-70b", text + "off")
    assert on.time.elementwise < off.time.elementwise
    assert on.time.gemm == off.time.gemm


def test_fp8_runs_the_block_gemms_at_the_fp8_peak() -> None:
    text = "tp=8,cp=1,pp=1,dp=16,ep=1,zero=1,recompute=none,mb=1"
    bf16, fp8 = _evaluate("llama-3-70b", text), _evaluate("llama-3-70b", text, precision="fp8")
    assert 0.5 * bf16.time.gemm < fp8.time.gemm < 0.6 * bf16.time.gemm  # the LM head stays bf16
    assert fp8.mfu > bf16.mfu  # MFU stays against the bf16 peak


def test_fp8_casts_the_inputs_no_norm_produces() -> None:
    # Llama 3 8B at TP2 with SP, mb 1, 4,096 tokens: per layer the attention output (4,096 / 2
    # columns) and the FFN down-projection's input (14,336 / 2) are cast, 4 B per element; the
    # q/k/v and gate/up inputs come out of the norm already in fp8
    data = model_data(_plan("llama-3-8b"), 4096)
    layout = parse_layout("tp=2,cp=1,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=1,sp=on").complete()
    assert layout is not None
    assert fp8_cast_bytes(data, 0, layout) == 4 * 4096 * (4096 + 14336) // 2
    text = "tp=2,cp=1,pp=1,dp=4,ep=1,zero=1,recompute=none,mb=1,sp=on"
    bf16, fp8 = _evaluate("llama-3-8b", text), _evaluate("llama-3-8b", text, precision="fp8")
    hbm = H100.hbm_bytes_per_s * kernel_efficiency(H100)[0].hbm
    # the forward's casts, then the backward's (twice the forward's bytes, as every elementwise kernel)
    casts = 3 * 32 * fp8_cast_bytes(data, 0, layout) / hbm * fp8.microbatches
    assert fp8.time.elementwise - bf16.time.elementwise == pytest.approx(casts)


def test_current_scaling_adds_an_amax_pass_and_casts_the_norms_outputs() -> None:
    """Under per-tensor current scaling (Transformer Engine's Float8CurrentScaling) every cast a
    delayed-scaling run pays reads its input once more for the amax first (2 B per element), and the
    norm's output, which TE's norm now writes in bf16 with its amax, is cast in a pass of its own
    (4 B), once per input the projections share: Llama 3 8B at TP2 with SP casts the attention and
    FFN inputs (4,096 columns each, gathered over the sequence), not once per q/k/v or gate/up."""
    data = model_data(_plan("llama-3-8b"), 4096)
    layout = parse_layout("tp=2,cp=1,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=1,sp=on").complete()
    assert layout is not None
    delayed = fp8_cast_bytes(data, 0, layout)
    assert fp8_cast_bytes(data, 0, layout, scaling="current") == delayed * 6 // 4 + 4 * 4096 * 2 * 4096
    text = "tp=2,cp=1,pp=1,dp=4,ep=1,zero=1,recompute=none,mb=1,sp=on"
    before, after = (_evaluate("llama-3-8b", text, precision="fp8", fp8_scaling=f) for f in ("delayed", "current"))
    hbm = H100.hbm_bytes_per_s * kernel_efficiency(H100)[0].hbm
    added = 3 * 32 * (fp8_cast_bytes(data, 0, layout, scaling="current") - delayed) / hbm * after.microbatches
    assert after.time.elementwise - before.time.elementwise == pytest.approx(added)
    assert (after.time.gemm, after.time.attention) == (before.time.gemm, before.time.attention)


def test_current_scaling_casts_each_norm_fed_input_once() -> None:
    """MLA reads three norms' outputs (the block's, into q_a and kv_a; q_a_norm's, into q_b;
    kv_a_norm's, into kv_b) and a MoE layer's shared expert the block's second: each is cast once.
    DeepSeek-V3's first layer (dense) at TP1 over 4,096 tokens: 7,168 + 1,536 + 512 columns into
    attention, 7,168 into the FFN; its fourth layer (MoE) casts the shared expert's input in the dense
    FFN's place, and the routed experts' casts, paid under delayed scaling too, gain the amax pass."""
    plan = _plan("deepseek-v3")
    data = model_data(plan, 4096)
    layout = parse_layout("tp=1,cp=1,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=1,sp=off").complete()
    assert layout is not None
    h = plan.d_model
    for i in (0, 3):
        delayed = fp8_cast_bytes(data, i, layout)
        normed = 4 * 4096 * (h + 1536 + 512 + h)
        assert fp8_cast_bytes(data, i, layout, scaling="current") == delayed * 6 // 4 + normed


def test_mxfp8_casts_the_norms_outputs_unless_cudnns_norm_writes_them() -> None:
    """MXFP8 (one E8M0 scale per 32 elements): each cast writes its scales beside its two copies, 1/16
    B per element more, and needs no amax pass. Transformer Engine's norm writes bf16 under MXFP8, so
    the norm-fed inputs are cast apart, 4 B; cuDNN's norm writes MXFP8 itself, so they cost nothing, as
    under delayed scaling. Under current scaling cuDNN's norm leaves the cast its own amax pass, 2 B
    more per norm-fed element. Llama 3 8B at TP2 with SP: 4,096-wide attention and FFN inputs."""
    data = model_data(_plan("llama-3-8b"), 4096)
    layout = parse_layout("tp=2,cp=1,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=1,sp=on").complete()
    assert layout is not None
    delayed = fp8_cast_bytes(data, 0, layout)
    paid = delayed // 4
    normed = 4096 * 2 * 4096
    assert fp8_cast_bytes(data, 0, layout, scaling="mxfp8", cudnn_norm=True) == delayed + 2 * paid // 32
    assert fp8_cast_bytes(data, 0, layout, scaling="mxfp8") == 4 * (paid + normed) + 2 * (paid + normed) // 32
    current = fp8_cast_bytes(data, 0, layout, scaling="current")
    assert fp8_cast_bytes(data, 0, layout, scaling="current", cudnn_norm=True) == current + 2 * normed


def _mixtral_ep8() -> tuple[Any, Any, Layout, int]:
    """Mixtral 8x7B over 4,096 tokens at EP8, one local expert per rank: its plan, model data and
    layout, and the routed copies one rank's expert receives."""
    plan = _plan("mixtral-8x7b")
    layout = parse_layout("tp=1,cp=1,pp=1,dp=1,ep=8,zero=1,recompute=none,mb=1,sp=off").complete()
    assert layout is not None
    moe = plan.layers[0].ffn
    return plan, model_data(plan, 4096), layout, math.ceil(4096 * moe.top_k * 8 / moe.n_experts)


def test_fp8_casts_of_experts_quantise_each_token_once_before_an_fp8_dispatch() -> None:
    """An fp8 dispatch (DeepSeek-V3 §3.3.2) quantizes each token once before it leaves; after a bf16
    one (Megatron-Core) the experts' grouped linear quantizes every routed copy it receives."""
    plan, data, layout, routed = _mixtral_ep8()
    moe = plan.layers[0].ffn
    tokens, h = 4096, plan.d_model
    down_and_o = routed * moe.expert.d_ff + tokens * h  # the down-projections' input, o_proj's
    assert fp8_cast_bytes(data, 0, layout, fp8_dispatch=True) == 4 * (tokens * h + down_and_o)
    assert fp8_cast_bytes(data, 0, layout) == 4 * (routed * h + down_and_o)


def test_a_mamba_layers_scan_streams_its_mixers_bytes_not_its_ffns() -> None:
    """The scan and its convolution stream what the Mamba mixer keeps; the FFN's passes are priced
    as every layer's are. The whole layer's bytes were taken, so a Mamba layer paid for its FFN
    twice: widening the FFN added more time to a Mamba layer than to an attention layer."""
    layout = Layout(tp=1, dp=1, zero=1, recompute="none", mb=1)
    eff = kernel_efficiency(H100)[0]
    elem: dict[int, list[float]] = {}
    for d_ff in (256, 512):
        data = model_data(_hybrid(d_ff), 64)
        layers = Pricer(data, rates_for(H100, eff, None, "bf16")).layers(layout, "flash")
        elem[d_ff] = [m.elem_fwd for m in layers]
        kinds = [type(layer.mixer).__name__ for layer in data.plan.layers]
        assert kinds == ["Mamba1Plan", "AttentionPlan"]
        mixer = f"{data.plan.layers[0].path}.mixer"
        assert data.mixer_kept[0] == activation_memory(data.plan, 1, 64, "none").by_component[mixer] - (
            mamba1_a_bytes(data.plan.layers[0].mixer))
    mamba, attention = (elem[512][i] - elem[256][i] for i in (0, 1))
    assert mamba == pytest.approx(attention)


def _hybrid(d_ff: int) -> ModelPlan:
    """tiny-mamba (a Mamba-1 layer, then an attention layer) with GLUs of width d_ff."""
    data = spec_data(load_spec(Path(__file__).parent / "fixtures" / "distributed" / "tiny-mamba.yaml"))
    data["ffn"] = data["ffn"] | {"d_ff": d_ff}
    return resolve(Spec.model_validate(data))


def test_bias_and_gate_rows_under_sequence_parallelism() -> None:
    """Under SP only a row-parallel linear's bias adds after the reduce-scatter, on the rank's
    shard: a router's bias (its GEMM already over the rank's routed tokens) was divided by tp a
    second time. The shared-expert gate reads the rank's shard, as the router does."""
    data_ = spec_data(load_spec(Path(__file__).parent / "fixtures" / "distributed" / "tiny-moe.yaml"))
    data_["moe"] = data_["moe"] | {"router": {"scoring": "softmax", "bias": True},
                                   "shared": {"n": 1, "d_ff": 32, "gate": True}}
    data = model_data(resolve(Spec.model_validate(data_)), 64)
    layout = Layout(tp=2, dp=1, zero=1, recompute="none", mb=1, sp=True)
    routed = 64 // 2  # the rank's sequence shard
    assert bias_grad_bytes(data, 0, layout) == 2 * routed * 4  # the router's 4-wide bias, 2 B a value
    layer = data.plan.layers[0]
    gate = next(t for t in data.layer_tensors[0] if t.role == "gate")
    shape = _gemm_shape(data, layer, gate, layout)
    assert shape is not None and shape[0] == routed


def test_mamba1_dt_proj_pays_its_fp8_cast() -> None:
    """dt_proj reads x_proj's Δ slice, which no norm writes: its fp8 cast is paid under every
    recipe, where it was taken for in_proj's norm-fed input and charged nothing."""
    data = model_data(_hybrid(128), 64)
    layout = Layout(tp=1, dp=1, zero=1, recompute="none", mb=1)
    mixer = data.plan.layers[0].mixer
    dt = 64 * mixer.dt_rank  # M × K of dt_proj
    x_proj, out_proj = 64 * mixer.d_inner, 64 * mixer.d_inner  # the row-parallel inputs
    down = 64 * 128
    assert fp8_cast_bytes(data, 0, layout) == 4 * (dt + x_proj + out_proj + down)


def test_fused_grouped_mlp_drops_the_experts_activation_and_down_projection_cast() -> None:
    """Transformer Engine's fused grouped MLP applies the experts' SwiGLU in the up-projection's
    epilogue, which writes the down-projection's input already in fp8: the activation's pass (read
    2·d_ff, write d_ff per routed copy, 2 B each) and that cast (4 B per element) go, forward and
    backward; the GEMMs, the dispatched tokens' cast and every other pass stay."""
    plan, data, layout, routed = _mixtral_ep8()
    moe = plan.layers[0].ffn
    tokens, h = 4096, plan.d_model
    assert fp8_cast_bytes(data, 0, layout, fused_grouped_mlp=True) == 4 * (routed * h + tokens * h)
    b200 = accelerator("b200")
    eff = kernel_efficiency(b200)[0]
    unfused, fused = (Pricer(data, rates_for(b200, eff, None, "fp8", fused_grouped_mlp=f)).layers(layout, "flash")[0]
                      for f in (False, True))
    removed = 4 * routed * moe.expert.d_ff + tokens * moe.top_k * 2 * 3 * moe.expert.d_ff
    assert unfused.elem_fwd - fused.elem_fwd == pytest.approx(removed / (b200.hbm_bytes_per_s * eff.hbm))
    assert (fused.gemm_fwd, fused.gemm_bwd, fused.attn_fwd) == (unfused.gemm_fwd, unfused.gemm_bwd, unfused.attn_fwd)
    assert unfused.backward - fused.backward == pytest.approx(2 * (unfused.elem_fwd - fused.elem_fwd))


@pytest.mark.parametrize(("args", "said"), [
    (("--gpu", "h100", "--fp8-scaling", "mxfp8"), "compute capability 10"),
    (("--gpu", "b200", "--fp8-scaling", "mxfp8", "--states", "fsdp2"), "Megatron-style"),
    (("--gpu", "b200"), "give --fp8-scaling mxfp8"),
])
def test_cli_fp8_lm_head_where_it_cannot_run_is_one_line_exit_2(
        args: tuple[str, ...], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", *args, "--precision", "fp8",
                       "--fp8-lm-head")
    assert code == 2 and said in err and err.count("\n") == 1


@pytest.mark.parametrize(("args", "said"), [
    (("qwen3-30b-a3b", "--gpu", "h100"), "compute capability 10"),
    (("llama-3-8b", "--gpu", "b200"), "routes to no experts"),
    (("qwen3-30b-a3b", "--gpu", "b200", "--states", "fsdp2"), "Megatron-style"),
])
def test_cli_fused_grouped_mlp_where_it_cannot_run_is_one_line_exit_2(
        args: tuple[str, ...], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, monkeypatch, "plan", args[0], "--gpus", "8", *args[1:], "--precision", "fp8",
                       "--fp8-scaling", "mxfp8", "--fused-grouped-mlp")
    assert code == 2 and said in err and err.count("\n") == 1


def _plan_json_per_variant(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                           argv: list[str], variants: list[list[str]]) -> list[dict[str, Any]]:
    """`plan ... --json` once per variant of its last options, each required to exit 0."""
    found = []
    for extra in variants:
        code, out, _ = run(capsys, monkeypatch, "plan", *argv, "--json", *extra)
        assert code == 0
        found.append(json.loads(out))
    return found


def test_cli_fused_grouped_mlp_shortens_the_elementwise_time(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    unfused, fused = _plan_json_per_variant(
        capsys, monkeypatch,
        ["qwen3-30b-a3b", "--gpus", "8", "--gpu", "gb300", "--seq", "4096", "--global-batch-tokens", "2M",
         "--precision", "fp8", "--fp8-scaling", "mxfp8", "--layout",
         "tp=1,cp=1,pp=1,dp=8,ep=8,zero=1,recompute=none,mb=4,vpp=1"],
        [["--unfused-grouped-mlp"], ["--fused-grouped-mlp"]])
    assert (unfused["fused_grouped_mlp"], fused["fused_grouped_mlp"]) == (False, True)
    before, after = unfused["layouts"][0]["step_time"], fused["layouts"][0]["step_time"]
    assert after["elementwise"] < before["elementwise"] and after["gemm"] == before["gemm"]


@pytest.mark.parametrize(("args", "said"), [
    (("--fp8-scaling", "current"), "--fp8-scaling current says how a run uses fp8"),
    (("--precision", "fp8", "--fp8-scaling", "current", "--fp8-lm-head"), "give --fp8-scaling mxfp8"),
    (("--precision", "fp8", "--fp8-scaling", "current", "--fused-grouped-mlp"), "give --fp8-scaling mxfp8"),
    (("--precision", "fp8", "--fp8-scaling", "current", "--flash-impl", "cudnn", "--fp8-attention"),
     "give --fp8-scaling mxfp8"),
    (("--precision", "fp8", "--cudnn-norm"), "delayed scaling fuses the cast into the norm"),
    (("--cudnn-norm",), "--cudnn-norm says how a run uses fp8"),
    (("--gpu", "h100", "--precision", "fp8", "--fp8-scaling", "mxfp8"), "compute capability 10"),
])
def test_cli_fp8_recipe_where_it_cannot_run_is_one_line_exit_2(
        args: tuple[str, ...], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe other than delayed scaling needs fp8; the features that run only under an MXFP8 recipe
    need that recipe, and it needs a compute capability 10 GPU; cuDNN's norm changes nothing under
    delayed scaling."""
    code, _, err = run(capsys, monkeypatch, "plan", "qwen3-30b-a3b", "--gpus", "8", "--gpu", "gb300", *args)
    assert code == 2 and said in err and err.count("\n") == 1


def test_cli_current_scaling_lengthens_only_the_elementwise_time(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    delayed, current = _plan_json_per_variant(
        capsys, monkeypatch,
        ["llama-3-8b", "--gpus", "8", "--gpu", "h100", "--seq", "8192", "--global-batch-tokens", "1M",
         "--precision", "fp8", "--layout", "tp=2,cp=1,pp=1,dp=4,ep=1,zero=1,recompute=none,mb=1,vpp=1,sp=on"],
        [["--fp8-scaling", "delayed"], ["--fp8-scaling", "current"]])
    assert (delayed["fp8_scaling"], current["fp8_scaling"]) == ("delayed", "current")
    before, after = delayed["layouts"][0]["step_time"], current["layouts"][0]["step_time"]
    assert after["elementwise"] > before["elementwise"] and after["gemm"] == before["gemm"]
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--top", "1",
                       "--json")
    assert code == 0 and json.loads(out)["fp8_scaling"] is None  # bf16: no fp8 scales to find


def test_fp8_attention_runs_at_cudnns_measured_mxfp8_speed() -> None:
    """cuDNN's MXFP8 attention against its BF16 one, as cudnn-frontend measured it on GB300: at a
    measured length the ratio is the measurement's, between two it is interpolated in log2(length);
    the layout model's attention core takes exactly that ratio, forward and backward, and nothing
    else moves."""
    assert fp8_attention_speed("gb300", 128, 4096) == pytest.approx((2272 / 1703, 1143 / 1248))
    assert fp8_attention_speed("gb300", 192, 4096) == pytest.approx((2517 / 1590, 1522 / 1143))
    assert fp8_attention_speed("gb200", 128, 1024) == fp8_attention_speed("gb200", 128, 2048)
    between = fp8_attention_speed("gb300", 128, 5793)  # 2^12.5
    assert between[0] == pytest.approx((2272 / 1703 + 2570 / 1856) / 2, rel=1e-3)
    gb300 = accelerator("gb300")
    eff = kernel_efficiency(gb300)[0]
    data = model_data(_plan("deepseek-v3"), 4096)
    layout = parse_layout("tp=1,cp=1,pp=2,dp=128,ep=32,zero=1,recompute=none,mb=1,sp=off").complete()
    assert layout is not None
    bf16, fp8 = (Pricer(data, rates_for(gb300, eff, None, "fp8", "cudnn", fp8_attention=f)).layers(layout, "flash")[0]
                 for f in (False, True))
    forward, backward = fp8_attention_speed("gb300", 192, 4096)
    assert bf16.attn_fwd / fp8.attn_fwd == pytest.approx(forward)
    assert bf16.attn_bwd / fp8.attn_bwd == pytest.approx(backward)
    assert (fp8.gemm_fwd, fp8.gemm_bwd, fp8.elem_fwd) == (bf16.gemm_fwd, bf16.gemm_bwd, bf16.elem_fwd)


def test_fp8_lm_head_runs_the_head_gemm_at_the_fp8_rate_and_pays_its_input_cast() -> None:
    """Megatron-Core's MXFP8 output projection: the LM head's GEMM at the fp8 rate, forward and
    backward, and its input (the final norm's output, which a plain Transformer Engine linear
    quantizes itself) cast to MXFP8 in a pass of its own, 4 B per element and a 1-byte scale per 32
    elements of each of its two copies; the loss is unchanged."""
    gb200 = accelerator("gb200")
    eff = kernel_efficiency(gb200)[0]
    plan = _plan("deepseek-v3")
    data = model_data(plan, 4096)
    layout = parse_layout("tp=1,cp=1,pp=4,dp=64,ep=64,zero=1,recompute=none,mb=1,sp=off").complete()
    assert layout is not None
    bf16, fp8 = (_head_micro(data, layout, rates_for(gb200, eff, None, "fp8", "cudnn", fp8_lm_head=f), "fp32-fused")
                 for f in (False, True))
    rates = rates_for(gb200, eff, None, "fp8", "cudnn")
    assert bf16.gemm_fwd == gemm_time(4096, plan.vocab_size, plan.d_model, rates)
    assert fp8.gemm_fwd == gemm_time(4096, plan.vocab_size, plan.d_model, rates, fp8=True) < 0.6 * bf16.gemm_fwd
    assert fp8.gemm_bwd == 2 * fp8.gemm_fwd
    cast = (4 + 2 / 32) * 4096 * plan.d_model / (gb200.hbm_bytes_per_s * eff.hbm)
    assert fp8.elem_fwd - bf16.elem_fwd == pytest.approx(cast)


@pytest.mark.parametrize(("args", "said"), [
    (("--gpu", "b200", "--flash-impl", "cudnn"), "no measured fp8 attention rate"),
    (("--gpu", "gb200"), "--flash-impl cudnn"),
])
def test_cli_fp8_attention_where_it_is_not_priced_is_one_line_exit_2(
        args: tuple[str, ...], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", *args, "--precision", "fp8",
                       "--fp8-scaling", "mxfp8", "--fp8-attention")
    assert code == 2 and said in err and err.count("\n") == 1


def test_overlapped_tp_communication_costs_the_gemms_beside_it_16_sms() -> None:
    # Transformer Engine's userbuffers defaults: the row-parallel forwards ("pipeline") and the
    # column-parallel dgrad + wgrad ("bulk") run on 132 - 16 SMs of an H100; ring exchange is free
    data = model_data(_plan("llama-3-70b"), 8192)
    layout = parse_layout("tp=8,cp=1,pp=1,dp=8,ep=1,zero=1,recompute=none,mb=1,sp=on").complete()
    assert layout is not None
    rates = rates_for(H100, kernel_efficiency(H100)[0], None, "bf16")
    layer = data.plan.layers[0]
    by_split = {"row": 0.0, "column": 0.0}
    for t in data.layer_tensors[0]:
        if t.split in by_split:
            by_split[t.split] += tensor_gemm(data, layer, t, layout, rates)[0]  # forward
    micro = Pricer(data, rates).layers(layout, "flash")[0]
    expected = (by_split["row"] + 2 * by_split["column"]) * 16 / (132 - 16)
    assert tp_overlap_cost(micro, layout, rates) == pytest.approx(expected)
    assert tp_overlap_cost(micro, replace(layout, tp=1), rates) == 0.0
    text = "tp=8,cp=1,pp=1,dp=8,ep=1,zero=1,recompute=none,mb=1,sp=on"
    hidden = _evaluate("llama-3-70b", text, seq=8192, overlap=frozenset({"dp", "tp"}))
    exposed = _evaluate("llama-3-70b", text, seq=8192, overlap=frozenset({"dp"}))
    assert 0 < hidden.time.tp < exposed.time.tp


def test_fp8_backward_gemms_pay_the_split_accumulator() -> None:
    # Transformer Engine: fast accumulation in the forward's fp8 GEMMs, the split accumulator in
    # dgrad and wgrad (Hopper: 1.15x); bf16 and Blackwell-like families (1.0) unchanged
    data = model_data(_plan("llama-3-8b"), 4096)
    layout = parse_layout("tp=1,cp=1,pp=1,dp=8,ep=1,zero=1,recompute=none,mb=1,sp=off").complete()
    assert layout is not None
    eff = kernel_efficiency(H100)[0]
    assert eff.fp8_split_acc == 1.15
    fp8 = Pricer(data, rates_for(H100, eff, None, "fp8")).layers(layout, "flash")[0]
    bf16 = Pricer(data, rates_for(H100, eff, None, "bf16")).layers(layout, "flash")[0]
    assert fp8.gemm_bwd == pytest.approx(2 * 1.15 * fp8.gemm_fwd)
    assert bf16.gemm_bwd == pytest.approx(2 * bf16.gemm_fwd)
    flat = Pricer(data, rates_for(H100, replace(eff, fp8_split_acc=1.0), None, "fp8")).layers(layout, "flash")[0]
    assert flat.gemm_bwd == pytest.approx(2 * flat.gemm_fwd)


def test_routed_copies_are_priced_over_the_tokens_a_rank_routes() -> None:
    """Under SP each tp rank routes its own sequence shard to whole experts, so the permutation's
    passes and the experts' activation run over mb·T/tp tokens' k copies, as the all-to-all and the
    expert GEMMs already counted; without SP every rank routes every token. Mixtral (top-2, d_ff
    14,336, d_model 4,096) at 4,096 tokens: 2·4,096·2·(2·3·14,336 + 4·2·4,096) bytes at tp 1. The
    router scores the same rows."""
    from archplan.planning.pricing import _gemm_shape, routed_copy_bytes

    data = model_data(_plan("mixtral-8x7b"), 4096)
    moe = data.plan.layers[0].ffn
    one = routed_copy_bytes(data, moe, parse_layout("tp=1,cp=1,pp=1,dp=8,ep=8,zero=1,recompute=none,mb=2").complete(),
                            False)
    assert one == 2 * 4096 * 2 * (2 * 3 * 14336 + 4 * 2 * 4096)
    for sp, share in (("on", 2), ("off", 1)):
        layout = parse_layout(f"tp=2,cp=1,pp=1,dp=4,ep=8,zero=1,recompute=none,mb=2,sp={sp}").complete()
        assert routed_copy_bytes(data, moe, layout, False) == one / share
        [router] = [t for t in data.layer_tensors[0] if t.name.endswith("router.weight")]
        assert _gemm_shape(data, data.plan.layers[0], router, layout)[0] == 2 * 4096 // share
    fused = routed_copy_bytes(data, moe, parse_layout("tp=1,cp=1,pp=1,dp=8,ep=8,zero=1,recompute=none,mb=2").complete(),
                              True)
    assert fused == 2 * 4096 * 2 * 4 * 2 * 4096  # the activation in the GEMMs' epilogues


def test_torchs_mla_expands_every_key_under_all_gather_cp() -> None:
    """Under `--states fsdp2` with the all-gather CP each rank expands the whole sequence's keys
    from the gathered latent (`modules.mla`): kv_b_proj's GEMM runs over mb·T tokens, not T/cp."""
    from archplan.planning.pricing import _gemm_shape

    data = model_data(_plan("deepseek-v3"), 4096)
    layer = data.plan.layers[0]
    [kv_b] = [t for t in data.layer_tensors[0] if t.name.endswith("mixer.kv_b_proj.weight")]
    layout = parse_layout("tp=8,cp=2,pp=8,dp=4,ep=64,zero=1,recompute=full,mb=1").complete()
    assert _gemm_shape(data, layer, kv_b, layout)[0] == 4096 // 2
    assert _gemm_shape(data, layer, kv_b, layout, mla_keys_whole=True)[0] == 4096
    settings = {"fsdp2": Settings(states=cluster.STATES["fsdp2"]), "megatron": Settings(),
                "ring": Settings(states=cluster.STATES["fsdp2"], cp_comm="ring")}
    whole = {key: Evaluator(data.plan, H100, NET, 4096, value, 72 * 2**30).pricer.rates.mla_keys_whole
             for key, value in settings.items()}
    assert whole == {"fsdp2": True, "megatron": False, "ring": False}


@pytest.mark.parametrize(("name", "skipped"), [
    ("llama-3-8b", "layers.0.ffn.down_proj.weight"),  # the block ends in the FFN's down-projection
    ("mamba-2.8b", "layers.0.mixer.out_proj.weight"),  # no FFN: the mixer's output projection
    ("mixtral-8x7b", None),  # a routed-only MoE layer ends in the combine, whose inputs are saved
])
def test_early_stopping_recompute_skips_the_last_gemm(name: str, skipped: str | None) -> None:
    """PyTorch's non-reentrant checkpoint stops re-running a block once every tensor its backward
    saved is rebuilt: the block's last GEMM is not re-run when nothing after it is saved (the same
    rule that drops that GEMM's TP reduction from the recompute's collectives)."""
    data = model_data(_plan(name), 4096)
    layout = parse_layout("tp=2,cp=1,pp=1,dp=4,ep=1,zero=1,recompute=full,mb=1,sp=off").complete()
    assert layout is not None
    rates = rates_for(H100, kernel_efficiency(H100)[0], None, "bf16")
    whole = Pricer(data, rates).layers(layout, "flash")[0]
    early = Pricer(data, rates, early_stop=True).layers(layout, "flash")[0]
    assert whole.recompute == pytest.approx(whole.forward)
    layer = data.plan.layers[0]
    last = 0.0
    if skipped is not None:
        [tensor] = [t for t in data.layer_tensors[0] if t.name == skipped]
        last = tensor_gemm(data, layer, tensor, layout, rates)[0]
        assert last > 0
    assert early.recompute == pytest.approx(whole.forward - last)
    tp_outputs = {early_stop: sum(r.count for r in step_collectives(data.plan, layout, 4096, microbatches=1,
                                                                    early_stop=early_stop)
                                  if r.mesh_dim == "tp" and "TP outputs" in r.what)
                  for early_stop in (False, True)}
    assert tp_outputs[False] - tp_outputs[True] == (len(data.plan.layers) if skipped else 0)


def test_early_stop_follows_the_states_unless_given() -> None:
    assert Settings(states=FSDP2).stops_early and not Settings().stops_early
    assert not Settings(states=FSDP2, early_stop=False).stops_early
    assert Settings(early_stop=True).stops_early


def test_pp_overlap_hides_the_interleaved_steady_state_transfers() -> None:
    # Megatron-LM's overlap_p2p_comm: only the interleaved schedule overlaps; its warm-up and flush
    # transfers block
    text = "tp=8,cp=1,pp=4,dp=4,ep=1,zero=1,recompute=none,mb=1,sp=on,vpp="
    kw: dict[str, Any] = {"seq": 8192, "batch": 64 * 8192}
    plain = _evaluate("llama-3-70b", text + "2", overlap=frozenset({"dp"}), **kw)
    hidden = _evaluate("llama-3-70b", text + "2", overlap=frozenset({"dp", "pp"}), **kw)
    assert 0 < hidden.time.pp_p2p < plain.time.pp_p2p
    one = _evaluate("llama-3-70b", text + "1", overlap=frozenset({"dp"}), **kw)
    assert _evaluate("llama-3-70b", text + "1", overlap=frozenset({"dp", "pp"}), **kw).time.pp_p2p == one.time.pp_p2p


def test_efficiency_override_prices_big_gemms_at_that_fraction() -> None:
    eff, _ = kernel_efficiency(H100)
    rates = Rates(H100.peak("bf16"), H100.peak("fp8"), eff, 0.5, H100.hbm_bytes_per_s, "bf16")
    n = 8192
    assert gemm_time(n, n, n, rates) == pytest.approx(2 * n**3 / (0.5 * H100.peak("bf16")))
    model = replace(rates, efficiency=None)
    # a skinny GEMM runs at a lower efficiency, or HBM-bound
    assert gemm_time(n, 64, n, model) / (2 * n * 64 * n) > gemm_time(n, n, n, model) / (2 * n**3)


def test_recompute_costs_a_forward() -> None:
    text = "tp=8,cp=1,pp=1,dp=16,ep=1,zero=1,mb=1,recompute="
    none, full = _evaluate("llama-3-70b", text + "none"), _evaluate("llama-3-70b", text + "full")
    assert full.time.recompute == pytest.approx(none.time.compute / 3, rel=0.1)
    assert full.memory.activations < none.memory.activations / 5


def test_calibration_constants_are_per_family() -> None:
    assert set(KERNEL_EFFICIENCY) == {"ampere", "hopper"}
    assert kernel_efficiency(accelerator("a100"))[0] is KERNEL_EFFICIENCY["ampere"]
    for key in ("h100", "h800", "h200"):
        assert kernel_efficiency(accelerator(key)) == (KERNEL_EFFICIENCY["hopper"], True)
    assert not kernel_efficiency(accelerator("b200"))[1]


# ------------------------------------------------------------------------------------------ CLI
LLAMA_405B = ["plan", "llama-3.1-405b", "--gpus", "16384", "--gpu", "h100", "--seq", "8192",
              "--global-batch-tokens", "16M"]


def test_cli_layout_evaluates_exactly_one(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, monkeypatch, *LLAMA_405B, "--layout",
                       "tp=8,cp=1,pp=16,vpp=4,dp=128,ep=1,zero=1,recompute=none,mb=1", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["considered"] == 1 and len(r["layouts"]) == 1
    row = r["layouts"][0]
    assert (row["tp"], row["pp"], row["vpp"], row["dp"]) == (8, 16, 4, 128)
    assert row["memory"]["fits"] and row["tokens_per_s_per_gpu"] > 0 and 0 < row["mfu"] < 1
    assert row["step_time"]["bubble"] > 0 and row["microbatches"] == 15
    assert r["efficiency"]["override"] is None and r["states"]["bytes_per_param"] == 18


def test_cli_layout_that_does_not_fit_exits_1_with_its_breakdown(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    layout = ["--layout", "tp=8,cp=1,pp=16,vpp=4,dp=128,ep=1,zero=0,recompute=none,mb=4"]
    code, out, _ = run(capsys, monkeypatch, *LLAMA_405B, *layout)
    assert code == 1 and "does not fit" in out
    code, out, _ = run(capsys, monkeypatch, *LLAMA_405B, *layout, "--json")
    row = json.loads(out)["layouts"][0]
    assert code == 1 and not row["memory"]["fits"]
    assert row["memory"]["total"] == sum(row["memory"][k] for k in (
        "parameters", "gradients", "optimizer", "activations", "temporary", "collective_buffers"))
    assert row["memory"]["total"] > row["memory"]["usable"]


@pytest.mark.parametrize("text,message", [
    ("tp=16,cp=1,pp=8,dp=128,ep=1,zero=1,recompute=none,mb=1", "node"),
    ("tp=8,cp=1,pp=16,dp=64,ep=1,zero=1,recompute=none,mb=1", "--gpus"),
    ("tp=8,cp=1,pp=16,dp=128,ep=2,zero=1,recompute=none,mb=1", "routed experts"),
    ("tp=8,pp=3", "divide"),
    ("tp=8,warp=2", "unknown field"),
    # ASCII digits only: int() reads `1_6` as 16 and other scripts' digits as theirs
    ("tp=8,pp=1_6", "pp=1_6 is not an integer"),
    ("tp=\u0668", "is not an integer"),
])
def test_cli_impossible_layout_is_one_line_exit_2(text: str, message: str,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, monkeypatch, *LLAMA_405B, "--layout", text)
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_partial_layout_searches_the_rest(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "64", "--seq", "4096",
                       "--layout", "tp=2,recompute=full", "--efficiency", "0.5", "--json")
    assert code == 0
    r = json.loads(out)
    assert all(row["tp"] == 2 and row["recompute"] == "full" for row in r["layouts"])
    assert r["efficiency"]["override"] == 0.5 and "--efficiency 0.5" in r["efficiency"]["description"]
    # the override sets the GEMM and attention rates only: the text names the HBM share still applied
    assert "elementwise and optimizer at 80% of HBM bandwidth" in r["efficiency"]["description"]
    assert r["efficiency"]["flash_fractions"] == []  # the user's rate has no length law
    assert r["accuracy"] is None  # the user's rates were not the ones validated
    assert all(row["training_days_range"] is None for row in r["layouts"])


def test_cli_recompute_early_stop(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The states' engine decides (fsdp2: PyTorch's non-reentrant checkpoint stops early), and the
    flag overrides it either way; the output says which recompute was priced."""
    args = ("plan", "llama-3-8b", "--gpus", "8", "--gpu", "a100-80gb", "--layout", "recompute=full")
    recompute = {}
    for extra, stops in (((), False), (("--states", "fsdp2"), True),
                         (("--states", "fsdp2", "--no-recompute-early-stop"), False),
                         (("--recompute-early-stop",), True)):
        code, out, _ = run(capsys, monkeypatch, *args, *extra, "--json")
        r = json.loads(out)
        assert code == 0 and r["recompute_early_stop"] is stops
        recompute[extra] = r["layouts"][0]["step_time"]["recompute"]
        code, out, _ = run(capsys, monkeypatch, *args, *extra)
        text = " ".join(out.split())
        assert ("full recompute stops early (non-reentrant checkpoint)" in text) is stops
        assert ("full recompute re-runs the whole block" in text) is not stops
    fsdp2 = ("--states", "fsdp2")
    assert recompute[fsdp2] < recompute[(*fsdp2, "--no-recompute-early-stop")]


def test_cli_states_the_held_out_accuracy(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside the calibrated model's figures, how close its GPU family's constants came on runs
    they were not calibrated on (archplan/planning/accuracy.py; tests/test_mosaicml_benchmarks.py
    keeps the figures current): the runs of the family on the engine the states run on where there
    are enough of them, else the family's; a GPU outside every family gets the uncalibrated runs';
    a model with routed experts the MoE runs', whatever the GPU (its own where one of its family ran)."""
    from archplan.planning.accuracy import HELD_OUT, HELD_OUT_BY_ENGINE, HELD_OUT_MOE, UNCALIBRATED

    for model, gpu, states, a, same in (
            ("llama-3-8b", "h100", "megatron", HELD_OUT_BY_ENGINE["hopper", "megatron"], True),
            ("llama-3-8b", "h100", "fsdp2", HELD_OUT_BY_ENGINE["hopper", "torch"], True),
            ("llama-3-8b", "h100", "deepspeed", HELD_OUT_BY_ENGINE["hopper", "megatron"], True),
            ("llama-3-8b", "h200", "zero", HELD_OUT_BY_ENGINE["hopper", "megatron"], True),
            ("llama-3-8b", "a100", "megatron", HELD_OUT_BY_ENGINE["ampere", "megatron"], True),
            ("llama-3-8b", "a100", "fsdp2", HELD_OUT_BY_ENGINE["ampere", "torch"], True),
            ("llama-3-8b", "a100-pcie", "megatron", HELD_OUT_BY_ENGINE["ampere", "megatron"], True),
            # the B200 and GB200 runs are all Megatron-style: the family's under PyTorch's engine
            ("llama-3-8b", "b200", "fsdp2", HELD_OUT[UNCALIBRATED], True),
            ("llama-3-8b", "gb200", "megatron", HELD_OUT_BY_ENGINE[UNCALIBRATED, "megatron"], True),
            ("llama-3-8b", "mi300x", "megatron", HELD_OUT_BY_ENGINE[UNCALIBRATED, "megatron"], False),
            ("mixtral-8x7b", "h200", "megatron", HELD_OUT_MOE, True),
            ("mixtral-8x7b", "a100", "megatron", HELD_OUT_MOE, False)):
        gpus = "32" if model == "mixtral-8x7b" else "8"  # Mixtral's 47 B parameters fit on 32 A100s
        args = ("plan", model, "--gpus", gpus, "--seq", "4096", "--gpu", gpu, "--states", states)
        code, out, _ = run(capsys, monkeypatch, *args, "--json")
        r = json.loads(out)
        assert code == 0 and r["accuracy"] == {**a.as_dict(), "gpu_in_runs": same, "mixers_in_runs": True}
        best = r["layouts"][0]
        # the duration the held-out runs bracket: measured time = predicted × (1 + error)
        days = best["training_days"]
        assert best["training_days_range"] == ([days * (1 + a.low), days * (1 + a.high)] if same else None)
        code, out, _ = run(capsys, monkeypatch, *args)
        text = " ".join(out.split())
        stacks = ((" of MoE models" if a.moe else "")
                  + {None: "", "megatron": " on Megatron-style stacks", "torch": " on PyTorch FSDP stacks"}[a.engine])
        spread = (f"held-out spread: nine in ten of the {a.runs} held-out {a.gpus} runs{stacks} took "
                  f"{1 + a.low:.2f}× to {1 + a.high:.2f}× the time predicted for them; for layout 1, "
                  f"{days * (1 + a.low):.1f} d to {days * (1 + a.high):.1f} d ({days:.1f} d predicted)")
        assert (spread in text) is same
        # H200's figures are H100 runs and the PCIe card's the SXM module's, its family's: the
        # line says none ran on it
        none_on = {"h200": " (none on the H200)", "a100-pcie": " (none on the A100 PCIe)"}.get(gpu, "")
        assert code == 0 and f"on {a.runs} published {a.gpus} runs{stacks}{none_on} held out from calibration" in text
        assert f"±{a.median:.1%}" in text and f"±{a.p90:.1%} for nine in ten" in text
        # a GPU no run of its family judged is told so
        missing = f"no published run{' of an MoE model' if a.moe else ''} on the {accelerator(gpu).name} was held out"
        assert (missing in text) is not same
        # the efficiency line's bracketed tag survives rich's markup
        assert ("[not calibrated on this GPU]" in text) is (gpu in ("b200", "gb200", "mi300x"))
        # and, where the one-tool matmul table measured it, at what rate its GEMMs are priced
        measured = gpu in ("b200", "gb200", "mi300x")
        assert ("its GEMMs' at" in text) is measured
        assert not measured or f"its GEMMs' at {matmul_ratio(accelerator(gpu)):.3f}× Hopper's" in text



def test_cli_says_no_held_out_run_had_the_models_mixers(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every held-out run is of a transformer, so for a model with Mamba, S4 or Hyena mixers their
    figures are only the nearest check: the accuracy line says so, `--json` carries
    `mixers_in_runs: false`, and no duration range is put on the transformer runs' spread."""
    from archplan.planning.accuracy import HELD_OUT_BY_ENGINE, HELD_OUT_MOE

    for model, gpu, kind, a, where in (
            ("mamba-2.8b", "h100", "Mamba", HELD_OUT_BY_ENGINE["hopper", "megatron"], ""),
            ("s4d-lm", "h100", "S4D", HELD_OUT_BY_ENGINE["hopper", "megatron"], ""),
            ("stripedhyena-7b", "h100", "StripedHyena", HELD_OUT_BY_ENGINE["hopper", "megatron"], ""),
            ("jamba-v0.1", "h100", "Mamba", HELD_OUT_MOE, ""),
            ("hybrid-ssm-moe", "a100", "Mamba-2", HELD_OUT_MOE, " on the NVIDIA A100 SXM 80GB")):
        args = ("plan", model, "--gpus", "64", "--seq", "2048", "--gpu", gpu)
        code, out, _ = run(capsys, monkeypatch, *args, "--json")
        r = json.loads(out)
        assert code == 0 and r["accuracy"] == {**a.as_dict(), "gpu_in_runs": not where, "mixers_in_runs": False}
        assert r["layouts"][0]["training_days_range"] is None
        code, out, _ = run(capsys, monkeypatch, *args)
        text = " ".join(out.split())
        others = ("MoE " if a.moe else "") + "transformer runs" + (" on other GPUs" if where else "")
        assert code == 0 and (f"accuracy: no published run of a model with {kind} mixers{where} was held out; "
                              f"the nearest check is the {others}, on {a.runs} published {a.gpus} runs") in text
        assert "held-out spread" not in text


def test_cli_header_and_notes_say_what_was_priced(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager attention is priced as GEMMs and a softmax, not at the FlashAttention rates the header
    quoted; under --efficiency an uncalibrated GPU's matmul ratio is not applied, so neither line
    claims it; with no layout that fits, the notes that need none print as --json carries them;
    cuDNN's attention is refused on every GPU before Hopper (Ada's L4 too), not A100 alone."""
    monkeypatch.setenv("COLUMNS", "400")
    layout = ("--layout", "tp=1,cp=1,pp=1,dp=8,zero=1,recompute=none,mb=1")
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--seq", "2048",
                       "--attention", "eager", "--layout", "tp=1,cp=1,pp=1,dp=8,zero=3,recompute=full,mb=1")
    text = " ".join(out.split())
    assert code == 0 and "attention as batched GEMMs over the full square" in text and "TFLOP/s fwd/bwd" not in text
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "mi300x", "--seq", "4096",
                       "--efficiency", "0.5", *layout)
    text = " ".join(out.split())
    assert code == 0 and "0.637" not in text and "GEMMs and attention run at the --efficiency given" in text
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "mi300x", "--seq", "4096",
                       "--efficiency", "0.5", *layout, "--json")
    assert code == 0 and json.loads(out)["efficiency"]["family"] == "uncalibrated (AMD Instinct MI300X 192GB, Hopper fractions)"
    # the user's rate replaces the attention's, fp8 attention's speed-up included
    fp8 = ("plan", "llama-3-8b", "--gpus", "8", "--gpu", "gb300", "--seq", "8192", "--precision", "fp8",
           "--fp8-scaling", "mxfp8", "--flash-impl", "cudnn", "--efficiency", "0.5", "--layout",
           "tp=1,cp=1,pp=1,dp=8,ep=1,zero=3,recompute=full,mb=1", "--json")
    attention = []
    for flag in ("--fp8-attention", "--bf16-attention"):
        code, out, _ = run(capsys, monkeypatch, *fp8, flag)
        attention.append(json.loads(out)["layouts"][0]["step_time"]["attention"])
    assert code == 0 and attention[0] == attention[1]
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3.1-405b", "--gpus", "12", "--gpu", "b200", "--seq", "8192")
    text = " ".join(out.split())
    code_json, out_json, _ = run(capsys, monkeypatch, "plan", "llama-3.1-405b", "--gpus", "12", "--gpu", "b200",
                                 "--seq", "8192", "--json")
    notes = json.loads(out_json)["notes"]
    assert code == code_json == 1 and len(notes) == 2 and all(" ".join(n.split()) in text for n in notes)
    # cuDNN's attention before Hopper: H100's measured speed-up priced A100's attention at 98% of its
    # peak, and Transformer Engine runs FlashAttention there; refused, where a note once said so
    for gpu, share in (("l4", "54%"), ("a100", "98%")):
        code, _, err = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", gpu, "--seq", "4096",
                           "--flash-impl", "cudnn", *layout)
        assert code == 2 and f"would price attention at {share} of the bf16 peak; use --flash-impl fa2" in err, gpu
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--seq", "4096",
                       "--flash-impl", "cudnn", *layout, "--json")
    assert not any("cudnn" in n for n in json.loads(out)["notes"])


STATES_ARGS = ("plan", "llama-3-8b", "--gpus", "8", "--seq", "4096", "--layout",
               "tp=1,pp=1,dp=8,cp=1,ep=1,zero=1,recompute=full,mb=1", "--json")


def _with_and_without(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                      *option: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`plan --json` of one Llama 3 8B layout as it is and with `option`."""
    _, plain, _ = run(capsys, monkeypatch, *STATES_ARGS)
    _, given, _ = run(capsys, monkeypatch, *STATES_ARGS, *option)
    return json.loads(plain), json.loads(given)


def test_megatron_main_grads_take_the_reduction_dtype(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Megatron-Core's gradient buffer is fp32 only when it reduces in fp32 (`grad_dtype =
    torch.float if ddp_config.grad_reduce_in_fp32 else param.dtype`): `--grad-reduce bf16` under
    `--states megatron` keeps bf16 main grads, 16 B/param, and halves the gradient memory; the
    other conventions keep their own gradient bytes whatever the wire carries."""
    from archplan.planning.parallel import Settings

    assert Settings(states=MEGATRON, grad_reduce=2).states.bytes_per_param == 16
    assert Settings(states=MEGATRON, grad_reduce=4).states is MEGATRON
    assert Settings(states=MEGATRON).states is MEGATRON
    assert Settings(states=ZERO, grad_reduce=4).states is ZERO
    assert Settings(states=FSDP2, grad_reduce=2).states is FSDP2
    a, b = _with_and_without(capsys, monkeypatch, "--grad-reduce", "bf16")
    assert (a["states"]["bytes_per_param"], b["states"]["bytes_per_param"]) == (18, 16)
    assert "bf16 main grads" in b["states"]["description"]
    assert a["layouts"][0]["memory"]["gradients"] == 2 * b["layouts"][0]["memory"]["gradients"]
    assert a["layouts"][0]["memory"]["optimizer"] == b["layouts"][0]["memory"]["optimizer"]


def test_narrower_optimizer_states(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`--optimizer-moments bf16` keeps Adam's m and v in bf16: under `--states megatron` with the
    fp32 master and main grads, DeepSeek-V3's §3.3.1 states to the byte, 2 + 4 + 4 + 2 + 2 = 14
    B/param; under ZeRO's, 12. `--master-weights remainders` keeps the fp32 master as the 16 bits
    the bf16 weight lacks (Megatron-Core's `store_param_remainders`), 2 B less; with both and bf16
    main grads, Megatron-Bridge's tuned DeepSeek recipes, 10 B/param. The optimizer shard's memory
    and the Adam step's bytes shrink with them; the conventions whose optimizer has no such state
    refuse them."""
    bf16 = Settings(states=MEGATRON, moments=2).states
    assert (bf16.master_bytes, bf16.moment_bytes, bf16.bytes_per_param) == (4, 2, 14)
    remainders = Settings(states=MEGATRON, master_remainders=True).states
    assert (remainders.master_bytes, remainders.bytes_per_param) == (2, 16)
    both = Settings(states=MEGATRON, grad_reduce=2, moments=2, master_remainders=True).states
    assert both.bytes_per_param == 10
    # the step reads and writes m and v (each 4 B a state narrower), the master (4 B narrower as
    # remainders), and the remainders read the bf16 weight they complete (2 B)
    assert (MEGATRON.step_bytes, bf16.step_bytes, remainders.step_bytes, both.step_bytes) == (30, 22, 28, 20)
    zero = Settings(states=ZERO, moments=2).states
    assert (zero.master_bytes, zero.bytes_per_param, zero.step_bytes) == (4, 12, 22)
    assert Settings(states=ZERO, moments=4).states is ZERO
    for states in (FSDP2, DEEPSPEED):
        with pytest.raises(ArchplanError, match="keeps Adam's moments in fp32"):
            Settings(states=states, moments=2)
    for states in (ZERO, FSDP2, DEEPSPEED):
        with pytest.raises(ArchplanError, match="store_param_remainders"):
            Settings(states=states, master_remainders=True)
    with pytest.raises(ArchplanError, match="2 \\(bf16\\) or 4 \\(fp32\\)"):
        Settings(states=ZERO, moments=1)
    a, b = _with_and_without(capsys, monkeypatch, "--optimizer-moments", "bf16", "--master-weights", "remainders")
    assert (a["states"]["optimizer_moment_bytes"], b["states"]["optimizer_moment_bytes"]) == (4, 2)
    assert (a["states"]["master_bytes"], b["states"]["master_bytes"]) == (4, 2)
    assert b["states"]["bytes_per_param"] == 12
    assert "fp32 master as 16-bit remainders + bf16 m, v" in b["states"]["description"]
    assert a["layouts"][0]["memory"]["optimizer"] == 2 * b["layouts"][0]["memory"]["optimizer"]
    assert a["layouts"][0]["memory"]["gradients"] == b["layouts"][0]["memory"]["gradients"]
    assert b["layouts"][0]["step_time"]["optimizer"] == pytest.approx(
        a["layouts"][0]["step_time"]["optimizer"] * 20 / 30)
    code, _, err = run(capsys, monkeypatch, *STATES_ARGS, "--optimizer-moments", "bf16", "--states", "fsdp2")
    assert code == 2 and "not a choice under --states fsdp2" in err


@pytest.mark.parametrize("mode", [["llama-3-8b", "--gpus", "8"], ["--compute", "1e24"],
                                  ["--solve", "partial.yaml", "--total", "1e9"]], ids=["layout", "budget", "solve"])
def test_cli_mfu_is_renamed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                            mode: list[str]) -> None:
    """In every mode: the budget and solve modes once called the retired option foreign instead."""
    code, _, err = run(capsys, monkeypatch, "plan", *mode, "--mfu", "0.4")
    assert code == 2 and "plan's --mfu is now --efficiency" in err


def test_cli_overlap_and_states_options(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "16", "--seq", "4096",
                       "--states", "fsdp2", "--overlap", "none", "--grad-reduce", "bf16",
                       "--attention", "eager", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["overlap"] == [] and r["grad_reduce_bytes"] == 2 and r["attention_kernel"] == "eager"
    assert r["states"]["convention"] == "fsdp2"
    code, _, err = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "16", "--overlap", "nccl")
    assert code == 2 and "--overlap" in err


def test_plan_layout_mode_does_not_import_torch() -> None:
    probe = (
        "import sys\nfrom archplan.cli import main\n"
        "sys.argv = ['archplan', 'plan', 'llama-3-8b', '--gpus', '64', '--layout', 'tp=8', '--json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layouts"]


def test_fixed_ep_skips_splits_it_does_not_divide(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "plan", "mixtral-8x7b", "--gpus", "64", "--seq", "4096",
                       "--layout", "ep=8,tp=2", "--json")
    assert code == 0
    assert all(row["ep"] == 8 and (row["dp"] * row["cp"]) % 8 == 0 for row in json.loads(out)["layouts"])


def test_fp8_needs_a_gpu_with_fp8(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "a100",
                       "--precision", "fp8")
    assert code == 2 and "fp8" in err and err.count("\n") == 1


def test_zero3_over_many_ranks_carries_the_validation_note(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "512", "--seq", "4096",
                       "--layout", "tp=1,pp=1,cp=1,zero=3", "--json")
    assert code == 0
    notes = json.loads(out)["notes"]
    assert "ZeRO-3" in notes[0] and "Table 2" in notes[0]
    # 512 ranks with 8 on each node, one 4,096-token sequence each: the network's range too
    assert len(notes) == 2 and "8 NICs" in notes[1]
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--seq", "4096", "--json")
    assert json.loads(out)["notes"] == []


@pytest.mark.parametrize("layout,nics", [
    (Layout(dp=64), 8), (Layout(tp=2, dp=32), 4), (Layout(tp=2, cp=2, dp=16), 4),
    (Layout(tp=8, dp=8), 1), (Layout(dp=8), 1), (Layout(tp=2, dp=4, pp=8), 1), (Layout(dp=2, tp=2, pp=16), 1),
])
def test_rails_are_the_ring_members_on_one_node(layout: Layout, nics: int) -> None:
    """The gradient ring's members on a node: over dp·cp when cp > 1 (Megatron reduces over the
    data × context group), so TP2 CP2 DP16 has 4 on each node."""
    assert rails(layout, 8) == nics


@pytest.mark.parametrize("mesh,layout,members", [
    ("dp", Layout(tp=2, cp=2, dp=16), 2), ("dp_cp", Layout(tp=2, cp=2, dp=16), 4),
    ("cp", Layout(tp=4, cp=4, dp=4), 2), ("expert_dp", Layout(dp=64, ep=8), 1),
    ("expert_dp", Layout(dp=64, ep=2), 4), ("expert_dp", Layout(tp=2, dp=32, ep=2), 4),
    ("tp", Layout(tp=8, dp=8), 1), ("pp", Layout(pp=8, dp=8), 1), ("ep", Layout(dp=64, ep=64), 1),
])
def test_members_per_node_follow_the_rank_order(mesh: MeshDim, layout: Layout, members: int) -> None:
    """Ranks ordered tp, cp, dp, pp (EP groups ep consecutive ranks of a stage): how many of one
    group share a node of 8; the experts' replicas are the ranks ep apart."""
    assert members_per_node(mesh, layout, 8) == members


def test_a_group_that_straddles_two_nodes_crosses_between_them(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups were judged by their size alone, as if each started at a node's first GPU: EP16 on
    144 GB200 (two racks of 72) put ranks 64-79 half in each rack and priced their all-to-all on
    NVLink (1.95 s of a 10.7 s step, ranked first); 9 H100 in DP9 drove 8 NICs from a node of 1."""
    from archplan.planning.pricing import nodes_touched

    straddled = Layout(dp=144, ep=16)
    assert spans_nodes("ep", straddled, 72) and nodes_touched("ep", straddled, 72) == 2
    assert not spans_nodes("ep", Layout(dp=144, ep=8), 72) and not spans_nodes("ep", Layout(dp=128, ep=16), 64)
    assert members_per_node("dp", Layout(dp=9), 8) == 1 and members_per_node("dp", Layout(dp=12), 8) == 4
    staged = Layout(pp=4, dp=6)  # stage 1 is ranks 6-11: two on the first node, four on the second
    assert spans_nodes("dp", staged, 8) and members_per_node("dp", staged, 8) == 2
    assert members_per_node("dp", Layout(tp=2, cp=2, dp=16), 8) == 2  # aligned: as before
    code, out, _ = run(capsys, monkeypatch, "plan", "qwen3-235b-a22b", "--gpus", "144", "--gpu", "gb200", "--seq",
                       "4096", "--global-batch-tokens", "8Mi", "--layout", "tp=1,pp=1,dp=144,ep=16,zero=2,recompute=none,mb=1",
                       "--json")
    step = json.loads(out)["layouts"][0]["step_time"]
    assert code == 0 and step["ep"] > 2 * step["compute"]
    code, out, _ = run(capsys, monkeypatch, "plan", "qwen3-235b-a22b", "--gpus", "144", "--gpu", "gb200", "--seq",
                       "4096", "--global-batch-tokens", "8Mi", "--top", "3", "--json")
    assert all(row["ep"] in (1, 2, 4, 8) for row in json.loads(out)["layouts"])


def test_an_nvl72_job_that_does_not_fill_its_racks_runs_on_64_of_each(capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """NVIDIA's Slurm guidance for GB200 NVL72 jobs of 128 GPUs and more is 16 of a rack's 18
    four-GPU trays (--segment 16): 256 GPUs are four racks of 64, where EP32 stays in a rack;
    144 GPUs fill two racks of 72; --gpus-per-node is the node, whatever the job."""
    net = network(interconnect(accelerator("gb200")), "members")
    assert [net.node(world) for world in (64, 72, 144, 256, 16384)] == [72, 72, 72, 64, 64]
    # the node TP must divide is the job's too: TP16 on 256 GB200 (64 a rack), not on 144 (72 a rack)
    gb200 = ("--gpu", "gb200", "--seq", "8192", "--global-batch-tokens", "4Mi", "--layout", "tp=16,pp=1")
    assert run(capsys, monkeypatch, "plan", "llama-3-70b", "--gpus", "256", *gb200)[0] == 0
    code, _, err = run(capsys, monkeypatch, "plan", "llama-3-70b", "--gpus", "144", *gb200)
    assert code == 2 and "tp=16 does not divide the node's 72 GPUs" in err
    assert run(capsys, monkeypatch, "plan", "llama-3-70b", "--gpus", "64", *gb200)[0] == 0  # one domain
    assert network(interconnect(accelerator("gb200"), gpus_per_node=72), "members").node(256) == 72
    assert network(interconnect(H100), "members").node(256) == 8


def test_expert_parallelism_folds_over_the_stage_ranks() -> None:
    """Megatron-Core's parallel folding (ETP = 1): an EP group is ep consecutive ranks of a
    pipeline stage, so ep may exceed dp·cp and span the TP ranks (Qwen3-235B's TP2 DP16 EP32 on
    H100); the experts' replicas are the tp·cp·dp/ep ranks ep apart. ep must divide the stage."""
    folded = Layout(tp=2, pp=8, dp=16, ep=32)
    assert layout_problem(folded, n_layers=94, gpus_per_node=8, n_experts=128) is None
    assert folded.expert_dp == 1
    too_many = layout_problem(Layout(tp=2, dp=16, ep=64), n_layers=94, gpus_per_node=8, n_experts=128)
    assert too_many is not None and "must divide the 32 ranks of a pipeline stage" in too_many
    # EP8 under TP2: one node (ranks 0-7), not 16 ranks strided by tp; its replicas 4 per node
    under_tp = Layout(tp=2, dp=32, ep=8)
    assert not spans_nodes("ep", under_tp, 8) and spans_nodes("ep", Layout(tp=2, dp=32, ep=16), 8)
    assert under_tp.expert_dp == 8 and members_per_node("expert_dp", under_tp, 8) == 1
    assert members_per_node("expert_dp", Layout(tp=2, dp=32, ep=2), 8) == 4


def test_rings_across_nodes_drive_their_members_nics() -> None:
    """Under ring_nics "members" a data-parallel ring with k members on a node moves its bytes over
    k NICs, capped by NVLink; all-to-alls and sends keep one NIC, and "one" prices every ring so."""
    eff, _ = kernel_efficiency(H100)
    one, members = (network(NET, rule) for rule in ("one", "members"))
    gather = Collective("all_gather", "dp", 64, 2**30, 1, "weights")
    nic = NET.inter_node * eff.inter_link
    for layout, k in ((Layout(dp=64), 8), (Layout(tp=2, dp=32), 4), (Layout(tp=8, dp=8), 1)):
        c = replace(gather, group_size=layout.dp)
        assert collective_time(c, layout, one, eff) == pytest.approx(c.wire_bytes / nic + eff.latency)
        bandwidth = min(k * nic, NET.intra_node * eff.intra_link)
        assert collective_time(c, layout, members, eff) == pytest.approx(c.wire_bytes / bandwidth + eff.latency)
    assert 8 * nic == pytest.approx(NET.intra_node * eff.intra_link)  # H100: 8 NDR NICs fill NVLink's share
    send = Collective("send", "pp", 2, 2**30, 1, "activations")
    layout = Layout(pp=16, dp=4)
    assert collective_time(send, layout, members, eff) == collective_time(send, layout, one, eff)
    a2a = Collective("all_to_all", "ep", 16, 2**30, 1, "dispatch")
    layout = Layout(dp=16, ep=16)
    assert collective_time(a2a, layout, members, eff) == collective_time(a2a, layout, one, eff)


@pytest.mark.parametrize("name,states", [("llama-3-8b", FSDP2), ("mixtral-8x7b", MEGATRON), ("llama-3-70b", ZERO)])
def test_rings_over_members_never_slower_and_hold_the_same_memory(name: str, states: StatesConvention) -> None:
    """Every layout a 64-GPU search ranks, priced under both conventions: the members' NICs never
    make a step slower (the per-stage maximum and the hiding windows included), and the network
    moves no byte of memory."""
    plan = resolve(load_spec(name))
    settings = Settings(states=states)
    result = search(plan, H100, 64, seq=4096, global_batch_tokens=2**22, net=NET, settings=settings)
    one, members = (Evaluator(plan, H100, NET, 4096, replace(settings, ring_nics=rule), result.usable_bytes)
                    for rule in ("one", "members"))
    faster = 0
    for e in result.ranked[:40]:
        a, b = one.evaluate(e.layout, e.microbatches), members.evaluate(e.layout, e.microbatches)
        assert b.time.total <= a.time.total * (1 + 1e-12), e.layout
        assert b.memory == a.memory
        faster += b.time.total < a.time.total
    assert faster > 0


@pytest.mark.parametrize("gpu,rule", [("h100", "members"), ("h200", "members"), ("h800", "members"),
                                      ("a100-40gb", "one"), ("a100-80gb", "one"), ("b200", "members")])
def test_ring_convention_per_family(gpu: str, rule: str) -> None:
    """Hopper takes NCCL's multi-NIC rings; Ampere keeps one NIC, as the issue's DeepSpeed ZeRO-3
    rows require (docs/validation.md); uncalibrated GPUs take the Hopper constants'."""
    assert kernel_efficiency(accelerator(gpu))[0].ring_nics == rule


FSDP_13B_SHAPE = ["plan", "llama-2-7b", "--gpus", "64", "--gpu", "h100", "--seq", "2048",
                  "--global-batch-tokens", "262144", "--layout", "tp=1,pp=1,cp=1,zero=3,recompute=none,mb=2"]


def test_data_parallel_bound_layout_shows_the_network_range(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP over 8 nodes with 2 sequences per GPU (MosaicML's MPT-13B shape). On H100 the ring is
    priced over its 8 NICs per node and plan shows the one-NIC end, where the data-parallel traffic
    is most of the step; on A100 the other way round; --ring-nics turns the H100 search around."""
    code, out, _ = run(capsys, monkeypatch, *FSDP_13B_SHAPE, "--states", "fsdp2", "--json")
    assert code == 0
    r = json.loads(out)
    top, bound = r["layouts"][0], r["network_bound"]
    assert r["network"]["ring_nics"] == "members"
    assert bound["ring_nics"] == "one" and bound["nics_per_gpu"] == 1 and bound["layout"] == top["layout"]
    assert bound["dp_s"] > 0.3 * bound["step_s"]
    assert top["tokens_per_s_per_gpu"] > 1.5 * bound["tokens_per_s_per_gpu"]
    assert bound["dp_s"] > 4 * top["step_time"]["dp"]
    assert any("8 NICs per node" in note and "--ring-nics one" in note for note in r["notes"])

    code, out, _ = run(capsys, monkeypatch, *FSDP_13B_SHAPE, "--states", "fsdp2", "--ring-nics", "one", "--json")
    assert code == 0
    one = json.loads(out)
    assert one["network"]["ring_nics"] == "one" and one["network_bound"]["ring_nics"] == "members"
    assert one["layouts"][0]["tokens_per_s_per_gpu"] == pytest.approx(bound["tokens_per_s_per_gpu"])
    assert one["network_bound"]["tokens_per_s_per_gpu"] == pytest.approx(top["tokens_per_s_per_gpu"])
    assert any("8 NICs" in note and "--ring-nics members" in note for note in one["notes"])

    a100 = [a if a != "h100" else "a100-80gb" for a in FSDP_13B_SHAPE]
    code, out, _ = run(capsys, monkeypatch, *a100, "--states", "fsdp2", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["network"]["ring_nics"] == "one" and r["network_bound"]["nics_per_gpu"] == 8
    assert r["network_bound"]["tokens_per_s_per_gpu"] > 1.5 * r["layouts"][0]["tokens_per_s_per_gpu"]
    code, out, _ = run(capsys, monkeypatch, *FSDP_13B_SHAPE, "--states", "fsdp2")
    text = " ".join(out.split())
    assert "as many NICs per GPU as the group has members on a node (the GPU family's" in text
    assert "At one NIC per GPU" in text


def test_network_range_only_where_the_nics_matter(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the fast end under DeepSpeed's fetch rules (its 2021 runs behaved as one NIC per GPU),
    though the cautious one where the family prices several; not for a ring with one member per
    node, and not when the data-parallel traffic hides."""
    a100 = [a if a != "h100" else "a100-80gb" for a in FSDP_13B_SHAPE]
    code, out, _ = run(capsys, monkeypatch, *a100, "--states", "deepspeed", "--json")
    assert code == 0 and json.loads(out)["network_bound"] is None
    code, out, _ = run(capsys, monkeypatch, *FSDP_13B_SHAPE, "--states", "deepspeed", "--json")
    assert code == 0 and json.loads(out)["network_bound"]["ring_nics"] == "one"
    code, out, _ = run(capsys, monkeypatch, *LLAMA_405B, "--layout",
                       "tp=8,cp=1,pp=16,vpp=4,dp=128,ep=1,zero=1,recompute=none,mb=1", "--json")
    assert code == 0 and json.loads(out)["network_bound"] is None
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--seq", "4096", "--json")
    assert code == 0 and json.loads(out)["network_bound"] is None


def test_mamba1_x_proj_partial_sums_are_all_reduced_under_tp() -> None:
    """Mamba-1's x_proj contracts the rank's d_inner channels: its dt_rank + 2·d_state outputs are
    all-reduced forward (again under full recompute) and backward, per layer and micro-batch
    (checked against torch by tests/test_distributed.py's fake verify)."""
    plan = _plan("mamba-2.8b")  # 64 Mamba-1 layers, dt_rank 160, d_state 16
    n, m, s = len(plan.layers), 2, 2048
    for recompute, passes in (("none", 2), ("full", 3)):
        records = step_collectives(plan, Layout(tp=2, recompute=recompute), s, microbatches=m)
        [x_proj] = [r for r in records if "x_proj" in r.what]
        assert (x_proj.kind, x_proj.bytes, x_proj.count) == ("all_reduce", 2 * s * (160 + 2 * 16), m * n * passes)


def test_long_conv_ffts_are_priced_at_hbm_bandwidth() -> None:
    """FFT convolutions are memory-bound elementwise work, not GEMMs: the GEMM-efficiency override
    leaves them alone, and the FFT bytes per token are there (pricing.FFT_CONV_BYTES)."""
    from archplan.planning.pricing import FFT_CONV_BYTES, Pricer, rates_for

    plan = _plan("s4d-lm")
    eff, _ = kernel_efficiency(H100)
    layout = Layout(tp=1, dp=1, mb=1)
    data = model_data(plan, 2048)
    model = Pricer(data, rates_for(H100, eff, None, "bf16")).layers(layout, "flash")[0]
    fixed = Pricer(data, rates_for(H100, eff, 0.3, "bf16")).layers(layout, "flash")[0]
    assert model.elem_fwd == fixed.elem_fwd and model.gemm_fwd != fixed.gemm_fwd
    hbm = H100.hbm_bytes_per_s * eff.hbm
    assert model.elem_fwd > FFT_CONV_BYTES * 768 * 2048 / hbm


def test_hyena_filter_mlp_runs_per_position_not_per_token() -> None:
    from archplan.planning.pricing import Pricer, rates_for

    plan = _plan("hyena-153m")
    eff, _ = kernel_efficiency(H100)
    rates = rates_for(H100, eff, None, "bf16")
    data = model_data(plan, 2048)
    filt = sum(gemm_time(2048, t.shape[0], t.shape[1], rates) for t in data.layer_tensors[0]
               if t.per_position and t.name.endswith(".weight"))
    assert filt > 0
    one, two = (Pricer(data, rates).layers(Layout(mb=mb), "flash")[0].gemm_fwd for mb in (1, 2))
    assert two - filt == pytest.approx(2 * (one - filt))


@pytest.mark.parametrize("args, message", [
    (("mixtral-8x7b", "--gpus", "64", "--layout", "ep=16"), "ep=16 does not divide the 8 routed experts"),
    (("deepseek-v3", "--gpus", "2048", "--seq", "4096", "--layout", "ep=512,tp=4,pp=1,zero=1,recompute=full,mb=1"),
     "ep=512 does not divide the 256 routed experts"),
    (("llama-3-8b", "--gpus", "8", "--layout", "ep=2"), "ep=2 but the model has no routed experts"),
    (("gpt2", "--gpus", "16", "--layout", "pp=16"), "pp·vpp = 16 model chunks, more than the 12 layers"),
    (("gpt2", "--gpus", "16", "--layout", "pp=2,vpp=8"), "pp·vpp = 16 model chunks, more than the 12 layers"),
    (("qwen2.5-7b", "--gpus", "8", "--layout", "tp=8"), "tp=8: 28 query / 4 KV heads do not split 8 ways"),
    (("llama-3-8b", "--gpus", "6", "--layout", "cp=3"), "cp=3 does not divide --seq 8192"),
    (("llama-3-8b", "--gpus", "8", "--seq", "8191", "--layout", "tp=8,cp=1,pp=1,dp=1,zero=1,recompute=full,mb=1"),
     "sequence parallelism splits each rank's 8191 tokens over tp=8"),
    # all four degrees given, their product short of --gpus: blamed on DP·mb and the batch before
    (("llama-3-8b", "--gpus", "16", "--global-batch-tokens", "64M", "--layout", "tp=2,cp=1,pp=2,dp=2,zero=1"),
     "tp·cp·pp·dp = 2·1·2·2 = 8 ranks, but --gpus is 16"),
])
def test_cli_partial_layout_passes_what_a_given_one_does(args: tuple[str, ...], message: str,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial --layout is held to the rules of a complete one: its given fields alone up front,
    with the search's choices for every candidate; a layout that cannot exist is exit 2, not a
    ranked row (nor exit 1 as if nothing fitted)."""
    code, _, err = run(capsys, monkeypatch, "plan", *args)
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_partial_layout_candidates_all_exist(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from archplan.planning.layout import layout_problem, parse_layout

    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--seq", "8191", "--layout",
                       "vpp=2,sp=off", "--json")
    assert code == 0
    for row in json.loads(out)["layouts"]:
        layout = parse_layout(row["layout"]).complete()
        assert layout is not None and layout.pp > 1
        assert layout_problem(layout, n_layers=32, gpus_per_node=8, seq=8191) is None


def test_search_turns_sequence_parallelism_off_where_tp_does_not_split_the_tokens(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """sp not given is searched: on where each rank's tokens split over tp, off where they do not
    (Megatron refuses SP there), so a length tp does not divide keeps its tp > 1 layouts, and a
    partial --layout tp=8 completes to one instead of failing on a rule the search imposed."""
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--seq", "8191", "--top", "100",
                       "--json")
    rows = json.loads(out)["layouts"]
    assert code == 0 and {row["tp"] for row in rows} > {1}
    assert all(row["layout"].endswith("sp=off") for row in rows)
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--seq", "8192", "--top", "100",
                       "--json")
    assert code == 0 and all(row["layout"].endswith("sp=on") for row in json.loads(out)["layouts"] if row["tp"] > 1)
    for partial in ("tp=8", "tp=8,cp=1", "tp=8,cp=1,pp=1"):
        code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--seq", "8191", "--layout", partial,
                           "--json")
        assert code == 0 and {row["layout"].split(",")[-1] for row in json.loads(out)["layouts"]} == {"sp=off"}, partial
    # Megatron-Core runs ep > 1 beside tp > 1 only with SP: there the length is the rule broken
    code, _, err = run(capsys, monkeypatch, "plan", "mixtral-8x7b", "--gpus", "64", "--gpu", "h100", "--seq", "4095",
                       "--layout", "tp=2,ep=2")
    assert code == 2 and "sequence parallelism splits each rank's 4095 tokens over tp=2" in err
    # and at ep = 1 under either engine (Megatron-Core's MoELayer refuses tp > 1 without SP in
    # training; torch's engine routes only from SP shards): tp=2 ep=1 keeps SP and breaks the length rule
    for states in ("fsdp2", "megatron"):
        code, _, err = run(capsys, monkeypatch, "plan", "mixtral-8x7b", "--gpus", "64", "--gpu", "h100", "--seq",
                           "4095", "--states", states, "--layout", "tp=2,ep=1")
        assert code == 2 and "sequence parallelism splits each rank's 4095 tokens over tp=2" in err


def test_cli_dense_layout_is_complete_without_ep(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's --layout example names no ep: on a dense model it is still the one layout."""
    code, out, _ = run(capsys, monkeypatch, *LLAMA_405B, "--layout",
                       "tp=8,cp=1,pp=16,vpp=2,dp=128,zero=1,recompute=none,mb=1", "--json")
    r = json.loads(out)
    assert code == 0 and r["considered"] == 1 and r["layouts"][0]["ep"] == 1


def test_interleaved_rounds_follow_the_engine() -> None:
    """No group given: torch's ScheduleInterleaved1F1B rounds, max(1, m div pp) of m / rounds; a
    given group: Megatron's rule."""
    from archplan.planning.layout import Layout, group_problem, round_size

    assert round_size(Layout(pp=16, vpp=4), 15) == 15 and group_problem(Layout(pp=16, vpp=4), 15) is None
    assert round_size(Layout(pp=16, vpp=4), 32) == 16 and round_size(Layout(pp=16, vpp=4), 31) == 31
    assert group_problem(Layout(pp=16, vpp=4), 33) is not None  # two rounds cannot split 33
    assert group_problem(Layout(pp=16, vpp=4, group=16), 15) is not None
    assert round_size(Layout(pp=4, vpp=2, group=6), 12) == 6
    # fewer micro-batches than stages: the one round the search reports (group = m) can be given back
    assert group_problem(Layout(pp=16, vpp=4, group=15), 15) is None
    assert group_problem(Layout(pp=16, vpp=4, group=8), 15) == (
        "group=8: m = 15 micro-batches, fewer than pp = 16, run in one round: group=15")


def test_cli_unfit_layout_shows_its_breakdown(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A given layout that does not fit: exit 1, its memory columns still on a wide terminal (the
    bar is drawn to its total, marked where the usable memory ends) and its breakdown in one line."""
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3.1-405b", "--gpus", "8", "--layout",
                       "tp=8,cp=1,pp=1,dp=1,ep=1,zero=3,recompute=full,mb=1")
    assert code == 1 and "hidden at" not in out and "┃" in out
    assert max(len(line) for line in out.splitlines()) <= 200
    assert "does not fit: pipeline rank 0 needs 855 GiB > 72.0 GiB usable (parameters 94.5 GiB" in out


def test_cli_a_run_shorter_than_one_step_says_so(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--tokens 1 printed a training time of 0.0 s beside a 4M-token step, and nothing else."""
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--tokens", "1",
                       "--top", "1", "--json")
    assert code == 0 and ("the run's 1 token is fewer than one step of layout 1 (4.00 M tokens): its training "
                          "time prices a fraction of a step") in json.loads(out)["notes"]
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--top", "1",
                       "--json")
    assert code == 0 and not any("fewer than one step" in note for note in json.loads(out)["notes"])


def test_cli_says_when_the_pipeline_never_fills(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama 3's 16K-GPU layout with "16M" tokens a step (SI: 16·10⁶) runs 1,953 sequences, 15
    micro-batches on 16 stages, and printed a slower step than Meta's (m = 16 at 16·2²⁰) without
    saying why. It now says the pipeline never fills and which batch fills it; at 16Mi it is silent."""
    layout = ["--layout", "tp=8,cp=1,pp=16,vpp=8,dp=128,ep=1,zero=1,recompute=none,mb=1"]
    asked = ["plan", "llama-3.1-405b", "--gpus", "16384", "--gpu", "h100", "--seq", "8192", *layout, "--headroom", "0",
             "--json"]
    code, out, _ = run(capsys, monkeypatch, *asked, "--global-batch-tokens", "16M")
    data = json.loads(out)
    assert code == 0 and data["layouts"][0]["microbatches"] == 15
    assert ("fewer micro-batches than pipeline stages, so the pipeline never fills (layout 1: m = 15 for pp = 16, "
            "filled by 16,777,216 tokens per step); --global-batch-tokens takes binary units too "
            "(16Mi = 16·2^20); Megatron-Core runs no interleaved schedule (vpp > 1) on fewer micro-batches "
            "than pp: priced as torch's one round") in data["notes"]
    # Megatron-Core refuses a round outside [pp, m]; torch's schedule runs it, so under fsdp2 no such word
    code, out, _ = run(capsys, monkeypatch, *asked, "--global-batch-tokens", "16M", "--states", "fsdp2")
    assert code in (0, 1) and not any("Megatron-Core runs no" in note for note in json.loads(out)["notes"])
    code, out, _ = run(capsys, monkeypatch, *asked, "--global-batch-tokens", "16Mi")
    data = json.loads(out)
    assert code == 0 and data["layouts"][0]["microbatches"] == 16
    assert not any("never fills" in note for note in data["notes"])
    # the search at 4M tokens: layouts grouped, no word of binary units (the filling batch is 4×)
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3.1-405b", "--gpus", "16384", "--gpu", "h100", "--json")
    data = json.loads(out)
    starved = [note for note in data["notes"] if "never fills" in note]
    shown = [(e["microbatches"], e["pp"]) for e in data["layouts"]]
    assert code == 0 and len(starved) == 1 and all(m < pp for m, pp in shown)
    assert "layouts 1, 3, 5" in starved[0] and "16Mi" not in starved[0]


def test_cli_micro_batches_are_the_nearest_to_the_batch_asked(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """1M tokens at seq 8192 over dp 4 asks 30.52 micro-batches: 31 (1,015,808 tokens, +1.6%), not
    the 30 (−1.7%) that rounding the sequences first, then half to even, made."""
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--seq", "8192",
                       "--global-batch-tokens", "1M", "--layout", "tp=2,cp=1,pp=1,dp=4,zero=1,recompute=none,mb=1",
                       "--json")
    layout = json.loads(out)["layouts"][0]
    assert code == 0 and (layout["microbatches"], layout["global_batch_tokens"]) == (31, 1_015_808)


def test_cli_an_overshoot_within_the_printed_digits_says_by_how_much(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """72.0030 GiB against 72.0 GiB usable printed "72.0 GiB > 72.0 GiB": now by how much too."""
    from archplan.units import overshoot

    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--seq", "3833",
                       "--global-batch-tokens", "245312", "--layout", "tp=1,cp=1,pp=1,dp=8,zero=1,recompute=none,mb=1")
    assert code == 1 and "needs 72.0 GiB > 72.0 GiB usable, over it by 2.93 MiB (parameters" in out
    assert overshoot(80 * 2**30, 72 * 2**30) == "" and overshoot(72 * 2**30, 72 * 2**30) == ""


def test_cli_infeasible_states_the_states_bytes(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for states, per_param in (("megatron", 18), ("zero", 16)):
        code, out, _ = run(capsys, monkeypatch, "plan", "llama-3.1-405b", "--gpus", "8", "--states", states,
                           "--json")
        reason = json.loads(out)["reasons"][0]
        assert code == 1 and f"params × {per_param} B (--states {states})" in reason


@pytest.mark.parametrize("args, message", [
    (("--seq", "0"), "Invalid value for '--seq': a length must be positive, got '0'"),  # as size, verify
    (("--total", "1e9"), "--total/--active go with --solve"),
    (("--force",), "--force overwrites the --plot figure"),
    (("--tokens", "0"), "--tokens must be between 1 and 1e+18, got 0"),  # as size says it
    (("--overlap", ","), "--overlap: ',' names nothing"),
    (("--global-batch-tokens", "1e400"), "--global-batch-tokens must be between 1 and 1e+18, got inf"),
    (("--gpus", "99999999999999999999"), "--gpus must be between 1 and 1,000,000,000"),
])
def test_cli_layout_search_refuses_what_it_would_ignore(args: tuple[str, ...], message: str,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", *args)
    assert code == 2 and message in err


def test_divisors_by_trial_division_to_the_root() -> None:
    from archplan.planning.parallel import _divisors

    for n in (*range(1, 400), 16384, 2**20 * 3, 10**9):
        assert _divisors(n) == sorted(d for k in range(1, math.isqrt(n) + 1) if n % k == 0 for d in {k, n // k})


def test_cli_plot_never_overwrites_silently(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    figure = tmp_path / "layouts.png"
    figure.write_text("mine")
    code, _, err = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--plot", str(figure))
    assert code == 2 and "file exists; pass --force" in err and figure.read_text() == "mine"
    code, _, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--plot", str(figure), "--force")
    assert code == 0 and figure.read_bytes().startswith(b"\x89PNG")
    code, _, err = run(capsys, monkeypatch, "plan", "llama-3.1-405b", "--gpus", "8", "--plot",
                       str(tmp_path / "none.png"))
    # none fits: the figure draws what the table does, the layout needing the least memory
    assert code == 1 and (tmp_path / "none.png").read_bytes().startswith(b"\x89PNG")


def _qwen3_fp8_ep16(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flag: str) -> Any:
    """`plan --json` of Qwen3-30B-A3B in fp8 at the archive's EP16 layout on 16 H100, with `flag`."""
    code, out, _ = run(capsys, monkeypatch, "plan", "qwen3-30b-a3b", "--gpus", "16", "--gpu", "h100", "--seq",
                       "4096", "--global-batch-tokens", "4M", "--precision", "fp8", "--json", "--layout",
                       "tp=1,cp=1,pp=1,dp=16,ep=16,zero=1,recompute=none,mb=1,vpp=1", flag)
    assert code == 0
    return json.loads(out)


def test_cli_fp8_experts_runs_the_routed_experts_at_the_fp8_rate(capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --precision fp8 the routed experts keep the bf16 rate (Transformer Engine's grouped
    GEMMs) unless --fp8-experts says they gain (DeepGEMM's): the step is shorter with it, the
    compute line and --json say which."""
    gemm = {}
    for fp8, rate in ((False, "bf16 rate"), (True, "fp8 rate (--fp8-experts)")):
        r = _qwen3_fp8_ep16(capsys, monkeypatch, "--fp8-experts" if fp8 else "--bf16-experts")
        assert r["fp8_experts"] is fp8
        assert f"routed experts' GEMMs at the {rate}" in r["efficiency"]["description"]
        gemm[fp8] = r["layouts"][0]["step_time"]["gemm"]
    assert gemm[True] < gemm[False]


def test_cli_dense_fp8_plan_says_nothing_of_routed_experts(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100",
                       "--precision", "fp8", "--top", "1", "--json")
    assert code == 0
    description = json.loads(out)["efficiency"]["description"]
    assert "fp8 casts" in description and "routed experts" not in description


@pytest.mark.parametrize("flag", ["--fp8-experts", "--fp8-dispatch", "--fused-grouped-mlp", "--fp8-attention",
                                  "--fp8-lm-head"])
def test_cli_moe_fp8_flags_without_fp8_are_one_line_exit_2(flag: str, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, monkeypatch, "plan", "qwen3-30b-a3b", "--gpus", "16", "--gpu", "h100", flag)
    assert code == 2 and flag in err and "--precision fp8" in err and err.count("\n") == 1


def test_cli_fp8_dispatch_halves_the_bytes_sent_to_the_experts(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Megatron-Core's dispatchers send bf16 (the default); --fp8-dispatch sends fp8 + a scale per
    1×128 tile to the experts, as DeepSeek-V3's did, and quantizes each token once before it."""
    bf16, fp8 = (_qwen3_fp8_ep16(capsys, monkeypatch, flag) for flag in ("--bf16-dispatch", "--fp8-dispatch"))
    assert (bf16["fp8_dispatch"], fp8["fp8_dispatch"]) == (False, True)
    bf16, fp8 = bf16["layouts"][0]["step_time"], fp8["layouts"][0]["step_time"]
    assert fp8["ep"] == pytest.approx(bf16["ep"] * (1 + 4 / 128 + 2) / 4, rel=0.05)
    assert fp8["elementwise"] < bf16["elementwise"] and fp8["gemm"] == bf16["gemm"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cases())
def test_blackwell_mxfp8_options_move_only_their_own_terms_on_random_specs(case: Case) -> None:
    """On random specs with routed experts, on GB300 in fp8: the fused grouped MLP removes from each
    MoE layer exactly its experts' activation pass and their down-projections' input cast, and
    nothing from any other layer or class; fp8 attention scales each attention layer's core by the
    measured ratio at its head dim and nothing else; the fp8 LM head moves only the head."""
    from archplan.planning.pricing import ACT_BYTES

    plan = resolve(case.spec)
    assume(plan.routed)
    data = model_data(plan, case.seq)
    layout = Layout(tp=1)
    gb300 = accelerator("gb300")
    eff = kernel_efficiency(gb300)[0]
    hbm = gb300.hbm_bytes_per_s * eff.hbm

    def layers(**flags: bool) -> list[Any]:
        return Pricer(data, rates_for(gb300, eff, None, "fp8", "cudnn", fp8_scaling="mxfp8", **flags)
                      ).layers(layout, "flash")

    plain, fused, fp8_attention = layers(), layers(fused_grouped_mlp=True), layers(fp8_attention=True)
    assert layers(fp8_lm_head=True) == plain
    bf16_head, fp8_head = (_head_micro(data, layout, rates_for(gb300, eff, None, "fp8", "cudnn", fp8_lm_head=f),
                                       "fp32-fused") for f in (False, True))
    assert fp8_head.gemm_fwd <= bf16_head.gemm_fwd and fp8_head.elem_fwd > bf16_head.elem_fwd
    for i, (layer, a, b, c) in enumerate(zip(plan.layers, plain, fused, fp8_attention)):
        assert (b.gemm_fwd, b.gemm_bwd, b.attn_fwd, b.attn_bwd) == (a.gemm_fwd, a.gemm_bwd, a.attn_fwd, a.attn_bwd)
        removed = 0.0
        if isinstance(layer.ffn, MoEPlan):
            expert = layer.ffn.expert
            act = ACT_BYTES * expert.d_ff * (3 if expert.kind == "glu" else 2) * layer.ffn.top_k * case.seq
            removed = act + (fp8_cast_bytes(data, i, layout, scaling="mxfp8")
                             - fp8_cast_bytes(data, i, layout, fused_grouped_mlp=True, scaling="mxfp8"))
        assert a.elem_fwd - b.elem_fwd == pytest.approx(removed / hbm, abs=1e-18)
        assert (c.gemm_fwd, c.elem_fwd) == (a.gemm_fwd, a.elem_fwd)
        dqk = {AttentionPlan: "head_dim", MLAPlan: "qk_head_dim"}.get(type(layer.mixer))
        if dqk is None:
            assert (c.attn_fwd, c.attn_bwd) == (a.attn_fwd, a.attn_bwd)
        else:
            window = layer.mixer.window  # type: ignore[union-attr]
            forward, backward = fp8_attention_speed("gb300", getattr(layer.mixer, dqk),
                                                    min(case.seq, window) if window else case.seq)
            assert a.attn_fwd == pytest.approx(c.attn_fwd * forward)
            assert a.attn_bwd == pytest.approx(c.attn_bwd * backward)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_current_scaling_moves_only_the_casts_on_random_specs(case: Case) -> None:
    """On random specs in fp8 on H100: current scaling adds to each layer's forward exactly its cast
    bytes' growth (the amax pass on every cast delayed scaling pays, at least, so never less) and the
    backward twice that; the GEMMs, the attention core and the LM head do not move."""
    from archplan.planning.pricing import FP8_AMAX_BYTES, FP8_CAST_BYTES

    plan = resolve(case.spec)
    data = model_data(plan, case.seq)
    layout = Layout(tp=1)
    eff = kernel_efficiency(H100)[0]
    hbm = H100.hbm_bytes_per_s * eff.hbm
    delayed, current = (Pricer(data, rates_for(H100, eff, None, "fp8", fp8_scaling=f)).layers(layout, "flash")
                        for f in ("delayed", "current"))
    for i, (a, b) in enumerate(zip(delayed, current)):
        assert (b.gemm_fwd, b.gemm_bwd, b.attn_fwd, b.attn_bwd) == (a.gemm_fwd, a.gemm_bwd, a.attn_fwd, a.attn_bwd)
        paid = fp8_cast_bytes(data, i, layout)
        added = fp8_cast_bytes(data, i, layout, scaling="current") - paid
        assert added >= paid * FP8_AMAX_BYTES // FP8_CAST_BYTES
        assert b.elem_fwd - a.elem_fwd == pytest.approx(added / hbm, abs=1e-18)
        assert b.backward - a.backward == pytest.approx(2 * (b.elem_fwd - a.elem_fwd), abs=1e-15)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(only={"attention": MLA}))
def test_mla_up_proj_recompute_drops_each_mla_layers_q_k_v_on_random_specs(case: Case) -> None:
    """On random specs with MLA layers (hybrids included): the "mla_up_proj" module recompute
    drops, per MLA layer and sequence, exactly its Q, K and V (heads · (2·qk + v) 16-bit values a
    token) from what the layer keeps, and nothing from any other layer; and the GEMMs it re-runs in
    an MLA layer are its up-projections by the torch modules' own tensor names (q_b_proj, or q_proj
    without a query latent, and kv_b_proj)."""
    from archplan.planning.pricing import is_up_projection

    plan = resolve(case.spec)
    seq = case.seq
    data = model_data(plan, seq)
    layout = Layout(tp=1)
    plain = data.layer_acts(layout, "none", "flash", "megatron")
    dropped = data.layer_acts(layout, "none", "flash", "megatron", frozenset({"mla_up_proj"}))
    for layer, tensors, before, after in zip(plan.layers, data.layer_tensors, plain, dropped):
        mixer = layer.mixer
        if isinstance(mixer, MLAPlan):
            rerun = sorted(t.name.rsplit(".", 2)[-2] for t in tensors if is_up_projection(t.name))
            qkv = 2 * seq * mixer.n_heads * (2 * mixer.qk_head_dim + mixer.v_head_dim)
            assert before - after == pytest.approx(qkv)
            assert rerun == (["kv_b_proj", "q_b_proj"] if mixer.q_lora_rank is not None else ["kv_b_proj", "q_proj"])
        else:
            assert before == after


@pytest.mark.parametrize(("args", "said"), [
    (("llama-3.1-405b", "--gpus", "144", "--gpu", "gb200", "--layout",
      "tp=16,cp=1,pp=9,dp=1,zero=1,recompute=full,mb=1"), "tp=16 does not divide the node's 72 GPUs"),
    (("llama-3-70b", "--gpus", "48", "--gpu", "h100", "--gpus-per-node", "6", "--layout", "tp=4"),
     "tp=4 does not divide the node's 6 GPUs"),
    (("llama-3-8b", "--gpus", "1024", "--gpu", "h100", "--global-batch-tokens", "1M", "--layout", "dp=1024,mb=8"),
     "DP·mb ≤ 122 sequences per step"),
    (("llama-3-8b", "--gpus", "1024", "--gpu", "h100", "--global-batch-tokens", "1M", "--layout",
      "tp=1,cp=1,pp=1,dp=1024,zero=1,recompute=none,mb=1"), "dp·mb = 1024·1 = 1,024 sequences"),
    (("llama-3-70b", "--gpus", "64", "--gpu", "h100", "--layout", "tp=8,pp=8,vpp=2,group=0"),
     "group=0 must be a positive integer"),
    (("llama-3-70b", "--gpus", "64", "--gpu", "h100", "--layout",
      "tp=8,pp=8,dp=1,cp=1,zero=1,recompute=none,mb=1,group=3"), "group=3 orders the rounds"),
    # a partial layout: the example is an interleaved candidate and the rule it breaks, not one
    # that has no virtual stages
    (("llama-3.1-405b", "--gpus", "16384", "--gpu", "h100", "--seq", "8192", "--global-batch-tokens", "16M",
      "--layout", "group=3"), "vpp=2,group=3,dp=1024,ep=1,zero=0,recompute=none,mb=1,sp=off: group=3: m = 2 micro-batches, fewer "
     "than pp = 16, run in one round: group=2"),
    (("llama-3-8b", "--gpus", "16", "--gpu", "h100", "--precision", "fp8", "--fp8-experts"),
     "--fp8-experts: this concerns the routed experts"),
    (("llama-3-8b", "--gpus", "16", "--gpu", "h100", "--overlap", "dp,dualpipe", "--dispatcher", "hierarchical"),
     "--dispatcher hierarchical, --overlap dualpipe: these concern the routed experts"),
    (("llama-3-8b", "--gpus", "8", "--gpu", "h100", "--overlap", "dp,none"), "none stands alone"),
    (("llama-3-8b", "--gpus", "8", "--gpu", "h100", "--overlap", "dp,pp,DP"), "'dp,pp,DP' names dp more than once"),
    (("deepseek-v3", "--gpus", "256", "--gpu", "h100", "--recompute-modules", "mla_up_proj,mla_up_proj"),
     "names mla_up_proj more than once"),
    # Megatron-LM turns sequence parallelism off at tp=1: a layout written out does not claim it
    (("llama-3-8b", "--gpus", "8", "--gpu", "h100", "--layout", "tp=1,sp=on"), "sp=on needs tp > 1"),
    (("llama-3-70b", "--gpus", "64", "--gpu", "h100", "--cp-comm", "ring"),
     "the search tries cp > 1 only from 16,384 tokens (each rank keeping ≥ 8,192), not at --seq 8,192"),
    (("qwen3-30b-a3b", "--gpus", "64", "--gpu", "h100", "--overlap", "dp,dualpipe", "--layout", "pp=1"),
     "--overlap dualpipe: DeepSeek's DualPipe feeds micro-batches from both ends of a pipeline of an even "
     "number of stages, and pp=1"),
    (("qwen3-30b-a3b", "--gpus", "64", "--gpu", "h100", "--overlap", "dp,dualpipe", "--layout", "pp=2,vpp=2"),
     "DualPipe runs its own schedule, not the interleaved one (vpp=2)"),
    (("mixtral-8x7b", "--gpus", "64", "--gpu", "h100", "--layout", "tp=2,ep=8,sp=off"),
     "runs expert parallelism (ep=8) beside tensor parallelism (tp=2) only with sequence parallelism"),
    # and at ep = 1 Megatron-Core's MoELayer refuses to train under tp > 1 without SP
    (("mixtral-8x7b", "--gpus", "64", "--gpu", "h100", "--layout", "tp=2,ep=1,sp=off"),
     "trains an MoE layer under tensor parallelism (tp=2) only with sequence parallelism"),
    # torch's engine (what verify --layout runs) refuses MoE under tp > 1 without SP at any ep
    (("mixtral-8x7b", "--gpus", "64", "--gpu", "h100", "--states", "fsdp2", "--layout", "tp=2,ep=1,sp=off"),
     "routes an MoE layer's tokens under tensor parallelism (tp=2) only from sequence-parallel shards: sp=on"),
    (("llama-3-70b", "--gpus", "64", "--gpu", "h100", "--overlap", "dp,pp", "--layout", "pp=1"),
     "--overlap pp hides the pipeline's sends and receives behind compute, and the given --layout has pp=1"),
    (("llama-3-70b", "--gpus", "64", "--gpu", "h100", "--overlap", "tp", "--layout", "tp=1"),
     "--overlap tp hides the tensor-parallel traffic behind its GEMMs, and the given --layout has tp=1"),
    (("llama-2-7b", "--gpus", "16", "--gpu", "h100", "--cp-comm", "ring", "--seq", "32768", "--layout",
      "tp=1,pp=1,dp=16"), "--gpus 16 with the given --layout leaves cp=1"),
    (("mixtral-8x7b", "--gpus", "1", "--gpu", "h100", "--overlap", "dualpipe"),
     "1 GPU admits no TP×CP×PP×DP split"),
    (("llama-2-7b", "--gpus", "16", "--gpu", "h100", "--top", "3", "--layout",
      "tp=1,cp=1,pp=1,dp=16,zero=1,recompute=none,mb=1"), "--top 3 ranks a search, and the given --layout fixes"),
    (("llama-3-70b", "--gpus", "144", "--gpu", "gb200", "--layout", "tp=16"),
     "does not divide the node's 72 GPUs: TP groups of consecutive ranks would straddle two nodes (tensor "
     "parallelism needs the in-node links); a job that uses 64 GPUs of each node says so with --gpus-per-node 64"),
    (("llama-3-8b", "--gpus", "8", "--gpu", "mi300x", "--flash-impl", "cudnn"),
     "--flash-impl cudnn: cuDNN is NVIDIA's library, and AMD Instinct MI300X 192GB runs none"),
    # options that would change nothing are named, not ignored
    (("deepseek-v3", "--gpus", "256", "--gpu", "gb300", "--precision", "fp8", "--fp8-scaling", "mxfp8",
      "--fp8-params"), "--fp8-params: under --fp8-scaling mxfp8"),
    (("llama-3-70b", "--gpus", "64", "--gpu", "h100", "--attention-kernel", "eager", "--flash-impl", "triton"),
     "--flash-impl triton picks a FlashAttention implementation, which --attention-kernel eager does not run"),
    (("mamba-2.8b", "--gpus", "8", "--gpu", "h100", "--fused-qkv", "--cp-comm", "ring"),
     "--cp-comm ring, --fused-qkv: these concern attention layers, and mamba-2.8b has none"),
    (("llama-3-70b", "--gpus", "64", "--gpu", "h100", "--cp-comm", "ring", "--layout", "cp=1"),
     "the given --layout has cp=1"),
    (("llama-3-70b", "--gpus", "64", "--gpu", "h100", "--no-recompute-early-stop", "--layout", "recompute=none"),
     "--no-recompute-early-stop says how full recompute re-runs a block, and the given --layout has recompute=none"),
    (("llama-2-7b", "--gpus", "16", "--gpu", "h100", "--seq", "16386", "--layout", "tp=1,cp=2"),
     "cp=2: --seq 16386 does not split into 2·cp = 4 chunks (load-balanced context parallelism gives each rank two)"),
    (("llama-3-8b", "--gpus", "64", "--gpu", "h100", "--tokens", "0.5"),
     "--tokens must be between 1 and 1e+18, got 0.5"),
    (("llama-3-8b", "--gpus", "64", "--gpu", "h100", "--global-batch-tokens", "1e30"),
     "--global-batch-tokens must be between 1 and 1e+18, got 1e+30"),
    (("llama-3-8b", "--gpus", "64", "--gpu", "h100", "--global-batch-tokens", "0.5"),
     "--global-batch-tokens must be between 1 and 1e+18, got 0.5"),
    (("llama-3-8b", "--gpus", "64", "--gpu", "h100", "--global-batch-tokens", "4000.5"),
     "--global-batch-tokens 4,000.5 is under half a sequence of 8,192 tokens"),
    (("--compute", "1e24", "--seq", "67108865"), "--seq must be between 1 and 67,108,864"),
    (("--compute", "1e24", "--vocab", "16777217"), "--vocab must be between 1 and 16,777,216"),
])
def test_cli_plans_that_cannot_run_are_one_line_exit_2(
        args: tuple[str, ...], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run(capsys, monkeypatch, "plan", *args)
    assert code == 2 and said in err and err.count("\n") == 1 and out == ""


@pytest.mark.parametrize("args,said", [
    (("gpt2", "--gpus", "1", "--overlap", "dp,pp,tp"), "--gpus 1 leaves tp=1"),
    (("llama-3-8b", "--gpus", "8", "--layout", "tp=8,dp=1", "--overlap", "dp,pp"),
     "--gpus 8 with the given --layout leaves pp=1"),
    (("mixtral-8x7b", "--gpus", "8", "--layout", "pp=8", "--overlap", "dp,ep"), "leaves ep=1"),
    (("llama-3-8b", "--gpus", "7", "--overlap", "dp,tp"), "leaves tp=1 (no TP degree, a power of two within"),
    (("llama-3-8b", "--gpus", "16", "--gpus-per-node", "1", "--overlap", "tp"), "within the node of 1, divides 16"),
    # a given layout's own refusal is the cause, not the overlap it leaves nothing to hide
    (("llama-3-8b", "--gpus", "16", "--layout", "tp=16", "--overlap", "pp"), "tp=16 spans more than one node"),
    # degrees that do not divide --gpus: the layout's own refusal, not a word on --overlap
    (("mixtral-8x7b", "--gpus", "4", "--layout", "tp=8", "--overlap", "pp"), "tp=8 = 8 ranks does not divide"),
])
def test_cli_an_overlap_of_a_degree_the_gpus_leave_at_1_is_refused(capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   args: tuple[str, ...], said: str) -> None:
    """--overlap pp or tp where --gpus and the given degrees leave that degree 1 printed "overlap:
    dp, pp, tp" beside a layout with neither, where --cp-comm ring was refused alike."""
    code, out, err = run(capsys, monkeypatch, "plan", *args, "--gpu", "h100", "--seq", "1024",
                         "--global-batch-tokens", "512Ki")
    assert code == 2 and said in err and err.count("\n") == 1 and out == ""


def test_cli_a_searched_layout_given_back_prices_the_same(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The search's best layout, given back as --layout with the same options, prints the same
    figures. A stack's --overlap names degrees the search may set to 1 (here tp and pp); given
    such a layout, the option is refused in one line that says what to drop, and once dropped the
    figures are the search's."""
    base = ("mistral-7b", "--gpus", "8", "--gpu", "h100", "--seq", "2048", "--global-batch-tokens", "1M")
    code, out, _ = run(capsys, monkeypatch, "plan", *base, "--overlap", "dp,tp,pp", "--json")
    best = json.loads(out)["layouts"][0]
    assert code == 0 and (best["tp"], best["pp"]) == (1, 1)
    code, _, err = run(capsys, monkeypatch, "plan", *base, "--overlap", "dp,tp,pp", "--layout", best["layout"])
    assert code == 2 and err.count("\n") == 1 and "drop tp from --overlap" in err
    code, out, _ = run(capsys, monkeypatch, "plan", *base, "--overlap", "dp", "--layout", best["layout"], "--json")
    given = json.loads(out)["layouts"][0]
    assert code == 0
    for key in ("memory", "step_time", "mfu", "tokens_per_s_per_gpu", "microbatches", "training_days"):
        assert given[key] == best[key], key


@pytest.mark.parametrize("states", ["megatron", "fsdp2"])
def test_cli_every_layout_a_moe_search_shows_is_priced_as_given(states: str, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The search's figures are each layout's own, whatever it priced before: under the torch
    engine an MoE layer keeps its expert order only where ep > 1, and the per-layer activations were
    memoised without ep, so mixtral's ep=8 layout read ep=1's 86,070,329,344 B (86,078,717,952 given)
    and a search could show a layout as fitting that, given, did not."""
    base = ("mixtral-8x7b", "--gpus", "64", "--gpu", "b200", "--seq", "4096", "--states", states)
    code, out, _ = run(capsys, monkeypatch, "plan", *base, "--layout", "tp=1,cp=1,pp=1,dp=64,zero=1,recompute=none,mb=2",
                       "--top", "10", "--json")
    shown = json.loads(out)["layouts"]
    assert code == 0 and {layout["ep"] for layout in shown} >= {4, 8}
    from archplan.planning import cluster, parallel, pricing, shards

    for layout in shown:
        # each given layout priced afresh, as its own process would: the memos are what is under test
        for module in (cluster, parallel, pricing, shards):
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()
        code, out, _ = run(capsys, monkeypatch, "plan", *base, "--layout", layout["layout"], "--json")
        assert json.loads(out)["layouts"][0]["memory"] == layout["memory"], layout["layout"]


def test_cli_the_search_never_straddles_a_node_with_tp(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-70b", "--gpus", "48", "--gpu", "h100",
                       "--gpus-per-node", "6", "--top", "100", "--json")
    tps = {layout["tp"] for layout in json.loads(out)["layouts"]}
    assert code == 0 and tps and all(6 % tp == 0 for tp in tps)


def test_cli_a_partly_filled_node_is_named(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """12 GPUs on 8-GPU nodes leave a node half full, whose 4 NICs carry a ring through it (it
    was priced as a full node's 8): said in the notes, the NICs only where rings are priced per
    node (--ring-nics members, Hopper's), and not said where the GPUs fill whole nodes or part
    of one."""
    def notes(gpus: str) -> list[str]:
        code, out, _ = run(capsys, monkeypatch, "plan", "llama-2-7b", "--gpus", gpus, "--gpu", "h100",
                           "--top", "1", "--json")
        assert code == 0
        return [n for n in json.loads(out)["notes"] if "whole node" in n]

    assert notes("12") == ["12 GPUs are 1 whole node of 8 and 4 GPUs on another: a data-parallel ring through "
                           "that node drives its 4 NICs across nodes, and a group that straddles two nodes is "
                           "priced across them; --gpus-per-node sets the node's size"]
    assert notes("16") == notes("4") == []


@pytest.mark.parametrize(("name", "gpus", "seq", "fixed", "stages"), [
    # one rank in both ZeRO groups: the stages price alike, and the layout is listed once
    ("llama-3-8b", 8, 8192, PartialLayout(tp=8, cp=1, dp=1), 1),
    # dp = 1 but cp > 1: ZeRO shards over dp·cp (a long sequence's usual layout)
    ("llama-3-8b", 64, 131072, PartialLayout(tp=1, cp=64, dp=1), 4),
    # dp·cp = 1 but the experts' group spans the tp ranks: their states shard over it
    ("mixtral-8x7b", 8, 8192, PartialLayout(tp=8, cp=1, dp=1, ep=1), 4),
])
def test_the_search_tries_every_zero_stage_where_one_shards_something(
        name: str, gpus: int, seq: int, fixed: PartialLayout, stages: int) -> None:
    def considered(partial: PartialLayout) -> int:
        return search(_plan(name), H100, gpus, seq=seq, global_batch_tokens=seq, net=NET, fixed=partial,
                      keep_unfit=True).considered

    assert considered(fixed) == stages * considered(replace(fixed, zero=0))


def test_an_infeasible_reason_does_not_blame_states_that_would_fit_sharded(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """ZeRO-0 held by the user at cp=16: the layout's states (148 GiB) exceed the GPU while all of
    them over 128 GPUs are 9.24 GiB each; the reason says which, not that the states 'alone exceed'
    a GPU they would fit sharded."""
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-70b", "--gpus", "128", "--gpu", "h100", "--seq",
                       "131072", "--global-batch-tokens", "128Ki", "--layout", "cp=16,zero=0", "--json")
    (reason,) = json.loads(out)["reasons"]
    assert code == 1 and "its model states alone (148 GiB) exceed it, where" in reason
    assert "is 9.24 GiB each before activations: no layout tried shards them that far" in reason


def test_ring_attention_keeps_no_gathered_kv_under_the_torch_engine(capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch engine's all-gather CP saves the whole sequence's K/V and the T/cp × T masks;
    its ring attention keeps the rank's own K/V only, as Transformer Engine's does: Llama 3 8B at
    1M tokens over cp=32 fits under ring and not under the all-gather (FSDP2's states), and under
    Megatron's states, whose all-gather re-gathers in the backward, the two keep alike.

    Under full recompute the activations peak at the loss (the rank's fp32 logits over the 128,256
    words), where no layer is re-running, so a layer's gathered K/V is not there: what the
    all-gather adds at that moment is what the chunk's layers share, one T/cp × T additive mask in
    bf16 and the int64 positions of the rank's queries and of every key, to the byte."""
    def activations(states: str, cp_comm: str) -> int:
        code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "32", "--gpu", "h100", "--seq",
                           "1048576", "--global-batch-tokens", "16Mi", "--states", states, "--cp-comm", cp_comm,
                           "--layout", "tp=1,cp=32,pp=1,dp=1,ep=1,zero=3,recompute=full,mb=1", "--json")
        memory = json.loads(out)["layouts"][0]["memory"]
        assert memory["fits"] == (code == 0)
        return memory["activations"]

    seq, local = 1_048_576, 1_048_576 // 32
    ring = activations("fsdp2", "ring")
    assert activations("fsdp2", "all_gather") - ring == 2 * local * seq + 8 * (local + seq)
    # the layers' checkpointed inputs (32 × T/cp × 4,096 in bf16) and the fp32 logits are most of it
    checkpoints, logits = 32 * local * 4096 * 2, local * 128_256 * 4
    assert checkpoints + logits < ring < 1.04 * (checkpoints + logits)
    assert ring / 2**30 == pytest.approx(24.17, abs=0.01)
    assert activations("megatron", "ring") == activations("megatron", "all_gather")


def test_a_given_sp_on_keeps_the_search_to_tp_groups() -> None:
    """sp=on asks for sequence parallelism, which needs a TP group: the search under it tries
    tp > 1 only (it listed TP1 layouts, which run without it)."""
    result = search(_plan("llama-2-7b"), H100, 16, seq=4096, global_batch_tokens=4 * 2**20, net=NET,
                    fixed=PartialLayout(sp=True), top=100)
    assert result.ranked and all(e.layout.tp > 1 and e.layout.sequence_parallel for e in result.ranked)


def test_a_given_zero_stage_that_shards_nothing_is_named(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """dp·cp = 1 under Megatron's states: ZeRO shards over one rank, legal and priced as zero=0's
    states, which a note says rather than a refusal."""
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-2-7b", "--gpus", "16", "--gpu", "h100", "--layout",
                       "tp=8,pp=2,dp=1,cp=1,zero=1,recompute=none,mb=1", "--json")
    assert code == 0 and "zero=1 shards the states over dp·cp = 1 rank: nothing to shard, so they are zero=0's" in \
        json.loads(out)["notes"]


def test_deepspeed_s_zero3_is_not_labelled_fsdp(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --states deepspeed a ZeRO-3 layout is DeepSpeed's ZeRO-3, not FSDP: the table and
    --json say so; the other states keep 'FSDP/ZeRO-3'."""
    def label(states: str) -> str:
        _, out, _ = run(capsys, monkeypatch, "plan", "llama-2-7b", "--gpus", "64", "--gpu", "h100", "--states", states,
                        "--layout", "tp=1,cp=1,pp=1,dp=64,zero=3,recompute=none,mb=4", "--json")
        return json.loads(out)["layouts"][0]["label"]

    assert label("deepspeed") == "TP1 PP1 DP64 ZeRO-3 none mb4"
    assert label("fsdp2") == "TP1 PP1 DP64 FSDP/ZeRO-3 none mb4"


def test_dualpipe_searches_only_the_pipelines_it_can_run() -> None:
    """DualPipe pairs stage i with stage pp − 1 − i: the search under it tries even pp ≥ 2 only,
    and no virtual stages."""
    settings = Settings(overlap=frozenset({"dp", "dualpipe"}))
    result = search(_plan("qwen3-30b-a3b"), H100, 64, seq=4096, global_batch_tokens=4 * 2**20, net=NET,
                    settings=settings, top=100)
    assert result.ranked and all(e.layout.pp >= 2 and e.layout.pp % 2 == 0 and e.layout.vpp == 1
                                 for e in result.ranked)


def test_megatron_all_gather_cp_holds_a_layers_gathered_kv_and_its_gradients(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Transformer Engine's all-gather CP re-gathers a layer's K/V in the backward beside their
    whole-sequence gradients: 2 × 1,048,576 tokens × (8 KV heads / tp 2) × 128 × 2 (K, V) × 2 B =
    4 GiB on top of ZeRO-3's gathers, which the ring does not hold; here it decides the fit."""
    def memory(cp_comm: str) -> dict[str, Any]:
        _, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "64", "--gpu", "h100", "--seq",
                        "1048576", "--global-batch-tokens", "16Mi", "--cp-comm", cp_comm, "--layout",
                        "tp=2,cp=32,pp=1,dp=1,ep=1,zero=3,recompute=none,mb=1", "--json")
        return json.loads(out)["layouts"][0]["memory"]

    gathered, ring = memory("all_gather"), memory("ring")
    assert gathered["temporary"] - ring["temporary"] == 2 * 2**20 * 4 * 128 * 2 * 2  # 4 GiB
    assert ring["fits"] and not gathered["fits"]


def test_a_layouts_text_says_sp_as_it_runs() -> None:
    """At tp=1 there is no TP group to split over: the layout's text says sp=off whatever the
    field holds, and reads back to a layout that prices the same."""
    tp1, tp2 = Layout(tp=1, dp=8), Layout(tp=2, dp=4)
    assert tp1.spec.endswith("sp=off") and tp2.spec.endswith("sp=on")
    again = parse_layout(tp1.spec).complete()
    assert again is not None and again.sequence_parallel == tp1.sequence_parallel and again.label == tp1.label


def test_cli_json_has_no_infinity(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A figure that overflows prints as null: strict parsers refuse Infinity. A link of 1e-300 GB/s
    made the training days infinite; such a link is refused now (at least 0.1 GB/s), and the
    slowest link it takes still gives finite figures."""
    from archplan import jsonout

    assert json.loads(jsonout.dumps({"days": math.inf, "mfu": [math.nan, 0.5]})) == {"days": None, "mfu": [None, 0.5]}
    code, _, err = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--nvlink-gbs",
                       "1e-300", "--layout", "tp=8,cp=1,pp=1,dp=1,zero=0,recompute=none,mb=1", "--json")
    assert code == 2 and "--nvlink-gbs" in err and err.count("\n") == 1
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--nvlink-gbs",
                       "0.1", "--layout", "tp=8,cp=1,pp=1,dp=1,zero=0,recompute=none,mb=1", "--json")
    layout = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in --json"))["layouts"][0]
    assert code == 0 and math.isfinite(layout["training_days"])


def test_cli_json_keys_are_all_in_the_docs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/plan.md's `--json` paragraph names every key the layout search prints, and every key
    of a layout in `layouts[]`, so that the list cannot fall behind the output."""
    import re

    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--json")
    printed = json.loads(out)
    docs = (Path(__file__).parents[1] / "docs" / "plan.md").read_text()
    start = docs.index("`--json` prints `mode`, `spec`, `gpus`")
    paragraph = docs[start:docs.index("`--plot` draws the", start)]
    named = {name for quoted in re.findall(r"`([^`]+)`", paragraph) for name in re.findall(r"[a-z_0-9]+", quoted)}
    assert code == 0
    assert set(printed) - named == set()
    assert set(printed["layouts"][0]) - named == set()


@pytest.mark.parametrize(("layout", "needles"), [
    (None, ["no layout: 1,024 GPUs admit no", "DP·mb ≤ 1 sequence per step"]),
    ("zero=1", ["--layout: no layout with zero=1", "DP·mb ≤ 1 sequence per step"]),
])
def test_a_search_with_no_layout_to_try_is_bad_input_either_way(layout: str | None, needles: list[str]) -> None:
    """1,024 GPUs for one sequence: no layout exists, fitting or not. It was exit 1 ("infeasible")
    without --layout and exit 2 with a --layout field that changes nothing."""
    with pytest.raises(ArchplanError) as err:
        search(_plan("llama-3-8b"), H100, 1024, seq=8192, global_batch_tokens=8192, net=NET,
               fixed=parse_layout(layout) if layout else PartialLayout())
    assert all(needle in str(err.value) for needle in needles), str(err.value)


@pytest.mark.parametrize(("model", "gpus", "seq", "layout", "needle"), [
    ("llama-3-8b", 64, 8192, "cp=1,pp=2,dp=32,sp=on", "leave tp = 1 for 64 GPUs, outside TP > 1 (sp=on)"),
    ("gpt2", 64, 1024, "cp=1,pp=1,dp=8", "leave tp = 8 for 64 GPUs, where 12 query / 12 KV heads do not split 8 ways"),
    ("llama-3-8b", 48, 32768, "tp=2,pp=1,dp=8", "leave cp = 3 for 48 GPUs, outside the CP degrees the search tries"),
    ("llama-3-8b", 8, 8192, "tp=1,cp=1,pp=1", "tp·cp·pp = 1 rank leaves dp = 8 for 8 GPUs, outside DP·mb ≤ 2 sequences"),
])
def test_no_split_names_the_rule_the_implied_degree_breaks(model: str, gpus: int, seq: int, layout: str,
                                                           needle: str) -> None:
    """Three degrees given leave the fourth: the error names the rule that one breaks. A first
    version named the fourth degree's usual rule where it held (tp = 1 "outside TP dividing a node
    of 8", cp = 3 "outside CP ≤ 4") and hid the rule it broke."""
    with pytest.raises(ArchplanError) as err:
        search(_plan(model), H100, gpus, seq=seq, global_batch_tokens=2 * seq, net=NET, fixed=parse_layout(layout))
    assert needle in str(err.value), str(err.value)


def test_no_split_names_the_searched_cp_floor() -> None:
    """64 GPUs at tp=2,pp=2,dp=2 need cp=8, under the search's floor of 8,192 tokens a rank: the
    error named TP, PP and DP rules that held and not that one, and not the cp the three degrees
    leave, which the same layout with cp= given says in its own words."""
    with pytest.raises(ArchplanError, match=r"tp·pp·dp = 8 ranks leave cp = 8 for 64 GPUs, outside CP = 1 "
                                            r"\(a CP rank keeps ≥ 8,192 tokens .*a given cp= is not held"):
        search(_plan("llama-3-8b"), H100, 64, seq=8192, global_batch_tokens=4e6, net=NET,
               fixed=parse_layout("tp=2,pp=2,dp=2"))
    given = search(_plan("llama-3-8b"), H100, 64, seq=8192, global_batch_tokens=4e6, net=NET, fixed=parse_layout("tp=2,cp=8,pp=2,dp=2"))
    assert given.ranked and all(e.layout.cp == 8 for e in given.ranked)


@pytest.mark.parametrize(("kind", "group", "wire"), [
    ("all_reduce", 8, 1750.0), ("all_gather", 8, 875.0), ("reduce_scatter", 8, 875.0), ("all_to_all", 8, 875.0),
    ("send", 8, 1000.0), ("recv", 2, 1000.0), ("all_reduce", 2, 1000.0), ("all_reduce", 1, 0.0),
    ("all_gather", 1, 0.0),
])
def test_wire_bytes_are_the_ring_factors(kind: str, group: int, wire: float) -> None:
    """Bytes a rank sends per call of 1,000 B, written out: a ring all-reduce is a reduce-scatter
    then an all-gather, 2(n−1)/n of the buffer; all-gather, reduce-scatter and all-to-all (n−1)/n;
    point-to-point the buffer; nothing in a group of one (Patarasuk & Yuan 2009; NCCL's bus-bandwidth
    factors)."""
    from archplan.planning.records import Collective

    assert Collective(kind, "dp", group, 1000, 1, "test").wire_bytes == wire  # type: ignore[arg-type]


def test_long_conv_hbm_bytes_written_out() -> None:
    """A Hyena layer's FFT traffic, fp32 over length 2T per channel and sequence (pricing.py): the
    rfft reads 4·2T and writes 8·T, the spectrum product reads two spectra and writes one (24·T),
    the irfft reads 8·T and writes 4·2T: 56 B per position; each filter's rfft, 16 B per position,
    once a micro-batch, and the decay window writes and reads the filter (8 B). Pointwise work at 2 B
    an element: the short conv over (N+1)·D channels (2 each), per order the gate and bias skip (6),
    the final gate (3)."""
    from archplan.planning.pricing import _long_conv
    from archplan.resolve import HyenaPlan

    hyena = HyenaPlan(order=2, filter_order=64, filter_depth=2, emb_dim=33, short_filter=3, l_max=2048,
                      trainable_positions=True, modulation=True, bias=True, sin_freq=14.0)
    layout = parse_layout("tp=1,cp=1,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=1").complete()
    assert layout is not None
    rates = rates_for(H100, kernel_efficiency(H100)[0], None, "bf16")
    d, seq = 768, 1024
    per_token, per_micro, gemm = _long_conv(hyena, d, layout, seq, rates)
    assert per_token == 2 * d * (2 * 3 + 6 + 3) + (8 + 8 + 24 + 8 + 8) * d
    assert per_micro == (8 + 8) * seq * d + 8 * seq * d and gemm == 0.0


def test_data_parallel_traffic_hides_all_but_the_last_layers_bucket() -> None:
    """Overlapped, a step's gradient reduction and parameter gathers hide behind compute but for
    the last layer's share, which runs after the last backward (Megatron's and FSDP's buckets):
    with ample compute 1/L of each stays exposed; with none, all of it; without overlap, all of it."""
    from archplan.planning.pricing import _dp_exposed, _MicroBatch

    ample, none = _MicroBatch(gemm_fwd=100.0, gemm_bwd=100.0), _MicroBatch()
    assert _dp_exposed(1, 4, 10.0, 0.0, ample, 10, True) == 1.0
    assert _dp_exposed(1, 4, 10.0, 0.0, none, 10, True) == 10.0
    assert _dp_exposed(1, 4, 10.0, 5.0, ample, 10, False) == 15.0
    # ZeRO-3: per micro-batch, half the gathers in the forward and half with the gradients
    assert _dp_exposed(3, 2, 4.0, 8.0, ample, 10, True) == pytest.approx(1.2)
    assert _dp_exposed(3, 2, 4.0, 8.0, none, 10, True) == 12.0


def test_interleaved_pipeline_blocks_on_its_warm_up_and_flush_transfers() -> None:
    """Megatron-LM's interleaved 1F1B with p2p overlap: stage 0 of p = 4, v = 2, m = 8 runs
    2(p − 1) + (v − 1)·p + 1 = 11 warm-up forwards of its m·v = 16 chunk forwards, 10 before the
    first steady one, so 10/16 of its transfers block; the rest hide behind ample compute."""
    from archplan.planning.pricing import _MicroBatch, pp_exposed

    layout = parse_layout("tp=1,cp=1,pp=4,vpp=2,dp=1,ep=1,zero=1,recompute=none,mb=1").complete()
    assert layout is not None
    assert sum(cluster.in_flight(layout, 8, 0)) == 11
    assert pp_exposed(1.6, _MicroBatch(gemm_fwd=1.0), layout, 8, 0) == pytest.approx(1.0)
    assert pp_exposed(1.6, _MicroBatch(), layout, 8, 0) == pytest.approx(1.6)


@pytest.mark.parametrize("states", ["megatron", "zero"])
def test_zero3_holds_two_gathered_layers_at_a_time(states: str) -> None:
    """ZeRO-3 under the Megatron and ZeRO conventions: the layer computing and the next one being
    prefetched are gathered in bf16, 2 · 2 B · a layer's parameters on a middle pipeline stage, the
    head and final norm (128,256·4096 + 4096) in a layer's place on the last; below stage 3 nothing
    is gathered. Llama-3-8B's layer, written out: q, k, v, o 4096·(4096 + 1024 + 1024 + 4096), the
    SwiGLU 3·4096·14,336, two RMSNorms 2·4096 = 218,112,000 parameters."""
    convention = {"megatron": cluster.MEGATRON, "zero": cluster.ZERO}[states]
    plan = _plan("llama-3-8b")
    layer = 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336 + 2 * 4096
    head = 128256 * 4096 + 4096
    temporary = {}
    for zero in (2, 3):
        layout = parse_layout(f"tp=1,cp=1,pp=4,dp=2,ep=1,zero={zero},recompute=full,mb=1").complete()
        assert layout is not None
        temporary[zero] = [cluster.rank_memory(plan, layout, 4096, microbatches=8, stage=stage,
                                               states=convention).temporary for stage in (1, 3)]
    assert temporary == {2: [0, 0], 3: [2 * 2 * layer, 2 * (layer + head)]}


def test_an_moe_layout_with_tensor_parallelism_notes_the_expert_tp_it_prices(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Experts are priced whole on every TP rank (expert TP 1); Megatron-Core's default expert
    TP = tp is not, and a shown layout with tp > 1 says so. A dense model or tp = 1 gets no note."""
    code, out, _ = run(capsys, monkeypatch, "plan", "mixtral-8x7b", "--gpus", "64", "--gpu", "h100", "--seq", "4096",
                       "--layout", "tp=8,cp=1,pp=1,dp=8,ep=1,zero=1,recompute=full,mb=1", "--json")
    notes = json.loads(out)["notes"]
    assert code == 1 and any(n.startswith("layout 1: the routed experts are whole on every tensor-parallel rank")
                             for n in notes)
    for args in (("mixtral-8x7b", "--layout", "tp=1,ep=8"), ("llama-3-8b", "--layout", "tp=8")):
        code, out, _ = run(capsys, monkeypatch, "plan", args[0], "--gpus", "64", "--gpu", "h100", "--seq", "4096",
                           *args[1:], "--json")
        assert code == 0 and not any("expert tensor parallelism" in n for n in json.loads(out)["notes"])


def test_a_pcie_card_s_runs_judge_its_family() -> None:
    """The PCIe cards are labelled apart from their model's SXM modules ("A100 PCIe"), and a run
    on one, once held out, reads back as a run of its family: the label was parsed as the GPU
    name `a100 pcie`, which no GPU has, and every plan on that family would have stopped there."""
    import dataclasses

    from archplan.hardware import accelerator
    from archplan.planning.accuracy import HELD_OUT, label, model_in_runs, own_runs

    assert label(accelerator("a100-pcie")) == "A100 PCIe" and label(accelerator("a100-80gb")) == "A100"
    with_pcie = dataclasses.replace(HELD_OUT["hopper"], gpus="H100 PCIe/H100")
    assert own_runs(accelerator("h200"), with_pcie) and not model_in_runs(accelerator("h200"), with_pcie)
    assert model_in_runs(accelerator("h100-pcie"), with_pcie)
    assert not own_runs(accelerator("a100"), with_pcie)
