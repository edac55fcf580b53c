"""Bad input: every case exits with code 2 and one line naming the file (and the field), no traceback.

The CLI is run in-process through `archplan.cli.main` (the function the console script calls),
so the ArchplanError -> one line mapping is the one users get; one case also runs the console
script in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from archplan.cli import main
from archplan.errors import ArchplanError

BASE = """\
name: tiny
vocab_size: 1000
d_model: 64
n_layers: 2
attention: {kind: gqa, n_heads: 4, n_kv_heads: 2}
ffn: {kind: glu, d_ff: 128}
"""


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Outcome:
    """Run `archplan ARGV` in-process exactly as the console script does."""
    monkeypatch.setattr(sys, "argv", ["archplan", *argv])
    monkeypatch.delenv("ARCHPLAN_DEBUG", raising=False)
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


def assert_one_line_error(outcome: Outcome, *needles: str) -> str:
    assert outcome.code == 2, outcome
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("archplan: error: ")
    assert "Traceback" not in outcome.stderr + outcome.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def spec_file(tmp_path: Path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    return lambda *argv: run_main(list(argv), capsys, monkeypatch)


def test_base_spec_is_valid(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # the cases below break this file in exactly one place each
    outcome = cli("size", spec_file(tmp_path, BASE), "--json")
    assert outcome.code == 0 and '"total"' in outcome.stdout


def test_missing_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    missing = str(tmp_path / "nope.yaml")
    assert_one_line_error(cli("size", missing), missing, "no such file")


def test_a_missing_path_named_as_a_preset_points_to(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    missing = str(tmp_path / "presets" / "70b.yaml")  # the README's path, outside a checkout
    assert_one_line_error(cli("size", missing), missing, "no such file; the bundled preset '70b'")


def test_unknown_preset_name_suggests_one(cli) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(cli("size", "llama-3-8"), "llama-3-8", "did you mean")


def test_directory(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(cli("size", str(tmp_path)), str(tmp_path), "directory")


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_device_or_pipe_is_refused_unread(tmp_path: Path, kind: str) -> None:
    # size 0 by stat, endless by read: /dev/zero ran out of memory; a FIFO blocks its reader
    # (in a subprocess, so a regression times out instead of hanging the suite)
    if kind == "device":
        path = "/dev/zero"
        if not Path(path).exists():
            pytest.skip("no /dev/zero here")
    else:
        path = str(tmp_path / "pipe.yaml")
        os.mkfifo(path)
    proc = subprocess.run([sys.executable, "-m", "archplan.cli", "size", path],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"archplan: error: {path}: not a regular file; expected a YAML spec file\n"


def test_a_folder_named_as_a_preset_does_not_hide_it(cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # `mkdir gpt2; archplan size gpt2` said "is a directory": a folder is never a spec
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    outcome = cli("size", "gpt2", "--json")
    assert outcome.code == 0 and '"name": "gpt2"' in outcome.stdout, outcome
    assert_one_line_error(cli("size", "./gpt2"), "./gpt2: is a directory; for the bundled preset give its name "
                          "alone: gpt2")
    (tmp_path / "gpt2.yaml").write_text(BASE)  # a file of the name is the user's spec, as before
    outcome = cli("size", "gpt2.yaml", "--json")
    assert outcome.code == 0 and '"name": "tiny"' in outcome.stdout, outcome


def test_empty_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, "")
    assert_one_line_error(cli("size", path), path, "empty")


def test_non_mapping_yaml(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, "- 1\n- 2\n")
    assert_one_line_error(cli("size", path), path, "mapping", "list")


def test_malformed_yaml_has_line_and_column(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, "name: x\nvocab_size: [1, 2\n")
    line = assert_one_line_error(cli("size", path), "invalid YAML")
    assert line.startswith(f"archplan: error: {path}:2:18:")  # the end of the last line, where the ] is missing


def test_unknown_field_suggests_the_closest(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, BASE.replace("n_layers", "n_layer"))
    assert_one_line_error(cli("size", path), f"{path}:4:1", "n_layer", "unknown field",
                          "did you mean 'n_layers'")


@pytest.mark.parametrize(("key", "read_as"), [("1", "int"), ("null", "null"), ("true", "bool"), ("2.5", "float")])
def test_a_key_yaml_reads_as_no_string_names_its_line(cli, tmp_path: Path, key: str,  # type: ignore[no-untyped-def]
                                                     read_as: str) -> None:
    """`1:` or `null:` is not a field name: the error names the key as written and its line (pydantic's
    "Keys should be strings (got None)" named neither), and lint files it under AP002 at that line."""
    path = spec_file(tmp_path, BASE.replace("ffn:", f"{key}: 2\nffn:"))
    assert_one_line_error(cli("size", path), f"{path}:6:1", f"key `{key}` (YAML reads it as {read_as})",
                          "is not a field name")
    outcome = cli("lint", path)
    assert outcome.code == 1 and f"{path}:6:1: AP002 error: key `{key}`" in outcome.stdout
    # beside the other problems of the same pass, each key at its own line
    path = spec_file(tmp_path, BASE.replace("ffn:", f"{key}: 2\nffn:").replace("d_model", "d_modl").replace(
        "n_heads: 4,", f"n_heads: 4, {key}: 1,"), "more.yaml")
    found = [line.split(" error: ")[0] for line in cli("lint", path).stdout.splitlines() if " error: " in line]
    assert found == [f"{path}:3:1: AP002", f"{path}:5:36: AP002", f"{path}:6:1: AP002"]


@pytest.mark.parametrize("key", ["08", "010000", "0o17", "4_096"])
def test_a_key_only_yaml_1_1_reads_as_a_number_is_an_unknown_field_once(cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                       key: str) -> None:
    """`08:` was reported twice, once as a key "YAML reads as yaml11-number" (an internal tag's
    name): to YAML 1.2 and to editors it is text, a field name no spec has."""
    path = spec_file(tmp_path, BASE.replace("ffn:", f"{key}: 2\nffn:"))
    outcome = cli("lint", path)
    assert outcome.code == 1 and "yaml11" not in outcome.stdout
    assert [line for line in outcome.stdout.splitlines() if " AP002 " in line] == [
        f"{path}:6:1: AP002 error: {key}: unknown field (expected one of: attention, d_model, description, embedding, "
        "ffn, final_norm, layout, long_conv, max_seq_len, moe, mtp, n_layers, name, norm, position, reference, "
        "residual, ssm, training, vocab_size)"]


def test_a_key_with_a_line_break_keeps_the_error_on_one_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A quoted key "a\\nb" was printed raw: one finding split over two lines in `lint`'s text
    output and in `size`'s error. The key is quoted as Python writes it."""
    path = spec_file(tmp_path, BASE.replace("ffn:", '"we,ird:\\nkey": 1\nffn:'))
    assert_one_line_error(cli("size", path), f"{path}:6:1: 'we,ird:\\nkey': unknown field")
    outcome = cli("lint", path)
    assert outcome.code == 1 and outcome.stdout.splitlines()[0].startswith(f"{path}:6:1: AP002 error: 'we,ird:\\nkey'")

def test_unknown_nested_field(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, BASE.replace("d_ff: 128", "dff: 128"))
    assert_one_line_error(cli("size", path), path, "ffn.dff", "did you mean 'd_ff'")


def test_a_missing_kind_names_the_choices(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, BASE.replace("kind: glu, ", ""))
    line = assert_one_line_error(cli("size", path), path, "ffn", "`kind` is missing", "'mlp', 'glu'")
    assert "discriminator" not in line


MAMBA = """\
name: tiny
vocab_size: 1000
d_model: 64
n_layers: 2
ssm: {kind: mamba1}
layout: {mixers: M}
"""

# BASE with an MoE layer whose router takes the fields put in place of ROUTER
MOE_ROUTER = BASE.replace("ffn: {kind: glu, d_ff: 128}",
                          "moe: {n_experts: 4, top_k: 2, expert: {kind: glu, d_ff: 64}, router: {ROUTER}}")


@pytest.mark.parametrize(("text", "needles"), [
    # fields that change nothing were accepted: each is refused where it stands
    (BASE.replace("n_layers: 2", "n_layers: 2\nposition: {kind: rope, scaling: {kind: linear, factor: 2.0, "
                  "mscale: 0.5, beta_fast: 8}}"),
     ("position.scaling", "beta_fast, mscale: yarn fields; linear scaling does not read them")),
    (BASE.replace("n_layers: 2", "n_layers: 2\nposition: {kind: rope, scaling: {kind: yarn, factor: 2.0, "
                  "original_max_positions: 512, high_freq_factor: 2}}"),
     ("position.scaling", "high_freq_factor: llama3 field; yarn scaling does not read it")),
    (MAMBA + "position: {kind: rope}\n", ("position: rope acts inside attention, and this model has none",)),
    (MAMBA + "position: {kind: alibi}\n", ("position: alibi acts inside attention",)),
    (MOE_ROUTER.replace("ROUTER", "group_score: max"),
     ("moe.router", "group_score scores the groups of group-limited routing")),
    (MOE_ROUTER.replace("ROUTER", "bias_update_speed: 0.01"),
     ("moe.router", "bias_update_speed moves the score-correction bias; set score_correction_bias: true")),
])
def test_a_field_that_changes_nothing_is_refused(cli, tmp_path: Path, text: str,  # type: ignore[no-untyped-def]
                                                needles: tuple[str, ...]) -> None:
    assert_one_line_error(cli("size", spec_file(tmp_path, text)), *needles)


def test_a_model_without_attention_has_no_rope_by_default(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`position` defaults to RoPE, which acts inside attention: a Mamba spec that left it out was
    told "RoPE was not trained there" past its max_seq_len, by size, compare and verify alike."""
    outcome = cli("size", spec_file(tmp_path, MAMBA), "--context", "100k", "--json")
    report = json.loads(outcome.stdout)
    assert outcome.code == 0 and report["kv_cache"]["past_max_seq_len"] is None
    assert "RoPE" not in cli("size", spec_file(tmp_path, MAMBA), "--context", "100k").stdout

@pytest.mark.parametrize(("old", "new", "needles"), [
    ("ffn: {kind: glu, d_ff: 128}", "ffn: glu", ("ffn", "got 'glu'", "write ffn: {kind: glu}")),
    ("ffn: {kind: glu, d_ff: 128}", "ffn: [glu]", ("ffn", "got a list", "kinds: mlp, glu")),
    ("n_layers: 2", "n_layers: 2\nnorm: 5", ("norm", "mapping with the fields kind", "got 5")),
])
def test_a_block_that_is_not_a_mapping(cli, tmp_path: Path, old: str, new: str,  # type: ignore[no-untyped-def]
                                       needles: tuple[str, ...]) -> None:
    """pydantic's wording names internal classes ("instance of NormSpec"); the error says what the
    block takes instead."""
    path = spec_file(tmp_path, BASE.replace(old, new))
    line = assert_one_line_error(cli("size", path), path, *needles)
    assert "instance of" not in line and "extract fields" not in line


def test_wrong_type(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, BASE.replace("d_model: 64", "d_model: big"))
    assert_one_line_error(cli("size", path), f"{path}:3:1", "d_model", "integer", "'big'")


@pytest.mark.parametrize(("old", "new", "field", "needle"), [
    ("n_layers: 2", "n_layers: true", "n_layers", "expected an integer, got a boolean (true)"),
    ("d_ff: 128", "d_ff: true", "ffn.d_ff", "expected an integer, got a boolean (true)"),
    ("n_layers: 2", 'n_layers: "32"', "n_layers",
     "expected an integer, got the string '32'; write the number without quotes"),
    ("d_model: 64", "d_model: 64.0", "d_model", "expected an integer, got 64.0; an integer takes no decimal point or exponent (64)"),
    ("n_kv_heads: 2}", "n_kv_heads: 2}\nposition: {kind: rope, theta: true}", "position.theta",
     "expected a number, got a boolean (true)"),
    ("n_kv_heads: 2}", "n_kv_heads: 2}\nnorm: {eps: '1e-5'}", "norm.eps", "expected a number, got the string"),
    # the command line's suffixes (--tokens 15T) are not YAML's: say how to write the number
    ("n_kv_heads: 2}", "n_kv_heads: 2}\ntraining: {tokens: 15T}", "training.tokens",
     "expected a number, got the string '15T'; a spec's numbers take no suffix: write 15e12"),
    ("d_model: 64", "d_model: 4k", "d_model",
     "expected an integer, got the string '4k'; a spec's numbers take no suffix: write the number in full"),
])
def test_booleans_and_strings_are_not_numbers(cli, tmp_path: Path, old: str, new: str, field: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    # pydantic's lax mode read `true` as 1 and "32" as 32: a 1-layer model sized without a word
    path = spec_file(tmp_path, BASE.replace(old, new))
    assert_one_line_error(cli("size", path), path, f"{field}: {needle}")


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_number_field_is_finite(cli, tmp_path: Path, value: str) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, BASE + f"position: {{kind: rope, theta: {value}}}\n")
    assert_one_line_error(cli("size", path), path, "position.theta", "finite number")


@pytest.mark.parametrize(("old", "new", "said"), [
    ("n_layers: 2", "n_layers: null", "n_layers: expected an integer, got null"),
    ("n_layers: 2", "n_layers: [2]", "n_layers: expected an integer, got a list"),
    # YAML 1.2 (editors) has no implicit dates: the text, which a number field refuses by name
    ("n_layers: 2", "n_layers: 2024-01-01", "n_layers: expected an integer, got the string '2024-01-01'"),
    ("n_layers: 2", "n_layers: !!timestamp 2024-01-01", "n_layers: expected an integer, got the date 2024-01-01"),
    ("n_layers: 2", "n_layers: !!binary aGVsbG8=", "n_layers: binary data (!!binary) is no spec value"),
    ("name: tiny", "name: !!timestamp 2024-01-01", "name: expected a string, got the date 2024-01-01 "
                                                   "(!!timestamp); quote it"),
    ("n_layers: 2", 'n_layers: 2\nlayout: {mixers: ""}', "layout.mixers: expected a pattern of the letters A"),
    ("n_layers: 2", "n_layers: 2\nnorm: null", "norm: expected a mapping with the fields kind, bias, eps, affine; "
                                               "got null"),
    ("n_layers: 2", "n_layers: 2\nfinal_norm: null", "final_norm: expected true or false, got null"),
])
def test_a_value_of_another_yaml_type_is_named_as_yaml_writes_it(cli, tmp_path: Path, old: str, new: str,  # type: ignore[no-untyped-def]
                                                                said: str) -> None:
    """pydantic's "(got None)", "(got datetime.date(2024, 1, 1))", "(got b'hello')" and a bare
    regular expression for the mixers named Python's values, not what the file says."""
    assert_one_line_error(cli("size", spec_file(tmp_path, BASE.replace(old, new))), said)

def test_a_number_field_takes_an_integer(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """YAML's `10000` is an int and `1e-5` a string to YAML 1.1: both are the numbers they read as,
    and the spec read is the one written with `10000.0` and `1.0e-5`."""
    from archplan.loader import load_spec

    path = spec_file(tmp_path, BASE + "position: {kind: rope, theta: 10000}\nnorm: {eps: 1e-5}\n")
    outcome = cli("size", path, "--json")
    assert outcome.code == 0, outcome
    spec = load_spec(path)
    assert spec.position.theta == 10000.0 and spec.norm.eps == 1e-5  # type: ignore[union-attr]
    same = spec_file(tmp_path, BASE + "position: {kind: rope, theta: 10000.0}\nnorm: {eps: 1.0e-5}\n", "same.yaml")
    assert outcome.stdout.replace(path, same) == cli("size", same, "--json").stdout


@pytest.mark.parametrize(("old", "new", "field"), [
    ("d_model: 64", "d_model: 0", "d_model"),
    ("n_layers: 2", "n_layers: -3", "n_layers"),
    ("d_ff: 128", "d_ff: 0", "ffn.d_ff"),
])
def test_zero_or_negative_size(cli, tmp_path: Path, old: str, new: str, field: str) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, BASE.replace(old, new))
    assert_one_line_error(cli("size", path), path, field, "expected a value > 0, got ")


@pytest.mark.parametrize("command", [("size",), ("plan", "--gpus", "8")])
def test_training_tokens_take_the_range_tokens_takes(cli, tmp_path: Path, command: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    """Half a token priced a run of 0.0 s; --tokens refuses it, and so does the spec."""
    path = spec_file(tmp_path, BASE + "training: {tokens: 0.5}\n")
    assert_one_line_error(cli(command[0], path, *command[1:]), path, "training.tokens", "expected a value ≥ 1.0, got 0.5")


def test_heads_not_divisible_by_kv_heads(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, BASE.replace("n_kv_heads: 2", "n_kv_heads: 3"))
    # at the field the rule names, as lint reports it (the block's line before)
    assert_one_line_error(cli("size", path), f"{path}:5:", "attention.n_kv_heads: n_heads (4)", "divisible")


def test_odd_rotary_dimension(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, BASE.replace("n_kv_heads: 2}", "n_kv_heads: 2, head_dim: 7}"))
    assert_one_line_error(cli("size", path), path, "rotary dimension 7 is odd")


def test_a_rotary_fraction_that_rotates_nothing(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """0.05 of a 16-wide head is 0 dimensions: even, so the odd check let it through, a RoPE model
    with no positions."""
    path = spec_file(tmp_path, BASE + "position: {kind: rope, fraction: 0.05}\n")
    assert_one_line_error(cli("size", path), f"{path}:7:", "position.fraction", "rotates no dimension")


def test_a_rotary_fraction_of_mla_is_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """MLA rotates its own qk_rope_head_dim dimensions; a fraction of them had been taken and
    ignored by both the sizer and the builder."""
    mla = ("attention: {kind: mla, n_heads: 4, q_lora_rank: 16, kv_lora_rank: 16, qk_nope_head_dim: 8, "
           "qk_rope_head_dim: 4, v_head_dim: 8}")
    spec = BASE.replace("attention: {kind: gqa, n_heads: 4, n_kv_heads: 2}", mla)
    path = spec_file(tmp_path, spec + "position: {kind: rope, fraction: 0.5}\n")
    assert_one_line_error(cli("size", path), f"{path}:7:", "position.fraction", "qk_rope_head_dim (4)")
    assert cli("size", spec_file(tmp_path, spec, "whole.yaml")).code == 0


def test_an_unknown_kind_is_placed_at_its_kind_key(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`ffn: {kind: swiglu}` was reported at the block's line; the mistake is the kind's word."""
    path = spec_file(tmp_path, BASE.replace("ffn: {kind: glu, d_ff: 128}", "ffn:\n  d_ff: 128\n  kind: swiglu"))
    assert_one_line_error(cli("size", path), f"{path}:8:3", "ffn: unknown kind 'swiglu'")


def test_top_k_exceeds_experts(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    moe = "moe: {n_experts: 4, top_k: 5, expert: {kind: glu, d_ff: 32}}"
    path = spec_file(tmp_path, BASE.replace("ffn: {kind: glu, d_ff: 128}", moe))
    assert_one_line_error(cli("size", path), f"{path}:6:21", "moe.top_k: top_k (5) exceeds n_experts (4)")


@pytest.mark.parametrize(("layout", "needles"), [
    # every layer routed: the dense `ffn` would change nothing, as a solved `ffn.d_ff` would not
    ("", (":6:1", "ffn: set, but the layout puts `moe` on every layer", "layout.first_dense")),
    ("layout: {first_dense: 2}\n", (":7:1", "moe: set, but the layout places it on no layer")),
])
def test_a_block_no_layer_uses_is_refused(cli, tmp_path: Path, layout: str,  # type: ignore[no-untyped-def]
                                          needles: tuple[str, ...]) -> None:
    path = spec_file(tmp_path, BASE + "moe: {n_experts: 4, top_k: 2, expert: {kind: glu, d_ff: 32}}\n" + layout)
    assert_one_line_error(cli("size", path), path, *needles)
    with_dense = spec_file(tmp_path, BASE + "moe: {n_experts: 4, top_k: 2, expert: {kind: glu, d_ff: 32}}\n"
                           "layout: {first_dense: 1}\n", "dense.yaml")
    assert cli("size", with_dense).code == 0


def test_a_dense_multi_token_prediction_block_needs_an_ffn(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A multi-token-prediction block is the layer that would come next: one layer, routed, with MoE
    on every second layer, so block 0 takes layer 1's place, dense, and needs `ffn` (it had been
    built without one); given, `ffn` is not refused as a field no layer uses."""
    one_layer = BASE.replace("n_layers: 2", "n_layers: 1")
    moe, tail = "moe: {n_experts: 4, top_k: 2, expert: {kind: glu, d_ff: 32}}\n", "layout: {moe_every: 2}\nmtp: {depth: 1}\n"
    path = spec_file(tmp_path, one_layer.replace("ffn: {kind: glu, d_ff: 128}\n", moe) + tail)
    needles = ("ffn: multi-token-prediction block 0 takes the place of layer 1", "dense under the layout")
    assert_one_line_error(cli("size", path), path, *needles)
    assert cli("size", spec_file(tmp_path, one_layer + moe + tail, "with-ffn.yaml")).code == 0


@pytest.mark.parametrize("argv", [["size", "gpt2"], ["compare", "gpt2", "bloom-560m"],
                                  ["bench", "gpt2", "--seq", "8,16", "--layers", "1"],
                                  ["plan", "gpt2", "--gpus", "8"]])
def test_force_without_plot_is_refused(cli, argv: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Every command with a --plot names a --force that has nothing to overwrite."""
    assert_one_line_error(cli(*argv, "--force"), "--force overwrites the --plot figure")


def test_force_or_layout_that_a_command_would_not_read_is_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`import hf --force` without -o had nothing to overwrite, and `plan --solve ... --layout
    garbage` ran the solve with the layout unread: both exited 0, where every other unread option
    is refused."""
    config = str(Path(__file__).parent / "fixtures" / "hf-configs" / "llama-3-8b.json")
    assert_one_line_error(cli("import", "hf", config, "--force"), "--force overwrites the -o spec")
    partial = spec_file(tmp_path, BASE.replace("d_ff: 128", "d_ff: solve"))
    for layout in ("tp=2", "garbage"):
        assert_one_line_error(cli("plan", "--solve", partial, "--total", "1e6", "--layout", layout),
                              "--solve takes --total/--active, not --tokens, --gpus or --layout")

@pytest.mark.parametrize("argv", [["size", ""], ["compare", "gpt2", " "], ["plan", "", "--gpus", "8"],
                                  ["lint", ""], ["schema", "-o", ""], ["plan", "--compute", "1e22", "-o", ""],
                                  ["import", "hf", str(Path(__file__).parent / "fixtures" / "hf-configs" / "gpt2.json"),
                                   "-o", ""], ["size", "gpt2", "--plot", ""]])
def test_an_empty_path_is_named_as_such(cli, argv: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Path("") is the current folder: not "is a directory", and lint does not walk it."""
    assert_one_line_error(cli(*argv), "empty")


@pytest.mark.parametrize(("argv", "said"), [
    (["size", "no-such-spec.yaml"], "no-such-spec.yaml: no such file"),
    # an option's own parser refusing its value (typer's usage error) shows its traceback too
    (["size", "gpt2", "--seq", "abc"],
     "Invalid value for '--seq': expected a length such as 4096 or 4k (k = 1024), got 'abc'; "
     "see 'archplan size --help'"),
])
def test_debug_shows_the_traceback_and_keeps_the_exit_code(argv: list[str], said: str,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["archplan", *argv])
    monkeypatch.setenv("ARCHPLAN_DEBUG", "1")
    with pytest.raises(SystemExit) as ended:
        main()
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" in err and err.endswith(f"archplan: error: {said}\n")


def test_absurdly_large_value(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, BASE.replace("d_model: 64", "d_model: 1000000000000"))
    assert_one_line_error(cli("size", path), f"{path}:3:1", "d_model",
                          "expected a value ≤ 16,777,216, got 1,000,000,000,000")


@pytest.mark.parametrize(("value", "said"), [
    ('"true"', "expected true or false, got the string 'true'; write true or false without quotes"),
    ('"false"', "expected true or false, got the string 'false'; write true or false without quotes"),
    # YAML 1.1's yes/no/on/off: text in YAML 1.2, which editors and the schema follow
    ("off", "expected true or false, got 'off', which YAML 1.2 (editors, the schema) reads as text and YAML 1.1 as "
            "false; write false"),
    ("yes", "got 'yes', which YAML 1.2 (editors, the schema) reads as text and YAML 1.1 as true; write true"),
    ("1", "expected true or false, got 1"),
])
def test_a_boolean_field_takes_only_a_boolean(cli, tmp_path: Path, value: str, said: str) -> None:  # type: ignore[no-untyped-def]
    """Lax booleans read `tied: "off"` as false and `tied: 1` as true without a word, where the
    number fields refuse a quoted number."""
    path = spec_file(tmp_path, BASE + f"embedding: {{tied: {value}}}\n")
    assert_one_line_error(cli("size", path), "embedding.tied", said)


@pytest.mark.parametrize(("value", "said"), [
    ("010000", "expected an integer, got 010000: YAML 1.1 reads a leading zero as octal, 4,096, and YAML 1.2 "
               "(editors) as decimal, 10,000; write the one meant without the zero"),
    # YAML 1.2's readings of what 1.1 reads as text: an editor took `08` and `0o100` as numbers
    ("08", "expected an integer, got 08: YAML 1.1 reads it as text, having no 8 or 9 in octal, and YAML 1.2 "
           "(editors) as decimal, 8; write 8"),
    ("0o100", "expected an integer, got 0o100: YAML 1.2 (editors) reads 0o as octal, 64, and YAML 1.1 as text; "
              "write 64"),
    # YAML 1.2's core schema has no sign on 0o and no underscores: text to both versions
    ("-0o17", "expected an integer, got -0o17: YAML 1.1 and 1.2 both read it as text; write the number, -15 in "
              "decimal"),
    ("0_8", "expected an integer, got 0_8: YAML 1.1 reads it as text, having no 8 or 9 in octal, and YAML 1.2 "
            "(editors) as text, having no underscores in numbers; write 8"),
    ("1:04", "expected an integer, got 1:04: YAML 1.1 reads it in base 60, as 64"),
    # a base-60 integer's first part starts 1-9 (`08:00` is text to both versions), a float's not
    ("08:00.5", "expected an integer, got 08:00.5: YAML 1.1 reads it in base 60, as 480.5"),
    ("08:00", "expected an integer, got the string '08:00'"),
    ("0b1000000", "expected an integer, got 0b1000000: YAML 1.1 reads 0b as binary, 64; write 64"),
    ("6_4", "expected an integer, got 6_4: YAML 1.1 reads the underscores as digit separators and YAML 1.2 as "
            "text; write 64"),
])
def test_a_number_only_yaml_1_1_reads_is_refused(cli, tmp_path: Path, value: str, said: str) -> None:  # type: ignore[no-untyped-def]
    """PyYAML follows YAML 1.1: `d_model: 010000` loaded as 4096 and `n_layers: 3:20` as 200."""
    path = spec_file(tmp_path, BASE.replace("d_model: 64", f"d_model: {value}"))
    assert_one_line_error(cli("size", path), f"{path}:3:1", "d_model", said)


def test_a_signed_fraction_without_its_zero_is_a_number(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`-.5`, a number to both YAML versions, was the string '-.5', told to "write the number
    without quotes" it did not have."""
    path = spec_file(tmp_path, BASE.replace("d_model: 64", "d_model: -.5"))
    assert_one_line_error(cli("size", path), f"{path}:3:1", "d_model: expected an integer, got -0.5")


@pytest.mark.parametrize("name", ["10:30", "1_000", "no", "on", "2024-06-01", "08", "0o17", "08:00"])
def test_a_name_keeps_what_yaml_1_1_would_read_as_a_number_or_a_boolean(cli, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, f"name: {name}\n" + BASE.split("\n", 1)[1])
    outcome = cli("size", path, "--json")
    assert outcome.code == 0 and json.loads(outcome.stdout)["name"] == name, outcome


def test_python_tag_is_refused_and_never_runs(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"
    text = f'name: !!python/object/apply:os.system ["touch {marker}"]\n' + BASE.split("\n", 1)[1]
    path = spec_file(tmp_path, text)
    assert_one_line_error(cli("size", path), f"{path}:1:7", "tag not allowed", "safe loader")
    assert not marker.exists()


# where the refusal points: the 101st level, or, for brackets, libyaml 0.2.6's scanner (PyYAML
# 6.0.4's wheels), which reads them ahead of the events and stops at its own 1,000 (loader.py)
@pytest.mark.parametrize(("nested", "where"), [
    ("name: " + "[" * 30_000 + "]" * 30_000, ("1:106", "1:1006")),
    ("name: " + "{a: " * 40_000 + "1" + "}" * 40_000, ("1:403",)),
    ("name:\n  " + "- " * 300_000 + "x", ("2:201",)),
    ("name:\n  " + "? " * 300_000 + "x", ("2:201",)),
], ids=["flow-sequence", "flow-mapping", "block-sequence", "block-key"])
def test_deep_nesting_is_an_error_not_a_crash(tmp_path: Path, nested: str, where: tuple[str, ...]) -> None:
    # in a subprocess: libyaml's C recursion overflowed the stack and killed the process (exit 139)
    path = spec_file(tmp_path, nested + "\n")
    proc = subprocess.run([sys.executable, "-m", "archplan.cli", "size", path],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr in {f"archplan: error: {path}:{at}: YAML nests more than 100 levels deep; a spec nests a few\n"
                           for at in where}


@pytest.mark.parametrize("body", [
    "layers:\n" + "- 1\n" * 250_000,
    "layers: [" + "[1]," * 120_000 + "]",
], ids=["block", "flow"])
def test_a_megabyte_of_small_nodes_is_refused_before_it_is_composed(tmp_path: Path, body: str) -> None:
    """Counted from the parser's events: composing them first took 10-19 s to refuse them."""
    from archplan.errors import ArchplanError
    from archplan.loader import parse_yaml

    with pytest.raises(ArchplanError, match="more than 200,000 nodes; a spec has a few hundred") as caught:
        parse_yaml(body, "big.yaml")
    assert caught.value.file == "big.yaml" and caught.value.line is not None


def test_aliases_expanding_past_the_node_budget_are_refused() -> None:
    from archplan.errors import ArchplanError
    from archplan.loader import parse_yaml

    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    with pytest.raises(ArchplanError, match="aliases expand it past 200,000 nodes"):
        parse_yaml("\n".join(lines) + "\n", "bomb.yaml")


def test_text_with_many_brackets_parses_as_usual(tmp_path: Path) -> None:
    # brackets in comments and strings neither nest nor count as nodes
    from archplan.loader import parse_yaml

    padding = "# " + "[{-?" * 1_000 + "\n"
    text = BASE + "rope: {theta: 5.0e5}\n"
    assert parse_yaml(padding + text, "x").data == parse_yaml(text, "x").data
    assert parse_yaml(padding + text, "x").data["rope"]["theta"] == 5.0e5
    loaded = parse_yaml(padding + text, "x")
    assert loaded.locations[("d_model",)] == (4, 1)
    with pytest.raises(ArchplanError, match="duplicate key 'd_model'"):
        parse_yaml(padding + text + "d_model: 1\n", "x")


def test_a_merge_key_is_overridden_by_the_mappings_own_keys() -> None:
    """YAML's merge type: `{<<: *base, y: 3}` takes base's x and its own y. The duplicate-key check
    counted the merged y against the own one and refused the file."""
    from archplan.loader import parse_yaml

    loaded = parse_yaml("a: &a {x: 1, y: 2}\nb: {<<: *a, y: 3}\n", "x")
    assert loaded.data["b"] == {"x": 1, "y": 3}
    with pytest.raises(ArchplanError, match="duplicate key 'y'"):
        parse_yaml("a: &a {x: 1}\nb: {<<: *a, y: 3, y: 4}\n", "x")
    # an error on the own key names its line, not the anchor's, whose value the data does not hold
    assert loaded.locations[("b", "y")] == (2, 13)
    assert loaded.locations[("b", "x")] == (1, 8)


@pytest.mark.parametrize(("text", "said"), [
    ("name: a\n---\nname: b\n", "x:2:1: invalid YAML: a second document (`---`); a spec is one YAML document a file"),
    ("name: t\nvocab_size: [1\n", "x:2:15: invalid YAML: did not find expected ',' or ']'"),
])
def test_a_yaml_error_names_a_line_the_file_has(text: str, said: str) -> None:
    """The end of the stream is past the last line: `x:3:1` for a two-line file."""
    from archplan.loader import parse_yaml

    with pytest.raises(ArchplanError) as info:
        parse_yaml(text, "x")
    assert str(info.value) == said


@pytest.mark.parametrize(("value", "said"), [
    ("!!timestamp 2024-13-45", "x:2:11: invalid YAML: '2024-13-45' cannot be read as a YAML timestamp (month "
                               "must be in 1..12); quote it if it is text"),
    ("!!int abc", "x:2:11: invalid YAML: 'abc' cannot be read as a YAML int (invalid literal for int() with "
                  "base 10: 'abc'); quote it if it is text"),
    ("!!bool maybe", "x:2:11: invalid YAML: 'maybe' cannot be read as a YAML bool (not written as one); quote it "
                     "if it is text"),
    ("!!timestamp hello", "x:2:11: invalid YAML: 'hello' cannot be read as a YAML timestamp (not written as one); "
                          "quote it if it is text"),
    ("1" * 5000, "x:2:11: invalid YAML: '" + "1" * 40 + "…' cannot be read as a YAML int (Exceeds the limit (4300 "
                 "digits) for integer string conversion: value has 5000 di…); quote it if it is text"),
])
def test_a_value_its_tag_cannot_take_is_a_yaml_error(value: str, said: str) -> None:
    """PyYAML's constructors raise plain ValueError, KeyError or AttributeError on these (a
    traceback, exit 1, and `lint` stopped at the file); each is a YAML error at the value now."""
    from archplan.loader import parse_yaml

    with pytest.raises(ArchplanError) as info:
        parse_yaml(f"name: t\nn_layers: {value}\n", "x")
    assert str(info.value) == said


def test_an_integer_json_cannot_hold_is_a_json_error(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": ' + "1" * 5000 + "}")
    assert_one_line_error(cli("import", "hf", str(path)), "invalid JSON: Exceeds the limit (4300 digits)")


@pytest.mark.parametrize(("field", "value", "said"), [
    ("name", '"a\\e[31mred"', "name: control character '\\x1b' at position 1; write printable text"),
    ("name", '"two\\nlines"', "name: control character '\\n' at position 3; write printable text"),
    ("description", '"a\\x07bell"', "description: control character '\\x07' at position 1"),
])
def test_a_name_or_prose_with_control_characters_is_refused(cli, tmp_path: Path, field: str, value: str,  # type: ignore[no-untyped-def]
                                                            said: str) -> None:
    """They reached the terminal as written: an ANSI escape in a spec's name recoloured `size`'s
    output. A description keeps its line breaks."""
    path = spec_file(tmp_path, BASE.replace("name: tiny", f"name: tiny\n{field}: {value}") if field != "name"
                     else BASE.replace("name: tiny", f"name: {value}"))
    assert_one_line_error(cli("size", path), said)
    prose = spec_file(tmp_path, BASE + 'description: "first line\\nsecond line"\n', "prose.yaml")
    assert cli("size", prose, "--json").code == 0


def test_compare_names_the_bad_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = spec_file(tmp_path, BASE, "good.yaml")
    bad = spec_file(tmp_path, BASE.replace("d_model: 64", "d_model: -1"), "bad.yaml")
    assert_one_line_error(cli("compare", good, bad), bad, "d_model")


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("--context", "0", "--context"),
    ("--batch", "-2", "--batch"),
    ("--seq", "100000000000", "--seq"),
    ("--micro-batch", "0", "--micro-batch"),
    ("--tokens", "lots", "--tokens"),
    ("--tokens", "0", "--tokens"),
    ("--tokens", "0.5", "must be between 1 and 1e+18, got 0.5"),
    ("--tokens", "1.0000001e18", "got 1.0000001e+18"),
    ("--gpu", "tpu-v9", "unknown GPU"),
    ("--gpu", "tpu-v9", "h100-sxm (h100, h100-80gb)"),  # the short names the help uses
])
def test_bad_option_values(cli, tmp_path: Path, option: str, value: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(cli("size", spec_file(tmp_path, BASE), option, value), needle)


def test_mfu_is_checked_and_needs_a_gpu(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = spec_file(tmp_path, BASE)
    assert_one_line_error(cli("size", spec, "--gpu", "h100", "--mfu", "1.5"), "--mfu", "must be in [0.01, 1]")
    # a subnormal fraction made the GPU-hours infinite and `units` raised OverflowError
    assert_one_line_error(cli("size", spec, "--gpu", "h100", "--mfu", "1e-320"), "--mfu", "must be in [0.01, 1]")
    assert_one_line_error(cli("size", spec, "--mfu", "0.5"), "--mfu", "give --gpu too")


@pytest.mark.parametrize("option", ["--context", "--seq"])
def test_length_beyond_a_learned_position_table(cli, option: str) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(cli("size", "gpt2", option, "2048"), option, "learned position table",
                          "max_seq_len 1,024")


@pytest.mark.parametrize("option", ["--context", "--seq"])
def test_length_beyond_a_hyena_filter(cli, option: str) -> None:  # type: ignore[no-untyped-def]
    # the implicit filter is generated for l_max positions, as bench and the torch cache refuse too
    assert_one_line_error(cli("size", "hyena-153m", option, "1000000"), option, "Hyena filter length",
                          "l_max 2,048")


def test_compare_needs_two_specs(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(cli("compare", spec_file(tmp_path, BASE)), "at least two")


def test_console_script_prints_one_line(tmp_path: Path) -> None:
    path = spec_file(tmp_path, BASE.replace("n_layers", "n_layer"))
    proc = subprocess.run([sys.executable, "-m", "archplan.cli", "size", path],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "did you mean 'n_layers'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [
    ("plan", "--compute", "1e21", "-o"), ("schema", "-o"), ("size", "gpt2", "--plot"),
])
def test_every_written_file_is_refused_alike(cli, tmp_path: Path, command: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    """plan -o, import -o, schema -o and every --plot go through one check (`archplan.outfile`):
    a folder is named as one even with --force (it was "cannot write: Is a directory" under
    schema), and a user's file is kept without --force."""
    suffix = ".png" if command[-1] == "--plot" else ".json" if command[0] == "schema" else ".yaml"
    folder = tmp_path / f"folder{suffix}"
    folder.mkdir()
    assert_one_line_error(cli(*command, str(folder), "--force"), "is a directory; expected a file")
    mine = tmp_path / f"mine{suffix}"
    mine.write_text("mine")
    assert_one_line_error(cli(*command, str(mine)), "file exists; pass --force to overwrite")
    assert mine.read_text() == "mine"
    assert_one_line_error(cli(*command, str(tmp_path / "none" / f"x{suffix}")), "directory does not exist")
    assert_one_line_error(cli(*command, str(mine / f"x{suffix}")), f"{mine} is a file, not a directory")
    assert_one_line_error(cli(*command, str(mine / "sub" / f"x{suffix}")), f"{mine} is a file, not a directory")
    wrong = {".png": "x.txt", ".json": "x.yaml", ".yaml": "x.json"}[suffix]
    assert_one_line_error(cli(*command, str(tmp_path / wrong)), "must end in")
    if Path("/proc/self").is_dir():  # a folder that takes no file, even from root
        assert_one_line_error(cli(*command, f"/proc/x{suffix}"), "cannot create a file in its directory")


def test_a_file_replaced_in_place_needs_no_new_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that takes no new file (read-only to a user who can still write the file itself)
    refuses a new name, and still lets --force replace an existing file in place; a file that
    takes no write (a read-only mount) is refused up front too."""
    import tempfile

    from archplan.outfile import check_target

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    assert check_target(mine, force=True, field="-o") == mine
    with pytest.raises(ArchplanError, match=r"cannot create a file in its directory \(Permission denied\)"):
        check_target(tmp_path / "new.json", force=False, field="-o")
    # a read-only mount refuses the file itself, even to root: refused before any work
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)
    with pytest.raises(ArchplanError, match=r"cannot write this file \(read-only\)"):
        check_target(mine, force=True, field="-o")


def test_a_plot_nowhere_to_write_is_refused_before_the_sweep(tmp_path: Path) -> None:
    """bench --seq a,b --plot PATH checks PATH before it measures anything (it failed after the
    sweep, on matplotlib's write)."""
    pytest.importorskip("torch")
    if not Path("/proc/self").is_dir():
        pytest.skip("needs a folder that takes no file (/proc)")
    proc = subprocess.run([sys.executable, "-m", "archplan.cli", "bench", "gpt2", "--layers", "1", "--seq", "8,16",
                           "--plot", "/proc/x.png"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot create a file in its directory" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_a_field_of_another_kind_names_that_kind(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """n_kv_heads under kind: mha suggested "did you mean 'n_heads'?"; it is gqa's field."""
    spec = spec_file(tmp_path, BASE.replace("kind: gqa", "kind: mha"))
    assert_one_line_error(cli("size", spec), "attention.n_kv_heads: not a field of kind mha; n_kv_heads belongs to "
                          "kind gqa")


@pytest.mark.parametrize(("conv", "said"), [
    ("{kind: s4d, d_state: 15}", ":8:24: long_conv.d_state: 15 is odd; it must be even"),
    ("{kind: hyena, l_max: 16}", ":8:26: long_conv.l_max: 16 is shorter than max_seq_len (64)"),
    ("{kind: s4, d_state: 8, n_ssm: 3}", ":8:35: long_conv.n_ssm: d_model (64) is not divisible by n_ssm (3)"),
])
def test_a_long_convolutions_cross_field_error_names_its_line(cli, tmp_path: Path, conv: str, said: str) -> None:  # type: ignore[no-untyped-def]
    """Two of these checks began `long_conv.d_state (15) must be even`, which the loader does not
    read as a field, so they named the file alone where their neighbour named file:line:column."""
    path = spec_file(tmp_path, "name: t\nvocab_size: 64\nd_model: 64\nn_layers: 1\nmax_seq_len: 64\n"
                               f"position: {{kind: none}}\nlayout: {{mixers: H}}\nlong_conv: {conv}\n")
    assert_one_line_error(cli("size", path), path + said)


@pytest.mark.parametrize(("body", "said"), [
    ("max_seq_len: 2\nposition: {kind: learned}\nattention: {kind: mha, n_heads: 2}\nffn: {kind: mlp, d_ff: 4}\n"
     "mtp: {depth: 1}\n",
     ":9:7: mtp.depth: 1 needs training sequences of at least 3 tokens (the next one and 1 more ahead), but the "
     "learned position table (max_seq_len) ends at 2"),
    ("max_seq_len: 4\nlayout: {mixers: H}\nlong_conv: {kind: hyena, l_max: 4}\nmtp: {depth: 3}\n",
     ":8:7: mtp.depth: 3 needs training sequences of at least 5 tokens (the next one and 3 more ahead), but the "
     "Hyena filter length (long_conv.l_max) ends at 4"),
    # both as short: the table is named, which raising l_max alone would leave failing
    ("max_seq_len: 3\nposition: {kind: learned}\nlayout: {mixers: H}\nlong_conv: {kind: hyena, l_max: 3}\n"
     "mtp: {depth: 2}\n",
     ":9:7: mtp.depth: 2 needs training sequences of at least 4 tokens (the next one and 2 more ahead), but the "
     "learned position table (max_seq_len) ends at 3"),
])
def test_multi_token_prediction_beyond_the_positions_is_refused(cli, tmp_path: Path, body: str,  # type: ignore[no-untyped-def]
                                                                said: str) -> None:
    """A spec whose positions end before its multi-token prediction has a target passed the schema,
    size and lint, and verify then refused every --seq: too short for MTP, or past the positions."""
    path = spec_file(tmp_path, f"name: c\nvocab_size: 7\nd_model: 8\nn_layers: 1\n{body}")
    assert_one_line_error(cli("size", path), path + said)
    one_more = (body.replace("max_seq_len: 2", "max_seq_len: 3").replace("l_max: 4", "l_max: 5")
                .replace("max_seq_len: 3\nposition", "max_seq_len: 4\nposition").replace("l_max: 3", "l_max: 4"))
    assert cli("size", spec_file(tmp_path, f"name: c\nvocab_size: 7\nd_model: 8\nn_layers: 1\n{one_more}",
                                 "long-enough.yaml")).code == 0


SMALL = "name: t\nvocab_size: 128\nd_model: 512\nn_layers: 4\nattention: {kind: mha, n_heads: 8}\nffn: {kind: glu, d_ff: 1408}\n"


@pytest.mark.parametrize(("change", "needles"), [
    # PyYAML's int and float constructors index past an empty text (IndexError)
    (("vocab_size: 128", "vocab_size: !!int"), ("2:13", "'' cannot be read as a YAML int")),
    (("vocab_size: 128", "vocab_size: !!float"), ("2:13", "'' cannot be read as a YAML float")),
    (("attention: {kind: mha, n_heads: 8}", "attention:\n\tkind: mha"), ("6:1", "a tab; YAML indents with spaces")),
    (("ffn: {kind: glu, d_ff: 1408}", "ssm: {kind: mamba1, dt_rank: foo}\nlayout: {mixers: M}\nffn: {kind: glu, d_ff: 1408}"),
     ("ssm.dt_rank: expected a positive integer (at most 16,777,216) or 'auto', got 'foo'",)),
])
def test_odd_yaml_gets_one_line_with_its_place(change: tuple[str, str], needles: tuple[str, ...], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SMALL.replace(*change))
    assert_one_line_error(run_main(["size", str(path)], capsys, monkeypatch), *needles)


@pytest.mark.parametrize("value", ["=", "<<"])
def test_a_plain_equals_or_merge_sign_as_a_value_is_text(value: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """YAML 1.1's value and merge tags read these as tags; YAML 1.2, editors and the schema as text."""
    path = tmp_path / "s.yaml"
    path.write_text(SMALL + f"description: {value}\n")
    outcome = run_main(["size", str(path), "--json"], capsys, monkeypatch)
    assert outcome.code == 0 and json.loads(outcome.stdout)["description"] == value


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """A full disk while writing `schema -o` left 8 KiB of a 53 KB schema, and with --force a
    user's file was emptied before the write failed: the file is written beside and renamed."""
    import resource
    import signal

    mine = tmp_path / "mine.json"
    mine.write_text("mine")

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    for target, force in ((mine, ["--force"]), (tmp_path / "new.json", [])):
        proc = subprocess.run([sys.executable, "-m", "archplan.cli", "schema", "-o", str(target), *force],
                              capture_output=True, text=True, timeout=60, preexec_fn=small_files)
        assert proc.returncode == 2 and "cannot write: File too large" in proc.stderr, proc.stderr
    assert mine.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json"]


def test_a_written_file_keeps_its_mode_and_a_device_stays_one(tmp_path: Path) -> None:
    """The rename keeps an existing file's permissions; a FIFO (as /dev/stdout) is written into,
    never replaced by a regular file."""
    import stat
    import threading

    from archplan.outfile import write_text

    mine = tmp_path / "mine.yaml"
    mine.write_text("old")
    mine.chmod(0o640)
    write_text(mine, "new")
    assert mine.read_text() == "new" and stat.S_IMODE(mine.stat().st_mode) == 0o640
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_text(fifo, "through")
    reader.join(timeout=30)
    assert got == ["through"] and stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_replaced_file_stays_its_owners_and_keeps_its_links(tmp_path: Path) -> None:
    """The rename gave root a user's file (`sudo archplan ... --force`) and cut its hard links
    off; a name near 255 bytes failed on the scratch file's longer name; a link to /dev/stdout
    feeding a pipe resolved to a name that is no file and was refused."""
    import stat

    from archplan.outfile import check_target, write_text

    mine = tmp_path / "mine.json"
    mine.write_text("old")
    twin = tmp_path / "twin.json"
    os.link(mine, twin)
    write_text(mine, "new")
    assert twin.read_text() == "new"
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs.json"
        theirs.write_text("old")
        os.chown(theirs, 65534, 65534)
        write_text(theirs, "new")
        assert (theirs.stat().st_uid, theirs.stat().st_gid, theirs.read_text()) == (65534, 65534, "new")
    if os.geteuid() == 0:  # a setgid folder gives a new file its group: the replaced one keeps its own
        shared = tmp_path / "shared"
        shared.mkdir()
        os.chown(shared, 0, 100)
        shared.chmod(0o2775)
        kept = shared / "kept.json"
        kept.write_text("old")
        os.chown(kept, 0, 0)
        kept.chmod(0o640)
        write_text(kept, "new")
        assert (kept.stat().st_gid, stat.S_IMODE(kept.stat().st_mode)) == (0, 0o640)
    long = tmp_path / ("a" * 240 + ".json")
    write_text(check_target(long, force=False, field="-o"), "{}")
    assert long.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))  == []
    proc = subprocess.run(f"ln -s /dev/stdout {tmp_path}/so.json && {sys.executable} -m archplan.cli schema "
                          f"-o {tmp_path}/so.json --force | head -c 1", shell=True, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout == "{" and "error" not in proc.stderr


def test_a_link_is_judged_by_the_file_it_names(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A dangling link was written through without --force, and one into a missing folder
    passed the up-front check and failed only after the work."""
    link = tmp_path / "link.yaml"
    link.symlink_to(tmp_path / "made.yaml")
    assert_one_line_error(cli("plan", "--compute", "1e21", "-o", str(link)), "file exists; pass --force")
    assert cli("plan", "--compute", "1e21", "-o", str(link), "--force").code == 0
    assert link.is_symlink() and (tmp_path / "made.yaml").read_text().startswith("#")
    lost = tmp_path / "lost.png"
    lost.symlink_to(tmp_path / "none" / "fig.png")
    assert_one_line_error(cli("size", "gpt2", "--plot", str(lost), "--force"),
                          f"links to {tmp_path / 'none' / 'fig.png'}, whose directory does not exist")
    chained = tmp_path / "chained.png"
    chained.symlink_to(lost)  # a link to that link: the folder missing is still the last target's
    assert_one_line_error(cli("size", "gpt2", "--plot", str(chained), "--force"),
                          f"links to {tmp_path / 'none' / 'fig.png'}, whose directory does not exist")


def test_hostile_text_gets_one_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A control character (PyYAML's ReaderError has no mark: two lines, no place), !!binary (read
    as a name unsaid), a scalar document ("got str"), a 5,000-character kind or key and an integer
    of 400 digits (the whole of each in the "one line")."""
    line = assert_one_line_error(cli("size", spec_file(tmp_path, BASE.replace("d_model: 64", "d_model: 64\x07"))),
                                 "spec.yaml:3:12: invalid YAML: the character U+0007 is not allowed")
    assert "\n" not in line
    # libyaml counts the offset in UTF-8 bytes: text before the character in any other script moved it
    assert_one_line_error(cli("size", spec_file(tmp_path, "# 日本語の説明\nname: 😀\x07\n")), "spec.yaml:2:8: invalid YAML")
    assert_one_line_error(cli("size", spec_file(tmp_path, "name: !!binary aGVsbG8=\n" + BASE.split("\n", 1)[1])),
                          "spec.yaml:1:1: name: binary data (!!binary) is no spec value")
    assert_one_line_error(cli("size", spec_file(tmp_path, "just text\n")), "got 'just text'")
    assert_one_line_error(cli("size", spec_file(tmp_path, "~\n")), "got null")
    for text in (BASE + "position: {kind: " + "a" * 5000 + "}\n", BASE.replace("name: tiny", "? " + "k" * 5000 + "\n: 1"),
                 BASE.replace("n_layers: 2", f"n_layers: {10**400}")):
        assert len(assert_one_line_error(cli("size", spec_file(tmp_path, text)))) < 400


def test_a_config_number_past_a_float_is_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An integer of 400 digits for rope_theta raised OverflowError from math.isfinite."""
    config = json.loads(Path(__file__).with_name("fixtures").joinpath("hf-configs", "llama-2-7b.json").read_text())
    for key in ("rope_theta", "rms_norm_eps", "num_hidden_layers"):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**config, key: 10**400}))
        line = assert_one_line_error(cli("import", "hf", str(path)), f"{key}: expected")
        assert len(line) < 300


def test_lint_does_not_pass_a_folder_it_cannot_read(tmp_path: Path) -> None:
    """os.walk skips a folder it cannot list unless told: `lint DIR` passed, exit 0, with a
    subfolder it never read; and a pyproject.toml of arrays 600 deep raised RecursionError."""
    from archplan.lint.engine import _walk, load_config

    with pytest.raises(ArchplanError, match="cannot read this folder"):
        list(_walk(tmp_path / "gone"))
    (tmp_path / "pyproject.toml").write_text("[tool.archplan.lint]\nselect = " + "[" * 600 + "]" * 600 + "\n")
    with pytest.raises(ArchplanError, match="arrays nested too deeply"):
        load_config(tmp_path)


@pytest.mark.parametrize(("value", "got"), [("true", "got true"), ("{}", "got a mapping"), ("[gelu]", "got a list"),
                                            ("1e400", "got .inf"), ("swish", "got 'swish'")])
def test_a_choice_field_names_its_choices_and_what_yaml_wrote(cli, tmp_path: Path, value: str,  # type: ignore[no-untyped-def]
                                                               got: str) -> None:
    """A choice field said pydantic's "Input should be 'relu', ... (got True)": Python's True and inf,
    not YAML's true and .inf, and nothing at all for a mapping or a list."""
    path = spec_file(tmp_path, BASE.replace("d_ff: 128}", f"d_ff: 128, activation: {value}}}"))
    assert_one_line_error(cli("size", path), f"ffn.activation: expected 'silu', 'gelu', 'gelu_tanh' or 'relu', {got}")
