"""`archplan verify`: exit codes 0/1/2, the table and the --json shape, through the real entry point."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from archplan import crosscheck as cc
from archplan.analytic import ParamCount
from archplan.cli import main
from archplan.resolve import ModelPlan

TINY_YAML = """\
name: tiny-verify
vocab_size: 32
d_model: 16
n_layers: 2
max_seq_len: 32
attention: {kind: gqa, n_heads: 4, n_kv_heads: 2}
ffn: {kind: glu, d_ff: 24}
"""


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["archplan", "verify", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 0), out, err


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


def test_exit_0_and_a_table_when_everything_matches(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "8")
    assert code == 0
    assert "layers.1.mixer" in out and "✓" in out and "✗" not in out
    assert "all figures match exactly" in out
    assert "KV/SSM cache" in out  # a tiny model also gets the real-instance checks


def test_json_shape(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "8", "--batch", "2", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["ok"] is True
    assert set(data["params"]) == {"analytic", "built"}
    assert set(data["flops"]) == {"analytic", "counted"}
    assert data["params"]["analytic"] == data["params"]["built"] > 0
    assert data["flops"]["analytic"] == data["flops"]["counted"] > 0
    assert (data["batch"], data["seq_len"]) == (2, 8)
    comps = {c["component"]: c for c in data["components"]}
    assert {"embed", "layers.0.mixer", "layers.0.ffn", "final_norm", "lm_head"} <= comps.keys()
    head = comps["lm_head"]
    assert head["ok"] and head["params"]["analytic"] == head["params"]["built"] == 32 * 16
    assert head["flops"]["counted"] == 2 * 2 * 8 * 16 * 32
    assert data["real"]["kv_cache"] and all(row["ok"] for row in data["real"]["kv_cache"])


def test_exit_1_with_the_diff_on_a_disagreement(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    real_count = cc.count_params

    def off(plan: ModelPlan) -> ParamCount:
        pc = real_count(plan)
        by_component = {**pc.by_component, "layers.0.ffn": pc.by_component["layers.0.ffn"] + 5}
        return dataclasses.replace(pc, by_component=by_component)

    monkeypatch.setattr(cc, "count_params", off)
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "8", "--no-cpu-check")
    assert code == 1
    assert "✗" in out
    assert "layers.0.ffn: analytic" in out and "(diff -5)" in out
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "8", "--no-cpu-check", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    bad = [c["component"] for c in data["components"] if not c["ok"]]
    assert bad == ["layers.0.ffn"]


def test_exit_2_on_a_missing_spec(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(monkeypatch, capsys, str(tmp_path / "nope.yaml"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no such file" in err


def test_exit_2_when_seq_exceeds_max_seq_len(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    code, _, err = run(monkeypatch, capsys, str(tiny), "--seq", "33")
    assert code == 2 and "max_seq_len" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_exit_2_for_cuda_without_cuda(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    code, out, err = run(monkeypatch, capsys, str(tiny), "--device", "cuda")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "CUDA is not available" in err


def test_a_deep_preset_folds_identical_layers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(monkeypatch, capsys, "llama-2-7b", "--seq", "16", "--no-backward")
    assert code == 0
    assert "layers.0-31.mixer" in out and "layers.5.mixer" not in out
    code, out, _ = run(monkeypatch, capsys, "llama-2-7b", "--seq", "16", "--no-backward", "--all-layers")
    assert code == 0 and "layers.31.mixer" in out


def test_a_failing_layer_is_never_folded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_count = cc.count_params

    def off(plan: ModelPlan) -> ParamCount:
        pc = real_count(plan)
        return dataclasses.replace(pc, by_component={**pc.by_component, "layers.5.mixer": 0})

    monkeypatch.setattr(cc, "count_params", off)
    code, out, _ = run(monkeypatch, capsys, "llama-2-7b", "--seq", "16", "--no-backward")
    assert code == 1
    assert "layers.0-4.mixer" in out and "layers.6-31.mixer" in out
    row = next(line for line in out.splitlines() if "│ layers.5.mixer" in line)
    assert "✗" in row
    assert "layers.5.mixer: analytic 0, built 67,108,864" in out
