"""`archplan verify`: exit codes 0/1/2, the table and the --json shape, through the real entry point."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from archplan import crosscheck as cc
from archplan.analytic import ParamCount
from archplan.cli import main
from archplan.commands.requires import torch_release
from archplan.flop_registry import FVCORE_FORMULAS
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
    # a tiny model also gets the real-instance checks: the cache measured on the CPU beside meta
    assert "KV/SSM cache" in out and "cpu, a 4-byte cache" in " ".join(out.split())


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
    assert "parameters, layers.0.ffn: analytic" in out and "(diff -5)" in out
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


@pytest.mark.parametrize("layout", [("--layout", "tp=1,cp=1,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=1"), ()],
                         ids=["layout", "model-check"])
def test_a_run_too_short_for_the_mtp_targets_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], layout: tuple[str, ...]
) -> None:
    """One MTP module needs 3 tokens (the next one and one ahead), as `training_loss` refuses on
    one device; `verify --layout` ran 2 and reported a mismatch, exit 1, and the model check
    counted a training forward at 2 and called it a step."""
    spec = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-mtp.yaml")
    code, out, err = run(monkeypatch, capsys, spec, "--seq", "2", *layout)
    assert code == 2 and out == ""
    assert "--seq: a training sequence needs at least 3 tokens" in err and err.count("\n") == 1


def test_seq_past_max_seq_len_is_verified_with_rope_and_exits_2_past_a_learned_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path
) -> None:
    """RoPE has a position at every length (ModelPlan.check_length): the model is built and counted
    there; a learned position table has no row past max_seq_len: one line, exit 2."""
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "33")
    assert code == 0 and "all figures match exactly" in out
    learned = tmp_path / "learned.yaml"
    learned.write_text(TINY_YAML + "position: {kind: learned}\n")
    code, _, err = run(monkeypatch, capsys, str(learned), "--seq", "33")
    assert code == 2 and "learned position table" in err and "max_seq_len 32" in err and err.count("\n") == 1


def test_exit_2_for_cuda_without_cuda(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    # a machine without CUDA, on every machine: `modules.model.resolve_device` asks torch.cuda.is_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
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


def test_a_narrow_terminal_gets_the_parameters_and_flops_apart(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """At 80 columns the one component table would cut the exact totals: it becomes two tables,
    each within the width, each with its exact total."""
    from rich.console import Console

    from archplan.commands import verify

    monkeypatch.setattr(verify, "report_console", lambda: Console(width=80))
    code, out, _ = run(monkeypatch, capsys, "llama-2-7b", "--seq", "16", "--no-backward")
    assert code == 0
    assert "(batch 1, seq 16): parameters" in out and "(batch 1, seq 16): forward FLOPs" in out
    assert "6,738,415,616" in out and "…" not in out
    # the closing summary is one soft-wrapped line, for grep
    assert max(len(line) for line in out.splitlines() if "match exactly" not in line) <= 80


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


def _summary(out: str) -> str:
    """The last line verify prints: which checks matched, disagreed, or did not run."""
    return out.strip().splitlines()[-1]


def test_an_absent_fvcore_is_reported_as_not_run_never_as_a_match(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    monkeypatch.setitem(sys.modules, "fvcore.nn", None)  # `from fvcore.nn import ...` raises ImportError
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "8")
    assert code == 0  # nothing disagreed
    assert "all figures match" not in out
    matched, _, not_run = _summary(out).partition("not run:")
    assert matched.startswith("match exactly: parameters, forward FLOPs, training FLOPs, KV cache")
    assert "fvcore" not in matched and "fvcore (fvcore is not installed" in not_run
    assert "fvcore FlopCountAnalysis: not run (fvcore is not installed" in out
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "8", "--json")
    checks = {c["check"]: c for c in json.loads(out)["checks"]}
    assert checks["fvcore"]["status"] == "not run" and "not installed" in checks["fvcore"]["detail"]


def test_a_crashing_fvcore_is_reported_as_not_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    with warnings.catch_warnings():  # fvcore's import scripts with torch.jit, which warns
        warnings.simplefilter("ignore")
        import fvcore.nn

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot trace")

    monkeypatch.setattr(fvcore.nn, "FlopCountAnalysis", crash)
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "8", "--no-backward")
    assert code == 0 and "all figures match" not in out
    summary = _summary(out)
    assert ("not run: training FLOPs (no backward requested), "
            "fvcore (fvcore failed: RuntimeError: cannot trace)") in summary
    assert summary.startswith("match exactly: parameters, forward FLOPs, KV cache;")


def test_checks_that_did_not_run_on_a_big_model_are_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(monkeypatch, capsys, "gpt2", "--seq", "8", "--no-backward")
    assert code == 0 and "all figures match" not in out
    assert _summary(out) == (
        "match exactly: parameters, forward FLOPs, KV cache; not run: training FLOPs (no backward requested), "
        "fvcore (model ≥ 50M parameters)"
    )
    # the cache is measured on meta whatever the size: a row per layer, folded where they repeat
    assert "KV/SSM cache after a prefill of 8 tokens" in out
    assert "layers.0-11.mixer" in out


def test_the_fvcore_table_folds_identical_layers_as_the_others_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """gpt2 --cpu-check printed 61 fvcore rows, every layers.N row alike, where the component and
    cache tables fold them (--all-layers keeps one row per layer everywhere)."""
    deep = tmp_path / "deep.yaml"
    deep.write_text(TINY_YAML.replace("n_layers: 2", "n_layers: 10"))
    code, out, _ = run(monkeypatch, capsys, str(deep), "--seq", "8", "--cpu-check")
    fvcore = out[out.index("fvcore FlopCountAnalysis"):]
    assert code == 0 and "layers.0-9.mixer" in fvcore and "layers.3.mixer" not in fvcore
    code, out, _ = run(monkeypatch, capsys, str(deep), "--seq", "8", "--cpu-check", "--all-layers")
    assert code == 0 and "layers.3.mixer" in out[out.index("fvcore FlopCountAnalysis"):]

def test_all_figures_match_only_when_every_check_ran(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "8")
    assert code == 0
    assert _summary(out) == (
        "all figures match exactly (parameters, forward FLOPs, training FLOPs, KV cache, fvcore)"
    )


def test_an_unregistered_matmul_op_fails_verify(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    def linear_with_mv(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        extra = torch.mv(self.weight, x.reshape(-1, x.shape[-1])[0]).sum()
        return torch.nn.functional.linear(x, self.weight, self.bias) + 0 * extra

    monkeypatch.setattr(torch.nn.Linear, "forward", linear_with_mv)
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "8", "--no-cpu-check")
    assert code == 1
    assert "op aten.mv ran" in out and "in the forward" in out and "in the backward" in out
    assert "none: matmul-shaped" in out
    assert "mismatch: forward FLOPs, training FLOPs" in _summary(out)
    assert "all figures match" not in out


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_an_old_torch_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path, command: str
) -> None:
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        return "2.7.1+cpu" if name == "torch" else real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(sys, "argv", ["archplan", command, str(tiny)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.count("\n") == 1
    assert "needs PyTorch 2.13 or newer" in err and "found 2.7.1+cpu" in err


@pytest.mark.parametrize(("source", "said"), [
    ('__version__ = "2.12.0+cpu"\n', "needs PyTorch 2.13 or newer (the oldest the test suite passes on); found 2.12.0"),
    ("x = 1\n", "states no version, so it is no PyTorch build"),
])
def test_a_torch_without_its_metadata_is_judged_by_the_module(tmp_path: Path, source: str, said: str) -> None:
    """A torch on PYTHONPATH with no distribution metadata raised PackageNotFoundError (a
    traceback); one shadowing the installed wheel passed as the wheel's version."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "archplan.cli", "verify", "gpt2"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and said in proc.stderr, proc.stderr


@pytest.mark.parametrize(("version", "release"), [
    ("2.13.0+cpu", (2, 13)), ("2.8.0a0+gitabc", (2, 8)), ("3.0.0", (3, 0)), ("2.6.0", (2, 6)),
])
def test_torch_release_reads_major_minor(version: str, release: tuple[int, int]) -> None:
    assert torch_release(version) == release


def test_an_fvcore_mismatch_fails_with_its_ops(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    sdpa = FVCORE_FORMULAS["aten::scaled_dot_product_attention"]
    monkeypatch.setitem(FVCORE_FORMULAS, "aten::scaled_dot_product_attention",
                        dataclasses.replace(sdpa, formula=lambda ins, outs: sdpa.formula(ins, outs) + 2))
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "8", "--no-backward")
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("  fvcore layers.0.mixer:"))
    assert "(linear " in line and "known " in line and "aten::scaled_dot_product_attention" in line
    assert "mismatch: fvcore" in _summary(out)


@pytest.mark.parametrize(("args", "message"), [
    (["--layout", "tp=2,cp=1,pp=1,dp=2,ep=1,zero=1,recompute=none,mb=1", "--batch", "2"],
     "--batch does not apply to --layout"),
    (["--microbatches", "2"], "--microbatches does not apply to the model check (it is read by --layout)"),
    # the flag as written, not the option's first name
    (["--layout", "tp=2,cp=1,pp=1,dp=2,ep=1,zero=1,recompute=none,mb=1", "--no-backward"],
     "--no-backward does not apply to --layout"),
    (["--layout", "tp=2,cp=1,pp=1,dp=2,ep=1,zero=1,recompute=none,mb=1", "--backward"],
     "--backward does not apply to --layout"),
    (["--stage", "1"], "--stage does not apply to the model check (it is read by --layout)"),
    (["--layout", "tp=1,cp=1,pp=2,dp=2,ep=1,zero=1,recompute=none,mb=1", "--stage", "2"],
     "--stage 2: the layout has 2 pipeline stages, 0 to 1"),
])
def test_an_option_the_mode_ignores_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path, args: list[str], message: str
) -> None:
    code, _, err = run(monkeypatch, capsys, str(tiny), *args)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_a_seq_past_max_seq_len_is_checked_with_a_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `size` and `bench` say it: tiny-llama (RoPE, max_seq_len 256) at 300 tokens."""
    spec = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-llama.yaml")
    code, _, err = run(monkeypatch, capsys, spec, "--seq", "300", "--no-backward")
    assert code == 0 and "note: seq 300 is past tiny-llama's max_seq_len (256): checked as asked" in " ".join(err.split())
    code, out, err = run(monkeypatch, capsys, spec, "--seq", "300", "--no-backward", "--json")
    data = json.loads(out)
    assert code == 0 and err == "" and data["past_max_seq_len"].startswith("seq 300 is past tiny-llama's max_seq_len")
    assert "2 per multiply-add" in data["convention"] and "a 2-byte cache" in data["convention"]


@pytest.mark.parametrize(("args", "said"), [
    (("--seq", "10000000000"), "--seq: must be between 1 and 67,108,864"),
    (("--batch", "10000000000"), "Invalid value for '--batch'"),
    (("--layout", "tp=1,cp=1,pp=1,dp=1,ep=1,zero=0,recompute=none,mb=100000000000000"), "at most 1,048,576"),
    (("--layout", "tp=1,cp=1,pp=1,dp=100000000000,ep=1,zero=0,recompute=none,mb=1"), "at most 1,000,000,000"),
])
def test_sizes_past_any_tensor_are_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path, args: tuple[str, ...], said: str
) -> None:
    code, out, err = run(monkeypatch, capsys, str(tiny), *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and said in err


def test_a_tensor_torch_cannot_size_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Within the options' bounds a counted forward can still need more than an index holds: 2^26
    tokens of eager attention scores, 1,024 at a time."""
    code, out, err = run(monkeypatch, capsys, "llama-3-8b", "--seq", "67108864", "--batch", "1024", "--no-backward")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "Storage size calculation overflowed" in err and "give a smaller --seq" in err


def test_a_weight_torch_cannot_size_names_the_spec(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Every field within its bounds, the attention's query weight (2^24 heads of 2^24 over 2^24)
    past an index: no smaller --seq helps, so the spec is named as a way out too."""
    spec = tmp_path / "huge.yaml"
    spec.write_text("name: huge\nvocab_size: 64\nd_model: 16777216\nn_layers: 1\nmax_seq_len: 16\n"
                    "attention: {kind: mha, n_heads: 16777216, head_dim: 16777216}\nffn: {kind: glu, d_ff: 64}\n")
    code, out, err = run(monkeypatch, capsys, str(spec), "--seq", "1", "--no-cpu-check", "--no-backward")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "Storage size calculation overflowed" in err and "a spec whose dimensions multiply to less" in err


def test_a_real_instance_past_the_host_memory_is_refused_before_it_is_built(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    monkeypatch.setattr(cc, "free_memory", lambda device: 1024)
    code, out, err = run(monkeypatch, capsys, str(tiny), "--cpu-check")
    assert code == 2 and out == "" and "its weights alone take" in err and "give --no-cpu-check" in err


def test_device_auto_is_read_as_bench_reads_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                               tiny: Path) -> None:
    """bench takes --device auto and verify refused it: auto is cuda where available, else cpu."""
    import torch

    code, out, _ = run(monkeypatch, capsys, str(tiny), "--device", "auto", "--seq", "8", "--no-backward")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert code == 0 and f"{expected} bytes" in out


def test_verifys_own_real_instance_past_the_host_memory_is_a_check_not_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    """Without --cpu-check the real instance is verify's own choice for a small model: one that
    would not fit aborted the whole run with exit 2, the meta checks' results thrown away. It is
    now a check not run, with why, and the meta checks stand."""
    monkeypatch.setattr(cc, "free_memory", lambda device: 1 << 30)
    code, out, err = run(monkeypatch, capsys, str(tiny), "--batch", "65536", "--seq", "32", "--no-backward")
    assert code == 0 and err == ""
    assert "not run (would not fit: it runs batch 65536 × seq 32 through the fp32 model on cpu" in out
    assert "a smaller --seq or --batch lets them run" in out and "--cpu-check forces them" not in out
    code, out, _ = run(monkeypatch, capsys, str(tiny), "--batch", "65536", "--seq", "32", "--no-backward", "--json")
    checks = {c["check"]: c for c in json.loads(out)["checks"]}
    assert code == 0 and checks["fvcore"]["status"] == "not run" and "would not fit" in checks["fvcore"]["detail"]


def test_a_real_run_past_the_host_memory_is_refused_before_it_is_built(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    """The weights fit, the run does not: only the weights were priced, and batch 65,536 × seq 256
    of a tiny model asked the allocator for 34 GB of logits after 27 s."""
    monkeypatch.setattr(cc, "free_memory", lambda device: 1 << 30)
    code, out, err = run(monkeypatch, capsys, str(tiny), "--cpu-check", "--batch", "65536", "--seq", "64",
                         "--no-backward")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--cpu-check runs batch 65536 × seq 64 through the fp32 model on cpu" in err
    assert "give a smaller --seq or --batch, or --no-cpu-check" in err


def test_a_narrow_terminal_folds_names_and_keeps_figures_and_marks() -> None:
    """At 60 columns the component names fold; every ✓ and the exact totals stay whole (with every
    column unwrappable, rich cut the totals and dropped the ✓ column)."""
    import io

    from rich.console import Console

    from archplan.commands.verify import render
    from archplan.loader import load_spec
    from archplan.resolve import resolve

    result = cc.crosscheck(resolve(load_spec("gpt2")), seq_len=8, batch=1, backward=False, real=False)

    def shown(width: int) -> str:
        out = io.StringIO()
        render(result, Console(file=out, width=width, color_system=None), aggregate=True)
        return out.getvalue()

    narrow, wide = shown(60), shown(200)
    assert "124,439,808" in narrow and narrow.count("✓") == wide.count("✓") > 10
    assert not any("…" in line for line in narrow.splitlines() if "✓" in line)


@pytest.mark.parametrize("stage", [0, 1])
def test_layout_measures_the_stage_asked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         tiny: Path, stage: int) -> None:
    """`--stage` picks the pipeline stage whose rank `--layout` measures (default: plan's most loaded)."""
    import torch.distributed as dist

    try:
        code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "16", "--json", "--stage", str(stage),
                           "--layout", "tp=1,cp=1,pp=2,dp=2,ep=1,zero=1,recompute=none,mb=1")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    result = json.loads(out)
    assert code == 0 and result["stage"] == stage and result["layers"] == [stage]


@pytest.mark.parametrize(("stage", "holds"), [(0, "the embedding alone"), (3, "the head alone")])
def test_layout_header_of_a_stage_without_layers(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                 tiny: Path, stage: int, holds: str) -> None:
    """Four stages over two layers leave the end stages the embedding and the head: the header still
    names the spec, the layout and the rank (it shrank to "stage N")."""
    import torch.distributed as dist

    try:
        code, out, _ = run(monkeypatch, capsys, str(tiny), "--seq", "16", "--stage", str(stage),
                           "--layout", "tp=1,cp=1,pp=4,dp=1,ep=1,zero=1,recompute=none,mb=1")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    header = " ".join(out.split("per-rank peak memory")[0].split())
    assert code == 0 and "archplan verify --layout — " in header
    assert f"measured rank {stage} = pipeline stage {stage} ({holds}), " in header


def test_layout_has_no_node_rule(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    """The fake process group has no nodes: tp=6 (a GB200 rack's tp, which plan prices with its
    --gpu's node) and tp=12 ran into "does not divide the node's 8 GPUs" / "spans more than one
    node", a rule of plan's cluster the checked figures do not depend on."""
    import torch.distributed as dist

    spec = tmp_path / "six.yaml"
    spec.write_text(TINY_YAML.replace("n_heads: 4, n_kv_heads: 2", "n_heads: 12, n_kv_heads: 12")
                    .replace("d_model: 16", "d_model: 48").replace("d_ff: 24", "d_ff: 96"))
    for tp in (6, 12):
        try:
            code, out, err = run(monkeypatch, capsys, str(spec), "--seq", "24", "--json",
                                 "--layout", f"tp={tp},cp=1,pp=1,dp=2,ep=1,zero=1,recompute=none,mb=1")
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        assert code == 0 and json.loads(out)["ok"], (tp, err)


@pytest.mark.parametrize("layout", [
    "tp=1,cp=1,pp=1,dp=4,ep=1,zero=1,recompute=none,mb=1",
    "tp=1,cp=1,pp=1,dp=4,ep=1,zero=0,recompute=none,mb=1",
    "tp=1,cp=1,pp=2,vpp=2,dp=2,ep=1,zero=3,recompute=none,mb=1",
    "tp=1,cp=1,pp=4,dp=1,ep=1,zero=1,recompute=none,mb=1",
])
def test_layout_by_default_checks_the_memory_plan_prints(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], tiny: Path,
                                                         layout: str) -> None:
    """Without --microbatches, verify runs the fewest micro-batches at which the rank's memory is
    plan's at its own batch (62,500 micro-batches here): at pp micro-batches a pp=1 layout
    accumulated no gradients (ZeRO-1's whole fp32 gradients were checked sharded) and an
    interleaved one stopped its warm-up short, so the figures verify judged were not plan's."""
    import torch.distributed as dist
    from typer.testing import CliRunner

    from archplan.cli import app

    planned = CliRunner().invoke(app, ["plan", str(tiny), "--gpus", "4", "--gpu", "h100", "--seq", "16", "--tokens",
                                       "1B", "--states", "fsdp2", "--cross-entropy", "eager", "--layout", layout,
                                       "--json"])
    assert planned.exit_code == 0, planned.output
    priced = json.loads(planned.stdout)["layouts"][0]["memory"]
    try:
        code, out, err = run(monkeypatch, capsys, str(tiny), "--seq", "16", "--json", "--layout", layout)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    checked = json.loads(out)
    assert code == 0 and checked["ok"] and checked["stage"] == priced["stage"], err
    assert {row["category"]: row["analytic"] for row in checked["memory"]} == {
        name: priced[name] for name in ("parameters", "gradients", "optimizer", "activations", "temporary",
                                        "collective_buffers")}
