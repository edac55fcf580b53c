"""Edges of the layout model, the solver, the designer and the scaling-law optima that a mutation
audit (2026-12-05) found no test pinned: each test fails on a plausible wrong change that passed
the suite, and its expected value is derived here from the rule the code documents."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import archplan
from archplan.analytic import count_params
from archplan.hardware import accelerator, kernel_efficiency
from archplan.loader import load_spec
from archplan.planning.design import Family, NoRecipe, design
from archplan.planning.layout import Layout
from archplan.planning.optimal import LawChoice, allocate, budget, isoflop_curve, law_params, optimum
from archplan.planning.parallel import interconnect
from archplan.planning.pricing import Network, collective_time, ep_all_to_all_time, nodes_reached, uniform_moe
from archplan.planning.records import Collective
from archplan.planning.shards import Tensor
from archplan.planning.solve import Targets, solve
from archplan.planning.zero3_fetch import modules
from archplan.resolve import resolve
from archplan.spec import Spec

PRESETS = Path(archplan.__file__).parent / "presets"


def test_a_pairwise_mesh_gives_a_group_one_link_per_other_member() -> None:
    """MI300X's eight GPUs are linked pairwise (7 × 64 GB/s each), not through a switch: TP2 and
    a pipeline send have one 64 GB/s link, TP4 three, and only TP8 all 448. Every group was priced
    at 448, and the search ranked TP2 first on bandwidth no pair has. A user's --nvlink-gbs is
    every group's, as through a switch."""
    from archplan.planning.parallel import network

    gpu = accelerator("mi300x")
    eff, _ = kernel_efficiency(gpu)
    net = network(interconnect(gpu), "one")
    assert [net.intra(g) for g in (2, 4, 8)] == [64e9, 192e9, 448e9]
    seconds = {size: collective_time(Collective("all_reduce", "tp", size, 10**9, 1, "tp"), Layout(tp=size, dp=8 // size),
                                     net, eff) for size in (2, 8)}
    # a ring all-reduce moves 2(g − 1)/g of the bytes
    assert seconds[2] - eff.latency == pytest.approx(1e9 / (64e9 * eff.intra_link))
    assert seconds[8] - eff.latency == pytest.approx(1.75e9 / (448e9 * eff.intra_link))
    send = collective_time(Collective("send", "pp", 8, 10**9, 1, "pp"), Layout(pp=8), net, eff)
    assert send - eff.latency == pytest.approx(1e9 / (64e9 * eff.intra_link))
    assert network(interconnect(gpu, intra_gbs=448), "one").intra(2) == 448e9
    assert network(interconnect(accelerator("h100")), "one").intra(2) == 450e9


def test_a_pcie_a100_is_priced_as_its_own_card() -> None:
    """The PCIe A100s borrowed the SXM entries: NVLink 3's 300 GB/s for every group on the node,
    where they reach each other over PCIe 4 (NVLink bridges join pairs only), and the SXM's HBM
    bandwidth on the 80 GB card (2,039 GB/s against its 1,935). Peaks, memory and the Ampere
    constants are the SXM parts'."""
    for size, hbm in (("40gb", 1555e9), ("80gb", 1935e9)):
        pcie, sxm = accelerator(f"a100-pcie-{size}"), accelerator(f"a100-{size}")
        assert pcie.hbm_bytes_per_s == hbm and pcie.peak_flops == sxm.peak_flops
        assert pcie.memory_bytes == sxm.memory_bytes
        assert kernel_efficiency(pcie) == kernel_efficiency(sxm)
        assert interconnect(pcie).intra_node == 32e9 and interconnect(sxm).intra_node == 300e9
    assert accelerator("a100-pcie").key == "a100-pcie-80gb"


def test_a_members_ring_never_outruns_the_in_node_link() -> None:
    """A ring over its members' NICs still leaves each rank over its own link to the node: on
    PCIe H100s eight 50 GB/s NICs would be 400 GB/s, but a rank's share goes out at 64 GB/s."""
    gpu = accelerator("h100-pcie")
    eff, _ = kernel_efficiency(gpu)
    net = interconnect(gpu)
    members = Network(net.intra_node, net.inter_node, net.gpus_per_node, "members")
    reduce = Collective("all_reduce", "dp", 16, 10**9, 1, "grads")
    expected = 2 * 15 / 16 * 1e9 / (64e9 * eff.intra_link) + eff.latency  # ring all-reduce, 2(n−1)/n
    assert collective_time(reduce, Layout(dp=16), members, eff) == pytest.approx(expected)


def test_an_ep_group_spans_the_nodes_its_ranks_need() -> None:
    """128 EP ranks over 72-GPU NVL72 domains take 2 of them (⌈128/72⌉, not ⌊⌋): DeepSeek-V3's 8
    groups, 4 per token, reach 2·(1 − C(4,4)/C(8,4)) nodes; the dispatch and combine each cost the
    slower of the inter-node and the NVLink leg (`ep_all_to_all_time`)."""
    moe = uniform_moe(resolve(load_spec("deepseek-v3")))
    gpu = accelerator("gb200")
    eff, _ = kernel_efficiency(gpu)
    net = interconnect(gpu)
    per_copy = 2 * 4096 * 7168  # bf16 hidden states of a 4,096-token micro-batch
    record = Collective("all_to_all", "ep", 128, 8 * per_copy, 2, "dispatch + combine")
    reach = 2 * (1 - math.comb(4, 4) / math.comb(8, 4))
    inter = 8 * per_copy / 8 * reach / 2 / (50e9 * eff.inter_link)
    nvlink = 8 * per_copy * 63 / 64 / (900e9 * eff.intra_link)
    time = ep_all_to_all_time(record, Layout(dp=128, ep=128), Network(net.intra_node, net.inter_node,
                                                                       net.gpus_per_node), eff, moe, False)
    assert time == pytest.approx(2 * (max(inter, nvlink) + eff.latency))


def test_k_routed_copies_reach_k_nodes_at_most() -> None:
    """A router picking more groups than copies (DeepSeek-V3's 4 of 8 groups at top-2) reaches at
    most 2 nodes: it read 4."""
    moe = replace(uniform_moe(resolve(load_spec("deepseek-v3"))), top_k=2)
    assert nodes_reached(moe, 8) <= 2
    assert nodes_reached(uniform_moe(resolve(load_spec("deepseek-v3"))), 8) == 4


def test_a_parameter_at_the_persistence_threshold_is_fetched() -> None:
    """DeepSpeed ZeRO-3 keeps parameters under `stage3_param_persistence_threshold` (10⁵) gathered:
    one of exactly 10⁵ elements is fetched, one of 99,999 is not."""
    assert [m.gathered for m, _ in modules([Tensor("a.w", (100_000,), "replicated")], 1, 1)] == [100_000]
    assert modules([Tensor("b.w", (99_999,), "replicated")], 1, 1) == []


def test_the_solver_tries_top_k_up_to_16(tmp_path: Path) -> None:
    """`top_k: solve` tries 1 … min(E, 16) (docs/plan.md): Mixtral with 16 experts at top-12
    is found from its own counts."""
    data = yaml.safe_load((PRESETS / "mixtral-8x7b.yaml").read_text())
    data.pop("reference", None)
    data["moe"].update(n_experts=16, top_k=12)
    counts = count_params(resolve(Spec.model_validate(data)))
    data["moe"]["top_k"] = "solve"
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump(data, sort_keys=False))
    result = solve(partial, Targets(counts.total, counts.active), tolerance=0)
    assert result.solved and result.nearest.values == {"moe.top_k": 12}


def test_the_dense_recipe_is_llama_3_8b_at_its_size() -> None:
    """The dense recipe's anchor: Llama 3 8B's non-embedding trunk (8,030,261,248 less its two
    128,256 × 4,096 matrices) is 32 layers of width 4,096."""
    made = design(Family.dense, 8_030_261_248, vocab=128256)
    assert made.recipe_layers == pytest.approx(32) and made.recipe_width == pytest.approx(4096)


def test_the_design_score_weighs_the_width_twice() -> None:
    """At 4.175B the documented score (width deviation counted twice) picks 27 × 3,072 with d_ff
    10,752 (the recipe's 3.5 × d_model) over 28 layers of d_ff 10,496, which weighing the width
    once would pick."""
    spec = design(Family.dense, 4.175e9, vocab=128256).spec
    assert (spec.n_layers, spec.d_model, spec.ffn.d_ff) == (27, 3072, 10752)


@pytest.mark.parametrize("family", [Family.dense, Family.moe])
def test_the_depth_moves_smoothly_with_the_budget(family: Family) -> None:
    """Steps of 512 in d_model moved the depth 2-4x between budgets 1% apart (24 x 1024, then 8 x
    1536, d/L 192): over 1e20 ... 1e26 FLOPs, neighbouring budgets 1.26x apart now differ by at most
    1.5x in depth, and d/L stays within the recipes' band (7B 128, 70B 102, 1T trunk 137) widened
    to 64 ... 192."""
    previous = None
    for exponent in range(200, 261):
        n_opt, _ = allocate(LawChoice.epoch, 10 ** (exponent / 10))
        spec = design(family, n_opt, vocab=128256).spec
        assert 64 <= spec.d_model / spec.n_layers <= 192, (exponent, spec.n_layers, spec.d_model)
        if previous is not None:
            assert max(spec.n_layers / previous, previous / spec.n_layers) <= 1.5, (exponent, spec.n_layers)
        previous = spec.n_layers


def test_a_small_model_is_not_pushed_to_d_model_2048() -> None:
    """With a 128K vocabulary an 853M model was 6 x 2048 (d/L 341) where the recipe curve says
    about 14 x 1,300: d_model 1,536, with 4 KV heads under its 12 query heads, sits between."""
    spec = design(Family.dense, 853e6, vocab=128256).spec
    assert (spec.n_layers, spec.d_model) == (15, 1536)
    assert (spec.attention.n_heads, spec.attention.n_kv_heads) == (12, 4)  # type: ignore[union-attr]


@pytest.mark.parametrize("target", [9e9, 6e10])
def test_an_moe_tokens_experts_add_up_to_the_dense_width(target: float) -> None:
    """The MoE recipe splits a dense FFN's 3.5·d over the k routed experts and the shared one
    (8 + 1): each expert's d_ff within a 128 rounding of 3.5·d/9."""
    spec = design(Family.moe, target, vocab=128256).spec
    assert abs(spec.moe.expert.d_ff - 3.5 * spec.d_model / 9) <= 128


def test_small_designs_keep_one_kv_head_per_query_head() -> None:
    """Below 8 heads the designer keeps multi-head attention (one KV head per query head)."""
    made = design(Family.dense, 1e8, vocab=32000).spec
    assert made.d_model == 640 and made.attention.n_heads == made.attention.n_kv_heads == 5


def test_the_isoflop_curve_spans_a_decade_each_side() -> None:
    optimal = optimum(LawChoice.epoch, 1e21)
    n, curve = optimal.optimal.params, isoflop_curve(optimal)
    assert [curve[i].params for i in (0, 40, -1)] == [pytest.approx(n / 10), pytest.approx(n), pytest.approx(10 * n)]


def test_the_isoflop_factors_are_the_documented_ones() -> None:
    assert [f for f, _ in optimum(LawChoice.epoch, 1e22).isoflop] == [0.25, 0.5, 1.0, 2.0, 4.0]


def test_the_20x_rule_is_scored_with_besiroglus_fit() -> None:
    """The 20-tokens-per-parameter rule's loss is Besiroglu et al. 2024's fit (E 1.8172, A 482.01,
    α 0.3478, B 2085.43, β 0.3658) at N = √(C/120), D = 20N."""
    n = math.sqrt(1e24 / 120)
    expected = 1.8172 + 482.01 / n**0.3478 + 2085.43 / (20 * n) ** 0.3658
    assert optimum(LawChoice.twenty, 1e24).optimal.loss == pytest.approx(expected, rel=1e-9)


def test_the_laws_read_active_parameters_of_routed_models() -> None:
    assert law_params(46_702_792_704, 12_879_925_248, True) == (12_879_925_248, "active")
    assert law_params(8_030_261_248, 8_030_261_248, False) == (8_030_261_248, "total")


@pytest.mark.parametrize("family", list(Family))
@pytest.mark.parametrize("vocab", [256, 4096])
def test_generated_ffn_widths_stay_within_the_documented_recipe_range(family: Family, vocab: int) -> None:
    """docs/plan.md: FFN widths within 0.75–1.33 × the recipe width. At d_model 256 the ±8 steps
    gave 2.86× (dense, 1e15 FLOPs), 0.57× (hybrid) and 7.7× (MoE experts); a budget that no width in
    range meets is "no spec", naming the step that is too coarse, not the embeddings, when they are
    not the cause."""
    from archplan.planning.design import WIDTH_RANGE, NoRecipe, _recipe_width

    for exponent in range(15, 19):
        target = optimum(LawChoice.epoch, 10.0**exponent).optimal.params
        try:
            made = design(family, target, vocab=vocab)
        except NoRecipe as refused:
            small_embeddings = 2 * vocab * 256 < 0.98 * target
            assert ("embeddings alone" in str(refused)) is not small_embeddings, str(refused)
            continue
        spec = made.spec
        ffn = spec.moe.expert if spec.moe is not None else spec.ffn
        ratio = ffn.d_ff / _recipe_width(family, spec.d_model)
        assert WIDTH_RANGE[0] <= ratio <= WIDTH_RANGE[1], (exponent, spec.d_model, ffn.d_ff)


def test_the_linear_per_layer_sums_equal_the_scans_they_replace() -> None:
    """A 2,000-layer spec's layout search took 51 s in two scans per layer (quadratic in the
    layers), 5.7 s with these one-pass sums; they must give the scans' figures."""
    from archplan.analytic import activation_memory
    from archplan.planning.cluster import _by_layer, _held_above

    plan = resolve(load_spec("jamba-v0.1"))
    acts = activation_memory(plan, 1, 64, "none").by_component
    paths = [f"{layer.path}.{name}" for layer in plan.layers for name in ("ffn", "norm2")]
    inclusive = _by_layer(acts, paths, inclusive=True)
    assert inclusive == {p: sum(v for k, v in acts.items() if k == p or k.startswith(p + ".")) for p in paths}
    assert any(inclusive.values())
    per_layer = [float(3 ** (i % 7)) for i in range(12)]
    layers = [8, 2, 5, 11, 3]
    assert dict(_held_above(per_layer, layers)) == {i: sum(per_layer[j] for j in layers if j > i) for i in layers}


def test_no_spec_names_the_depth_floor_and_offers_dense_only_where_it_helps() -> None:
    """A hybrid is never shallower than one period of its pattern: where that period alone is above
    the target, the refusal says so (27.9 M total for the smallest hybrid against 24.7 M), not that
    the step between depths is too coarse; where the embeddings are the obstacle, the dense family,
    with the same embeddings, is not suggested."""
    from archplan.planning.design import NoRecipe

    with pytest.raises(NoRecipe) as hybrid:
        design(Family.hybrid, 24.7e6, vocab=32000)
    assert ("the smallest hybrid spec, one period of 8 layers at d_model 256, has 27.9 M total parameters"
            in str(hybrid.value)) and str(hybrid.value).endswith("or --family dense")
    for family in (Family.moe, Family.dense):
        with pytest.raises(NoRecipe) as refused:
            design(family, 56.4e6, vocab=128256)
        assert "embeddings alone" in str(refused.value) and "--family dense" not in str(refused.value)
    # nor where dense fails at the same target for its own reason (a step too coarse)
    target = optimum(LawChoice.epoch, 3e15).optimal.params
    with pytest.raises(NoRecipe):
        design(Family.dense, target, vocab=1000)
    with pytest.raises(NoRecipe) as refused:
        design(Family.moe, target, vocab=1000)
    assert "--family dense" not in str(refused.value)


def test_a_refusal_offers_a_smaller_vocabulary_only_where_the_embeddings_are_in_the_way() -> None:
    """At 2.33M parameters and vocab 1,000 one layer is the obstacle (a step coarser than 2%),
    which no vocabulary changes; at 7.6M and vocab 128,256 the embeddings are."""
    with pytest.raises(NoRecipe) as coarse:
        design(Family.dense, 2.33e6, vocab=1000)
    assert str(coarse.value).endswith("try a larger budget")
    with pytest.raises(NoRecipe) as embeddings:
        design(Family.dense, 7.6e6, vocab=128256)
    assert "try a larger budget, a smaller --vocab" in str(embeddings.value)


def test_the_optimum_at_the_lowest_budget_inverts_back_into_range() -> None:
    """--params N_opt(1e15) found 1e15 less a rounding error and was refused as out of range."""
    n_opt, _ = allocate(LawChoice.twenty, 1e15)
    assert budget(LawChoice.twenty, params=n_opt) == pytest.approx(1e15)


def test_the_budget_examples_table_is_what_plan_prints(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/plan.md's table of budgets and the specs designed for them: a change to the design's
    score (its weight on the error against N_opt) moved five of its rows and no test saw it."""
    import json
    import re
    import sys

    from archplan.cli import main

    doc = (Path(archplan.__file__).parents[1] / "docs" / "plan.md").read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in doc.splitlines() if re.match(r"\| 1e\d\d \| ", line)]
    assert len(rows) == 11
    for c, family, n_opt, d_opt, loss, shape, d_ff, expert_ff, total, active, error in rows:
        monkeypatch.setattr(sys, "argv", ["archplan", "plan", "--compute", c, "--family", family, "--json"])
        with pytest.raises(SystemExit) as ended:
            main()
        printed = json.loads(capsys.readouterr().out)
        assert ended.value.code in (0, None)
        made, spec = printed["design"], printed["spec"]
        moe = spec.get("moe")
        dense_ff = spec["ffn"]["d_ff"] if "ffn" in spec else None
        assert (f"{printed['optimal']['params'] / 1e9:.1f}B", f"{printed['optimal']['tokens'] / 1e12:.2f}T",
                f"{printed['optimal']['loss']:.3f}") == (n_opt, d_opt, loss), c
        assert f"{made['n_layers']} × {made['d_model']}" == shape, (c, family)
        assert (str(dense_ff) if dense_ff else "—", str(moe["expert"]["d_ff"]) if moe else "—") == (d_ff, expert_ff)
        assert (f"{made['total_params'] / 1e9:.1f}B", f"{made['active_params'] / 1e9:.1f}B",
                f"{made['error']:+.2%}") == (total, active, error), (c, family)


def test_a_half_micro_batch_rounds_up() -> None:
    """20 sequences over 8 ranks are 2.5 micro-batches a rank: 3, as docs/plan.md says (halves up),
    where Python's round gives 2 (a third of the batch and the step time gone)."""
    from archplan.planning.parallel import _microbatches

    assert (_microbatches(20, 8, 1), _microbatches(36, 8, 1), _microbatches(12, 8, 1)) == (3, 5, 2)


def test_the_receives_megatron_issues_alone() -> None:
    """1F1B at p 4, m 8: rank r warms up w = min(p − r − 1, m) forwards; its lone receives are the w
    warm-up `recv_forward`s and the one before the steady state (r > 0), and the w cool-down
    `recv_backward`s (r < p − 1), over m forward receives (r > 0) and m backward ones (r < p − 1):
    rank 0 3/8, rank 1 (2 + 1 + 2)/16, rank 2 (1 + 1 + 1)/16, rank 3 1/8. Interleaved (v 2): only
    the first of 2·m·v receives, on every rank but the first."""
    from archplan.planning.pricing import lone_receive_share

    assert [lone_receive_share(Layout(pp=4, dp=1), 8, r) for r in range(4)] == [3 / 8, 5 / 16, 3 / 16, 1 / 8]
    assert [lone_receive_share(Layout(pp=4, vpp=2, dp=1), 8, r) for r in range(4)] == [0, 1 / 32, 1 / 32, 1 / 32]


def test_hoffmanns_approach1_is_a_law_plan_takes() -> None:
    """`analytic.scaling.approach1`, the fit over Hoffmann Table 3, was reachable from no command:
    `plan --law approach1` allocates with it (Table 3's Gopher-budget row: 67B parameters, 1.5T
    tokens as printed, 1.433T = C/(6N)) and scores its losses with Besiroglu's fit, as 20x does."""
    result = optimum(LawChoice.approach1, 5.76e23)
    assert result.optimal.params == pytest.approx(67e9, rel=0.02)
    assert result.optimal.tokens == pytest.approx(1.433e12, rel=0.02)
    assert result.loss_law.key == "besiroglu2024"
