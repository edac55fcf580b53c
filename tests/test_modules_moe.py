"""MoE module: routing (group-limited included) against per-token references, the fp32 router, the
load-balancing loss (per batch and per sequence) and its gradient, no graph kept between forwards,
grouped dispatch ≡ per-expert loop, FLOPs on meta."""

from __future__ import annotations

import gc
import itertools
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from autograd_units import saved_during

from archplan.analytic import built_weights_bytes, count_params
from archplan.analytic.moe import moe_counted_flops, moe_params
from archplan.loader import load_spec
from archplan.modules.flop_formulas import grouped_mm_flop, register
from archplan.modules.model import build_model
from archplan.modules.moe import (
    MoEFFN,
    TokenShards,
    experts_loop,
    grouped_mm_path,
    load_balancing_loss,
    balance_routers,
    per_expert_linear,
    route,
)
from archplan.resolve import FFNPlan, MoEPlan, resolve
from archplan.spec import Spec


def plan(
    kind: str = "glu",
    d_ff: int = 16,
    n_experts: int = 6,
    top_k: int = 2,
    scoring: str = "softmax",
    normalize: bool = True,
    correction: bool = False,
    bias: bool = False,
    shared: bool = False,
    gate: bool = False,
    scale: float = 1.0,
    coef: float = 0.01,
    scope: str = "batch",
    groups: tuple[int, int] | None = None,  # (n_group, topk_group)
    group_score: str = "top2_sum",
    speed: float = 0.001,
) -> MoEPlan:
    act = "silu" if kind == "glu" else "gelu"
    return MoEPlan(
        n_experts=n_experts,
        top_k=top_k,
        expert=FFNPlan(kind, d_ff, act, bias),  # type: ignore[arg-type]
        shared=FFNPlan(kind, 2 * d_ff, act, bias) if shared else None,  # type: ignore[arg-type]
        shared_gate=gate,
        scoring=scoring,  # type: ignore[arg-type]
        normalize_top_k=normalize,
        router_bias=bias,
        score_correction_bias=correction,
        bias_update_speed=speed,
        routed_scale=scale,
        aux_loss_coef=coef,
        aux_loss_scope=scope,  # type: ignore[arg-type]
        n_group=groups[0] if groups else None,
        topk_group=groups[1] if groups else None,
        group_score=group_score,  # type: ignore[arg-type]
    )


def naive_route(logits: torch.Tensor, p: MoEPlan, correction: torch.Tensor | None) -> tuple[list, list]:
    """Per token, in Python: scores, pick the K best (by score + correction), weights from scores."""
    experts, weights = [], []
    for row in logits.tolist():
        if p.scoring == "softmax":
            z = sum(math.exp(v - max(row)) for v in row)
            scores = [math.exp(v - max(row)) / z for v in row]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        keys = [s + (correction[e].item() if correction is not None else 0.0) for e, s in enumerate(scores)]
        candidates = list(range(len(row)))
        if p.n_group is not None and p.topk_group is not None:
            # DeepSeek group-limited routing: rank the groups, keep the experts of the best topk_group
            per = len(row) // p.n_group
            groups = [keys[g * per:(g + 1) * per] for g in range(p.n_group)]
            rank = [max(g) if p.group_score == "max" else sum(sorted(g)[-2:]) for g in groups]
            kept = sorted(range(p.n_group), key=lambda g: -rank[g])[: p.topk_group]
            candidates = [e for e in candidates if e // per in kept]
        chosen = sorted(candidates, key=lambda e: -keys[e])[: p.top_k]
        w = [scores[e] for e in chosen]
        if p.normalize_top_k:
            w = [v / sum(w) for v in w]
        experts.append(chosen)
        weights.append([v * p.routed_scale for v in w])
    return experts, weights


@pytest.mark.parametrize(
    ("scoring", "normalize", "correction"),
    [("softmax", True, False), ("softmax", False, False), ("sigmoid", True, True), ("sigmoid", False, True),
     ("sigmoid", True, False)],
)
def test_route_matches_per_token_reference(scoring: str, normalize: bool, correction: bool) -> None:
    torch.manual_seed(0)
    p = plan(scoring=scoring, normalize=normalize, correction=correction, scale=2.5, top_k=3)
    logits = torch.randn(20, p.n_experts)
    bias = torch.randn(p.n_experts) if correction else None
    experts, weights, scores = route(logits, p, bias)
    want_e, want_w = naive_route(logits, p, bias)
    assert experts.tolist() == want_e
    torch.testing.assert_close(weights, torch.tensor(want_w), rtol=1e-5, atol=1e-6)
    assert scores.shape == (20, p.n_experts)


def test_correction_bias_steers_selection_not_weights() -> None:
    """DeepSeek-V3 eq. 16: a large bias on expert 0 selects it everywhere, weighted by its raw score."""
    p = plan(scoring="sigmoid", normalize=False, correction=True, top_k=1)
    logits = torch.randn(8, p.n_experts)
    bias = torch.zeros(p.n_experts)
    bias[0] = 100.0
    experts, weights, _ = route(logits, p, bias)
    assert (experts == 0).all()
    torch.testing.assert_close(weights[:, 0], logits[:, 0].sigmoid())


def test_the_correction_bias_balances_a_skewed_router_step_by_step() -> None:
    """DeepSeek-V3 §2.1.2: after each step an expert's bias falls by γ if it took more than the mean
    load, rises by γ if fewer. The bias was a buffer nothing updated, so `score_correction_bias`
    balanced nothing. A router skewed to expert 0 (and a training loop of forwards and updates)
    evens out; inference and untracked training forwards count nothing."""
    torch.manual_seed(0)
    gamma = 0.01
    moe = MoEFFN(plan(n_experts=4, top_k=1, scoring="sigmoid", normalize=False, correction=True, coef=0.0,
                      speed=gamma), 8)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.3)
        moe.router.weight[0] += 1.0  # expert 0 leads for every token of positive features
    x = torch.randn(1, 256, 8).abs()

    def loads() -> list[int]:
        with torch.no_grad():
            experts, _, _ = route(moe.router(x.reshape(-1, 8)), moe.plan, moe.router.score_correction_bias)
        return torch.bincount(experts.flatten(), minlength=4).tolist()

    moe.train()
    moe(x)
    assert moe.router.load_E is None  # nothing tracked until a loop asks
    balance_routers(moe, start=True)
    first = loads()
    assert first[0] == 256
    moe(x)
    moe(x)  # two micro-batches (or a recomputed forward): twice the counts, the same signs
    assert moe.router.load_E.tolist() == [2 * n for n in first]
    balance_routers(moe)
    assert moe.router.score_correction_bias.tolist() == pytest.approx([-gamma, gamma, gamma, gamma])
    assert moe.router.load_E is None
    late = torch.zeros(4)
    for step in range(200):
        moe(x)
        balance_routers(moe)
        if step >= 150:
            late += torch.tensor(loads(), dtype=torch.float32) / 50
    # from all 256 tokens on one expert to each within 15% of the mean, averaged over the last 50
    # steps (the ±γ steps keep the bias, and a step's loads, oscillating about the balance)
    assert late.tolist() == pytest.approx([256 / 4] * 4, rel=0.15)
    moe.eval()
    moe(x)
    assert moe.router.load_E is None  # inference counts nothing

@pytest.mark.parametrize(("scoring", "correction", "groups", "group_score"), [
    ("sigmoid", True, (4, 2), "top2_sum"),  # DeepSeek-V3 noaux_tc
    ("sigmoid", False, (3, 1), "top2_sum"),
    ("softmax", False, (4, 2), "max"),  # DeepSeek-V2 group_limited_greedy
    ("softmax", False, (2, 2), "max"),  # every group kept: plain top-k
])
def test_group_limited_routing_matches_per_token_reference(
    scoring: str, correction: bool, groups: tuple[int, int], group_score: str
) -> None:
    torch.manual_seed(3)
    p = plan(n_experts=12, top_k=3, scoring=scoring, correction=correction, groups=groups,
             group_score=group_score, scale=2.5)
    logits = torch.randn(64, 12)
    bias = torch.randn(12) if correction else None
    experts, weights, _ = route(logits, p, bias)
    want_e, want_w = naive_route(logits, p, bias)
    assert experts.tolist() == want_e
    torch.testing.assert_close(weights, torch.tensor(want_w), rtol=1e-5, atol=1e-6)
    if groups[1] < groups[0]:  # the limit binds: some token's plain top-k leaves its groups
        plain = route(logits, plan(n_experts=12, top_k=3, scoring=scoring, correction=correction, scale=2.5), bias)
        assert plain[0].tolist() != want_e


def test_router_and_correction_bias_stay_fp32() -> None:
    """A bf16 model keeps its router weight and correction bias in fp32 and routes on fp32 logits."""
    moe = MoEFFN(plan(scoring="sigmoid", correction=True, bias=True), 8).to(torch.bfloat16)
    assert moe.experts.w_up_EFD.dtype == torch.bfloat16
    assert moe.router.weight.dtype == moe.router.bias.dtype == torch.float32  # type: ignore[union-attr]
    assert moe.router.score_correction_bias is not None and moe.router.score_correction_bias.dtype == torch.float32
    assert moe.router(torch.randn(5, 8, dtype=torch.bfloat16)).dtype == torch.float32
    with torch.device("meta"):
        meta = MoEFFN(plan(scoring="sigmoid", correction=True), 8).to(torch.bfloat16)
    real = meta.to_empty(device="cpu")
    assert real.router.weight.dtype == torch.float32 and real.router.weight.device.type == "cpu"
    # near-tie logits a bf16 router would merge: fp32 keeps them apart
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    x[0, 0] = 1
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.zero_()  # type: ignore[union-attr]
        moe.router.weight[:2, 0] = torch.tensor([1.0, 1.0 + 2**-12])
    assert moe.router(x)[0, 1] > moe.router(x)[0, 0]
    # and under autocast, which would run the linear in bf16 and merge them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = moe.router(x)
    assert logits.dtype == torch.float32 and logits[0, 1] > logits[0, 0]


def test_correction_bias_is_a_buffer() -> None:
    moe = MoEFFN(plan(scoring="sigmoid", correction=True), 8)
    names = {n for n, _ in moe.named_parameters()}
    assert not any("score_correction_bias" in n for n in names)
    assert "router.score_correction_bias" in dict(moe.named_buffers())
    assert "router.score_correction_bias" in moe.state_dict()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_aux_loss_uniform_routing_equals_coef(scoring: str) -> None:
    """Uniform probabilities: E·Σ_e f_e·(1/E) = Σ f_e = 1, whatever the (tie-broken) selection."""
    moe = MoEFFN(plan(scoring=scoring, coef=0.03), 8)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(2, 5, 8))
    assert moe.last_aux_loss is not None
    torch.testing.assert_close(moe.last_aux_loss, torch.tensor(0.03))


def per_group_loss(scores: list[list[float]], experts: list[list[int]], coef: float) -> float:
    """E · Σ_e f_e · P_e over one group of tokens, in Python (DeepSeek-V3 eq. 17-20)."""
    n_experts, t, k = len(scores[0]), len(scores), len(experts[0])
    f = [sum(row.count(e) for row in experts) / (t * k) for e in range(n_experts)]
    p = [sum(row[e] / sum(row) for row in scores) / t for e in range(n_experts)]
    return coef * n_experts * sum(a * b for a, b in zip(f, p))


def test_aux_loss_formula_on_imbalanced_routing() -> None:
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    experts = torch.tensor([[0, 1], [0, 2]])  # top-2 of 2 tokens
    want = 0.5 * 3 * sum(a * b for a, b in zip([2 / 4, 1 / 4, 1 / 4], [0.6, 0.25, 0.15]))
    assert load_balancing_loss(scores, experts, 1, 0.5).item() == pytest.approx(want)
    # all tokens on one expert with probability 1: the maximum, coef·E
    one = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    assert load_balancing_loss(one, torch.zeros(4, 1, dtype=torch.long), 1, 0.5).item() == pytest.approx(1.5)


def test_sequence_and_batch_balance_losses() -> None:
    """Per sequence (DeepSeek-V3 eq. 17-20, seq_aux): the mean of each sequence's loss; per batch
    (Switch eq. 4-6): one loss over the pooled tokens. Two sequences each using one expert only are
    perfectly balanced as a batch and maximally unbalanced per sequence."""
    torch.manual_seed(4)
    scores = torch.rand(2 * 5, 4)
    experts = torch.randint(0, 4, (10, 2))
    seqs = [(scores[i * 5:(i + 1) * 5].tolist(), experts[i * 5:(i + 1) * 5].tolist()) for i in range(2)]
    want_seq = sum(per_group_loss(s, e, 0.1) for s, e in seqs) / 2
    assert load_balancing_loss(scores, experts, 2, 0.1).item() == pytest.approx(want_seq, rel=1e-6)
    want_batch = per_group_loss(scores.tolist(), experts.tolist(), 0.1)
    assert load_balancing_loss(scores, experts, 1, 0.1).item() == pytest.approx(want_batch, rel=1e-6)
    split = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    picks = torch.tensor([[0]] * 3 + [[1]] * 3)
    assert load_balancing_loss(split, picks, 1, 1.0).item() == pytest.approx(1.0)
    assert load_balancing_loss(split, picks, 2, 1.0).item() == pytest.approx(2.0)


@pytest.mark.parametrize("groups", [1, 2], ids=["batch", "sequence"])
def test_balance_loss_over_token_shards_is_the_micro_batch_loss(groups: int) -> None:
    """Two ranks holding half of each sequence (SP's tp ranks, CP's cp ranks): with the routed-pair
    counts summed over them, their terms make the micro-batch's loss, and its gradient, when added
    (tp: the router's gradients are summed) or averaged (cp: averaged with the data-parallel ones).
    Over each shard alone they would not (Megatron-Core sums the counts over its tp_cp_group)."""
    torch.manual_seed(5)
    scores = torch.rand(groups, 8, 4).softmax(-1).requires_grad_(True)
    experts = scores.detach().topk(2, dim=-1).indices
    whole = load_balancing_loss(scores.reshape(-1, 4), experts.reshape(-1, 2), groups, 0.1)
    halves = (slice(0, 4), slice(4, 8))
    counts = [torch.zeros(groups, 4).scatter_add_(1, experts[:, h].reshape(groups, -1), torch.ones(groups, 8))
              for h in halves]
    whole_grad, = torch.autograd.grad(whole, scores)
    for summed, combine in ((2, 1.0), (1, 0.5)):
        shards = TokenShards(ranks=2, summed=summed, reduce=lambda local: counts[0] + counts[1])
        terms = [load_balancing_loss(scores[:, h].reshape(-1, 4), experts[:, h].reshape(-1, 2), groups, 0.1, shards)
                 for h in halves]
        total = combine * sum(terms)
        assert total.item() == pytest.approx(whole.item(), rel=1e-6)
        assert torch.allclose(torch.autograd.grad(total, scores)[0], whole_grad, atol=1e-7)
    alone = sum(load_balancing_loss(scores[:, h].reshape(-1, 4), experts[:, h].reshape(-1, 2), groups, 0.1)
                for h in halves) / 2
    assert alone.item() != pytest.approx(whole.item(), rel=1e-3)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_module_aux_loss_uses_its_scope(scope: str) -> None:
    torch.manual_seed(5)
    p = plan(scoring="sigmoid", correction=True, coef=0.2, scope=scope, groups=(3, 2), top_k=2)
    moe = MoEFFN(p, 8)
    x = torch.randn(3, 4, 8)
    moe(x)
    experts, _, scores = route(moe.router(x.reshape(12, 8)), p, moe.router.score_correction_bias)
    want = load_balancing_loss(scores, experts, 3 if scope == "sequence" else 1, 0.2)
    assert moe.last_aux_loss is not None
    torch.testing.assert_close(moe.last_aux_loss, want.detach())
    moe.eval()
    moe(x)
    assert moe.last_aux_loss is None  # no balance loss outside training


def test_no_graph_is_kept_between_forwards() -> None:
    """Every tensor the forward saves for backward dies with the output: the module keeps a
    detached loss, never the scores or their graph."""
    moe = MoEFFN(plan(scoring="sigmoid", correction=True, coef=0.1, shared=True), 8)
    x = torch.randn(2, 6, 8)
    saved: list[weakref.ref[torch.Tensor]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        # a detached alias, held by the graph alone (returning `t` itself would make an output's
        # node and its saved output a reference cycle)
        alias = t.detach()
        saved.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = moe(x)
    alive = [r for r in saved if r() is not None]
    assert alive  # the graph exists while the output does
    assert moe.last_aux_loss is not None and moe.last_aux_loss.grad_fn is None
    del out
    gc.collect()
    assert [r for r in saved if r() is not None] == []


def test_aux_loss_reaches_the_router_gradient() -> None:
    """The attached loss adds exactly ∂(aux)/∂θ to the gradient taken through the output."""
    torch.manual_seed(6)
    p = plan(scoring="softmax", coef=0.5, scope="sequence")
    moe = MoEFFN(p, 8)
    x = torch.randn(2, 5, 8)
    probe = torch.randn(2, 5, 8)
    got = torch.autograd.grad((moe(x) * probe).sum(), moe.router.weight)[0]
    experts, _, scores = route(moe.router(x.reshape(10, 8)), p, None)
    explicit = (experts_loop(moe, x) * probe).sum() + load_balancing_loss(scores, experts, 2, 0.5)
    want = torch.autograd.grad(explicit, moe.router.weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


CASES = list(
    itertools.product(
        ["glu", "mlp"],  # expert kind
        [(16, 24), (6, 10)],  # (d_model, d_ff): aligned grouped_mm rows, and the per-expert loop
        [("softmax", True, False), ("sigmoid", True, True), ("softmax", False, False)],
        [False, True],  # biases, shared experts + gate
    )
)


@pytest.mark.parametrize(("kind", "dims", "routing", "extras"), CASES)
def test_grouped_dispatch_equals_expert_loop(
    kind: str, dims: tuple[int, int], routing: tuple[str, bool, bool], extras: bool
) -> None:
    torch.manual_seed(1)
    d, f = dims
    scoring, normalize, correction = routing
    p = plan(kind, f, scoring=scoring, normalize=normalize, correction=correction, bias=extras,
             shared=extras, gate=extras, scale=1.5)
    moe = MoEFFN(p, d).eval()  # the balance loss's gradient is tested on its own above
    if moe.router.score_correction_bias is not None:
        moe.router.score_correction_bias.normal_()
    x = torch.randn(3, 7, d, requires_grad=True)
    y = moe(x)
    y_ref = experts_loop(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    probe = torch.randn_like(y)
    grads = torch.autograd.grad((y * probe).sum(), [x, *moe.parameters()])
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x, *moe.parameters()], allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        want = g_ref if g_ref is not None else torch.zeros_like(g)
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", [False, True])
def test_shared_expert_and_its_gate_against_qwen2_moe(gate: bool) -> None:
    """experts_loop adds the module's own shared path, so the comparison above cannot see it wrong:
    here it is written out. DeepSeekMoE (Dai et al. 2024): the shared expert's output is added
    ungated; Qwen2-MoE `Qwen2MoeSparseMoeBlock`: sigmoid(x·w_gate) · shared_expert(x), one scalar per
    token. The routed part is experts_loop's without the shared term."""
    torch.manual_seed(3)
    d = 16
    moe = MoEFFN(plan("glu", 24, shared=True, gate=gate), d).eval()
    assert moe.shared is not None
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        x_ND = x.reshape(-1, d)
        up, gate_proj, down = moe.shared.up_proj, moe.shared.gate_proj, moe.shared.down_proj
        shared_ND = down(F.silu(gate_proj(x_ND)) * up(x_ND))
        if gate:
            assert moe.shared_gate is not None and moe.shared_gate.weight.shape == (1, d)
            shared_ND = torch.sigmoid(x_ND @ moe.shared_gate.weight.T) * shared_ND
        routed = experts_loop(moe, x).reshape(-1, d) - moe._shared(x_ND)
        torch.testing.assert_close(moe(x).reshape(-1, d), routed + shared_ND, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moe._shared(x_ND), shared_ND)


@pytest.mark.parametrize(("d", "f"), [(16, 32), (12, 20)])  # bf16 rows aligned; unaligned (per-expert loop)
def test_dispatch_bf16_matches_fp32_loop(d: int, f: int) -> None:
    torch.manual_seed(2)
    moe = MoEFFN(plan("glu", f, n_experts=4, shared=True), d)
    x = torch.randn(2, 9, d)
    want = experts_loop(moe, x)
    got = moe.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


def test_experts_compute_in_the_autocast_dtype() -> None:
    """Under bf16 autocast with fp32 weights (a training step's master copy) the grouped matmuls run
    in bf16, as autocast runs every mm, though torch registers no autocast kernel for `_grouped_mm`:
    the routed rows and every expert tensor kept for the backward are bf16, the result within bf16
    rounding of the fp32 loop, and the weights' gradients fp32."""
    torch.manual_seed(3)
    moe = MoEFFN(plan("glu", 32, n_experts=4, top_k=2), 16)
    x = torch.randn(2, 9, 16, requires_grad=True)
    want = experts_loop(moe, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, saved = saved_during(lambda: moe(x))
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    routed = 2 * 9 * 2  # tokens × top_k
    assert {t.dtype for t in saved if t.dim() == 2 and t.shape[0] == routed and t.is_floating_point()} == {torch.bfloat16}
    got.sum().backward()
    assert moe.experts.w_up_EFD.grad is not None and moe.experts.w_up_EFD.grad.dtype == torch.float32


def test_unrouted_experts_get_zero_gradient() -> None:
    """Only the chosen experts compute: experts no token picks get exactly zero gradient."""
    moe = MoEFFN(plan("glu", 8, n_experts=4, top_k=1, bias=True), 8)
    with torch.no_grad():
        moe.router.weight.zero_()
        assert moe.router.bias is not None
        moe.router.bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
    moe(torch.randn(1, 5, 8)).sum().backward()
    grad = moe.experts.w_up_EFD.grad
    assert grad is not None
    assert grad[2].abs().sum() > 0
    assert (grad[[0, 1, 3]] == 0).all()


def expected_flops(p: MoEPlan, d: int, n: int) -> int:
    mats = 3 if p.expert.kind == "glu" else 2
    flops = 2 * n * d * p.n_experts + 2 * n * p.top_k * mats * d * p.expert.d_ff
    if p.shared is not None:
        flops += 2 * n * mats * d * p.shared.d_ff
    if p.shared_gate:
        flops += 2 * n * d
    return flops


@pytest.mark.parametrize(("kind", "dims", "dtype"), [
    ("glu", (16, 24), torch.bfloat16),  # grouped_mm on meta
    ("glu", (16, 24), torch.float32),  # grouped_mm after a free meta cast to bf16
    ("mlp", (6, 10), torch.bfloat16),  # unaligned: views into zero-padded copies
    ("glu", (12, 20), torch.float32),  # aligned for fp32 but not for bf16
    ("mlp", (1, 3), torch.float32),  # d_model = 1: a size-1 contraction still counts
])
def test_flops_on_meta_match_formula(kind: str, dims: tuple[int, int], dtype: torch.dtype) -> None:
    d, f = dims
    p = plan(kind, f, n_experts=8, top_k=3, shared=True, gate=True, bias=True)
    with torch.device("meta"):
        moe = MoEFFN(p, d).to(dtype)
    x = torch.empty(2, 5, d, device="meta", dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        y = moe(x)
    assert y.shape == (2, 5, d) and y.device.type == "meta"
    assert counter.get_total_flops() == expected_flops(p, d, 10)
    assert counter.get_total_flops() == sum(moe_counted_flops(p, d, 2, 5).values())


@pytest.mark.parametrize(("dims", "dtype"), [
    ((16, 24), torch.float32),  # grouped_mm
    ((64, 1), torch.float32),  # unaligned: the per-expert loop, never a zero-padded product
    ((12, 20), torch.bfloat16),  # aligned for fp32 but not for bf16
])
def test_flops_on_cpu_match_formula(dims: tuple[int, int], dtype: torch.dtype) -> None:
    d, f = dims
    p = plan("glu", f, n_experts=8, top_k=2, shared=True, gate=True)
    moe = MoEFFN(p, d).to(dtype)
    x = torch.randn(2, 5, d, dtype=dtype, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y = moe(x)
    assert counter.get_total_flops() == expected_flops(p, d, 10)
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()  # an expanded (stride 0) gradient: handed on in aligned rows
    assert counter.get_total_flops() == 2 * expected_flops(p, d, 10)


def test_training_flops_on_meta_are_three_forwards() -> None:
    p = plan("glu", 24, n_experts=8, top_k=2, shared=True, gate=True)
    with torch.device("meta"):
        moe = MoEFFN(p, 16).bfloat16()
    x = torch.empty(2, 5, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        moe(x).float().sum().backward()
    assert counter.get_total_flops() == 3 * expected_flops(p, 16, 10)


def test_params_match_analytic() -> None:
    for p in [plan("glu", 24, shared=True, gate=True, bias=True, correction=True, scoring="sigmoid"),
              plan("mlp", 10, bias=True), plan("glu", 8)]:
        moe = MoEFFN(p, 12)
        built = {name: sum(t.numel() for t in getattr(moe, name).parameters())
                 for name in ("router", "experts", "shared", "shared_gate") if getattr(moe, name) is not None}
        assert built == moe_params(p, 12)


def test_expert_weights_are_3d_and_linear_shaped() -> None:
    moe = MoEFFN(plan("glu", 24, n_experts=5, bias=True), 16)
    ex = moe.experts
    assert ex.w_gate_EFD is not None and ex.w_gate_EFD.shape == (5, 24, 16)
    assert ex.w_up_EFD.shape == (5, 24, 16) and ex.w_down_EDF.shape == (5, 16, 24)
    assert ex.b_up_EF is not None and ex.b_up_EF.shape == (5, 24)
    assert ex.b_down_ED is not None and ex.b_down_ED.shape == (5, 16)
    mlp = MoEFFN(plan("mlp", 24, n_experts=5), 16).experts
    assert mlp.w_gate_EFD is None and mlp.b_up_EF is None


def test_grouped_mm_formula_layouts_and_idempotent_registration() -> None:
    register()
    register()
    assert grouped_mm_flop((10, 4), (3, 4, 6)) == 2 * 10 * 4 * 6
    assert grouped_mm_flop((3, 10, 4), (3, 4, 6)) == 2 * 3 * 10 * 4 * 6
    assert grouped_mm_flop((4, 10), (10, 6)) == 2 * 4 * 10 * 6
    assert grouped_mm_flop((3, 10, 4), (4, 6)) == 2 * 10 * 4 * 6
    x = torch.randn(10, 8)
    w = torch.randn(3, 8, 4)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    with FlopCounterMode(display=False) as counter:
        y = F.grouped_mm(x, w, offs=offs)
    assert counter.get_total_flops() == 2 * 10 * 8 * 4
    torch.testing.assert_close(y, torch.cat([x[:3] @ w[0], x[3:] @ w[2]]))


def test_grouped_mm_path_follows_the_documented_support() -> None:
    """grouped_mm's docstring: bf16 on CUDA SM >= 80. Elsewhere on CUDA: a per-expert loop."""
    cuda, cpu, meta = torch.device("cuda"), torch.device("cpu"), torch.device("meta")
    assert grouped_mm_path(cuda, torch.bfloat16, (9, 0)) == "grouped"
    assert grouped_mm_path(cuda, torch.float32, (9, 0)) == "loop"
    assert grouped_mm_path(cuda, torch.bfloat16, (7, 5)) == "loop"
    assert grouped_mm_path(cpu, torch.float32, None) == "grouped"
    assert grouped_mm_path(cpu, torch.float64, None) == "loop"  # the CPU kernel refuses fp64
    assert grouped_mm_path(meta, torch.float32, None) == "meta"


@pytest.mark.parametrize("preset", ["deepseek-v3-mtp", "qwen3-30b-a3b", "mixtral-8x7b", "llama-2-7b"])
def test_the_built_weights_take_the_bytes_bench_prices(preset: str) -> None:
    """A bf16 build holds every parameter in 2 bytes but the routers' 4 (fp32, as transformers'
    DeepSeek-V3 keeps gate.weight): `built_weights_bytes`, which `bench` prices, is the build's own
    sum (DeepSeek-V3 with MTP: 216,530,944 B above 2 B/param)."""
    plan = resolve(load_spec(preset))
    model = build_model(load_spec(preset), device="meta", dtype=torch.bfloat16)
    built = sum(p.numel() * p.element_size() for p in model.parameters())
    assert built_weights_bytes(count_params(plan), 2) == built
    if preset == "deepseek-v3-mtp":
        assert built - 2 * count_params(plan).total == 216_530_944


def test_an_fp64_moe_model_runs_its_experts_in_fp64() -> None:
    """An fp64 reference build of a routed model: grouped_mm's CPU kernel takes fp32/bf16/fp16 only,
    so the experts take the per-expert loop, and forward and backward run."""
    spec = dict(name="t", vocab_size=32, d_model=16, n_layers=1, max_seq_len=16, attention={"kind": "mha", "n_heads": 2},
                ffn=None, moe={"n_experts": 4, "top_k": 2, "expert": {"kind": "glu", "d_ff": 16}})
    torch.manual_seed(3)
    model = build_model(Spec.model_validate(spec), device="cpu", dtype=torch.float64)
    logits = model(torch.randint(0, 32, (2, 5)))
    assert logits.dtype == torch.float64
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())
    assert {p.dtype for p in model.layers[0].ffn.experts.parameters()} == {torch.float64}  # the router stays fp32


def test_per_expert_loop_equals_grouped_mm_and_counts_the_same() -> None:
    torch.manual_seed(7)
    x = torch.randn(11, 8)
    w = torch.randn(4, 6, 8)
    offs = torch.tensor([3, 3, 9, 11], dtype=torch.int32)  # expert 1 gets no rows
    with FlopCounterMode(display=False) as counter:
        got = per_expert_linear(x, w, offs)
    torch.testing.assert_close(got, F.grouped_mm(x, w.transpose(-2, -1), offs=offs))
    assert counter.get_total_flops() == 2 * 11 * 8 * 6


def test_deepnorm_init_scales_expert_weights_not_biases() -> None:
    spec = dict(name="t", vocab_size=32, d_model=16, n_layers=2, max_seq_len=16, residual={"kind": "deepnorm"},
                attention={"kind": "mha", "n_heads": 2},
                ffn=None, moe={"n_experts": 4, "top_k": 2, "expert": {"kind": "mlp", "d_ff": 16, "bias": True}})
    torch.manual_seed(8)
    deep = build_model(Spec.model_validate(spec), device="cpu")
    torch.manual_seed(8)
    pre = build_model(Spec.model_validate({**spec, "residual": {"kind": "pre"}}), device="cpu")
    beta = deep.plan.deepnorm_beta
    assert beta < 1
    for a, b in zip(deep.layers, pre.layers):
        ea, eb = a.ffn.experts, b.ffn.experts  # type: ignore[union-attr]
        torch.testing.assert_close(ea.w_up_EFD, beta * eb.w_up_EFD)
        torch.testing.assert_close(ea.w_down_EDF, beta * eb.w_down_EDF)
        torch.testing.assert_close(ea.b_up_EF, eb.b_up_EF)
        torch.testing.assert_close(ea.b_down_ED, eb.b_down_ED)


def test_fvcore_traces_group_limited_routing() -> None:
    """fvcore's jit trace of the group mask (a scatter of a bool Scalar once crashed its alias
    analysis): it runs, and counts the fp32 router as N·D·E multiply-adds."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    moe = MoEFFN(plan(scoring="sigmoid", correction=True, n_experts=8, groups=(4, 2), scope="sequence"), 16)
    analysis = fvcore_nn.FlopCountAnalysis(moe, (torch.randn(2, 5, 16),))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert analysis.by_module()["router"] == 10 * 16 * 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_dispatch_matches_the_expert_loop(dtype: torch.dtype, tol: float) -> None:
    """On CUDA: bf16 through grouped_mm (SM >= 80), fp32 through the per-expert loop; both equal
    the reference loop, and the router stays fp32."""
    torch.manual_seed(9)
    p = plan("glu", 32, n_experts=8, top_k=2, scoring="sigmoid", correction=True, groups=(4, 2), shared=True)
    moe = MoEFFN(p, 64).to("cuda", dtype).eval()
    assert moe.router.weight.dtype == torch.float32
    x = torch.randn(2, 16, 64, device="cuda", dtype=dtype)
    want = experts_loop(moe, x).float()
    torch.testing.assert_close(moe(x).float(), want, rtol=tol, atol=tol)


def test_router_gating_on_a_16_bit_weight_keeps_no_fp32_copy() -> None:
    """FSDP2's mixed precision hands the router its bf16 gather: the fp32 product and gradients
    are autograd's through `weight.float()`, but the fp32 copy of the weight is not saved for the
    backward (Megatron-Core's `RouterGatingLinearFunction`)."""
    from torch import nn

    from archplan.modules.moe import Router

    torch.manual_seed(0)
    x = torch.randn(5, 16, requires_grad=True)
    weight = torch.randn(8, 16).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(8).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(5, 8)
    expected = F.linear(x.float(), weight.float(), bias.float())
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), grad)
    router = Router(16, 8, bias=True, correction=False)
    router.weight, router.bias = nn.Parameter(weight.detach().clone()), nn.Parameter(bias.detach().clone())
    got = router(x)
    assert torch.equal(got, expected)
    saved = got.grad_fn.saved_tensors
    assert not any(t.dtype == torch.float32 and t.shape == weight.shape for t in saved), [t.shape for t in saved]
    got_grads = torch.autograd.grad(got, (x, router.weight, router.bias), grad)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == e.dtype and torch.allclose(g.float(), e.float(), rtol=1e-6, atol=1e-6)
