"""archplan.distributed: sharded stages equal one process (2 gloo processes), and verify --layout
measures model states and the collectives of a step on the fake process group."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from archplan.loader import load_spec  # noqa: E402
from archplan.planning.layout import parse_layout  # noqa: E402
from archplan.resolve import resolve  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "distributed"
TOLERANCE = 1e-4  # fp32: only the order of the sums differs between one and two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, spec: str, layout_text: str, port: int, out: str) -> None:
    from archplan.distributed.parity import parity

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        result = parity(resolve(load_spec(spec)), parse_layout(layout_text).complete())
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("spec", "layout"), [
    ("tiny-llama.yaml", "tp=2,cp=1,pp=1,dp=1,ep=1,zero=3,recompute=none,mb=2"),
    ("tiny-llama.yaml", "tp=1,cp=1,pp=1,dp=2,ep=1,zero=3,recompute=full,mb=2"),
    ("tiny-llama.yaml", "tp=1,cp=1,pp=1,dp=2,ep=1,zero=1,recompute=selective,mb=2"),
    ("tiny-moe.yaml", "tp=1,cp=1,pp=1,dp=2,ep=2,zero=3,recompute=none,mb=2"),
    # MLA with TP (k_pe's gradient summed over tp) and MoE under TP + SP (each rank routes its
    # sequence shard to whole experts, reduced over tp); full recompute re-runs both
    ("tiny-mla-moe.yaml", "tp=2,cp=1,pp=1,dp=1,ep=1,zero=3,recompute=none,mb=2"),
    ("tiny-mla-moe.yaml", "tp=2,cp=1,pp=1,dp=1,ep=1,zero=2,recompute=full,mb=2"),
    # one KV head replicated on both tp ranks (its gradient summed over tp), each rank's ALiBi slopes
    ("tiny-mqa-alibi.yaml", "tp=2,cp=1,pp=1,dp=1,ep=1,zero=3,recompute=none,mb=2"),
], ids=["tp2", "fsdp2-full-recompute", "zero1-selective", "ep2", "tp2-mla-moe", "tp2-mla-moe-full-recompute",
        "tp2-mqa-alibi"])
def test_two_gloo_processes_equal_one(tmp_path: Path, spec: str, layout: str) -> None:
    mp.spawn(_worker, args=(str(FIXTURES / spec), layout, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["logits"] < TOLERANCE, result
        assert result["grads"] < TOLERANCE, result
        losses = result["losses"]
        assert losses[-1] < losses[0], losses


@pytest.fixture()
def fake_world():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_fake_verify_model_states_and_dp_pp_traffic_exact(fake_world: None) -> None:
    from archplan.distributed.check import check_layout_run

    plan = resolve(load_spec(FIXTURES / "tiny-llama.yaml"))
    layout = parse_layout("tp=2,cp=1,pp=2,dp=4,ep=1,zero=3,recompute=full,mb=1").complete()
    result = check_layout_run(plan, layout, 32, microbatches=2)
    rows = {r.category: r for r in result.memory}
    for name in ("parameters", "gradients", "optimizer"):
        assert rows[name].measured == rows[name].analytic > 0
    assert rows["activations"].measured > 0
    by_dim = {(r.mesh_dim, r.kind): r for r in result.collectives}
    assert {("dp", "all_gather"), ("dp", "reduce_scatter"), ("pp", "send"), ("pp", "recv")} <= by_dim.keys()
    for row in result.collectives:
        if row.mesh_dim in ("dp", "pp"):
            assert row.ok, row


def test_fake_verify_expert_all_to_all_recorded(fake_world: None) -> None:
    from archplan.distributed.check import check_layout_run

    plan = resolve(load_spec(FIXTURES / "tiny-moe.yaml"))
    layout = parse_layout("tp=1,cp=1,pp=1,dp=4,ep=4,zero=3,recompute=none,mb=1").complete()
    result = check_layout_run(plan, layout, 32, microbatches=1)
    rows = {r.category: r for r in result.memory}
    for name in ("parameters", "gradients", "optimizer"):
        assert rows[name].measured == rows[name].analytic > 0
    # ep = dp here (expert_dp = 1): the all-to-all is still named for expert parallelism
    [a2a] = [r for r in result.collectives if r.kind == "all_to_all"]
    assert a2a.mesh_dim == "ep" and a2a.measured == a2a.analytic == 2 * 2 * 2  # 2 layers, dispatch+combine, fwd+bwd


def test_refusals_are_one_line(fake_world: None) -> None:
    from archplan.distributed.check import check_layout_run
    from archplan.errors import ArchplanError

    plan = resolve(load_spec(FIXTURES / "tiny-moe.yaml"))
    # MoE under tp needs sequence parallelism (each tp rank routes its own sequence shard)
    layout = parse_layout("tp=2,cp=1,pp=1,dp=2,ep=2,zero=3,recompute=none,mb=1,sp=off").complete()
    with pytest.raises(ArchplanError, match="MoE layers under tensor parallelism without sequence parallelism"):
        check_layout_run(plan, layout, 32, microbatches=1)


@pytest.mark.parametrize("layout", [
    "tp=2,cp=1,pp=1,dp=1,ep=1,zero=3,recompute=none,mb=1",
    "tp=1,cp=1,pp=2,dp=1,ep=1,zero=3,recompute=none,mb=1",
    "tp=1,cp=1,pp=1,dp=2,ep=1,zero=2,recompute=full,mb=1",
], ids=["tp2", "pp2", "fsdp2"])
def test_bench_nproc_two_gloo_workers(layout: str) -> None:
    from typer.testing import CliRunner

    from archplan.cli import app

    out = CliRunner().invoke(app, ["bench", str(FIXTURES / "tiny-llama.yaml"), "--nproc", "2", "--seq", "32",
                                   "--iters", "2", "--warmup", "1", "--layout", layout, "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["world"] == 2 and result["backend"] == "gloo"
    assert len(result["step_seconds"]) == 2 and all(s > 0 for s in result["step_seconds"])
    dp = parse_layout(layout).dp
    assert result["tokens_per_step"] == 32 * result["microbatches"] * dp
    assert len(result["peak_memory_bytes"]) == 2 and min(result["peak_memory_bytes"]) > 0
    assert 0 < result["mfu"] < 1
    assert result["predicted_step_seconds"] is None  # CPU: plan models GPUs only


@pytest.mark.parametrize(("recompute", "phase"), [("full", "optimizer step"), ("none", "loss backward")])
def test_bench_train_states_exact(recompute: str, phase: str) -> None:
    """Model states (fp32 weights + fp32 grads + AdamW m, v = size's 16 B/param) equal exactly and
    the step's peak is within PEAK_TOLERANCE of size's, at the moment size names (with full
    recompute this tiny model's AdamW temporary outweighs its activations). The activations kept
    are not: at d_model 64 torch's fp32 residual stream and fp32 RMSNorm inputs (autocast keeps
    them fp32; size counts 16-bit tensors) put them outside ±25%, and the exit code says so."""
    from typer.testing import CliRunner

    from archplan.cli import app

    out = CliRunner().invoke(app, ["bench", str(FIXTURES / "tiny-llama.yaml"), "--train", "--device", "cpu",
                                   "--seq", "64", "--iters", "1", "--recompute", recompute, "--json"])
    assert out.exit_code == 1, out.output
    result = json.loads(out.output)
    m = result["measured"]
    assert m["Parameter"] + m["Gradient"] + m["Optstate"] == result["analytic_states"]
    assert result["states_ok"] is True and result["total_ok"] is True
    assert result["analytic_peak_phase"] == phase
    assert result["activations_ok"] is False
    assert m["Activation"] - m["WeightCopies"] > 1.25 * result["analytic_activations"]


def test_bench_train_layers_builds_the_truncated_model() -> None:
    """`--train --layers 1` builds one layer and compares it with size's figure for that model."""
    from typer.testing import CliRunner

    from archplan.analytic import count_params
    from archplan.bench.runner import truncate
    from archplan.cli import app
    from archplan.loader import load_spec
    from archplan.resolve import resolve

    spec = str(FIXTURES / "tiny-llama.yaml")
    out = CliRunner().invoke(app, ["bench", spec, "--train", "--device", "cpu", "--seq", "32", "--iters", "1",
                                   "--layers", "1", "--dtype", "fp32", "--json"])
    result = json.loads(out.output)
    one_layer = count_params(truncate(resolve(load_spec(spec)), 1)).total
    assert result["analytic_states"] == 16 * one_layer
    assert result["states_ok"] is True and result["total_ok"] is True
