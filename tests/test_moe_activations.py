"""An MoE layer's forward working set beyond its saved tensors (`cluster.COMBINE_COPIES`).

The layout model prices, beside an MoE layer's saved tensors, two transient copies of its routed
rows at the combine (the re-run layer's peak under full recompute: DeepSeek-V3's measured
activations at `verify --layout`, docs/distributed.md). Measured here on the module itself: the
live bytes at the forward's peak minus those still live after it (the saved tensors and the
output), with and without expert parallelism (two ranks of the fake process group, balanced
routing: every rank receives as many rows as it sends, under FakeTensorMode as `verify --layout`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autograd_units import held_by_graph, storages

from archplan.analytic.memory import _ffn_bytes, activation_memory, moe_routing_bytes
from archplan.distributed.expert import ExpertParallel
from archplan.distributed.mesh import init_fake_world
from archplan.loader import load_spec
from archplan.modules.moe import Experts, MoEFFN
from archplan.planning import cluster
from archplan.resolve import LayerPlan, ModelPlan, MoEPlan, resolve
from archplan.spec import Spec

FIXTURES = Path(__file__).parent / "fixtures" / "distributed"
SEQ = 32
# d_model wide enough that the routed rows dwarf the routing's int64 index vectors (M = SEQ·k
# entries each), which the per-row figure does not count
D_MODEL = 512


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages the ops create that are still alive, and their peak. A functional
    collective's wait returns its input, as on a device (FakeTensorMode's makes a new tensor;
    torch's FSDPMemTracker short-circuits it the same way)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: set[int] = set()
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops._c10d_functional.wait_tensor.default:
            return args[0]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live.add(key)
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.now)
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.now -= nbytes


@pytest.fixture
def moe_layer() -> tuple[LayerPlan, int]:
    spec = load_spec(FIXTURES / "tiny-moe.yaml")
    plan = resolve(spec.model_copy(update={"d_model": D_MODEL}))
    layer = next(layer for layer in plan.layers if isinstance(layer.ffn, MoEPlan))
    return layer, plan.d_model


@pytest.fixture
def two_ranks() -> Iterator[dist.ProcessGroup]:
    init_fake_world(2, 0)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _transient(moe: MoEFFN, d_model: int) -> int:
    x = torch.randn(1, SEQ, d_model, dtype=torch.bfloat16, requires_grad=True)
    tracker = LiveBytes()
    with tracker:
        out = moe(x)
    assert out.shape == x.shape
    return tracker.peak - tracker.now


def _expected(layer: LayerPlan, d_model: int) -> int:
    assert isinstance(layer.ffn, MoEPlan)
    rows = cluster.ACT_BYTES * SEQ * layer.ffn.top_k * d_model
    combine = cluster._combine_rows(layer, SEQ, d_model)
    assert combine == cluster.COMBINE_COPIES * rows == 2 * rows
    return combine


def test_combine_working_set_one_rank(moe_layer: tuple[LayerPlan, int]) -> None:
    layer, d_model = moe_layer
    assert isinstance(layer.ffn, MoEPlan)
    moe = MoEFFN(layer.ffn, d_model).to(torch.bfloat16)
    expected = _expected(layer, d_model)
    assert expected <= _transient(moe, d_model) <= 1.05 * expected


def test_combine_working_set_expert_parallel(moe_layer: tuple[LayerPlan, int],
                                             two_ranks: dist.ProcessGroup) -> None:
    """Under EP the dispatch's all-to-all output is freed once sorted by local expert (the fix:
    it was held through the experts, a third copy); the peak is the combine's, as on one rank."""
    layer, d_model = moe_layer
    assert isinstance(layer.ffn, MoEPlan)
    e = layer.ffn.n_experts
    moe = MoEFFN(layer.ffn, d_model).to(torch.bfloat16)
    local = Experts(layer.ffn.expert, e // 2, d_model).to(torch.bfloat16)
    moe.experts = ExpertParallel(local, e, two_ranks, balanced=True)
    expected = _expected(layer, d_model)
    # as verify --layout measures it: no data moves over the fake process group
    with FakeTensorMode(allow_non_fake_inputs=True):
        transient = _transient(moe, d_model)
    assert expected <= transient <= 1.05 * expected


def _saved(moe: MoEFFN, d_model: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the distinct non-parameter storages the autograd graph of one forward holds."""
    params = storages([*moe.parameters(), *moe.buffers()])
    out = moe(torch.randn(1, SEQ, d_model, dtype=dtype, requires_grad=True) * 1.0)
    return sum(n for ptr, n in held_by_graph(out).items() if ptr not in params)


ROUTERS = {
    "softmax-aux": {},  # tiny-moe: softmax, normalised top-k, a load-balancing loss
    "sigmoid-correction": {"router": {"scoring": "sigmoid", "normalize_top_k": True,
                                      "score_correction_bias": True}, "aux_loss_coef": 0.0},
    "group-limited": {"n_experts": 8, "router": {"scoring": "sigmoid", "normalize_top_k": False,
                                                 "score_correction_bias": True, "n_group": 4, "topk_group": 2}},
    "shared-gated": {"shared": {"n": 1, "d_ff": 32, "gate": True}},  # Qwen2-MoE: 16-bit input beside the fp32 copy
}


def _with_router(router: str) -> tuple[ModelPlan, LayerPlan]:
    """tiny-moe at D_MODEL with one of ROUTERS, and its first MoE layer."""
    spec = load_spec(FIXTURES / "tiny-moe.yaml").model_dump(exclude_unset=True)
    spec["moe"] |= {k: v for k, v in ROUTERS[router].items() if k != "router"}
    spec["moe"]["router"] |= ROUTERS[router].get("router", {})
    plan = resolve(Spec.model_validate(spec | {"d_model": D_MODEL}))
    return plan, next(layer for layer in plan.layers if isinstance(layer.ffn, MoEPlan))


@pytest.mark.parametrize("ep", [1, 2])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_routing_metadata_is_what_autograd_saves(router: str, ep: int) -> None:
    """What the torch MoE saves for its backward is the per-tensor model's router, experts and
    shared experts (16-bit), the router's fp32 input copy with, beside it, the shared experts'
    16-bit input (`_fp32_cast_width`) and the routing metadata
    (`cluster._routing_bytes`: fp32 scores, int64 indices and orders, the normalisation's and the
    loss's fp32 sums, the group mask; with EP the received rows' orders), to the byte once the
    per-layer terms are added: the group ends (int32) and the loss's expert fractions and value
    (fp32). Before these were priced, verify --layout's activations at 128 tokens were 1.023 of
    plan's on tiny-moe and 1.030 on tiny-mla-moe (shared experts)."""
    plan, layer = _with_router(router)
    assert isinstance(layer.ffn, MoEPlan)
    e = layer.ffn.n_experts
    moe = MoEFFN(layer.ffn, D_MODEL).to(torch.bfloat16).train()
    per_tensor = activation_memory(plan, 1, SEQ).by_component
    expected = sum(v for k, v in per_tensor.items() if k.startswith(f"{layer.path}.ffn."))
    expected += cluster.ACT_BYTES * SEQ * cluster._fp32_cast_width(layer, D_MODEL)
    routing, expert_order = cluster._routing_bytes(layer)
    expected += SEQ * routing + 4 * e // ep + (4 * e + 4 if layer.ffn.aux_loss_coef > 0 else 0)
    if ep == 1:
        assert _saved(moe, D_MODEL) == expected
        return
    init_fake_world(ep, 0)
    try:
        local = Experts(layer.ffn.expert, e // ep, D_MODEL).to(torch.bfloat16)
        moe.experts = ExpertParallel(local, e, dist.group.WORLD, balanced=True)
        saved = _saved(moe, D_MODEL)
    finally:
        dist.destroy_process_group()
    assert saved == expected + SEQ * expert_order


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize(("autocast", "wide"), [(True, True), (True, False), (False, True)])
def test_bench_train_counts_the_routing_metadata(router: str, autocast: bool, wide: bool) -> None:
    """`bench --train`'s step (fp32 weights, under autocast or in fp32): what the torch MoE's graph
    holds is size's count with archplan's units (`units="torch"`: the per-tensor router, experts
    and shared experts, autocast's copies of the input, and `memory.moe_routing_bytes`) plus the
    per-layer terms left out of it (the group ends, the loss's expert fractions and value) and,
    under autocast, its bf16 copies of the weights its matmuls cast (model states' copies, not
    activations; the router runs in fp32 and has none). Under autocast the input is the norm's
    fp32 output, or (`wide` False) a bf16 one, as in an MTP module's block, whose router keeps an
    fp32 copy of it. Before the routing was counted, tiny-moe's `bench --train` activations at
    128 tokens were 1.019 of size's."""
    plan, layer = _with_router(router)
    moe_plan = layer.ffn
    assert isinstance(moe_plan, MoEPlan)
    moe = MoEFFN(moe_plan, D_MODEL).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        saved = _saved(moe, D_MODEL, torch.float32 if wide else torch.bfloat16)
    act = 2 if autocast else 4
    counted = _ffn_bytes("ffn", moe_plan, SEQ, D_MODEL, input_shared=False, dropout=False, act=act,
                         autocast=autocast, units="torch", wide=wide)
    e = moe_plan.n_experts
    per_layer = 4 * e + (4 * e + 4 if moe_plan.aux_loss_coef > 0 else 0)
    router_params = sum(p.numel() for p in moe.router.parameters())
    copies = 2 * (sum(p.numel() for p in moe.parameters()) - router_params) if autocast else 0
    assert saved == sum(counted.values()) + per_layer + copies
    plain = _ffn_bytes("ffn", moe_plan, SEQ, D_MODEL, input_shared=False, dropout=False, act=act, autocast=autocast,
                       wide=wide)
    assert sum(counted.values()) - sum(plain.values()) == SEQ * moe_routing_bytes(moe_plan, act)[0] > 0
