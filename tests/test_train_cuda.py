"""`bench --train` on CUDA: the step measured by the caching allocator in MemTracker's categories
(skipped without a CUDA device; run on a lent H200, docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from archplan.cli import app

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("spec", "args"), [
    ("tests/fixtures/distributed/tiny-llama.yaml", ["--seq", "64", "--recompute", "full"]),
    ("benchmarks/specs/small-dsv3-mtp.yaml", ["--batch", "2", "--seq", "1024", "--recompute", "selective"]),
    # archplan's SSD unit, whose backward sets the peak (the `scan backward` moment)
    ("tests/fixtures/distributed/tiny-mamba2.yaml", ["--seq", "128", "--recompute", "none"]),
])
def test_bench_train_cuda_measures_each_category(spec: str, args: list[str]) -> None:
    """Model states equal size's exactly (read from the live tensors), the activations and the peak
    are within their tolerances, and cuBLAS's workspaces (whole MiB, one per thread that ran a
    matmul) are measured apart: left in, they were the whole of a tiny model's peak."""
    out = CliRunner().invoke(app, ["bench", str(ROOT / spec), "--train", "--device", "cuda", "--iters", "1",
                                   "--json", *args])
    result = json.loads(out.output)
    m = result["measured"]
    assert m["Parameter"] + m["Gradient"] + m["Optstate"] == result["analytic_states"]
    assert m["Workspace"] > 0 and m["Workspace"] % MiB == 0
    assert result["measured_activations"] == m["Activation"] - m["WeightCopies"]
    assert result["ok"] is True and out.exit_code == 0, out.output
