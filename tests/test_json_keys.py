"""Every key the commands' `--json` prints is listed in docs/json.md: the top level, and for `bench`
and `verify` every nested object's too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archplan.cli import app

DOCS = (Path(__file__).parents[1] / "docs" / "json.md").read_text()
FIXTURES = Path(__file__).parent / "fixtures" / "distributed"


def _listed(item: str) -> set[str]:
    """The key names docs/json.md's bullet starting with `item` lists."""
    start = DOCS.index(f"- `{item}")
    end = DOCS.find("\n- ", start + 1)
    return {name for quoted in re.findall(r"`([^`]+)`", DOCS[start:end]) for name in re.findall(r"[a-z_0-9]+", quoted)}


# objects keyed by data (an op, a layer kind, a component), not by names the docs list: their
# values' keys are still checked
DATA_KEYED = {"ops", "known", "skipped", "built_layers", "full_layers", "block_seconds", "gemv_bandwidth",
              "attention_seconds", "op_seconds", "ops_per_layer", "by_component", "measured"}


def _nested_keys(value: object) -> set[str]:
    """Every key of every object in `value`, but those of the objects keyed by data."""
    keys: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in DATA_KEYED and isinstance(inner, dict):
                for item in inner.values():
                    keys |= _nested_keys(item)
            else:
                keys |= {key} | _nested_keys(inner)
    elif isinstance(value, list):
        for item in value:
            keys |= _nested_keys(item)
    return keys


@pytest.mark.parametrize(("item", "argv"), [
    ("archplan verify SPEC --json", ["verify", "gpt2", "--seq", "16", "--no-backward", "--json"]),
    ("archplan lint --format json", ["lint", "gpt2", "--format", "json"]),
    ("archplan import hf CONFIG --json", ["import", "hf", str(Path(__file__).parent / "fixtures" / "hf-configs"
                                                            / "deepseek-v3.json"), "--json"]),
])
def test_printed_keys_are_documented(item: str, argv: list[str]) -> None:
    pytest.importorskip("torch")
    out = CliRunner().invoke(app, argv)
    printed = json.loads(out.stdout)
    assert set(printed) - _listed(item) == set()


def test_bench_keys_are_documented() -> None:
    pytest.importorskip("torch")
    out = CliRunner().invoke(app, ["bench", str(FIXTURES / "tiny-llama.yaml"), "--device", "cpu", "--layers", "1",
                                   "--seq", "32", "--iters", "1", "--warmup", "0", "--decode-tokens", "2", "--json"])
    printed = json.loads(out.stdout)
    assert printed["extrapolation"] is not None and printed["decode"]["by_kind"]
    assert _nested_keys(printed) - _listed("archplan bench SPEC --json") == set()


def test_verify_nested_keys_are_documented() -> None:
    """Each component's, each fvcore row's and each check's keys, with the CPU instance's check."""
    pytest.importorskip("torch")
    out = CliRunner().invoke(app, ["verify", str(FIXTURES / "tiny-llama.yaml"), "--seq", "16", "--json"])
    printed = json.loads(out.stdout)
    assert printed["real"]["fvcore"]["rows"]
    assert _nested_keys(printed) - _listed("archplan verify SPEC --json") == set()


def test_bench_sweep_keys_are_documented() -> None:
    """A --seq sweep's objects, each key and each point's and exponent's."""
    pytest.importorskip("torch")
    out = CliRunner().invoke(app, ["bench", str(FIXTURES / "tiny-llama.yaml"), "--device", "cpu", "--seq", "16,32",
                                   "--iters", "1", "--warmup", "0", "--json"])
    (printed,) = json.loads(out.stdout)
    keys = set(printed) | set(printed["points"][0]) | set(printed["exponent"])
    assert keys - _listed("archplan bench SPEC --json") == set()


def test_bench_train_keys_are_documented() -> None:
    pytest.importorskip("torch")
    out = CliRunner().invoke(app, ["bench", str(FIXTURES / "tiny-llama.yaml"), "--train", "--device", "cpu",
                                   "--seq", "16", "--iters", "1", "--json"])
    printed = json.loads(out.stdout)
    assert set(printed) - _listed("archplan bench SPEC --train --json") == set()


def test_bench_layout_keys_are_documented() -> None:
    """The fields of the object `bench --layout` prints (`workers.DistBench`, dumped whole), read
    without launching workers."""
    pytest.importorskip("torch")
    from dataclasses import fields

    from archplan.distributed.workers import DistBench

    listed = _listed("archplan bench SPEC --layout ... --json")
    assert {f.name for f in fields(DistBench)} - listed == set()


def test_verify_layout_keys_are_documented() -> None:
    pytest.importorskip("torch")
    out = CliRunner().invoke(app, ["verify", str(FIXTURES / "tiny-llama.yaml"), "--seq", "16", "--json",
                                   "--layout", "tp=1,cp=1,pp=1,dp=2,ep=1,zero=1,recompute=none,mb=1"])
    printed = json.loads(out.stdout)
    assert set(printed) - _listed("archplan verify SPEC --layout ... --json") == set()
