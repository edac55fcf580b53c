"""`archplan bench --seq a,b,c`: the exponent fit, the length parser, the analytic peak memory, and
the CLI sweep end to end on tiny specs (structure and memory only, never speed)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from archplan.analytic import count_params
from archplan.bench.growth import fit_exponent, parse_lengths, prefill_peak_bytes
from archplan.cli import app
from archplan.errors import ArchplanError
from archplan.resolve import resolve
from archplan.spec import Spec

TINY = dict(
    name="tiny-sweep", vocab_size=128, d_model=32, n_layers=2, max_seq_len=256,
    attention={"kind": "gqa", "n_heads": 2, "n_kv_heads": 1},
    ffn={"kind": "glu", "d_ff": 64},
)
TINY_MAMBA = dict(
    name="tiny-mamba", vocab_size=128, d_model=32, n_layers=2, max_seq_len=256, position={"kind": "none"},
    ssm={"kind": "mamba1", "d_state": 4}, layout={"mixers": "M"}, ffn={"kind": "glu", "d_ff": 64},
)


@pytest.mark.parametrize("k", [0.5, 1.0, 1.37, 2.0])
def test_fit_recovers_a_power_law(k: float) -> None:
    xs = [1024, 2048, 4096, 8192, 16384]
    assert fit_exponent(xs, [3e-7 * x**k for x in xs]) == pytest.approx(k, abs=1e-12)


def test_fit_of_a_linear_plus_quadratic_cost_lies_between_and_moves_with_the_range() -> None:
    def cost(n: int) -> float:
        return 1e4 * n + n * n  # equal shares at n = 10^4

    low = fit_exponent([256, 512, 1024], [cost(n) for n in (256, 512, 1024)])
    high = fit_exponent([1 << 17, 1 << 18, 1 << 19], [cost(n) for n in (1 << 17, 1 << 18, 1 << 19)])
    assert 1 < low < 1.1 < 1.9 < high < 2


def test_fit_is_the_least_squares_slope_of_noisy_points() -> None:
    # log-space residuals +e, -e, -e, +e around slope 1 cancel: the fit is exactly 1
    e = 0.1
    xs = [1, 2, 4, 8]
    ys = [x * math.exp(r) for x, r in zip(xs, (e, -e, -e, e))]
    assert fit_exponent(xs, ys) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("xs, ys, said", [
    ([1], [1], "at least two"), ([1, 2], [1], "at least two"), ([2, 2], [1, 3], "two distinct x values"),
    ([1, 2], [0, 1], "fit needs positive values"),
])
def test_fit_rejects_what_has_no_slope(xs: list[float], ys: list[float], said: str) -> None:
    with pytest.raises(ValueError, match=said):
        fit_exponent(xs, ys)


def test_parse_lengths() -> None:
    assert parse_lengths("1k,2k,4k,8k,16k") == [1024, 2048, 4096, 8192, 16384]
    assert parse_lengths("512") == [512]
    assert parse_lengths("4K, 1000, 1m") == [1000, 4096, 1 << 20]
    for bad in ("", "1k,,2k", "0", "2x", "1.5k", "1k,1024"):
        with pytest.raises(ArchplanError):
            parse_lengths(bad)
    # zero and negative lengths are named as size's and verify's --seq name them
    for bad in ("0", "-5", "1k,-2k"):
        with pytest.raises(ArchplanError, match="a length must be positive"):
            parse_lengths(bad)


def test_materialised_scores_add_two_head_by_length_squared_tensors() -> None:
    plan = resolve(Spec.model_validate(TINY))
    for t in (64, 256):
        fused = prefill_peak_bytes(plan, 2, t, 4, "fused")
        materialised = prefill_peak_bytes(plan, 2, t, 4, "materialised")
        assert materialised - fused >= 2 * 2 * 2 * t * t * 4 - 2 * t * plan.vocab_size * 4
    # without attention the core does not matter
    mamba = resolve(Spec.model_validate(TINY_MAMBA))
    assert prefill_peak_bytes(mamba, 1, 256, 4, "fused") == prefill_peak_bytes(mamba, 1, 256, 4, "materialised")


def test_predicted_memory_starts_at_the_weights_and_grows_linearly_when_fused() -> None:
    plan = resolve(Spec.model_validate(TINY))
    weights = count_params(plan).total * 4
    sizes = [1 << 14, 1 << 15, 1 << 16]
    assert prefill_peak_bytes(plan, 1, 1, 4) > weights
    activations = [prefill_peak_bytes(plan, 1, t, 4) - weights for t in sizes]
    assert fit_exponent(sizes, activations) == pytest.approx(1.0, abs=1e-3)
    scores = [prefill_peak_bytes(plan, 1, t, 4, "materialised") - weights for t in sizes]
    assert fit_exponent(sizes, scores) > 1.9


def test_a_mask_is_held_beside_the_layer_and_the_math_kernel_builds_the_causal_one() -> None:
    """An ALiBi bias (1, H, T, S) in the run's dtype stays alive beside every layer's working set,
    and its build's transient is a floor under the peak (`mask_bytes`); the math kernel turns
    `is_causal` into a boolean and an additive T × S mask beside its scores, all fp32 on 16-bit
    inputs."""
    from archplan.bench.growth import held_mask_bytes, mask_bytes

    alibi = resolve(Spec.model_validate({**TINY, "name": "tiny-alibi", "position": {"kind": "alibi"}}))
    plain = resolve(Spec.model_validate(TINY))
    t = 256
    assert held_mask_bytes(alibi, t, 4) == 2 * t * t * 4 and held_mask_bytes(plain, t, 4) == 0
    assert mask_bytes(alibi, t, 4) > held_mask_bytes(alibi, t, 4)
    assert (prefill_peak_bytes(alibi, 2, t, 4, "fused") - prefill_peak_bytes(plain, 2, t, 4, "fused")
            >= held_mask_bytes(alibi, t, 4))
    for dtype_bytes in (4, 2):  # the math kernel upcasts bf16: its scores and mask are fp32 either way
        fused, materialised = (prefill_peak_bytes(plain, 2, t, dtype_bytes, core) for core in ("fused", "materialised"))
        layer = materialised - fused  # the logits (2·t·128·4) are below the layer here
        assert layer >= 2 * 2 * 2 * t * t * 4 + t * t * 5


def test_auto_prices_the_scores_where_sdpa_falls_back_to_math() -> None:
    """On a CPU the flash kernel refuses MLA's unequal q and v head sizes, so `auto` runs the math
    kernel and holds the scores: priced so, as a forced math backend is; a GQA model's `auto` runs
    flash; a model without attention holds none."""
    from archplan.bench.runner import materialises_scores
    from archplan.dtypes import DType
    from archplan.loader import load_spec

    cpu = torch.device("cpu")
    mla = resolve(load_spec("tests/fixtures/distributed/tiny-mla.yaml"))
    plain = resolve(Spec.model_validate(TINY))
    assert materialises_scores(mla, "auto", cpu, DType.fp32)
    assert not materialises_scores(plain, "auto", cpu, DType.fp32)
    assert materialises_scores(plain, "math", cpu, DType.fp32)
    assert not materialises_scores(resolve(Spec.model_validate(TINY_MAMBA)), "auto", cpu, DType.fp32)


def test_a_sweep_refuses_every_spec_before_timing_any(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A later spec's refusal (a length past its position table) comes before the first spec is
    built or timed, as decode's position check does."""
    from archplan.bench import sweep

    def timed(*args: object, **kwargs: object) -> None:
        raise AssertionError("a spec was timed before every spec was checked")

    monkeypatch.setattr(sweep, "_run_sweep", timed)
    short = {**TINY, "name": "tiny-short", "max_seq_len": 64, "position": {"kind": "learned"}}
    paths = []
    for raw in (TINY, short):
        path = tmp_path / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw))
        paths.append(str(path))
    result = CliRunner().invoke(app, ["bench", *paths, "--seq", "64,128", "--device", "cpu", "--dtype", "fp32"])
    assert isinstance(result.exception, ArchplanError)  # `main` prints it in one line, exit 2
    assert "128 exceeds the learned position table of tiny-short" in str(result.exception)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards are dominated by thread synchronisation on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sweep(args: list[str]) -> list[dict]:
    result = CliRunner().invoke(app, ["bench", *args, "--device", "cpu", "--dtype", "fp32", "--warmup", "0",
                                      "--iters", "1", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture()
def tiny_specs(tmp_path):
    paths = []
    for raw in (TINY, TINY_MAMBA):
        path = tmp_path / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw))
        paths.append(str(path))
    return paths


def test_cli_sweep_two_specs_two_lengths(tiny_specs: list[str]) -> None:
    out = _sweep([*tiny_specs, "--seq", "64,128"])
    assert [r["name"] for r in out] == ["tiny-sweep", "tiny-mamba"]
    for r in out:
        assert [p["seq"] for p in r["points"]] == [64, 128]
        weights = r["params"] * 4
        for p in r["points"]:
            assert p["seconds"] == min(p["samples_s"]) > 0
            assert p["tokens_per_s"] == pytest.approx(p["seq"] / p["seconds"])
            assert p["predicted_s"] > 0 and p["flops"] > 0
            # the measured peak holds the weights and more; the prediction is within 3x of it
            assert p["peak_memory_bytes"] > weights
            assert 1 / 3 < p["predicted_memory_bytes"] / p["peak_memory_bytes"] < 3
        assert r["points"][1]["peak_memory_bytes"] > r["points"][0]["peak_memory_bytes"]
        k = r["exponent"]
        assert k["range"] == [64, 128]
        assert k["memory"] == pytest.approx(fit_exponent([64, 128], [p["peak_memory_bytes"] for p in r["points"]]))
        assert k["time_analytic"] == pytest.approx(fit_exponent([64, 128], [p["predicted_s"] for p in r["points"]]))
        assert "profile_memory" in r["memory_method"]


def test_cli_sweep_math_backend_holds_the_scores(tiny_specs: list[str]) -> None:
    fused = _sweep([tiny_specs[0], "--seq", "128,256"])[0]["points"][1]["peak_memory_bytes"]
    math_ = _sweep([tiny_specs[0], "--seq", "128,256", "--attn-backend", "math"])[0]["points"][1]
    # math holds at least the (B, H, T, T) fp32 scores beyond what the fused kernel needs
    assert math_["peak_memory_bytes"] - fused >= 2 * 256 * 256 * 4


def test_cli_sweep_writes_the_plot_and_a_table(tiny_specs: list[str], tmp_path) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "sweep.png"
    result = CliRunner().invoke(app, ["bench", *tiny_specs, "--seq", "32,64", "--device", "cpu", "--dtype", "fp32",
                                      "--warmup", "0", "--iters", "1", "--plot", str(target)])
    assert result.exit_code == 0, result.output
    assert target.stat().st_size > 10_000
    assert "exponent k" in result.stdout and "figure written to" in result.stdout
    # a tiny model's analytic microseconds keep three digits (a fixed one decimal printed 0.0 ms)
    assert re.search(r"│ +0\.0\d+ ms │", result.stdout) and " 0.0 ms " not in result.stdout


@pytest.mark.parametrize("extra, message", [
    (["--seq", "64,128", "--compile"], "--compile"),
    (["--seq", "64,64"], "twice"),
    (["--seq", "1q"], "--seq"),
    (["--seq", "64,128", "--plot", "out.txt"], "--plot"),
    (["--seq", "64,128", "--plot", "EXISTING"], "--plot: file exists; pass --force to overwrite"),
    (["--seq", "64", "--force"], "--force overwrites the --plot figure; without --plot nothing is written"),
])
def test_cli_sweep_bad_input_is_an_archplan_error(tiny_specs: list[str], extra: list[str], message: str,
                                                   tmp_path) -> None:
    # ArchplanError is what `main()` turns into one line and exit 2 (tests/test_bad_input.py)
    existing = tmp_path / "keep.png"
    existing.write_text("precious\n")  # refused before the sweep runs, and left as it was
    extra = [str(existing) if arg == "EXISTING" else arg for arg in extra]
    result = CliRunner().invoke(app, ["bench", tiny_specs[0], *extra, "--device", "cpu"])
    assert isinstance(result.exception, ArchplanError)
    assert message in result.exception.render()
    assert existing.read_text() == "precious\n"


def test_two_specs_need_two_lengths(tiny_specs: list[str]) -> None:
    result = CliRunner().invoke(app, ["bench", *tiny_specs, "--seq", "64", "--device", "cpu"])
    assert isinstance(result.exception, ArchplanError)
    assert "at least two lengths" in result.exception.render()
