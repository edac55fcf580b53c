"""Any mix of `plan` and `size` options ends in a result or in one line, never in a traceback.

Each option is drawn from valid values, edge values (0, negatives, the extremes) and garbage, and
several are combined, as a user editing a command line does. The outcome must be exit 0 or 1 with
output (and, under --json, one strict JSON object: no NaN or Infinity, which `json` would write
for a float that went wrong), or exit 2 with a single `archplan: error:` line.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_bad_input import Outcome, run_main

PRESETS = ["7b", "deepseek-v3", "mixtral-8x7b", "hyena-153m", "s4d-lm", "jamba-v0.1", "gemma-2b",
           "gpt2", "mamba-2.8b", "stripedhyena-7b", "hybrid-ssm-moe", "llama-3.1-405b"]

PLAN_OPTIONS: dict[str, list[str]] = {
    "--gpu": ["h100", "a100-80gb", "a100-40gb", "h800", "b200", "mi300x", "v100", "tpu-v9"],
    "--seq": ["1", "7", "2048", "8192", "100000", "0", "-3"],
    "--global-batch-tokens": ["1", "4M", "16M", "1e9", "0", "lots", "1.5M"],
    "--layout": ["tp=8", "tp=3", "pp=4,vpp=2", "cp=2", "ep=8", "zero=3", "recompute=selective", "mb=4",
                 "sp=off", "tp=16", "dp=7", "group=3", "vpp=3", "foo=1", "tp=", "recompute=bogus",
                 "tp=2,pp=2,dp=2,cp=1,ep=1,zero=1,recompute=none,mb=1"],
    "--headroom": ["0", "0.5", "0.99", "1", "-0.1"],
    "--efficiency": ["0.5", "1", "1.5", "0", "-1", "1e-320", "0.009"],
    "--precision": ["bf16", "fp8", "fp16", "fp32", "int4"],
    "--states": ["megatron", "zero", "fsdp2", "deepspeed"],
    "--attention-kernel": ["eager", "flash"],
    "--overlap": ["none", "dp", "dp,tp,pp", "dp,ep", "dualpipe", "ep,dualpipe", "xx"],
    "--grad-reduce": ["bf16", "fp32"],
    "--optimizer-moments": ["bf16", "fp32", "fp8"],
    "--master-weights": ["fp32", "remainders", "half"],
    "--tokens": ["15T", "1e12", "0"],
    "--gpus-per-node": ["4", "8", "72", "0"],
    "--ib-gbs": ["50", "0", "1e9", "1e-300"],
    "--nvlink-gbs": ["450", "0", "1e-320"],
    "--cp-comm": ["all_gather", "ring", "tree"],
    "--dispatcher": ["auto", "nccl", "hierarchical", "deepep"],
    "--flash-impl": ["fa2", "triton", "fa3"],
    "--cross-entropy": ["fp32-fused", "bf16-fused", "eager", "fp16"],
    "--ring-nics": ["one", "members", "all"],
    "--top": ["1", "5", "100", "0", "101", "x"],
}
# The switches that take no value, each pair's two sides drawn alike.
PLAN_FLAGS = ["--recompute-early-stop", "--no-recompute-early-stop", "--fused-qkv", "--separate-qkv"]

SIZE_OPTIONS: dict[str, list[str]] = {
    "--context": ["1", "3", "4096", "1000000", "0", "-5"],
    "--batch": ["1", "64", "0", "-1"],
    "--kv-dtype": ["bf16", "fp8", "int4", "fp32"],
    "--seq": ["1", "7", "4096", "500000", "0"],
    "--micro-batch": ["1", "32", "0"],
    "--recompute": ["none", "selective", "full"],
    "--attention-kernel": ["eager", "flash"],
    "--activation-dtype": ["bf16", "fp32"],
    "--residual-dtype": ["bf16", "fp32", "fp8"],
    "--tokens": ["15T", "2.5B", "1e30", "0", "-1", "abc"],
    "--gpu": ["h100", "a100", "b200", "mi300x", "tpu-v9"],
    "--mfu": ["0.4", "1", "0", "1.5", "-1", "1e-320"],
    "--law": ["hoffmann2022", "besiroglu2024", "hoffmann2022-tex", "chinchilla", "epoch"],
    "--attention": ["full", "causal"],
}


def _options(table: dict[str, list[str]]) -> st.SearchStrategy[list[str]]:
    def flatten(chosen: dict[str, str]) -> list[str]:
        return [token for pair in chosen.items() for token in pair]
    return st.dictionaries(st.sampled_from(sorted(table)), st.just(""), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.sampled_from(table[k]) for k in keys})).map(flatten)


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"--json wrote {name}")


def _assert_finite(value: Any, where: str = "") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _assert_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _assert_finite(item, f"{where}[{i}]")
    elif isinstance(value, float):
        assert math.isfinite(value), where


def _assert_clean(outcome: Outcome, json_out: bool) -> None:
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome
    if outcome.code == 2:
        lines = outcome.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("archplan: error: "), outcome.stderr
        return
    assert outcome.code in (0, 1), outcome
    assert outcome.stdout.strip(), outcome
    if json_out:
        _assert_finite(json.loads(outcome.stdout, parse_constant=_refuse_constant))


FUZZ = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(spec=st.sampled_from(PRESETS), gpus=st.sampled_from(["1", "8", "64", "512", "0"]),
       options=_options(PLAN_OPTIONS), flags=st.lists(st.sampled_from(PLAN_FLAGS), max_size=2),
       json_out=st.booleans())
def test_plan_layout_options(spec: str, gpus: str, options: list[str], flags: list[str], json_out: bool,
                             capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["plan", spec, "--gpus", gpus, *options, *flags, *(["--json"] if json_out else [])]
    _assert_clean(run_main(argv, capsys, monkeypatch), json_out)


@FUZZ
@given(spec=st.sampled_from(PRESETS), options=_options(SIZE_OPTIONS), autocast=st.booleans(),
       json_out=st.booleans())
def test_size_options(spec: str, options: list[str], autocast: bool, json_out: bool,
                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["size", spec, *options, *(["--autocast"] if autocast else []), *(["--json"] if json_out else [])]
    _assert_clean(run_main(argv, capsys, monkeypatch), json_out)
