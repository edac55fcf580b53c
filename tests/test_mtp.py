"""Multi-token prediction (DeepSeek-V3 §2.2) beyond its torch module (test_mtp_module.py): the
analytic counts against the published shapes, the pipeline split that puts it on the last stage,
`plan`'s last stage, and the commands that run it (verify --layout on torch.distributed's stages:
test_distributed.py) or refuse to."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from archplan.analytic import count_params, forward_flops, training_flops_per_token
from archplan.analytic.memory import activation_memory
from archplan.loader import load_spec
from archplan.planning import cluster
from archplan.planning.layout import parse_layout, pipeline_chunks
from archplan.resolve import resolve
from archplan.spec import MultiTokenPrediction
from test_bad_input import run_main

TINY_MTP = """\
name: tiny-mtp
vocab_size: 512
d_model: 64
n_layers: 2
max_seq_len: 256
attention: {kind: gqa, n_heads: 4, n_kv_heads: 2}
ffn: {kind: glu, activation: silu, d_ff: 128}
mtp: {depth: 2}
"""


@pytest.fixture
def tiny_mtp(tmp_path: Path) -> str:
    path = tmp_path / "tiny-mtp.yaml"
    path.write_text(TINY_MTP, encoding="utf-8")
    return str(path)


def test_deepseek_v3_mtp_adds_its_module_and_a_training_pass() -> None:
    main = resolve(load_spec("deepseek-v3"))
    mtp = resolve(load_spec("deepseek-v3-mtp"))
    # one MoE block (its MLA, router, 256 experts and the shared one), two input norms, the
    # 2·7168 → 7168 projection and the head's norm: 11,610,068,224 with the buffer-held bias
    assert count_params(mtp).total - count_params(main).total == 11_610_067_968
    assert count_params(mtp).total == load_spec("deepseek-v3-mtp").reference.total_params  # type: ignore[union-attr]
    # inference never runs it; training does, at Megatron's ratio (259.99 / 249.81 GFLOP a token
    # at seq 4,096, its causal convention: 1.0408; here 1.0407)
    assert forward_flops(mtp, 4096).counted == forward_flops(main, 4096).counted
    ratio = training_flops_per_token(mtp, 4096, "causal") / training_flops_per_token(main, 4096, "causal")
    assert ratio == pytest.approx(259.99 / 249.81, abs=2e-4)


def test_mtp_activations_are_the_module_and_one_head_pass_per_depth() -> None:
    plan = resolve(load_spec("llama-3-8b"))
    with_mtp = replace(plan, mtp=resolve(load_spec("llama-3-8b").model_copy(
        update={"mtp": MultiTokenPrediction(depth=2)})).mtp)
    s, h, v = 1024, plan.d_model, plan.vocab_size
    base = activation_memory(plan, 1, s).by_component
    more = activation_memory(with_mtp, 1, s).by_component
    layer = sum(value for key, value in base.items() if key.startswith("layers.0."))
    for k in range(2):
        own = {key: value for key, value in more.items() if key.startswith(f"mtp.{k}.")}
        assert own[f"mtp.{k}.enorm"] == 8 * s + 2 * s * h  # rolled ids and their embedding
        assert own[f"mtp.{k}.hnorm"] == 0  # the head's input, kept once
        assert own[f"mtp.{k}.proj"] == 2 * s * 2 * h
        assert own[f"mtp.{k}.loss"] == 4 * s * v
        block = sum(value for key, value in own.items()
                    if key.split(".")[2] in ("norm1", "mixer", "norm2", "ffn"))
        assert block == layer


def test_the_mtp_blocks_sit_on_the_last_chunk_as_megatron_bridge_splits_them() -> None:
    def sizes(n: int, pp: int, vpp: int, tail: int) -> list[int]:
        chunks = pipeline_chunks(n, pp, vpp, tail)
        return [len(chunks[c % pp][c // pp]) for c in range(pp * vpp)]

    # DeepSeek-V3's layout maps: 61 layers, the last chunk also holding the MTP block
    assert sizes(61, 16, 1, 1) == [4] * 15 + [1 + 1]
    assert sizes(61, 8, 1, 1) == [8] * 7 + [5 + 1]
    assert sizes(61, 4, 2, 1) == [8] * 7 + [5 + 1]
    assert sizes(61, 4, 1, 1) == [16, 16, 16, 13 + 1]
    # where ⌈n / chunks⌉ leaves the last chunk no layer, the n + tail blocks split as without it
    assert sizes(61, 32, 1, 1) == sizes(62, 32, 1, 0)
    # without a tail the embedding and the head count as a layer each (test_layout.py)
    assert sizes(61, 16, 1, 0) == [3] + [4] * 14 + [2]
    for pp, vpp in ((16, 1), (8, 2), (32, 1), (1, 1)):
        assert pipeline_chunks(61, pp, vpp, 1)[(pp * vpp - 1) % pp][-1].stop == 62
    # deeper MTP over more chunks than the even split leaves room for: the main layers split alone
    assert sizes(2, 2, 2, 2) == [0, 1, 1, 0 + 2]
    # DeepSeek-V3 with its module on n + 2 = 63 chunks: the embedding alone, a layer each, and the
    # module beside the head (Megatron-LM's layout string `E|(t|)*61mL`)
    assert sizes(61, 63, 1, 1) == [0] + [1] * 61 + [0 + 1]


@given(n=st.integers(1, 70), pp=st.integers(1, 16), vpp=st.integers(1, 4), tail=st.integers(0, 4))
def test_every_split_keeps_the_tail_whole_on_the_last_chunk(n: int, pp: int, vpp: int, tail: int) -> None:
    """The last chunk runs the MTP modules (`distributed.stage.Stage`): none may sit elsewhere."""
    assume(pp * vpp <= n + 2)  # `layout_problem`'s bound: the MTP blocks share the head's chunk
    chunks = pipeline_chunks(n, pp, vpp, tail)
    in_order = [chunks[c % pp][c // pp] for c in range(pp * vpp)]
    assert [r.start for r in in_order[1:]] == [r.stop for r in in_order[:-1]] and in_order[0].start == 0
    assert in_order[-1].stop == n + tail and len(in_order[-1]) >= tail
    assert sum(map(len, in_order)) == n + tail  # no chunk of negative size hidden by the chain above


def test_plan_puts_the_mtp_module_and_an_embedding_copy_on_the_last_stage() -> None:
    spec = load_spec("llama-3-8b").model_copy(update={"mtp": MultiTokenPrediction(depth=1)})
    plan = resolve(spec)
    counts = count_params(plan).by_component
    layout = parse_layout("tp=1,cp=1,pp=2,dp=1,ep=1,zero=1,recompute=none,mb=1").complete()
    assert layout is not None
    data = cluster.model_data(plan, 1024)
    last = data.stage_params(layout, 1, per_tensor=False)[0]
    layers = range(16, 32)  # pipeline_chunks(32, 2, 1, 1): 16 and 16 + the MTP block
    expected = (sum(v for k, v in counts.items() if k.startswith(tuple(f"layers.{i}." for i in layers)))
                + sum(v for k, v in counts.items() if k.startswith("mtp.0."))
                + counts["final_norm"] + counts["lm_head"] + counts["embed"])  # the embedding copy
    assert last == expected
    first = data.stage_params(layout, 0, per_tensor=False)[0]
    assert first == counts["embed"] + sum(v for k, v in counts.items()
                                          if k.startswith(tuple(f"layers.{i}." for i in range(16))))
    # the last stage's step: the head twice, the MTP block as a layer
    without = cluster.model_data(resolve(load_spec("llama-3-8b")), 1024)
    assert data.logits_act == 2 * without.logits_act
    assert len(data.plan.layers) == 33 and data.plan.layers[-1].path == "mtp.0"


def test_commands_with_mtp(tiny_mtp: str, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    size = run_main(["size", tiny_mtp, "--json"], capsys, monkeypatch)
    assert size.code == 0
    report = json.loads(size.stdout)
    assert report["params"]["by_kind"]["multi-token prediction"]["total"] == sum(
        v for k, v in report["params"]["by_component"].items() if k.startswith("mtp."))
    assert "multi-token-prediction" in report["flops"]["convention"]
    # inference holds the main model alone: bf16 weights of every parameter but the MTP modules'
    mtp = report["params"]["by_kind"]["multi-token prediction"]["total"]
    assert report["memory"]["weights_bytes"] == 2 * (report["params"]["total"] - mtp)
    planned = run_main(["plan", tiny_mtp, "--gpus", "2", "--gpu", "h100", "--seq", "128", "--tokens", "1B", "--layout",
                        "tp=1,cp=1,pp=2,dp=1,ep=1,zero=1,recompute=none,mb=1", "--json"], capsys, monkeypatch)
    assert planned.code == 0, planned.stderr
    verified = run_main(["verify", tiny_mtp, "--seq", "16", "--json"], capsys, monkeypatch)
    assert verified.code == 0 and json.loads(verified.stdout)["ok"]
    laid_out = run_main(["verify", tiny_mtp, "--seq", "64", "--layout", "tp=2,cp=1,pp=2,dp=1,ep=1,zero=1,"
                         "recompute=none,mb=1", "--json"], capsys, monkeypatch)
    assert laid_out.code == 0 and json.loads(laid_out.stdout)["ok"], laid_out.stdout
    trained = run_main(["bench", tiny_mtp, "--device", "cpu", "--iters", "1", "--train",
                        "--seq", "128", "--batch", "2", "--json"], capsys, monkeypatch)
    assert trained.code == 0, trained.stdout


def test_plan_and_verify_bound_the_chunks_alike(tiny_mtp: str, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The MTP blocks share the head's chunk, so 2 layers fill at most 4 chunks for `plan` as for
    `verify --layout` (plan once counted the 2 blocks among the layers and searched pp 2 × v 3,
    with empty chunks, which verify refused)."""
    deep = "tp=1,cp=1,pp=5,dp=1,ep=1,zero=1,recompute=none,mb=1"
    planned = run_main(["plan", tiny_mtp, "--gpus", "5", "--gpu", "h100", "--seq", "128", "--tokens", "1B",
                        "--layout", deep], capsys, monkeypatch)
    verified = run_main(["verify", tiny_mtp, "--seq", "16", "--layout", deep], capsys, monkeypatch)
    bound = "more than the 2 layers with the embedding and the head (4) can fill"
    assert planned.code == verified.code == 2 and bound in planned.stderr and bound in verified.stderr
    searched = run_main(["plan", tiny_mtp, "--gpus", "8", "--gpu", "h100", "--seq", "128", "--tokens", "1B",
                         "--layout", "pp=2", "--top", "100", "--json"], capsys, monkeypatch)
    assert searched.code == 0, searched.stderr
    assert max(r["pp"] * r["vpp"] for r in json.loads(searched.stdout)["layouts"]) <= 4


@pytest.mark.parametrize("sp", [True, False])
def test_the_last_stage_calls_the_mtp_modules_collectives(tiny_mtp: str, sp: bool) -> None:
    """Per micro-batch and module under TP (Megatron-Core's `_concat_embeddings`): the shifted
    tokens' vocabulary-parallel embedding, eh_proj's 2·d input (gathered over the sequence under SP)
    and its output gathered over the last dim; and one more head pass each. The first stage calls
    none of them; the embedding copy's gradient is summed with the first stage's once a step."""
    plan = resolve(load_spec(tiny_mtp))
    layout = parse_layout(f"tp=2,cp=1,pp=2,dp=1,ep=1,zero=1,recompute=none,mb=1,sp={'on' if sp else 'off'}").complete()
    assert layout is not None
    m, seq, act = 4, 64, 2 * 64 * plan.d_model
    calls = {c.what: c for c in cluster.step_collectives(plan, layout, seq, microbatches=m, stage=1)}
    first = {c.what for c in cluster.step_collectives(plan, layout, seq, microbatches=m, stage=0)}
    mtp = {what: c for what, c in calls.items() if what.startswith("MTP ")}
    gathered = "MTP projection input, 2·d (SP)"
    assert all(c.count == m * 2 for what, c in mtp.items() if what != gathered)
    assert not any(w.startswith("MTP ") for w in first)
    assert calls["MTP projection output, over the last dim (TP)"].bytes == act
    # Megatron's eh_proj, column-parallel, gathers its input again in the backward under SP
    assert (gathered in mtp) == sp and (not sp or (mtp[gathered].bytes, mtp[gathered].count) == (2 * act, 2 * m * 2))
    assert calls["LM-head input (TP)"].count == m * 3
    if sp:  # the modules' norms see a rank's sequence shard: 2 depths × (3 own + 2 in the block) × d, fp32
        summed = "replicated weight gradients summed over tp (SP norms, routers, MLA latents)"
        without = {c.what: c for c in cluster.step_collectives(
            resolve(load_spec(tiny_mtp).model_copy(update={"mtp": None})), layout, seq, microbatches=m, stage=1)}
        assert calls[summed].bytes - without[summed].bytes == 4 * 2 * 5 * plan.d_model
    assert calls["tied embedding gradient (first + last stage)"].count == 1
    assert "tied embedding gradient (first + last stage)" in first
