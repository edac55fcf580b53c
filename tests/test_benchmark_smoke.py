"""The benchmark scripts no other test loads run, at their smallest sizes: a field added to a plan
they build directly (`resolve.MoEPlan`) broke `moe_dispatch.py` unseen. Behaviour only: what they
time is docs/benchmarks.md's, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(("script", "args", "key"), [
    ("moe_dispatch", ("--d-model", "32", "--d-ff", "32", "--experts", "4", "--top-k", "2", "--tokens", "32",
                      "--iters", "2", "--json"), "config"),
    ("norm_backward", ("--tokens", "16", "--width", "32", "--iters", "2", "--json"), "paths"),
    ("lint_scale", ("--n", "5", "--repeat", "1", "--json"), "findings_by_code"),
    ("decode_pieces", ("gpt2", "--layers", "1", "--seq", "16", "--steps", "2"), None),
])
def test_a_benchmark_script_runs(script: str, args: tuple[str, ...], key: str | None) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if key is not None:
        assert key in json.loads(proc.stdout)
    else:
        assert proc.stdout.strip()
