"""verify --layout's activations and gradients against planning.cluster where they used to differ:
pipeline ranks' held tensors (interleaved and not) and a tied embedding's accumulated gradient."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from archplan.loader import load_spec  # noqa: E402
from archplan.planning import cluster  # noqa: E402
from archplan.planning.layout import parse_layout  # noqa: E402
from archplan.resolve import resolve  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "distributed"
PRESETS = Path(__file__).parent.parent / "presets"


@pytest.fixture()
def fake_world():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _rows(spec: Path, layout: str, seq: int, microbatches: int) -> dict[str, object]:
    from archplan.distributed.check import check_layout_run

    plan = resolve(load_spec(spec))
    result = check_layout_run(plan, parse_layout(layout).complete(), seq, microbatches=microbatches)
    return {r.category: r for r in result.memory}


@pytest.mark.parametrize("layout", [
    "tp=2,cp=1,pp=2,dp=1,ep=1,zero=3,recompute=full,mb=1",
    "tp=2,cp=1,pp=2,vpp=2,dp=1,ep=1,zero=3,recompute=full,mb=1",
], ids=["pp2", "pp2-vpp2"])
def test_pipeline_ranks_hold_layer_inputs_and_chunk_outputs(fake_world: None, layout: str) -> None:
    """Each received hidden state is freed after its chunk's backward (torch's ModTracker used to
    keep every one alive) and each non-last chunk's output is held until its backward, as
    cluster's torch engine counts: model states exact, activations within the tolerance."""
    rows = _rows(FIXTURES / "tiny-llama.yaml", layout, 64, 4)
    for name in ("parameters", "gradients", "optimizer"):
        assert rows[name].measured == rows[name].analytic > 0
    assert rows["activations"].ok, rows["activations"]


def test_megatron_frees_chunk_outputs_torch_keeps_them() -> None:
    """The torch engine's extra over Megatron's convention on the last rank of pp=2, vpp=2 under
    full recompute is its first chunk's output: one b·s·h/tp bf16 tensor per micro-batch it holds."""
    plan = resolve(load_spec(FIXTURES / "tiny-llama.yaml"))
    layout = parse_layout("tp=2,cp=1,pp=2,vpp=2,dp=1,ep=1,zero=3,recompute=full,mb=1").complete()
    seq, m = 64, 4
    data = cluster.model_data(plan, seq)
    chunks = cluster.rank_chunks(len(plan.layers), layout, 1)
    counts = cluster.in_flight(layout, m, 1)
    held = [cluster._held_output(data, layout, c, "torch") for c in chunks]
    assert held == [2 * seq * plan.d_model / layout.tp, 0.0]  # the last chunk outputs the loss
    assert all(cluster._held_output(data, layout, c, "megatron") == 0 for c in chunks)
    assert counts[0] * held[0] > 0


@pytest.mark.parametrize("pp", [1, 2])
def test_tied_embedding_gradients_exact_zero1_tp2_without_sp(fake_world: None, pp: int) -> None:
    """ZeRO-1 over two micro-batches accumulates unreduced gradients: the embedding's whole
    vocabulary where the embedding is alone on its rank (DTensor's Replicate gradient), only the
    rank's rows where the tied head on the same rank sums its Shard(0) gradient in first."""
    layout = f"tp=2,cp=1,pp={pp},dp=2,ep=1,zero=1,recompute=none,mb=1,sp=off"
    rows = _rows(FIXTURES / "tiny-gpt.yaml", layout, 32, 2)
    for name in ("parameters", "gradients", "optimizer"):
        assert rows[name].measured == rows[name].analytic > 0, rows[name]


@pytest.mark.heavy
def test_llama3_8b_interleaved_last_rank_activations(fake_world: None) -> None:
    """docs/distributed.md "Interleaved pipeline": TP8 PP4 VPP2 DP32, the last rank."""
    rows = _rows(PRESETS / "llama-3-8b.yaml",
                 "tp=8,cp=1,pp=4,vpp=2,dp=32,ep=1,zero=3,recompute=full,mb=1", 512, 8)
    for name in ("parameters", "gradients", "optimizer"):
        assert rows[name].measured == rows[name].analytic
    assert rows["activations"].ok, rows["activations"]
