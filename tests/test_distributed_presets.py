"""verify --layout on every preset at `plan`'s top layout for 1,024 H100s (computed here by
archplan.planning under the FSDP2 states convention that verify compares against, at plan's default
sequence length and 4M-token batch), and on the Llama 3 405B layout (TP8 PP16 DP128, 16,384 ranks;
Llama Team 2024 §3.3.2), run at small --seq to stay fast.

Model states must equal planning.cluster exactly, and every collective (tensor-parallel traffic
included) must be the same calls with the same bytes, under cluster's torch engine (the FSDP2
states convention; docs/distributed.md, "the `engine` convention"). verify builds every preset's top
layout; the largest run it under `-m heavy` and a cheaper layout of the same kind by default.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from archplan.commands.plan import DEFAULT_BUDGET_SEQ  # noqa: E402
from archplan.distributed.check import LayoutCheck, check_layout_run  # noqa: E402
from archplan.hardware import accelerator  # noqa: E402
from archplan.loader import load_spec  # noqa: E402
from archplan.planning.cluster import FSDP2  # noqa: E402
from archplan.planning.layout import Layout, parse_layout  # noqa: E402
from archplan.planning.parallel import Settings, interconnect, search  # noqa: E402
from archplan.resolve import resolve  # noqa: E402

PRESETS = Path(__file__).parent.parent / "archplan" / "presets"
GPUS = 1024
BATCH_TOKENS = 4 * 2**20  # plan's default --global-batch-tokens


@cache
def plan_top_layout(name: str) -> Layout:
    """`archplan plan PRESET --gpus 1024 --gpu h100 --states fsdp2`'s first layout."""
    spec = load_spec(PRESETS / f"{name}.yaml")
    gpu = accelerator("h100")
    result = search(resolve(spec), gpu, GPUS, seq=min(DEFAULT_BUDGET_SEQ, spec.max_seq_len),
                    global_batch_tokens=BATCH_TOKENS, net=interconnect(gpu), settings=Settings(states=FSDP2))
    return result.ranked[0].layout


MOE = "tp=1,cp=1,pp=4,dp=256,ep=8,zero=3,recompute=full,mb=1"
NAMES = sorted(p.stem for p in PRESETS.glob("*.yaml"))
# the selective scan runs a Python loop over the sequence: a shorter one keeps it to seconds
SEQ = {"mamba-2.8b": 8}
# plan's top layouts of the largest presets hold many layers on the measured rank; seconds per
# case on the shared 2-core machine (under load): 70b 80, claude-3-opus-rumored 116, deepseek-v3
# 130, frontier-1t-moe 349 (interleaved, its 4 chunks' 61 MoE layers), llama-3-70b 98,
# llama-3.1-405b 198 (the others 6-36).
# They run with `-m heavy` (not in the default run, pyproject's addopts); by default they run at a
# deeper pipeline of the same kind instead (CHEAPER): the same sharding of the same layers, and a
# measured rank holding 2-5 of them. The cost is per op (FakeTensorMode, DTensor and the tracker in
# Python), so it scales with the layers on the rank: at pp = 4 these took 24-56 s each in CI on the
# 2-core host (2026-11-30). jamba-v0.1, mamba-2.8b and stripedhyena-7b are pp = 1 at their top
# layouts too (every layer on the rank): by default they run deeper with the top layout's tp, so
# their mixers' TP plans run.
HEAVY = {"70b", "claude-3-opus-rumored", "deepseek-v3", "deepseek-v3-mtp", "frontier-1t-moe", "gpt-4-rumored", "llama-3-70b",
         "llama-3.1-405b", "jamba-v0.1", "mamba-2.8b", "stripedhyena-7b", "qwen3-235b-a22b"}
# CI budget: a 7B-class preset at a pp = 1 layout (every layer on the rank) takes 100 s on a slow
# 2-core host (measured 2026-11-30; the last landing's CI host ran the suite 7x slower than a quiet
# one). The default run keeps one preset per kind of layer and sharding; these run with `-m heavy`
# only, each beside one kept of its kind: dense GQA/MHA 7B (llama-3-8b), dense 70B deeper (70b),
# an MoE stand-in (deepseek-v3, jamba-v0.1), long convolution (hyena-153m, s4d-lm), and the small
# MHA + GELU + LayerNorm model at its top layout (gpt2: TP2 + SP, ZeRO-1, pp = 1 when this was written,
# TP1 DP1024 since later pricing; bloom-560m is the same sharding
# with ALiBi, whose per-rank slopes the gloo pair's tp2-mqa-alibi case checks, 37 s in CI), and
# Qwen3's fine-grained MoE with per-head q/k norms (qwen3-30b-a3b at its top layout, 53 s on the
# 2-core host, 2026-12-02).
# deepseek-v3-mtp's deeper layout measures the stage deepseek-v3's does (its last stage, the MTP
# module's: test_deepseek_v3_mtp_last_stage).
SAME_KIND = {"7b", "falcon-7b", "llama-2-7b", "mistral-7b", "qwen2.5-7b", "bloom-560m", "deepseek-v3-mtp",
             "claude-3-opus-rumored", "llama-3-70b", "frontier-1t-moe", "gpt-4-rumored", "stripedhyena-7b",
             "qwen3-235b-a22b"}
# 32 layers on the measured rank at their pp = 1 top layouts (TP4 + SP; mixtral also EP8): by
# default they run at pp = 16 with the top layout's tp, ep and zero (2 layers), so the same sharding
# runs at a sixteenth of the cost; the top layout itself with `-m heavy`.
DEEPER_TOP = {"llama-3-8b", "mixtral-8x7b"}
DEEPER_PP = 16
DENSE = "tp=8,cp=1,pp=16,dp=8,ep=1,zero=3,recompute=full,mb=1"  # 5 of 80 layers on the rank
CHEAPER = {"70b": DENSE, "claude-3-opus-rumored": DENSE, "llama-3-70b": DENSE,
           # llama-3.1-405b: test_llama_405b_at_16384_ranks
           # MLA + MoE under TP2 + SP, experts over ep = 32: 4 of its 61 layers
           "deepseek-v3": "tp=2,cp=1,pp=16,dp=32,ep=32,zero=2,recompute=full,mb=1",
           "deepseek-v3-mtp": "tp=2,cp=1,pp=16,dp=32,ep=32,zero=2,recompute=full,mb=1",
           "frontier-1t-moe": MOE,
           # TP8 + SP with MoE over ep, two of its 120 layers on the measured (last) rank
           "gpt-4-rumored": "tp=8,cp=1,pp=64,dp=2,ep=2,zero=2,recompute=full,mb=1",
           # 4 of 32 layers: the last stage's attention layer, Mamba-1 and MoE layers under TP4
           "jamba-v0.1": "tp=4,cp=1,pp=8,dp=32,ep=16,zero=2,recompute=none,mb=1",
           # tied embeddings over pp = 16 (Megatron's embedding group): 4 of 64 layers
           "mamba-2.8b": "tp=2,cp=1,pp=16,dp=32,ep=1,zero=2,recompute=none,mb=1",
           "stripedhyena-7b": "tp=4,cp=1,pp=4,dp=64,ep=1,zero=2,recompute=none,mb=1"}


@pytest.fixture()
def fake_world():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _check(result: LayoutCheck) -> None:
    rows = {r.category: r for r in result.memory}
    for name in ("parameters", "gradients", "optimizer"):
        assert rows[name].measured == rows[name].analytic > 0, rows[name]
    # every collective, tensor parallelism's included: same calls, same bytes (torch engine)
    for row in result.collectives:
        assert row.ok, row
    assert any(r.measured for r in result.collectives)


def _marks(name: str) -> list[pytest.MarkDecorator]:
    return [pytest.mark.heavy] if name in HEAVY or name in SAME_KIND or name in DEEPER_TOP else []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in NAMES])
def test_every_preset_at_plans_top_layout(fake_world: None, name: str) -> None:
    plan = resolve(load_spec(PRESETS / f"{name}.yaml"))
    layout = plan_top_layout(name)
    assert layout.world == GPUS
    seq = SEQ.get(name, 32)
    # one round of the interleaved schedule (vpp > 1): pp micro-batches
    _check(check_layout_run(plan, layout, seq, microbatches=layout.pp if layout.vpp > 1 else 1))


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.heavy] if n in SAME_KIND else [])
                                  for n in sorted(CHEAPER)])
def test_heavy_presets_at_a_deeper_layout(fake_world: None, name: str) -> None:
    plan = resolve(load_spec(PRESETS / f"{name}.yaml"))
    layout = parse_layout(CHEAPER[name]).complete()
    assert layout is not None and layout.world == GPUS
    _check(check_layout_run(plan, layout, SEQ.get(name, 32), microbatches=1))


@pytest.mark.parametrize("name", sorted(DEEPER_TOP))
def test_top_layout_deeper(fake_world: None, name: str) -> None:
    plan = resolve(load_spec(PRESETS / f"{name}.yaml"))
    top = plan_top_layout(name)
    assert top.pp == 1
    layout = replace(top, pp=DEEPER_PP, dp=top.dp // DEEPER_PP)
    assert layout.world == GPUS
    _check(check_layout_run(plan, layout, 32, microbatches=1))


@pytest.mark.heavy
def test_mamba_at_eight_tokens_with_four_in_flight(fake_world: None) -> None:
    """mamba-2.8b at 8 tokens, `verify --layout`'s default four micro-batches in flight on stage 0:
    the torch engine prices Mamba-1 as archplan's unit keeps it (the conv's output before its SiLU,
    none of mamba_ssm's fp32 chunk states, x_proj's all-reduced output whole on every tp rank),
    where the kernels' chunk states had put the analytic activations at 1.40 times the measured
    (58.9 MiB against 42.2, ✗); 0.985 now."""
    plan = resolve(load_spec(PRESETS / "mamba-2.8b.yaml"))
    layout = parse_layout("tp=2,cp=1,pp=4,dp=128,ep=1,zero=2,recompute=none,mb=1").complete()
    result = check_layout_run(plan, layout, 8, microbatches=4)
    activations = {r.category: r for r in result.memory}["activations"]
    assert 0.97 <= activations.analytic / activations.measured <= 1.0
    _check(result)


def test_deepseek_v3_mtp_last_stage(fake_world: None) -> None:
    """DeepSeek-V3 with its MTP module at 1,024 ranks: the last of 16 stages holds layer 60 and the
    module (TP2 + SP, experts over ep = 32), whose embedding copy, projection and head pass are
    measured beside plan's figures. Under full recompute the module's re-run is the stage's
    activation peak, the main pass's logits still alive (1.31x of plan's figure before that moment
    was priced, 1.03x now; docs/distributed.md)."""
    plan = resolve(load_spec(PRESETS / "deepseek-v3-mtp.yaml"))
    layout = parse_layout(CHEAPER["deepseek-v3-mtp"]).complete()
    assert layout is not None and layout.world == GPUS
    seq = 128
    result = check_layout_run(plan, layout, seq, microbatches=1, stage=15)
    assert list(result.measured.layers) == [60] and list(result.measured.mtp) == [0]
    _check(result)
    assert result.ok, [r for r in (*result.memory, *result.collectives) if not r.ok]
    assert any(r.kind == "all_gather" and r.mesh_dim == "tp" and r.bytes == 2 * 2 * seq * plan.d_model and r.measured
               for r in result.collectives)  # the projection's 2·d input, gathered over the sequence


def test_stand_ins_are_for_heavy_presets() -> None:
    assert CHEAPER.keys() <= HEAVY <= set(NAMES)


# CI budget: the default run takes 2 micro-batches through the measured stage (its per-micro-batch
# and per-step collectives both counted): 65 s on the loaded 2-core machine, against 141 s for 16
# in flight, the step Meta ran (docs/distributed.md's goal command), which runs with `-m heavy`
@pytest.mark.parametrize("microbatches", [2, pytest.param(16, marks=pytest.mark.heavy)])
def test_llama_405b_at_16384_ranks(fake_world: None, microbatches: int) -> None:
    plan = resolve(load_spec(PRESETS / "llama-3.1-405b.yaml"))
    layout = parse_layout("tp=8,cp=1,pp=16,dp=128,ep=1,zero=3,recompute=full,mb=1").complete()
    result = check_layout_run(plan, layout, 256, microbatches=microbatches)
    assert result.measured.layout.world == 16_384
    _check(result)


def test_tp_layout_passes_whole(fake_world: None) -> None:
    """A TP=2 SP layout passes every judged row: model states and collectives exact, activations
    within ACTIVATION_TOLERANCE (the torch engine: DTensor's gathered column inputs, act(gate),
    fp32 norm inputs)."""
    plan = resolve(load_spec(PRESETS / "llama-3-8b.yaml"))
    layout = parse_layout("tp=2,cp=1,pp=4,dp=1,ep=1,zero=3,recompute=none,mb=1").complete()
    result = check_layout_run(plan, layout, 256, microbatches=1)
    assert result.ok, [r for r in (*result.memory, *result.collectives) if not r.ok]


def test_qwen3_folded_expert_parallel_passes_whole(fake_world: None) -> None:
    """Qwen3-30B-A3B with EP8 folded over TP2 × DP4 (parallel folding), no recompute, 12 of its 48
    layers on the measured rank: every judged row passes, the activations within
    ACTIVATION_TOLERANCE since the torch engine's fp32 copies of the q/k norms' and the router's
    inputs are counted (+17%; +27%, outside it, before that; +32% over all 48 layers at seq 4,096),
    and +0.8% since the router keeps no fp32 copy of its bf16 weight (`moe._Fp32Gating`); the
    load-balancing loss's counts summed over tp, as every collective, exact."""
    plan = resolve(load_spec(PRESETS / "qwen3-30b-a3b.yaml"))
    layout = parse_layout("tp=2,cp=1,pp=4,dp=4,ep=8,zero=1,recompute=none,mb=1").complete()
    result = check_layout_run(plan, layout, 1024, microbatches=1)
    assert result.ok, [r for r in (*result.memory, *result.collectives) if not r.ok]
    acts = next(r for r in result.memory if r.category == "activations")
    assert 0.95 < acts.measured / acts.analytic < 1.05, acts
    assert any(r.kind == "all_to_all" and r.mesh_dim == "ep" and r.group_size == 8 and r.measured
               for r in result.collectives)


def test_zero3_gathered_weights_are_not_activations(fake_world: None) -> None:
    """FSDP2 at zero 3 re-creates a unit's all-gather outputs in each pre-forward; torch's tracker
    filed them as activations. Mixtral at TP2 CP2 PP2 DP4 EP8, 4 micro-batches, peaks inside a
    steady-state forward of an expert unit, whose three gathered 117 MB weights were counted as
    activations: 2.99× the analytic figure, ✗ (found by a random sweep). Filed as temporary since,
    as the same tensors made in the pre-backward are."""
    plan = resolve(load_spec(PRESETS / "mixtral-8x7b.yaml"))
    layout = parse_layout("tp=2,cp=2,pp=2,dp=4,ep=8,zero=3,recompute=none,mb=1").complete()
    result = check_layout_run(plan, layout, 64, microbatches=4, stage=0)
    assert result.ok, [r for r in (*result.memory, *result.collectives) if not r.ok]
    acts = next(r for r in result.memory if r.category == "activations")
    assert 0.95 < acts.measured / acts.analytic < 1.05, acts


# ZeRO-0 (FSDP2's replicate), ZeRO-1 (FSDP2, gradients accumulated unsharded over 4 micro-batches)
# and tied embeddings across pipeline stages (the end stages' 2-rank gradient all-reduce), 1,024 GPUs.
# ZeRO-0/1 under TP is checked in tests/test_distributed.py: after this file's earlier worlds a
# TP vocabulary-parallel embedding can be handed a destroyed world's process group by DTensor
# (docs/distributed.md, "Two fake worlds in one process")
ZERO_AND_TIED = {
    "gpt2": ("tp=1,cp=1,pp=4,dp=256,ep=1,zero=1,recompute=full,mb=1", []),
    "gemma-2b": ("tp=1,cp=1,pp=2,dp=512,ep=1,zero=0,recompute=none,mb=1", []),
    "mixtral-8x7b": ("tp=1,cp=1,pp=4,dp=256,ep=8,zero=0,recompute=full,mb=1", [pytest.mark.heavy]),
}


@pytest.mark.parametrize(("name", "layout"), [pytest.param(n, lay, marks=marks, id=n)
                                              for n, (lay, marks) in ZERO_AND_TIED.items()])
def test_zero_0_1_and_tied_embeddings_across_stages(fake_world: None, name: str, layout: str) -> None:
    plan = resolve(load_spec(PRESETS / f"{name}.yaml"))
    result = check_layout_run(plan, parse_layout(layout).complete(), 32, microbatches=4)
    _check(result)
    if plan.tied:
        assert any(r.kind == "all_reduce" and r.mesh_dim == "pp" and r.group_size == 2 and r.measured
                   for r in result.collectives)


@pytest.mark.heavy  # CI budget: tests/test_distributed.py runs vpp = 2 on tiny specs by default
def test_interleaved_pipeline_at_1024_gpus(fake_world: None) -> None:
    """vpp = 2 (Megatron's interleaved 1F1B) on llama-3-8b TP2 PP4 DP128: the last rank's two model
    chunks, 8 micro-batches; model states and every collective exact."""
    plan = resolve(load_spec(PRESETS / "llama-3-8b.yaml"))
    layout = parse_layout("tp=2,cp=1,pp=4,vpp=2,dp=128,ep=1,zero=3,recompute=full,mb=1").complete()
    result = check_layout_run(plan, layout, 32, microbatches=8, stage=3)
    assert result.measured.layers == (12, 13, 14, 15, 28, 29, 30, 31)
    _check(result)
