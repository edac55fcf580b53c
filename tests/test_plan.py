"""`archplan plan`: compute-optimal allocation against Hoffmann et al. 2022 (docs/formulas.md §5), recipe specs
within 2% of the target, the partial-spec solver, the cluster layout search, and the CLI contract."""

from __future__ import annotations

import json
import re
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from archplan.analytic import count_params, training_flops_per_token
from archplan.analytic.scaling import LAWS
from archplan.cli import main
from archplan.commands.plan import FamilyChoice, LawOption
from archplan.errors import ArchplanError
from archplan.hardware import accelerator
from archplan.loader import PRESETS_DIR, load_spec, preset_names
from archplan.planning import spec_data, spec_yaml
from archplan.planning.design import RECIPES, SMALL_MODELS, Family, design, recipe_shape
from archplan.planning.optimal import LawChoice, budget, optimum
from archplan.planning.cluster import STATES, rank_memory
from archplan.planning.layout import Layout, parse_layout
from archplan.planning.parallel import Evaluator, Settings, cp_problem, interconnect, search, tp_problem
from archplan.planning.solve import SolveResult, Targets, solve
from archplan.resolve import HyenaPlan, ModelPlan, S4Plan, StripedHyenaPlan, resolve
from archplan.spec import Spec

DISTRIBUTED = Path(__file__).parent / "fixtures" / "distributed"

H100 = accelerator("h100")
NET = interconnect(H100)


def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        *argv: str) -> tuple[int, str, str]:
    """Run the real entry point (exit codes as a shell sees them)."""
    monkeypatch.setattr(sys, "argv", ["archplan", *argv])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- scaling laws
# docs/formulas.md §5.1 table: C -> (rounded N_opt, D_opt), (Besiroglu N_opt, D_opt); 5 significant digits.
HOFFMANN_TABLE = {
    1e20: ((6.4486e8, 2.5846e10), (8.5348e8, 1.9528e10)),
    1e21: ((1.8242e9, 9.1363e10), (2.7785e9, 5.9985e10)),
    1e22: ((5.1605e9, 3.2297e11), (9.0452e9, 1.8426e11)),
    5.76e23: ((3.2190e10, 2.9823e12), (7.2249e10, 1.3287e12)),
    1e24: ((4.1297e10, 4.0358e12), (9.5861e10, 1.7386e12)),
    1e25: ((1.1682e11, 1.4267e13), (3.1207e11, 5.3407e12)),
    1e26: ((3.3048e11, 5.0432e13), (1.0159e12, 1.6405e13)),
}
TABLE_TOLERANCE = 1e-4  # the table prints 5 significant digits


@pytest.mark.parametrize("compute", sorted(HOFFMANN_TABLE))
def test_compute_optimal_table(compute: float) -> None:
    (hn, hd), (bn, bd) = HOFFMANN_TABLE[compute]
    chinchilla = optimum(LawChoice.chinchilla, compute).optimal
    epoch = optimum(LawChoice.epoch, compute).optimal
    assert chinchilla.params == pytest.approx(hn, rel=TABLE_TOLERANCE)
    assert chinchilla.tokens == pytest.approx(hd, rel=TABLE_TOLERANCE)
    assert epoch.params == pytest.approx(bn, rel=TABLE_TOLERANCE)
    assert epoch.tokens == pytest.approx(bd, rel=TABLE_TOLERANCE)


def test_losses_at_the_gopher_budget() -> None:
    """docs/formulas.md §5.1: loss at the optimum for C = 5.76e23 is 1.9307 (rounded) / 1.9744 (Besiroglu)."""
    assert optimum(LawChoice.chinchilla, 5.76e23).optimal.loss == pytest.approx(1.9307, abs=1e-4)
    assert optimum(LawChoice.epoch, 5.76e23).optimal.loss == pytest.approx(1.9744, abs=1e-4)


@pytest.mark.parametrize("choice,key", [(LawChoice.chinchilla, "hoffmann2022"),
                                        (LawChoice.hoffmann2022, "hoffmann2022"),
                                        (LawChoice.hoffmann2022_tex, "hoffmann2022-tex"),
                                        (LawChoice.epoch, "besiroglu2024"),
                                        (LawChoice.besiroglu2024, "besiroglu2024")])
@pytest.mark.parametrize("compute", [3e19, 2e22, 7e25])
def test_closed_form(choice: LawChoice, key: str, compute: float) -> None:
    """N_opt = G·(C/6)^a, D_opt = C/(6·N_opt), G = (αA/(βB))^(1/(α+β)), a = β/(α+β) (Hoffmann App. D.2),
    computed here from the fitted constants alone."""
    law = LAWS[key]
    g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    a = law.beta / (law.alpha + law.beta)
    n = g * (compute / 6) ** a
    result = optimum(choice, compute)
    assert result.optimal.params == pytest.approx(n, rel=1e-9)
    assert result.optimal.tokens == pytest.approx(compute / (6 * n), rel=1e-9)
    # the optimum is the minimum of the IsoFLOP profile
    assert all(p.loss >= result.optimal.loss - 1e-12 for _, p in result.isoflop)


# Hoffmann et al. 2022 Table 3 (Approach 1): parameters, FLOPs, tokens. The 67B row prints 1.5T, a
# rounding of C/(6N) = 1.433T (its 6ND/C is 1.0469, docs/formulas.md §5.2); that row uses C/(6N).
TABLE3 = [
    (400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 5.76e23 / (6 * 67e9)), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12),
]


@pytest.mark.parametrize("params,compute,tokens", TABLE3)
def test_twenty_tokens_rule_against_table3(params: float, compute: float, tokens: float) -> None:
    result = optimum(LawChoice.twenty, compute).optimal
    assert result.params == pytest.approx(params, rel=0.05)
    assert result.tokens == pytest.approx(tokens, rel=0.05)
    assert result.tokens == pytest.approx(20 * result.params)


@pytest.mark.parametrize("choice", list(LawChoice))
def test_budget_from_params_or_tokens_inverts_the_law(choice: LawChoice) -> None:
    n, d = optimum(choice, 3e23).optimal.params, optimum(choice, 3e23).optimal.tokens
    assert budget(choice, params=n) == pytest.approx(3e23, rel=1e-9)
    assert budget(choice, tokens=d) == pytest.approx(3e23, rel=1e-9)


@pytest.mark.parametrize(("kwargs", "said"), [
    ({}, "give exactly one of --compute, --params or --tokens"),
    ({"compute": 1e24, "params": 7e9}, "give exactly one of --compute, --params or --tokens"),
    ({"compute": -1.0}, "--compute: must be a positive number, got -1"),
    ({"compute": 1e40}, "--compute implies a budget of 1e+40 FLOPs; plan works between 1e+15 and 1e+30 FLOPs"),
    ({"params": float("nan")}, "--params: must be a positive number, got nan"),
])
def test_budget_rejects_bad_input(kwargs: dict[str, float], said: str) -> None:
    with pytest.raises(ArchplanError, match=re.escape(said)):
        budget(LawChoice.epoch, **kwargs)


# ----------------------------------------------------------------------------------- design
def test_recipe_curve_passes_through_the_guide_recipes() -> None:
    for _, layers, width in SMALL_MODELS + RECIPES:
        # below d_model 1024 the designer keeps one KV head per query head
        spec = Spec(name="r", vocab_size=32000, d_model=width, n_layers=layers,
                    attention={"kind": "gqa", "n_heads": width // 128, "n_kv_heads": min(8, width // 128)},
                    ffn={"kind": "glu", "d_ff": round(3.5 * width / 256) * 256})
        l_r, d_r = recipe_shape(count_params(resolve(spec)).non_embedding)
        assert (l_r, d_r) == (pytest.approx(layers), pytest.approx(width))


def test_small_budgets_get_the_small_models_proportions() -> None:
    """Below the 7B recipe the curve runs through GPT-2 small and Llama 3.2 1B / 3B: GPT-2 small's
    total (124,439,808 at its 50,257-token vocabulary) designs 10 × 640, not the 3 × 896 the 7B-70B
    segment extended down gave; d/L stays between 32 and 128 (GPT-2 small 64, Llama 3.2 1B 128) down
    to a 20 M trunk."""
    made = design(Family.dense, 124_439_808, vocab=50257)
    assert (made.spec.n_layers, made.spec.d_model) == (10, 640)
    for trunk in (2e7, 1e8, 1e9, 3e9):
        layers, width = recipe_shape(trunk)
        assert 32 <= width / layers <= 128, trunk


@pytest.mark.parametrize("preset", ["llama-3-8b", "llama-3-70b"])
def test_dense_design_finds_the_llama3_recipe(preset: str) -> None:
    """Llama 3 8B/70B are exactly the guide's recipe (GQA-8, d_ff 3.5d, untied, vocab 128256)."""
    reference = load_spec(preset)
    target = count_params(resolve(reference)).total
    made = design(Family.dense, target, vocab=128256)
    assert (made.spec.n_layers, made.spec.d_model) == (reference.n_layers, reference.d_model)
    assert made.spec.ffn is not None and reference.ffn is not None
    assert made.spec.ffn.d_ff == reference.ffn.d_ff
    assert made.params.total == target


@pytest.mark.parametrize("family", list(Family))
@pytest.mark.parametrize("target", [6e8, 9e9, 6e10])
def test_design_within_two_percent_and_valid(family: Family, target: float, tmp_path: Path) -> None:
    made = design(family, target, vocab=128256, name="t", tokens=20 * target)
    params = count_params(resolve(made.spec))
    achieved = params.active if family in (Family.moe, Family.hybrid_moe) else params.total
    assert abs(achieved / target - 1) <= 0.02
    assert made.achieved == achieved
    spec = made.spec
    assert spec.attention is not None and spec.attention.head_dim == 128
    assert spec.position.kind == "rope" and spec.norm.kind == "rmsnorm" and spec.residual.kind == "pre"
    if spec.d_model >= 1024:
        n_heads = spec.attention.n_heads  # type: ignore[union-attr]
        assert spec.attention.n_kv_heads == next(k for k in (8, 4, 2) if n_heads % k == 0)  # type: ignore[union-attr]
    width = spec.ffn.d_ff if spec.ffn is not None else spec.moe.expert.d_ff  # type: ignore[union-attr]
    assert width % 128 == 0
    if family is Family.dense:
        assert width % 256 == 0 and 0.75 <= width / (3.5 * spec.d_model) <= 1.33
    if family in (Family.moe, Family.hybrid_moe):
        assert params.total > params.active
    if family in (Family.hybrid, Family.hybrid_moe):
        assert spec.ssm is not None and spec.ssm.kind == "mamba2" and "A" in spec.layout.mixers
    # YAML round trip through the loader
    path = tmp_path / "spec.yaml"
    path.write_text(spec_yaml(spec, "test"))
    assert load_spec(str(path)) == spec


@pytest.mark.parametrize("family", list(Family))
def test_generated_specs_pass_verify(family: Family) -> None:
    """The torch model built from a generated spec agrees with the analytic counts (archplan verify)."""
    pytest.importorskip("torch")
    from archplan.crosscheck import crosscheck

    made = design(family, optimum(LawChoice.epoch, 1e18).optimal.params, vocab=32000)
    result = crosscheck(resolve(made.spec), seq_len=64, batch=1, backward=True, real=False)
    assert result.ok


@pytest.mark.parametrize(("family", "counted"), [
    ("dense", "N counts every parameter"), ("hybrid", "N counts every parameter"),
    ("moe", "N counts the active parameters"), ("hybrid-moe", "N counts the active parameters"),
])
def test_budget_header_says_what_n_counts_for_the_family(family: str, counted: str,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An MoE is matched to the optimum by its active count, as its 6·N·D is; the header said "every
    parameter" for every family, beside a generated spec whose total was 6× the N printed."""
    code, out, _ = run(capsys, monkeypatch, "plan", "--compute", "1e24", "--family", family)
    header = " ".join(out.split()[:40])
    assert code == 0 and counted in header, header


def test_a_written_spec_holds_whole_numbers_as_integers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`training: {tokens: 184260640754.0}`: a number field holds floats, and the file said so."""
    out = tmp_path / "m.yaml"
    code, _, _ = run(capsys, monkeypatch, "plan", "--compute", "1e22", "-o", str(out))
    data = yaml.safe_load(out.read_text())
    assert code == 0 and isinstance(data["training"]["tokens"], int) and isinstance(data["position"]["theta"], int)
    assert load_spec(out).training.tokens == data["training"]["tokens"]


def test_a_written_specs_header_command_writes_it_again(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The header's command is the one that wrote the file: the budget as given (it was rounded to
    4 digits) and --seq (it was left out), so running it again gives the same spec."""
    first, again = tmp_path / "a.yaml", tmp_path / "b.yaml"
    code, _, _ = run(capsys, monkeypatch, "plan", "--compute", "1.23456e24", "--seq", "4096", "-o", str(first))
    modeline, header = first.read_text().splitlines()[:2]
    # the first line points an editor at the schema, from where the file is
    schema = (tmp_path / modeline.removeprefix("# yaml-language-server: $schema=")).resolve()
    assert schema.is_file() and schema.name == "spec.schema.json"
    command = header.removeprefix("# generated by archplan ").split()
    assert code == 0 and "--seq" in command
    code, _, _ = run(capsys, monkeypatch, *command, "-o", str(again))
    assert code == 0 and again.read_text() == first.read_text()


def test_design_too_small_for_the_vocabulary() -> None:
    with pytest.raises(ArchplanError, match="vocab"):
        design(Family.dense, 5e7, vocab=128256)


def test_spec_data_round_trips_every_preset() -> None:
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        spec = load_spec(path.stem)
        assert Spec.model_validate(spec_data(spec)) == spec, path.stem


# ------------------------------------------------------------------------------------ solve
MIXTRAL_TOTAL, MIXTRAL_ACTIVE = 46_702_792_704, 12_879_925_248


def _partial(tmp_path: Path, preset: str, edit: Any) -> Path:
    data = yaml.safe_load((PRESETS_DIR / f"{preset}.yaml").read_text())
    data.pop("reference", None)
    edit(data)
    path = tmp_path / f"{preset}-partial.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_solve_finds_mixtral_expert_width(tmp_path: Path) -> None:
    path = _partial(tmp_path, "mixtral-8x7b", lambda d: d["moe"]["expert"].update(d_ff="solve"))
    result = solve(path, Targets(MIXTRAL_TOTAL, MIXTRAL_ACTIVE), tolerance=0)
    assert result.solved and result.unknowns == ("moe.expert.d_ff",)
    best = result.nearest
    assert best.values == {"moe.expert.d_ff": 14336}
    assert (best.total, best.active) == (MIXTRAL_TOTAL, MIXTRAL_ACTIVE)
    assert best.spec == load_spec("mixtral-8x7b").model_copy(update={"reference": None})


def test_solve_finds_mixtral_from_totals_with_experts_and_top_k_unknown(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        del d["moe"]["n_experts"], d["moe"]["top_k"], d["moe"]["expert"]["d_ff"]

    result = solve(_partial(tmp_path, "mixtral-8x7b", edit), Targets(MIXTRAL_TOTAL, MIXTRAL_ACTIVE),
                   tolerance=0)
    assert result.solved
    assert result.nearest.values == {"moe.n_experts": 8, "moe.top_k": 2, "moe.expert.d_ff": 14336}


@pytest.mark.parametrize(("compute", "extrapolated"), [("1e21", False), ("1e25", True)])
def test_a_budget_past_the_fitted_runs_says_its_loss_is_extrapolated(compute: str, extrapolated: bool,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`size` marked an N or D outside Hoffmann's runs (70 M–16 B, 5 B–500 B tokens); plan's budget
    printed the same kind of loss, 1.9117 at 312 B and 5.34 T, without a word."""
    code, out, _ = run(capsys, monkeypatch, "plan", "--compute", compute, "--json")
    assert code == 0 and json.loads(out)["optimal"]["extrapolated"] is extrapolated
    code, out, _ = run(capsys, monkeypatch, "plan", "--compute", compute)
    assert code == 0 and ("the losses are extrapolated" in " ".join(out.split())) is extrapolated

def test_law_beside_given_tokens_is_refused_not_ignored(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout search reads --law only to size the tokens: beside --tokens or a spec's
    training.tokens it went unread with exit 0, where every other unread option is refused."""
    spec = yaml.safe_load((PRESETS_DIR / "llama-3-8b.yaml").read_text())
    spec["training"] = {"tokens": 15e12}
    with_tokens = tmp_path / "trained.yaml"
    with_tokens.write_text(yaml.safe_dump(spec, sort_keys=False))
    for args, given in ((("llama-3-8b", "--tokens", "15T"), "--tokens"), ((str(with_tokens),), "spec training.tokens")):
        code, _, err = run(capsys, monkeypatch, "plan", *args, "--gpus", "8", "--law", "chinchilla")
        assert code == 2 and f"--law: sets the tokens from the model's size, which {given} gives already" in err
        code, out, _ = run(capsys, monkeypatch, "plan", *args, "--gpus", "8", "--top", "1", "--json")
        assert code == 0 and json.loads(out)["training_tokens"] == 15e12

def test_solve_ranks_the_smaller_model_first_among_equally_near(tmp_path: Path) -> None:
    """Given only --active, many (experts, top-k, width) meet it exactly: the sum of the solved
    values ranked 2,386 × 128 experts (121.7 B parameters) first, as if adding an expert count to a
    width measured a model. The total count decides, the smaller first (docs/plan.md)."""
    def edit(d: dict) -> None:
        d["moe"].update(n_experts="solve", top_k="?")
        d["moe"]["expert"]["d_ff"] = "solve"

    result = solve(_partial(tmp_path, "mixtral-8x7b", edit), Targets(None, MIXTRAL_ACTIVE), tolerance=0.01)
    ranked = [(c.worst, c.total, c.active) for c in result.candidates]
    assert ranked == sorted(ranked) and len(ranked) > 2
    assert result.nearest.total == min(c.total for c in result.candidates if c.worst == 0) <= MIXTRAL_ACTIVE

def test_a_solved_spec_keeps_no_reference_count_it_contradicts(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial cut from a preset keeps its `reference`: the file `-o` wrote claimed Llama-2-7B's
    6,738,415,616 beside sizes solved for 7e9, and lint refused it (AP017). A count the solve
    reproduces stays; one it does not is dropped, the source kept."""
    data = yaml.safe_load((PRESETS_DIR / "llama-2-7b.yaml").read_text())
    data["ffn"]["d_ff"] = "solve"
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump(data, sort_keys=False))
    for total, tol, kept in ((7e9, "0.01", None), (6_738_415_616, "0", 6_738_415_616)):
        out = tmp_path / f"solved-{total:.0f}.yaml"
        code, _, _ = run(capsys, monkeypatch, "plan", "--solve", str(partial), "--total", f"{total:.0f}",
                         "--tol", tol, "-o", str(out))
        reference = load_spec(out).reference
        assert code == 0 and reference is not None and reference.source == data["reference"]["source"]
        assert reference.total_params == reference.active_params == kept
        code, out_text, _ = run(capsys, monkeypatch, "lint", str(out), "--format", "json")
        assert "AP017" not in out_text


def test_solve_dense_width_from_total(tmp_path: Path) -> None:
    path = _partial(tmp_path, "llama-3-8b", lambda d: d["ffn"].pop("d_ff"))
    result = solve(path, Targets(8_030_261_248, None), tolerance=0, multiple=256)
    assert result.solved and result.nearest.values == {"ffn.d_ff": 14336}


@pytest.mark.parametrize("preset", ["gpt-4-rumored", "claude-3-opus-rumored"])
def test_the_bundled_partials_make_the_rumoured_presets(preset: str) -> None:
    """Each rumoured preset's header names the solve that built it, with a partial spec bundled by
    name: run as written, it finds the preset's counts exactly."""
    header = (PRESETS_DIR / f"{preset}.yaml").read_text().splitlines()[1]
    args = header.removeprefix("# built with: archplan plan --solve ").split()
    options = dict(zip(args[1::2], args[2::2]))
    active = float(options["--active"]) if "--active" in options else None
    result = solve(args[0], Targets(float(options["--total"]), active),
                   tolerance=float(options.get("--tol", 0.01)), multiple=int(options["--multiple"]))
    counts = count_params(resolve(load_spec(preset)))
    assert result.nearest.count("total") == counts.total and result.nearest.count("active") == counts.active


def test_solve_names_the_bundled_partials_for_an_unknown_name() -> None:
    with pytest.raises(ArchplanError, match=r"no such file or bundled partial spec \(claude-3-opus-partial, "
                                            r"gpt-4-partial\)"):
        solve("nope-partial", Targets(1e9, None))


def test_solve_reports_no_integer_solution_with_the_nearest(tmp_path: Path) -> None:
    path = _partial(tmp_path, "mixtral-8x7b", lambda d: d["moe"]["expert"].update(d_ff="solve"))
    result = solve(path, Targets(MIXTRAL_TOTAL + 1, MIXTRAL_ACTIVE), tolerance=0)
    assert not result.solved
    assert result.nearest.values == {"moe.expert.d_ff": 14336}
    assert result.nearest.errors["total"] == pytest.approx(-1 / (MIXTRAL_TOTAL + 1))
    # inconsistent targets (more active than total) are refused: no spec could come near
    with pytest.raises(ArchplanError, match="exceeds --total"):
        solve(path, Targets(MIXTRAL_ACTIVE, MIXTRAL_TOTAL), tolerance=0.01)


def _shared_moe_solve(tmp_path: Path, shared_d_ff: int, shared: object) -> tuple[Spec, SolveResult]:
    """A DeepSeek-MoE-style spec with 2 shared experts of `shared_d_ff`, solved back from its counts
    with the expert width and the `shared` block (as given) unknown."""
    spec = Spec(name="small-moe", vocab_size=1000, d_model=256, n_layers=4,
                attention={"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
                moe={"n_experts": 16, "top_k": 4, "expert": {"kind": "glu", "d_ff": 384},
                     "shared": {"n": 2, "d_ff": shared_d_ff}})
    params = count_params(resolve(spec))
    data = spec_data(spec)
    data["moe"]["shared"] = shared
    data["moe"]["expert"]["d_ff"] = "solve"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec, solve(path, Targets(params.total, params.active), tolerance=0)


def test_solve_shared_experts(tmp_path: Path) -> None:
    """A DeepSeek-MoE-style spec with 2 shared experts of the expert width is found back."""
    spec, result = _shared_moe_solve(tmp_path, 384, "solve")
    assert result.solved and result.tied == ("moe.shared.d_ff",)
    assert result.nearest.values == {"moe.expert.d_ff": 384, "moe.shared.n": 2}
    assert result.nearest.spec == spec


def test_solve_one_width_against_two_targets_finds_the_least_worst_error(tmp_path: Path) -> None:
    """Least squares on the two relative errors put Mixtral's expert width at 14,328 (active −1.04%)
    and reported no solution within 1%, though its own 14,336 is within 1% of both counts: the
    ranking's measure, the worse error, is minimised too."""
    path = _partial(tmp_path, "mixtral-8x7b", lambda d: d["moe"]["expert"].update(d_ff="solve"))
    result = solve(path, Targets(46_245_958_712, 13_008_711_492), tolerance=0.01)
    assert result.solved and result.nearest.values == {"moe.expert.d_ff": 14336}
    assert max(abs(e) for e in result.nearest.errors.values()) < 0.01


def test_solve_holds_a_width_at_its_least_and_solves_the_other_again(tmp_path: Path) -> None:
    """DeepSeek-V3's dense and expert widths for 671e9 / 33e9 within 7%: least squares put the
    dense width below zero, rounding raised it to 128 and kept the expert width that assumed it
    negative, and "no integer solution" was printed though 128 / 1,920 is within 7% of both."""
    def unknown_widths(d: dict) -> None:
        d["ffn"]["d_ff"] = "solve"
        d["moe"]["expert"]["d_ff"] = "solve"
        d["moe"]["shared"] = {"n": 1}

    path = _partial(tmp_path, "deepseek-v3", unknown_widths)
    result = solve(path, Targets(671e9, 33e9), tolerance=0.07, multiple=128)
    assert result.solved and result.nearest.values["ffn.d_ff"] == 128
    assert result.nearest.values["moe.expert.d_ff"] == 1920


@pytest.mark.parametrize("total", ["0.5", "1e30"])
def test_solve_refuses_a_target_no_model_has(total: str, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--total 0.5 ran a search and its note said "the --total 0 asked"; 1e30 printed float noise
    as digits. A count is between 1 and 1e18 parameters, as --tokens is."""
    code, _, err = run(capsys, monkeypatch, "plan", "--solve", "gpt-4-partial", "--total", total)
    assert code == 2 and f"--total: must be between 1 and 1e+18 parameters, got {float(total):g}" in err


def test_plan_takes_the_tex_fit_by_its_name(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The TeX-source fit, the one that gives the paper's 40B at the Gopher budget, was `size`'s
    only; `plan` takes it and `size`'s names for the other two."""
    code, out, _ = run(capsys, monkeypatch, "plan", "--compute", "5.76e23", "--law", "hoffmann2022-tex", "--json")
    data = json.loads(out)
    assert code == 0 and data["law"] == "hoffmann2022-tex" and data["loss_law"] == "hoffmann2022-tex"
    assert round(data["optimal"]["params"] / 1e9, 1) == 40.3


def test_solve_judges_the_tolerance_exactly_and_tries_the_width_cap() -> None:
    """d_ff 78,054 makes 1.01 × the target exactly, shown "+1.000% ✗" (in floats the miss is
    0.010000000000000009); a target needing a width past the spec's cap was refused, though the cap
    meets it within --tol; and a --multiple too coarse was blamed on the sizes not solved for."""
    exact = solve("claude-3-opus-partial", Targets(197_745_868_800, None), multiple=78054)
    assert exact.solved and exact.nearest.values == {"ffn.d_ff": 78054} and exact.nearest.errors["total"] > 0.01
    capped = solve("claude-3-opus-partial", Targets(4e13, None), tolerance=0.02)
    assert capped.solved and capped.nearest.values == {"ffn.d_ff": 1 << 24}
    coarse = solve("claude-3-opus-partial", Targets(16e9, None), multiple=1024)
    assert not coarse.solved and coarse.floor_note is not None and "a smaller --multiple" in coarse.floor_note
    assert solve("claude-3-opus-partial", Targets(16e9, None)).solved


def test_solve_shared_experts_whose_count_and_width_are_both_unknown(tmp_path: Path) -> None:
    """At `shared.n: 0` the shared width moves no count: that combination solves the expert width
    alone instead of stopping the whole solve as two widths moving the targets in proportion."""
    _, result = _shared_moe_solve(tmp_path, 768, {"n": "solve", "d_ff": "solve"})
    # n · d_ff is all the counts see, so every split of the 1,536 shared width is exact
    exact = [c.values for c in result.candidates if not any(c.errors.values())]
    assert result.solved and {"moe.shared.n": 2, "moe.expert.d_ff": 384, "moe.shared.d_ff": 768} in exact
    assert all(v["moe.shared.n"] * v["moe.shared.d_ff"] == 1536 for v in exact)


def test_solve_cli_shows_a_width_a_candidate_leaves_out(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate at `shared.n: 0` has no shared width: the table shows "—", `--json` leaves the
    key out, `-o` writes the spec, and an unreachable target's note skips it (a KeyError traceback
    each, after the file was written)."""
    spec = Spec(name="small-moe", vocab_size=1000, d_model=256, n_layers=4,
                attention={"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
                moe={"n_experts": 16, "top_k": 4, "expert": {"kind": "glu", "d_ff": 384}})
    params = count_params(resolve(spec))
    data = spec_data(spec)
    data["moe"]["shared"] = {"n": "solve", "d_ff": "solve"}
    data["moe"]["expert"]["d_ff"] = "solve"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    targets = ("--total", str(params.total), "--active", str(params.active), "--tol", "0")
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(path), *targets, "-o", str(tmp_path / "s.yaml"))
    assert code == 0 and "│       — │" in out and "moe.shared.n = 0" in out and (tmp_path / "s.yaml").exists()
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(path), *targets, "--json")
    best = json.loads(out)["candidates"][0]["values"]
    assert code == 0 and best == {"moe.expert.d_ff": 384, "moe.shared.n": 0}
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(path), "--total", "1e6", "--active", "5e5")
    assert code == 1 and "no integer solution" in out


def test_solve_names_the_best_candidates_size_in_human_units(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's exact counts (1,710,796,800,000) beside the summary's 1.71 T."""
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", "gpt-4-partial", "--total", "1.8e12",
                       "--active", "220e9", "--multiple", "128", "--tol", "0.07")
    assert code == 0 and "moe.expert.d_ff = 25,088 (1.71 T total, 231 B active)" in " ".join(out.split())


def test_solve_counts_every_solution_and_breaks_ties_exactly(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """"solved: N" counts every candidate within tolerance, not the 10 kept; a target midway between
    two widths ranks the smaller model first (in floats the two misses differed in the last bit)."""
    per_unit = 2 * 1_179_648  # d_ff 16 → 17 in the Claude partial; the target is midway
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", "claude-3-opus-partial", "--total", "15609765888",
                       "--tol", "0", "--json")
    data = json.loads(out)
    first, second = data["candidates"][:2]
    assert code == 1 and first["values"] == {"ffn.d_ff": 16} and second["values"] == {"ffn.d_ff": 17}
    assert second["total_params"] - first["total_params"] == per_unit
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", "gpt-4-partial", "--total", "1.8e12",
                       "--active", "220e9", "--multiple", "128", "--tol", "0.3", "--json")
    data = json.loads(out)
    assert code == 0 and len(data["candidates"]) == 10 and data["solutions"] > 10


def test_solve_two_widths_from_two_targets(tmp_path: Path) -> None:
    """Jamba: the dense FFN and the expert width are both unknown; total and active separate them."""
    reference = count_params(resolve(load_spec("jamba-v0.1")))

    def edit(d: dict) -> None:
        d["ffn"]["d_ff"] = "solve"
        d["moe"]["expert"]["d_ff"] = "solve"

    result = solve(_partial(tmp_path, "jamba-v0.1", edit), Targets(reference.total, reference.active),
                   tolerance=0)
    assert result.solved
    assert result.nearest.values == {"ffn.d_ff": 14336, "moe.expert.d_ff": 14336}


def test_solve_refuses_widths_the_targets_cannot_separate(tmp_path: Path) -> None:
    spec = Spec(name="mixed", vocab_size=1000, d_model=256, n_layers=4,
                attention={"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
                ffn={"kind": "glu", "d_ff": 512}, layout={"moe_every": 2},
                moe={"n_experts": 8, "top_k": 2, "expert": {"kind": "glu", "d_ff": 384},
                     "shared": {"n": 1, "d_ff": 512}})
    params = count_params(resolve(spec))
    data = spec_data(spec)
    data["ffn"]["d_ff"] = "solve"
    data["moe"]["shared"]["d_ff"] = "solve"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ArchplanError, match="ffn.d_ff and moe.shared.d_ff move the targets in proportion"):
        solve(path, Targets(params.total, params.active))


def test_solve_blames_the_proportional_widths_before_a_size_it_chose(tmp_path: Path) -> None:
    """top_k 1 and 2 leave two widths in proportion and the router refuses top_k 3 and up: the
    refusal blamed `top_k (3)`, a value the user never wrote, not the widths they can fix."""
    path = tmp_path / "q.yaml"
    path.write_text("name: q\nvocab_size: 1000\nd_model: 256\nn_layers: 4\n"
                    "attention: {kind: gqa, n_heads: 4, n_kv_heads: 2}\nffn: {kind: glu, d_ff: solve}\n"
                    "layout: {moe_every: 2}\nmoe:\n  n_experts: 16\n  top_k: solve\n"
                    "  expert: {kind: glu, d_ff: 384}\n  shared: {n: 1, d_ff: solve}\n"
                    "  router: {n_group: 8, topk_group: 1}\n")
    with pytest.raises(ArchplanError) as err:
        solve(path, Targets(20e6, 8e6))
    message = str(err.value)
    assert message.startswith("ffn.d_ff and moe.shared.d_ff move the targets in proportion")
    assert "at moe.top_k = 1; moe.top_k = 2; fix one (the spec refuses the others, e.g. moe.top_k: top_k (3)" in message


def test_solve_names_the_combinations_the_targets_cannot_separate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """With `shared.n` solved too, n = 0 leaves the dense width alone and solves; n = 1 … 4 keep a
    dense and a shared width that move both counts in proportion. Those were passed over in silence:
    the result now names them, printed and in `--json`."""
    spec = Spec(name="mixed", vocab_size=1000, d_model=256, n_layers=4,
                attention={"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
                ffn={"kind": "glu", "d_ff": 512}, layout={"moe_every": 2},
                moe={"n_experts": 8, "top_k": 2, "expert": {"kind": "glu", "d_ff": 384}})
    params = count_params(resolve(spec))
    data = spec_data(spec)
    data["ffn"]["d_ff"] = "solve"
    data["moe"]["shared"] = {"n": "solve", "d_ff": "solve"}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = solve(path, Targets(params.total, params.active), tolerance=0)
    assert result.solved and result.nearest.values == {"ffn.d_ff": 512, "moe.shared.n": 0}
    assert result.skipped == ("not tried at moe.shared.n = 1; moe.shared.n = 2; moe.shared.n = 3; "
                              "moe.shared.n = 4: there ffn.d_ff and moe.shared.d_ff move the targets in "
                              "proportion (e.g. a dense FFN and shared experts, both always active), so the "
                              "targets cannot separate them; fix one width to try them")
    targets = ("--total", str(params.total), "--active", str(params.active), "--tol", "0")
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(path), *targets)
    assert code == 0 and f"note: {result.skipped}" in out
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(path), *targets, "--json")
    assert code == 0 and json.loads(out)["skipped"] == result.skipped


@pytest.mark.parametrize("edit,message", [
    # named where it is, as every error of the file is: FILE:LINE:COLUMN: d_model: ...
    (lambda d: d.update(d_model="solve"), r"-partial\.yaml:\d+:1: d_model: cannot solve for this field"),
    (lambda d: None, "nothing to solve"),
    (lambda d: (d["moe"].update(shared={"n": 1, "d_ff": "solve"}),
                d["moe"]["expert"].update(d_ff="solve")), "2 unknown widths"),
])
def test_solve_rejects(tmp_path: Path, edit: Any, message: str) -> None:
    path = _partial(tmp_path, "mixtral-8x7b", edit)
    with pytest.raises(ArchplanError, match=message):
        solve(path, Targets(MIXTRAL_TOTAL, None))


@pytest.mark.parametrize(("edit", "targets", "message"), [
    # a misspelt marker is a bad value, named where it is, not "nothing to solve"
    (lambda d: d["ffn"].update(d_ff="solv"), Targets(8e9, None), r"ffn\.d_ff: expected an integer, got the string 'solv'"),
    # without experts every parameter is active: two different counts cannot both be met
    (lambda d: d["ffn"].update(d_ff="solve"), Targets(8e9, 7e9), "without `moe` every parameter is active"),
])
def test_solve_names_what_cannot_work(tmp_path: Path, edit: Any, targets: Targets, message: str) -> None:
    path = _partial(tmp_path, "llama-3-8b", edit)
    with pytest.raises(ArchplanError, match=message):
        solve(path, targets)


def test_solve_reads_a_preset_by_name() -> None:
    """Names work wherever a spec path does: a preset has no unknowns, and says so."""
    with pytest.raises(ArchplanError, match="nothing to solve"):
        solve("llama-3-8b", Targets(8e9, None))


def test_rumoured_presets_are_solver_output(tmp_path: Path) -> None:
    """The presets are what the documented solves give; 8 experts cannot match the GPT-4 rumour."""
    for name, targets, tol, multiple in (("gpt-4-rumored", Targets(1.8e12, 220e9), 0.07, 128),
                                         ("claude-3-opus-rumored", Targets(200e9, None), 0.01, 256)):
        preset = load_spec(name)
        assert preset.reference is not None and preset.reference.rumour

        def edit(d: dict) -> None:
            if "moe" in d:
                d["moe"]["n_experts"] = "solve"
                d["moe"]["expert"]["d_ff"] = "solve"
            else:
                d["ffn"]["d_ff"] = "solve"

        result = solve(_partial(tmp_path, name, edit), targets, tolerance=tol, multiple=multiple)
        assert result.solved
        assert result.nearest.spec == preset.model_copy(
            update={"reference": None, "description": result.nearest.spec.description})

    def eight(d: dict) -> None:
        d["moe"].update(n_experts=8, top_k="solve")
        d["moe"]["expert"]["d_ff"] = "solve"

    result = solve(_partial(tmp_path, "gpt-4-rumored", eight), Targets(1.8e12, 220e9), tolerance=0.07)
    assert not result.solved and result.nearest.worst > 0.2


# ----------------------------------------------------------------------------------- layout
def _search(name: str, gpus: int, seq: int = 4096, **kw: Any) -> Any:
    return search(resolve(load_spec(name)), H100, gpus, seq=seq, global_batch_tokens=4e6, net=NET, **kw)


def _s4_dplr(d_state: int) -> dict[str, Any]:
    """s4d-lm with S4's diagonal-plus-low-rank A: its kernel generation grows as d_state²."""
    data = yaml.safe_load((PRESETS_DIR / "s4d-lm.yaml").read_text(encoding="utf-8"))
    data["long_conv"].update(kind="s4", d_state=d_state)
    data.pop("reference")
    return data


def test_mfu_counts_a_micro_batchs_shared_filters_once() -> None:
    """The step prices S4's kernel generation once per micro-batch; MFU's numerator counted it once
    per sequence (size's batch-1 figure), so S4 at d_state 256 on 8 H100 printed 111.8% MFU."""
    plan = resolve(Spec.model_validate(_s4_dplr(256)))
    result = search(plan, H100, 8, seq=2048, global_batch_tokens=4e6, net=NET)
    best = result.ranked[0]
    assert best.layout.mb > 1
    assert best.model_flops_per_token == training_flops_per_token(plan, 2048, "causal", "none", best.layout.mb)
    assert best.model_flops_per_token < result.model_flops_per_token / 4
    assert result.model_flops_per_token == training_flops_per_token(plan, 2048, "causal", "none")
    assert all(0 < e.mfu < 1 for e in result.ranked)
    # a model without long convolutions counts the same FLOPs a token at every micro-batch, its
    # multi-token-prediction modules too (the layout model's own plan folds them into its layers)
    for name in preset_names():
        model = resolve(load_spec(name))
        evaluator = Evaluator(model, H100, NET, 256, Settings(), 80 << 30)
        long_conv = any(isinstance(layer.mixer, S4Plan | HyenaPlan | StripedHyenaPlan) for layer in model.layers)
        assert (evaluator.model_flops_at(2) < evaluator.model_flops) == long_conv, name
        assert evaluator.model_flops_at(2) <= evaluator.model_flops, name


def test_size_states_s4s_kernel_generation_is_archplans(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = tmp_path / "s4.yaml"
    spec.write_text(yaml.safe_dump(_s4_dplr(64)), encoding="utf-8")
    code, out, _ = run(capsys, monkeypatch, "size", str(spec), "--json")
    report = json.loads(out)
    assert code == 0
    assert "Cauchy kernel at the FFT nodes" in report["flops"]["convention"]
    assert "Cauchy kernel keeps" in report["memory"]["training"]["convention"]
    code, out, _ = run(capsys, monkeypatch, "size", "s4d-lm", "--json")
    assert "Cauchy" not in out


def test_7b_fits_on_8_gpus_without_tp() -> None:
    result = _search("llama-2-7b", 8)
    assert result.feasible
    assert any(e.layout.tp == 1 and e.layout.pp == 1 for e in result.ranked)
    assert all(e.memory.total <= result.usable_bytes for e in result.ranked)
    per_token = [e.time.total / e.global_batch_tokens for e in result.ranked]
    assert per_token == sorted(per_token)


def test_405b_on_8_gpus_is_infeasible_with_the_reason() -> None:
    result = _search("llama-3.1-405b", 8)
    assert not result.feasible and not result.ranked
    assert "model states alone" in result.reasons[0]
    assert result.tightest is not None and result.tightest.memory.total > result.usable_bytes


def test_memory_per_gpu_decreases_with_zero_stage() -> None:
    plan = resolve(load_spec("llama-3-8b"))
    totals = []
    for zero in (0, 1, 2, 3):
        layout = Layout(tp=1, pp=1, dp=8, zero=zero, recompute="full", mb=1)
        mem = rank_memory(plan, layout, 4096, microbatches=4)
        totals.append(mem.model_states)
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    # Megatron's 18 B/param unsharded; ZeRO-3 shards all 18 (its gathered layers are temporary)
    psi = count_params(plan).total
    assert totals[0] == 18 * psi
    # rank 0 keeps its ⌈ψ/8⌉-element shard of the flat buffers, at 18 B an element
    assert totals[3] == 18 * math.ceil(psi / 8)



def test_zero3_on_one_data_parallel_rank_gathers_nothing() -> None:
    """With dp·cp = 1 (and no expert replicas) ZeRO-3 shards nothing, so no layer is gathered:
    its memory is ZeRO-1's. Where the experts still have replicas, their gathers are priced."""
    plan = resolve(load_spec("llama-3-8b"))
    one = {z: rank_memory(plan, Layout(tp=8, pp=1, dp=1, zero=z, recompute="none", mb=1), 4096, microbatches=2)
           for z in (1, 3)}
    assert one[3].temporary == one[1].temporary and one[3].total == one[1].total
    moe = resolve(load_spec("mixtral-8x7b"))
    folded = rank_memory(moe, Layout(tp=4, pp=2, dp=1, ep=2, zero=3, recompute="full", mb=1), 4096, microbatches=2)
    assert folded.temporary > 0

def test_zero3_gathers_the_embedding_and_the_head_where_they_run() -> None:
    """Megatron-style ZeRO-3 holds the running unit and the prefetched next layer in bf16: two
    layers inside the stack, but the whole embedding at the lookup and the whole head at its GEMM
    (the larger of the two ends a rank holds; Gemma's tied head gathers the embedding again).
    Llama 3 8B: a layer 218,112,000 elements, the head and final norm 525,340,672; Gemma 2B: a
    layer 110,104,576, the tied embedding 524,288,000. A middle stage gathers two layers."""
    for preset, layer, end in (("llama-3-8b", 218_112_000, 525_340_672), ("gemma-2b", 110_104_576, 524_288_000)):
        plan = resolve(load_spec(preset))
        mem = rank_memory(plan, Layout(tp=1, pp=1, dp=8, zero=3, recompute="full", mb=1), 4096, microbatches=4)
        assert mem.temporary == 2 * (layer + end)
    plan = resolve(load_spec("llama-3-8b"))
    layout = Layout(tp=1, pp=4, dp=2, zero=3, recompute="full", mb=1)
    middle = rank_memory(plan, layout, 4096, microbatches=8, stage=1)
    assert middle.temporary == 2 * 2 * 218_112_000


def test_megatrons_memory_efficient_final_norm_keeps_no_input() -> None:
    """Under Megatron's fused kernels a memory-efficient norm keeps its output, which the next GEMM
    keeps anyway, not its input: the block norms and the final norm alike. The final norm's input
    (2·s·h bytes a sequence, 33,554,432 for Llama 3 8B at 4,096 tokens) is priced only where the
    kernels are eager or the engine is torch's, whose norm saves its input."""
    from archplan.planning.cluster import _head_tensors, model_data

    data = model_data(resolve(load_spec("llama-3-8b")), 4096)
    layout = Layout(tp=1, pp=1, dp=8, zero=0, recompute="none", mb=1)
    norm_input = 2 * 4096 * 4096
    assert data.final_norm_act == norm_input
    fused = _head_tensors(data, layout, "megatron", "flash")[0]
    for engine, kernel in (("megatron", "eager"), ("torch", "flash"), ("torch", "eager")):
        assert _head_tensors(data, layout, engine, kernel)[0] - fused == norm_input


TOP_CASES = [
    ("qwen3-30b-a3b", 64, {}),
    ("qwen3-30b-a3b", 64, {"settings": Settings(overlap=frozenset({"dp", "ep"}), precision="fp8")}),
    ("qwen3-30b-a3b", 64, {"settings": Settings(overlap=frozenset({"dp", "dualpipe"}), dispatcher="hierarchical")}),
    ("deepseek-v3", 512, {"settings": Settings(overlap=frozenset({"dp", "ep"}), precision="fp8", dispatcher="nccl")}),
    ("deepseek-v3", 512, {}),
    ("llama-3-8b", 16, {"settings": Settings(states=STATES["fsdp2"])}),
    ("mixtral-8x7b", 64, {"settings": Settings(states=STATES["deepspeed"], attention_kernel="eager")}),
    ("jamba-v0.1", 64, {"fixed": parse_layout("tp=2")}),
    # short sequences, where the layers' gradient reduction outlasts the compute (the floor's DP term)
    ("qwen3-30b-a3b", 64, {"seq": 256}),
    ("llama-3-8b", 64, {"seq": 256, "fixed": parse_layout("zero=0")}),
    ("llama-3-8b", 64, {"seq": 256, "settings": Settings(states=STATES["fsdp2"], overlap=frozenset())}),
]


@pytest.mark.parametrize(("name", "gpus", "kw"), TOP_CASES, ids=[f"{n}-{g}-{i}" for i, (n, g, _) in enumerate(TOP_CASES)])
def test_search_top_prices_only_what_can_rank(name: str, gpus: int, kw: dict[str, Any]) -> None:
    """`search(top=k)`, what `plan` runs: the k fastest layouts are exactly those of the search
    that prices every fitting layout, figure for figure, and as many layouts fit; it prices fewer.
    Every fitting layout's floor (`pricing.step_time_floor`) is at most its step time."""
    from archplan.planning.parallel import Evaluator
    from archplan.planning.pricing import step_time_floor

    every = _search(name, gpus, **kw)
    top = _search(name, gpus, top=3, **kw)
    assert [(e.layout, e.time, e.memory) for e in top.ranked[:3]] == [
        (e.layout, e.time, e.memory) for e in every.ranked[:3]]
    assert (top.fitting, top.considered) == (every.fitting, every.considered)
    assert 3 <= len(top.ranked) < len(every.ranked)
    settings = kw.get("settings", Settings())
    evaluator = Evaluator(resolve(load_spec(name)), H100, NET, kw.get("seq", 4096), settings, every.usable_bytes)
    for e in every.ranked:
        floor = step_time_floor(evaluator.pricer, e.layout, e.microbatches, settings.attention_kernel,
                                evaluator.network, settings.overlap, evaluator.states, settings.reduce_bytes)
        assert floor <= e.time.total * (1 + 1e-12)


def test_cli_top_shows_the_fastest_of_the_full_search(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`plan --top N` shows the N fastest layouts, those the search that prices every fitting
    layout ranks first; out of 1-100 it is a one-line error."""
    code, out, _ = run(capsys, monkeypatch, "plan", "qwen3-30b-a3b", "--gpus", "64", "--gpu", "h100",
                       "--seq", "4096", "--global-batch-tokens", "4e6", "--top", "8", "--json")
    assert code == 0
    shown = [e["layout"] for e in json.loads(out)["layouts"]]
    every = _search("qwen3-30b-a3b", 64)
    assert shown == [e.layout.spec for e in every.ranked[:8]]
    code, _, err = run(capsys, monkeypatch, "plan", "qwen3-30b-a3b", "--gpus", "64", "--top", "0")
    assert code == 2 and "--top must be between 1 and 100, got 0" in err
    with pytest.raises(ArchplanError, match="at least one layout"):
        _search("qwen3-30b-a3b", 64, top=0)


def test_fsdp2_search_runs_every_zero_stage() -> None:
    """Under --states fsdp2 the search ranks replicate (zero 0) and unsharded-gradient (zero 1)
    layouts beside the sharded ones, as verify --layout runs all four."""
    from archplan.planning.cluster import STATES

    result = _search("llama-3-8b", 8, settings=Settings(states=STATES["fsdp2"]))
    assert {e.layout.zero for e in result.ranked} == {0, 1, 2, 3}


@pytest.mark.parametrize(("grad_reduce", "per_param"), [(4, 6 + 10 * 3), (2, 6 * 3)])
def test_fsdp2_zero1_prices_its_gradient_accumulation(monkeypatch: pytest.MonkeyPatch, grad_reduce: int,
                                                     per_param: int) -> None:
    """Under --states fsdp2 at zero 1 over 4 micro-batches, FSDP2 accumulates every local gradient
    unsharded: reducing in fp32 a cast after the first backward and an add after each later one
    (6 + 3 × 10 B per parameter), in bf16 autograd's adds (3 × 6 B). The elementwise term carries
    exactly those bytes at the family's HBM rate; nothing at zero 2, which reduces every backward."""
    from archplan.planning import pricing
    from archplan.planning.cluster import STATES
    from archplan.planning.parallel import Evaluator

    plan = resolve(load_spec("llama-3-8b"))
    settings = Settings(states=STATES["fsdp2"], grad_reduce=grad_reduce)
    evaluator = Evaluator(plan, H100, NET, 4096, settings, 72 * 2**30)
    zero1 = Layout(tp=1, pp=1, dp=8, zero=1, recompute="full", mb=1)
    zero2 = Layout(tp=1, pp=1, dp=8, zero=2, recompute="full", mb=1)
    priced = {z: evaluator.evaluate(z, 4).time.elementwise for z in (zero1, zero2)}
    monkeypatch.setattr(pricing, "fsdp2_accumulation_bytes", lambda numel, grad_reduce, m: 0)
    unpriced = {z: evaluator.evaluate(z, 4).time.elementwise for z in (zero1, zero2)}
    rate = evaluator.pricer.rates.hbm
    assert priced[zero1] - unpriced[zero1] == pytest.approx(per_param * count_params(plan).total / rate, rel=1e-12)
    assert priced[zero2] == unpriced[zero2]


def test_torch_engine_pays_eager_bias_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager autograd sums each linear bias's output gradient in a pass of its own; the torch
    engine's backward carries those bytes at the HBM rate (`pricing.bias_grad_bytes`), the
    Megatron-style engines (Transformer Engine's fused bias gradient) none, nor fp8 runs (their
    block linears are TE's), nor a model without biases."""
    from archplan.planning import pricing
    from archplan.planning.cluster import STATES, model_data
    from archplan.planning.parallel import Evaluator

    layout = Layout(tp=2, pp=1, dp=4, zero=3, recompute="full", mb=2, sp=True)

    def elementwise(name: str, states: str, precision: str = "bf16") -> float:
        settings = Settings(states=STATES[states], precision=precision)  # type: ignore[arg-type]
        evaluator = Evaluator(resolve(load_spec(name)), H100, NET, 1024, settings, 72 * 2**30)
        return evaluator.evaluate(layout, 4).time.elementwise

    priced = {(n, s): elementwise(n, s) for n in ("gpt2", "llama-3-8b") for s in ("fsdp2", "megatron")}
    fp8 = elementwise("gpt2", "fsdp2", "fp8")
    bias_grad_bytes = pricing.bias_grad_bytes
    monkeypatch.setattr(pricing, "bias_grad_bytes", lambda data, i, layout: 0)
    unpriced = {key: elementwise(*key) for key in priced}
    plan = resolve(load_spec("gpt2"))
    data = model_data(plan, 1024)
    rate = Evaluator(plan, H100, NET, 1024, Settings(), 72 * 2**30).pricer.rates.hbm
    per_micro = sum(bias_grad_bytes(data, i, layout) for i in range(len(plan.layers)))
    # q, k, v and up are column-parallel (their tp share of every token); o and down are
    # row-parallel, their whole bias summed over every row of the gathered output gradient
    # (torch's RowwiseParallel adds it before the reduce-scatter)
    d, tokens = plan.d_model, 2 * 1024
    assert per_micro == len(plan.layers) * 2 * (tokens * (3 * d + 4 * d) // 2 + tokens * 2 * d)
    assert priced[("gpt2", "fsdp2")] - unpriced[("gpt2", "fsdp2")] == pytest.approx(4 * per_micro / rate, rel=1e-12)
    for key in (("gpt2", "megatron"), ("llama-3-8b", "fsdp2"), ("llama-3-8b", "megatron")):
        assert priced[key] == unpriced[key]
    assert fp8 == elementwise("gpt2", "fsdp2", "fp8")


def test_fused_qkv_concatenation_is_priced_under_eager_autograd(capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`--fused-qkv` adds the split's backward concatenation (`pricing.qkv_concat_bytes`) to the
    torch engine's elementwise time, once per micro-batch, and nothing under the
    Megatron-style states (Transformer Engine splits without a copy), where it is refused."""
    from archplan.planning.cluster import model_data
    from archplan.planning.parallel import Evaluator
    from archplan.planning.pricing import qkv_concat_bytes

    base = ("plan", "gpt2", "--gpus", "8", "--gpu", "h100", "--seq", "1024", "--global-batch-tokens", "64K",
            "--layout", "tp=2,pp=1,dp=4,cp=1,ep=1,zero=3,recompute=full,mb=2", "--json")
    found = {}
    for flag in ("--fused-qkv", "--separate-qkv"):
        code, out, _ = run(capsys, monkeypatch, *base, "--states", "fsdp2", flag)
        data = json.loads(out)
        assert code == 0 and data["fused_qkv"] == (flag == "--fused-qkv")
        found[flag] = data["layouts"][0]["step_time"]["elementwise"]
        microbatches = data["layouts"][0]["microbatches"]
    # it would change nothing under Megatron-style states: refused, as an option that changes nothing is
    code, _, err = run(capsys, monkeypatch, *base, "--states", "megatron", "--fused-qkv")
    assert code == 2 and "only --states fsdp2 runs; under --states megatron it would change nothing" in err
    plan = resolve(load_spec("gpt2"))
    layout = Layout(tp=2, pp=1, dp=4, zero=3, recompute="full", mb=2)
    per_micro = sum(qkv_concat_bytes(model_data(plan, 1024), i, layout) for i in range(len(plan.layers)))
    assert per_micro == len(plan.layers) * 2 * 2 * 2048 * 3 * plan.d_model // 2
    rate = Evaluator(plan, H100, NET, 1024, Settings(), 72 * 2**30).pricer.rates.hbm
    assert microbatches == 65536 // (4 * 2 * 1024)
    assert found["--fused-qkv"] - found["--separate-qkv"] == pytest.approx(microbatches * per_micro / rate, rel=1e-9)


def test_fsdp2_states_name_the_loss_fsdp2_stacks_run(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Megatron's fused loss is the default, which no FSDP2 stack runs: under --states fsdp2 the
    states line says which option prices torchtitan's loss and what its backward holds, and says
    nothing once a loss is chosen or under Megatron-style states."""
    base = ("plan", "llama-3-8b", "--gpus", "64", "--gpu", "h100", "--seq", "8192", "--global-batch-tokens", "4M")
    hint = "torchtitan and Hugging Face run --cross-entropy eager"
    for extra, shown in ((("--states", "fsdp2"), True), (("--states", "fsdp2", "--cross-entropy", "eager"), False),
                         ((), False)):
        monkeypatch.setenv("COLUMNS", "400")
        code, out, _ = run(capsys, monkeypatch, *base, *extra)
        assert code == 0 and (hint in " ".join(out.split())) == shown, extra


def test_fused_qkv_concatenation_reads_the_ranks_columns_with_fewer_kv_heads_than_tp() -> None:
    """The concatenated gradient is the rank's slice of the fused projection's output: its q heads,
    and K and V split by rows, which with fewer KV heads than tp ranks (Qwen3-30B-A3B's 4 at tp 8)
    is part of one head each: 4 q heads and 2 · 64 columns of K and V, not two whole heads."""
    from archplan.planning.cluster import model_data
    from archplan.planning.pricing import qkv_concat_bytes
    from archplan.planning.shards import layer_tensors

    plan = resolve(load_spec("qwen3-30b-a3b"))
    a = plan.layers[0].mixer
    assert (a.n_heads, a.n_kv_heads, a.head_dim) == (32, 4, 128)
    for tp in (1, 2, 4, 8):
        layout = Layout(tp=tp, pp=1, dp=1, zero=1, recompute="none", mb=2)
        columns = sum(t.local_shape(tp)[0] for t in layer_tensors(plan.layers[0], plan)
                      if t.name.split(".")[-2] in ("q_proj", "k_proj", "v_proj") and t.name.endswith("weight"))
        assert columns == (32 + 2 * 4) * 128 // tp
        assert qkv_concat_bytes(model_data(plan, 256), 0, layout) == 2 * 2 * (2 * 256) * columns


def test_a_rank_keeps_the_whole_kv_head_its_query_heads_read() -> None:
    """With fewer K/V heads than tp ranks each rank keeps one whole K and V head (and K's qk-norm
    input) as activations, not n_kv/tp of one: over tp the kept bytes fall by tp save that
    shortfall, 2·s·d_head·(2 + qk-norm)·(1 − n_kv/tp) per attention layer and sequence, under either
    engine and short of full recompute. Gemma 2B (MQA, d_head 256) and Qwen3-30B-A3B (4 K/V heads
    with a qk-norm) at tp 8."""
    from archplan.planning.cluster import _layer_act, model_data

    for preset, qk_norm in (("gemma-2b", 0), ("qwen3-30b-a3b", 1)):
        plan = resolve(load_spec(preset))
        a = plan.layers[0].mixer
        seq = 1024
        acts = model_data(plan, seq).acts[0]
        for engine in ("megatron", "torch"):
            for recompute in ("none", "selective"):
                for tp, sp in ((2, False), (8, False), (8, True)):
                    layout = Layout(tp=tp, pp=1, dp=1, zero=1, recompute=recompute, mb=1, sp=sp)
                    split = _layer_act(replace(acts, kv_heads=0), layout, recompute, "flash", engine)
                    head = 2 * seq * a.head_dim * (2 + qk_norm)
                    short = head * (1 - a.n_kv_heads / tp) if a.n_kv_heads < tp else 0
                    assert _layer_act(acts, layout, recompute, "flash", engine) == pytest.approx(split + short)
        full = Layout(tp=8, pp=1, dp=1, zero=1, recompute="full", mb=1)
        assert _layer_act(acts, full, "full", "flash", "megatron") == acts.block_input / 8  # SP


def test_eager_cross_entropy_bytes() -> None:
    """`F.cross_entropy` on bf16 logits cast to fp32 (torchtitan's loss), op by op in a real
    backward: the cast (2 + 4 B per logit), the log-softmax (4 + 4), the loss gradient's dense
    write (4: the forward's gather of the target logits and the scatter of their gradient touch one
    entry a row), the log-softmax backward (4 + 4 + 4) and the cast back (4 + 2): 36 B, what
    `pricing.CROSS_ENTROPY_BYTES["eager"]` charges."""
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    from archplan.planning.pricing import CROSS_ENTROPY_BYTES

    tokens, vocab = 64, 1000
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    aten = torch.ops.aten
    # the ops that stream the logits (or their gradient) whole; the nll loss reads one entry a row
    streaming = {aten._to_copy.default, aten._log_softmax.default, aten._log_softmax_backward_data.default}

    class Bytes(TorchDispatchMode):
        moved = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            res = func(*args, **(kwargs or {}))
            whole = [x for x in (*args, res) if isinstance(x, torch.Tensor) and x.numel() == tokens * vocab]
            if func in streaming:
                self.moved += sum(x.numel() * x.element_size() for x in whole)
            elif func is aten.nll_loss_backward.default:
                self.moved += res.numel() * res.element_size()
            return res

    with Bytes() as counted:
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
    assert counted.moved == CROSS_ENTROPY_BYTES["eager"] * tokens * vocab == 36 * tokens * vocab


def test_cross_entropy_option_reaches_the_model(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`--cross-entropy` prices the loss at its implementation's bytes per logit, on the head's
    tokens × vocabulary every micro-batch: eager (36 B) and bf16-fused (8 B) against the default
    fp32-fused (24 B)."""
    from archplan.planning.parallel import Evaluator
    from archplan.planning.pricing import CROSS_ENTROPY_BYTES

    args = ("plan", "gpt2", "--gpus", "8", "--gpu", "h100", "--seq", "1024", "--global-batch-tokens", "64K",
            "--layout", "tp=1,pp=1,dp=8,cp=1,ep=1,zero=3,recompute=full,mb=2", "--json")
    found = {}
    for impl in ("fp32-fused", "bf16-fused", "eager"):
        code, out, _ = run(capsys, monkeypatch, *args, "--cross-entropy", impl)
        data = json.loads(out)
        assert code == 0 and data["cross_entropy"] == impl
        found[impl] = data["layouts"][0]["step_time"]["elementwise"]
        microbatches = data["layouts"][0]["microbatches"]
    plan = resolve(load_spec("gpt2"))
    rate = Evaluator(plan, H100, NET, 1024, Settings(), 72 * 2**30).pricer.rates.hbm
    logits = 2 * 1024 * plan.vocab_size  # one micro-batch's tokens × the vocabulary (tp = 1)
    for impl in ("bf16-fused", "eager"):
        extra = (CROSS_ENTROPY_BYTES[impl] - CROSS_ENTROPY_BYTES["fp32-fused"]) * logits * microbatches / rate
        assert found[impl] - found["fp32-fused"] == pytest.approx(extra, rel=1e-9)


def test_cli_choices_are_the_models() -> None:
    """Each `plan` option's choices are exactly the values its model type accepts."""
    from typing import get_args

    from archplan.commands.plan import (
        CrossEntropyChoice,
        FlashImplChoice,
        FP8ScalingChoice,
        PrecisionChoice,
        RingNicsChoice,
    )
    from archplan.hardware import FlashImpl, RingNics
    from archplan.planning.pricing import CROSS_ENTROPY_BYTES, CrossEntropyImpl, FP8Scaling, Precision

    for choice, values in ((CrossEntropyChoice, get_args(CrossEntropyImpl)), (FlashImplChoice, get_args(FlashImpl)),
                           (PrecisionChoice, get_args(Precision)), (RingNicsChoice, get_args(RingNics)),
                           (FP8ScalingChoice, get_args(FP8Scaling))):
        assert [c.value for c in choice] == list(values)
    assert list(CROSS_ENTROPY_BYTES) == list(get_args(CrossEntropyImpl))


def test_cross_entropy_help_states_the_priced_bytes() -> None:
    """`--cross-entropy`'s help spells out the HBM bytes a logit moves and what the eager loss's
    backward holds: the figures of `pricing.CROSS_ENTROPY_BYTES` and `cluster.LOSS_BACKWARD_BYTES`."""
    import typer

    from archplan.cli import app
    from archplan.planning.cluster import LOSS_BACKWARD_BYTES
    from archplan.planning.pricing import CROSS_ENTROPY_BYTES

    plan = typer.main.get_command(app).commands["plan"]  # type: ignore[attr-defined]
    text = " ".join(next(p.help for p in plan.params if p.name == "cross_entropy").split())
    for impl, moved in CROSS_ENTROPY_BYTES.items():
        assert re.search(rf"{impl} \([^)]*: {moved}[);]", text), impl
    whole, split = LOSS_BACKWARD_BYTES["eager"]
    assert f"{whole} B a logit, {split} B under torch's loss_parallel" in text


def test_moe_layouts_use_expert_parallelism() -> None:
    result = _search("mixtral-8x7b", 64)
    assert result.feasible
    with_ep = [e for e in result.ranked if e.layout.ep > 1]
    assert with_ep and all(e.time.ep > 0 for e in with_ep)
    assert all(e.time.ep == 0 for e in result.ranked if e.layout.ep == 1)


def test_interconnect_overrides() -> None:
    net = interconnect(H100, intra_gbs=100, gpus_per_node=4)
    assert (net.intra_node, net.inter_node, net.gpus_per_node) == (100e9, NET.inter_node, 4)
    assert net.source == "user-given; nodes of 4 GPUs (--gpus-per-node)"
    assert interconnect(H100, gpus_per_node=8).source == NET.source  # the node size it already has
    with pytest.raises(ArchplanError, match="--ib-gbs must be a number of GB/s of at least 0.1, got -1"):
        interconnect(H100, inter_gbs=-1)
    # a slower fabric never makes the best layout faster
    slow = search(resolve(load_spec("llama-2-7b")), H100, 16, seq=4096, global_batch_tokens=4e6,
                  net=interconnect(H100, intra_gbs=50, inter_gbs=5))
    fast = _search("llama-2-7b", 16)

    def per_token(e: Any) -> float:
        return e.time.total / e.global_batch_tokens

    assert per_token(slow.ranked[0]) >= per_token(fast.ranked[0])


@pytest.mark.parametrize(("kwargs", "said"), [
    ({"settings": Settings(efficiency=0.0)}, "--efficiency must be in [0.01, 1], got 0.0"),
    ({"headroom": 1.0}, "--headroom must be in [0, 1), got 1.0"),
    ({"global_batch_tokens": 2047}, "--global-batch-tokens 2,047 is under half a sequence of 4,096 tokens"),
])
def test_search_rejects_bad_input(kwargs: dict[str, Any], said: str) -> None:
    args = {"seq": 4096, "global_batch_tokens": 4e6, "net": NET} | kwargs
    with pytest.raises(ArchplanError, match=re.escape(said)):
        search(resolve(load_spec("llama-2-7b")), H100, 8, **args)


def test_a_sequence_past_max_seq_len_is_priced_with_a_note_where_positions_go_on(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """As `size` does: a rotary model past its max_seq_len (a long-context stage) is priced as
    asked and says RoPE was not trained there, in the text and first in --json's notes; a
    learned position table has no row past max_seq_len, so that is refused; at or below the
    length, and for a model with no positions (Mamba), there is no note."""
    argv = ["plan", "llama-2-7b", "--gpus", "8", "--seq", "16384", "--global-batch-tokens", "1M"]
    code, out, _ = run(capsys, monkeypatch, *argv)
    assert code == 0 and "RoPE was not trained there" in " ".join(out.split())
    code, out, _ = run(capsys, monkeypatch, *argv, "--json")
    found = json.loads(out)
    assert code == 0 and found["seq"] == 16384 and found["layouts"]
    assert found["notes"][0].startswith("seq 16,384 is past llama-2-7b's max_seq_len (4,096)")
    for quiet in (["llama-2-7b", "--seq", "4096"], ["mamba-2.8b", "--seq", "65536"]):
        code, out, _ = run(capsys, monkeypatch, "plan", quiet[0], "--gpus", "8", *quiet[1:],
                           "--global-batch-tokens", "1M", "--json")
        assert code == 0 and not any("max_seq_len" in note for note in json.loads(out)["notes"])
    with pytest.raises(ArchplanError, match=r"learned position table of gpt2 \(max_seq_len 1,024\)"):
        search(resolve(load_spec("gpt2")), H100, 8, seq=2048, global_batch_tokens=1e6, net=NET)


# -------------------------------------------------------------------------------------- CLI
def test_cli_choices_match_the_library() -> None:
    assert [c.value for c in FamilyChoice] == [f.value for f in Family]
    assert [c.value for c in LawOption] == [c.value for c in LawChoice]


def test_cli_budget_json_contract(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "plan", "--compute", "1e22", "--law", "chinchilla",
                       "--json")
    assert code == 0
    r = json.loads(out)
    assert r["compute"] == 1e22 and r["law"] == "chinchilla"
    assert r["optimal"]["params"] == pytest.approx(5.1605e9, rel=1e-4)
    assert r["optimal"]["tokens"] == pytest.approx(3.2297e11, rel=1e-4)
    assert r["optimal"]["loss"] > 1.69
    spec = Spec.model_validate(r["spec"])
    assert count_params(resolve(spec)).total == pytest.approx(r["optimal"]["params"], rel=0.02)
    assert spec.training is not None and spec.training.tokens == round(r["optimal"]["tokens"])
    assert r["no_spec"] is None


def test_cli_a_budget_no_recipe_meets_prints_its_allocation_and_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """At 1e16 FLOPs N_opt is 7.6 M, below a 128K vocabulary's embeddings: the allocation is the
    answer and still prints; no spec is made or written, and the exit code says so (1, not 2)."""
    target = tmp_path / "tiny.yaml"
    code, out, err = run(capsys, monkeypatch, "plan", "--compute", "1e16", "--json", "-o", str(target))
    r = json.loads(out)
    assert code == 1 and err == "" and not target.exists()
    assert r["optimal"]["params"] == pytest.approx(7.6e6, rel=0.01) and len(r["isoflop"]) == 5
    assert r["spec"] is None and r["design"] is None and r["written"] is None
    assert r["no_spec"].startswith("no dense recipe spec within 2% of 7.6e+06 total parameters at vocab 128256")
    code, out, _ = run(capsys, monkeypatch, "plan", "--compute", "1e16")
    assert code == 1 and "N_opt 7.60 M" in out and "no spec: no dense recipe spec" in out
    code, _, _ = run(capsys, monkeypatch, "plan", "--compute", "1e16", "--vocab", "256")
    assert code == 0


def test_cli_writes_a_spec_that_lints(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "moe.yaml"
    code, out, _ = run(capsys, monkeypatch, "plan", "--params", "2e9", "--family", "moe",
                       "--law", "20x", "-o", str(target))
    assert code == 0 and "written to" in out
    spec = load_spec(str(target))
    assert spec.moe is not None and spec.training is not None
    assert count_params(resolve(spec)).active == pytest.approx(2e9, rel=0.02)
    code, out, err = run(capsys, monkeypatch, "lint", str(target))
    assert code == 0, out + err
    # an existing file is kept without --force (exit 2, one line), replaced with it
    code, _, err = run(capsys, monkeypatch, "plan", "--params", "1e9", "-o", str(target))
    assert code == 2 and "--force" in err and err.count("\n") == 1
    assert load_spec(str(target)) == spec
    code, _, _ = run(capsys, monkeypatch, "plan", "--params", "1e9", "-o", str(target), "--force")
    assert code == 0 and load_spec(str(target)).moe is None


@pytest.mark.parametrize(("budget", "family"), [("1e23", "dense"), ("1e28", "dense"), ("1e24", "moe")])
def test_cli_specs_written_at_the_default_laws_optimum_lint_clean(
        budget: str, family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Besiroglu et al.'s optimum is 19.2 tokens/param at 1e23 and 14.4 at 1e28: lint's AP013 no
    longer warns that the spec `plan` wrote is "1.0× below the compute-optimal ~20"."""
    target = tmp_path / "spec.yaml"
    code, _, _ = run(capsys, monkeypatch, "plan", "--compute", budget, "--family", family, "-o", str(target))
    assert code == 0
    code, out, err = run(capsys, monkeypatch, "lint", "--strict", str(target))
    assert code == 0 and "AP013" not in out, out + err


def test_cli_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    figure = tmp_path / "iso.svg"
    code, _, _ = run(capsys, monkeypatch, "plan", "--compute", "1e21", "--plot", str(figure))
    assert code == 0 and figure.read_text().lstrip().startswith("<?xml")


def test_cli_plot_without_matplotlib(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    code, _, err = run(capsys, monkeypatch, "plan", "--compute", "1e21", "--plot",
                       str(tmp_path / "x.png"))
    assert code == 2 and "matplotlib" in err and err.count("\n") == 1


@pytest.mark.parametrize("figure", ["bad.txt", "taken.png", "nodir/x.png", "matplotlib-missing.png"])
def test_a_refused_plot_writes_no_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch, figure: str) -> None:
    """Every place `plan` writes is checked before it writes any: the -o spec was written and the
    --plot refused after it, so a rerun with a good --plot was refused for the spec it had left."""
    (tmp_path / "taken.png").write_bytes(b"mine")
    if figure == "matplotlib-missing.png":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    spec = tmp_path / "m.yaml"
    code, _, err = run(capsys, monkeypatch, "plan", "--compute", "1e22", "-o", str(spec),
                       "--plot", str(tmp_path / figure))
    assert code == 2 and err.count("\n") == 1 and not spec.exists()
    assert (tmp_path / "taken.png").read_bytes() == b"mine"


def test_cli_solve_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = _partial(tmp_path, "mixtral-8x7b", lambda d: d["moe"]["expert"].update(d_ff="solve"))
    out_file = tmp_path / "solved.yaml"
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(path), "--total", "46702792704",
                       "--active", "12.879925248B", "--tol", "0", "-o", str(out_file), "--json")
    assert code == 0
    r = json.loads(out)
    assert r["solved"] and r["candidates"][0]["values"] == {"moe.expert.d_ff": 14336}
    assert load_spec(str(out_file)).moe.expert.d_ff == 14336  # type: ignore[union-attr]
    # the header names the targets, so the file says how to solve it again
    assert out_file.read_text().splitlines()[0].startswith("# yaml-language-server: $schema=")
    assert out_file.read_text().splitlines()[1] == (
        f"# solved by archplan plan --solve {path} --total 46702792704 --active 12.879925248B --tol 0 "
        "--multiple 1: moe.expert.d_ff = 14336")
    other = tmp_path / "none.yaml"
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(path), "--total", "46702792705",
                       "--active", "12879925248", "--tol", "0", "-o", str(other))
    assert code == 1 and "no integer solution" in out and not other.exists()
    # targets below what the fixed sizes hold: the nearest is the least width, and the note says why
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(path), "--total", "1e9", "--active", "5e8",
                       "--json")
    r = json.loads(out)
    assert code == 1 and r["candidates"][0]["values"] == {"moe.expert.d_ff": 1}
    assert r["note"].startswith("at their least (moe.expert.d_ff = 1) the widths leave 1,608,781,824 total "
                                "parameters, above the --total 1,000,000,000 asked and 1,606,422,528 active")
    # the table reads a miss of a thousand-fold as a ratio, not a ten-digit percentage
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(path), "--total", "1e6", "--active", "5e5")
    assert code == 1 and "(×1.61e+03)" in out and "%)" not in out
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(path), "--total", "46702792705",
                       "--active", "12879925248", "--tol", "0", "--json")
    assert code == 1 and json.loads(out)["note"] is None
    # a token's parameters are some of the model's: refused before any solve
    code, _, err = run(capsys, monkeypatch, "plan", "--solve", str(path), "--total", "1e9", "--active", "12.9e9")
    assert code == 2 and "--active 12,900,000,000 exceeds --total 1,000,000,000" in err


def test_cli_layout(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-2-7b", "--gpus", "8", "--gpu", "h100",
                       "--seq", "4096", "--global-batch-tokens", "2M", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["feasible"] and 1 <= len(r["layouts"]) <= 5
    best = r["layouts"][0]
    assert set(best["memory"]) == {"stage", "parameters", "gradients", "optimizer", "activations",
                                   "temporary", "collective_buffers", "total", "usable", "fits"}
    assert best["memory"]["total"] <= r["usable_bytes_per_gpu"]
    assert best["training_days"] > 0 and 0 < best["mfu"] < 1
    assert best["tokens_per_s_per_gpu"] == pytest.approx(
        best["global_batch_tokens"] / best["step_time"]["total"] / 8)
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3.1-405b", "--gpus", "8")
    assert code == 1 and "infeasible" in out


def test_cli_layout_table_fits_the_terminal(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A narrow terminal hides the memory categories and the bar, never the total, step time, MFU
    or throughput, and says what it hid; a wide one shows every column."""
    argv = ("plan", "llama-3.1-405b", "--gpus", "16384", "--gpu", "h100", "--seq", "8192",
            "--global-batch-tokens", "16M")
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, monkeypatch, *argv)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    assert all(word in out for word in ("total", "MFU", "per GPU", "time", " d\n", "TP8 PP16×v4 DP128"))
    assert "hidden at 80 columns: temp., optim., grads, params, activ., of usable" in out
    assert "bars:" not in out  # no bar, no legend
    monkeypatch.setenv("COLUMNS", "240")
    code, out, _ = run(capsys, monkeypatch, *argv)
    assert code == 0 and "hidden at" not in out and "bars:" in out
    assert "TP8 PP16×v4 DP128 ZeRO-1 none mb1 SP" in out  # a label on one line
    assert all(word in out for word in ("params", "grads", "optim.", "activ.", "temp.", "usable"))
    # too narrow even for the columns that stay: each layout's figures stack under its label
    monkeypatch.setenv("COLUMNS", "50")
    code, out, _ = run(capsys, monkeypatch, *argv)
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 50
    table = out[out.index("layout, then its figures"):out.index("hidden at 50 columns")]
    assert all(word in table for word in ("TP8 PP16×v4 DP128", "total", "MFU", "tok/s per GPU", "time", "step (s)"))


@pytest.mark.parametrize("option", ["--compute", "--params", "--tokens"])
def test_an_overflowing_budget_is_named_out_of_range(option: str, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """1e400 reads as infinity: out of plan's range, not "must be a positive number"."""
    code, _, err = run(capsys, monkeypatch, "plan", option, "1e400")
    assert code == 2 and err == (f"archplan: error: {option} implies a budget far above 1e+30 FLOPs; plan works "
                                 "between 1e+15 and 1e+30 FLOPs\n")


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--tokens", "1", "far below 1e+15 FLOPs"), ("--params", "1e20", "far above 1e+30 FLOPs"),
    ("--params", "1e5", "of 2.14e+12 FLOPs")])
def test_a_budget_past_the_searched_range_is_not_named_by_its_end(option: str, value: str, said: str,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The inversion searches a bracket around plan's range; a size whose budget lies past it was
    printed as the bracket's end (2.06e+06 FLOPs for one token), a figure no law gives."""
    code, _, err = run(capsys, monkeypatch, "plan", option, value)
    assert code == 2 and f"{option} implies a budget {said}; plan works" in err


@pytest.mark.parametrize("argv", [
    ["plan"],
    ["plan", "--compute", "1e24", "--params", "7e9"],
    ["plan", "--compute", "lots"],
    ["plan", "llama-2-7b"],
    ["plan", "llama-2-7b", "--gpus", "8", "--gpu", "tpu-v9"],
    ["plan", "--compute", "1e24", "--total", "1e9"],
    ["plan", "--solve", "missing.yaml", "--total", "1e9"],
    ["plan", "--solve", "missing.yaml", "--total", "1e9", "--compute", "1e24"],
    ["plan", "llama-2-7b", "--gpus", "8", "--params", "7e9"],
    ["plan", "gpt2", "--gpus", "8", "--seq", "100000"],
    # a partial layout that cannot exist: tp beyond a node, given degrees not dividing the GPUs
    ["plan", "llama-2-7b", "--gpus", "32", "--layout", "tp=16"],
    ["plan", "llama-2-7b", "--gpus", "32", "--layout", "tp=8,pp=3"],
    # an option the mode does not read is refused, not ignored
    ["plan", "--compute", "1e22", "--states", "fsdp2"],
    ["plan", "llama-2-7b", "--gpus", "8", "--family", "moe"],
    ["plan", "--solve", "missing.yaml", "--total", "1e9", "--headroom", "0.2"],
])
def test_cli_bad_input_is_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, monkeypatch, *argv)
    assert code == 2 and err.startswith("archplan: error:") and err.count("\n") == 1


def test_plan_does_not_import_torch() -> None:
    probe = (
        "import sys\nfrom archplan.cli import main\n"
        "sys.argv = ['archplan', 'plan', '--compute', '1e21', '--family', 'hybrid', '--json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert math.isfinite(json.loads(proc.stdout)["optimal"]["loss"])


# ------------------------------------------------------------------ every preset, every mixer
PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_plans_on_64_h100(name: str, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`plan PRESET --gpus 64 --gpu h100` for every mixer family (long convolutions included):
    ranked layouts whose step-time terms are finite and non-negative, or the reason none fits."""
    code, out, err = run(capsys, monkeypatch, "plan", name, "--gpus", "64", "--gpu", "h100", "--json")
    assert code in (0, 1), err
    r = json.loads(out)
    assert r["feasible"] == (code == 0)
    if not r["feasible"]:
        assert r["reasons"] and "does not fit" in r["reasons"][0]
        return
    for layout in r["layouts"]:
        times = layout["step_time"]
        assert all(math.isfinite(v) and v >= 0 for v in times.values())
        assert times["total"] > 0 and 0 < layout["mfu"] < 1
        assert layout["memory"]["total"] <= r["usable_bytes_per_gpu"]


def test_stripedhyena_fixed_layout_is_evaluated(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A given layout of the StripedHyena hybrid (attention + long-conv layers), CP included."""
    given = "tp=4,cp=2,pp=2,vpp=1,dp=4,ep=1,zero=1,recompute=none,mb=1,sp=on"
    code, out, err = run(capsys, monkeypatch, "plan", "stripedhyena-7b", "--gpus", "64", "--gpu", "h100",
                         "--seq", "32768", "--layout", given, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert len(r["layouts"]) == 1 and r["considered"] == 1
    best = r["layouts"][0]
    assert best["layout"] == given
    assert best["step_time"]["tp"] > 0 and best["step_time"]["cp"] > 0 and best["step_time"]["bubble"] > 0


def _tiny(name: str, **update: Any) -> ModelPlan:
    data = spec_data(load_spec(DISTRIBUTED / f"{name}.yaml"))
    for key, value in update.items():
        data[key] = data[key] | value if isinstance(value, dict) else value
    return resolve(Spec.model_validate(data))


def test_tp_refuses_what_the_torch_engine_cannot_split_and_only_that() -> None:
    """`plan` priced tensor-parallel layouts `verify --layout` refuses (`distributed.plans.refusal`),
    with no tp reduction for the filters or copies several ranks held, and refused layouts it runs:
    routed experts are whole on every tp rank, so their width need not divide tp."""
    one_filter = _tiny("tiny-stripedhyena", long_conv={"filter_groups": 64})
    assert tp_problem(one_filter, 2) == "1 modal filter does not split 2 ways"
    assert tp_problem(_tiny("tiny-stripedhyena"), 4) is None  # 16 filters
    copies = _tiny("tiny-s4d", long_conv={"n_ssm": 2})
    assert tp_problem(copies, 4) == "2 S4 SSM copies do not split 4 ways"
    assert tp_problem(copies, 2) is None and tp_problem(_tiny("tiny-s4d"), 4) is None  # one copy: replicated
    full = _tiny("tiny-qk-norm")  # 2 KV heads, a full-scope qk-norm
    assert tp_problem(full, 4) == "a full k-norm over 2 KV heads does not split 4 ways"
    assert tp_problem(full, 2) is None
    per_head = _tiny("tiny-qk-norm", attention={"qk_norm": {"scope": "per_head", "norm": {"kind": "rmsnorm"}}})
    assert tp_problem(per_head, 4) == "a per_head k-norm over 2 KV heads does not split 4 ways"
    moe = _tiny("tiny-moe", moe={"expert": {"kind": "glu", "d_ff": 56}}, d_model=96,
                attention={"n_heads": 6, "n_kv_heads": 3})
    assert tp_problem(moe, 3) is None
    tied_bias = _tiny("tiny-gpt", embedding={"tied": True, "lm_head_bias": True})
    assert tp_problem(tied_bias, 2) == "a tied head with a bias does not split 2 ways"
    assert tp_problem(tied_bias, 1) is None


def test_long_conv_tp_and_cp_must_split_the_channels() -> None:
    odd = resolve(load_spec("s4d-lm").model_copy(update={"d_model": 772}))
    assert tp_problem(odd, 4) is None
    assert tp_problem(odd, 8) == "d_model 772 does not split 8 ways"
    with pytest.raises(ArchplanError, match="tp=8: d_model 772"):
        search(odd, H100, 64, seq=2048, global_batch_tokens=1e6, net=NET,
               fixed=parse_layout("tp=8,cp=1,pp=1,dp=8,ep=1,zero=1,recompute=none,mb=1"))
    # under CP the channels split over tp·cp (the sequence <-> channel all-to-all)
    assert cp_problem(odd, 4, 1) is None and cp_problem(odd, 2, 2) is None
    assert cp_problem(odd, 4, 2) == "long convolutions split d_model 772 over tp·cp = 8 channel shards"
    with pytest.raises(ArchplanError, match="cp=2: long convolutions"):
        search(odd, H100, 64, seq=2048, global_batch_tokens=1e6, net=NET,
               fixed=parse_layout("tp=4,cp=2,pp=1,dp=8,ep=1,zero=1,recompute=none,mb=1"))
    assert cp_problem(resolve(load_spec("llama-3-8b")), 8, 16) is None  # attention needs no channel split


def test_mamba_context_parallelism_follows_megatron_rules() -> None:
    """Mamba layers split over tp·cp as Megatron-Core's MambaContextParallel: Mamba-1's d_inner
    channels, Mamba-2's heads, and a tp rank's groups split over cp or dividing it."""
    mamba = resolve(load_spec("mamba-2.8b"))  # d_inner 5120
    assert cp_problem(mamba, 1, 2) is None and cp_problem(mamba, 4, 8) is None
    assert cp_problem(mamba, 1, 3) == "Mamba d_inner 5120 does not split over tp·cp = 3 channel shards"
    with pytest.raises(ArchplanError, match="cp=3: Mamba d_inner 5120"):
        search(mamba, H100, 96, seq=1536, global_batch_tokens=1e6, net=NET,
               fixed=parse_layout("tp=1,cp=3,pp=1,dp=32,ep=1,zero=1,recompute=none,mb=1"))

    def mamba2(d_model: int, groups: int) -> ModelPlan:  # head_dim 32, expand 2: d_model / 16 heads
        ssm = {"kind": "mamba2", "d_state": 16, "expand": 2, "head_dim": 32, "n_groups": groups}
        data = spec_data(load_spec(DISTRIBUTED / "tiny-mamba2.yaml")) | {"d_model": d_model, "ssm": ssm}
        return resolve(Spec.model_validate(data))

    four = mamba2(64, 2)  # 4 heads in 2 groups
    assert cp_problem(four, 1, 2) is None  # a group per cp rank
    assert cp_problem(four, 1, 4) is None and cp_problem(four, 2, 2) is None  # each group on 2 ranks
    assert cp_problem(four, 1, 8) == ("4 Mamba-2 heads / 2 groups over tp·cp = 8: heads split over tp·cp, "
                                      "a tp rank's groups split over cp or divide it (Megatron-Core)")
    assert cp_problem(mamba2(192, 3), 1, 2) is not None  # 12 heads split, 3 groups neither split nor divide 2


def test_mamba_exchange_bytes() -> None:
    """Per token, the channels each Mamba all-to-all sends (`cluster.mamba_exchange`)."""
    from archplan.planning.cluster import mamba_exchange, step_collectives

    layer = resolve(load_spec(DISTRIBUTED / "tiny-mamba2.yaml")).layers[0]  # I 128, 4 heads, 2 groups, N 16
    assert mamba_exchange(layer, 1, 2, "torch") == (2 * 128 + 2 * 2 * 16 + 4, 128)
    # tp = 2: one group per tp rank, repeated for its 2 cp ranks; the gate goes back with y (torch)
    assert mamba_exchange(layer, 2, 2, "torch") == (2 * 64 + 2 * 1 * 2 * 16 + 2, 2 * 64)
    assert mamba_exchange(layer, 2, 2, "megatron") == (2 * 64 + 2 * 1 * 2 * 16 + 2, 64)
    jamba = resolve(load_spec(DISTRIBUTED / "tiny-mamba.yaml"))  # Mamba-1 (I 128, dt_rank 8, N 8) + GQA
    assert mamba_exchange(jamba.layers[0], 2, 4, "torch") == (128, 64)
    assert mamba_exchange(jamba.layers[1], 2, 4, "torch") == ()
    # x_proj's dt_rank + 2N partial sums for the whole sequence (32 tokens, bf16), over tp then cp:
    # forward, recompute, backward (tests/test_distributed.py measures the same on the fake PG)
    layout = parse_layout("tp=2,cp=2,pp=1,dp=1,ep=1,zero=3,recompute=full,mb=1").complete()
    calls = {(c.kind, c.mesh_dim, c.bytes): c.count for c in step_collectives(jamba, layout, 32, microbatches=1)
             if c.what.endswith("Mamba x_proj partial sums (CP)") or "Mamba sequence" in c.what}
    assert calls == {("all_reduce", "cp", 2 * 32 * 24): 3, ("all_to_all", "cp", 2 * 16 * 128): 3,
                     ("all_to_all", "cp", 2 * 16 * 64): 3}


def test_cli_layout_of_a_spec_below_the_laws_range_asks_for_tokens(capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny spec has no compute-optimal token budget: the error names the spec and --tokens, not
    the --params the user never gave; with --tokens its short run prints in seconds, not 0.0 days,
    and the fixed fields in --layout's own syntax."""
    tiny = str(DISTRIBUTED / "tiny-gpt.yaml")
    code, out, err = run(capsys, monkeypatch, "plan", tiny, "--gpus", "8", "--gpu", "h100")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "no token budget for tiny-gpt" in err and "--tokens" in err and "--params" not in err
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, monkeypatch, "plan", tiny, "--gpus", "8", "--gpu", "h100", "--tokens", "1e8",
                       "--layout", "sp=on")
    assert code == 0 and "fixed: sp=on" in out and "ep=1" not in out and "{" not in out
    assert re.search(r"│ +\d+\.\d s$", out, re.M) and "0.0 d" not in out


def test_plan_refuses_two_schedules_for_one_all_to_all(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`ep` (Megatron-Core's EP overlap) and `dualpipe` price the same MoE all-to-all two ways."""
    code, _, err = run(capsys, monkeypatch, "plan", "qwen3-30b-a3b", "--gpus", "16", "--gpu", "h100",
                       "--overlap", "dp,ep,dualpipe")
    assert code == 2 and "ep and dualpipe" in err and "Traceback" not in err


def test_an_moe_layout_priced_under_the_h100_host_floor_says_so(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Megatron-Core MoE runs on H100 priced under 9.4 ms a layer pass measured 9.4-9.7 ms without
    CUDA graphs (docs/validation.md): Qwen3-30B-A3B over 16 H100 at EP16 (HybridEP) is priced under it and says
    by how much it would be slower; its figures do not move. Qwen3-235B-A22B at EP32 (priced above
    it), a dense model and B200 (no such runs) say nothing."""
    from archplan.commands.plan import MOE_HOST_FLOOR_S

    base = ["--seq", "4096", "--global-batch-tokens", "4194304", "--json"]
    moe = ["plan", "qwen3-30b-a3b", "--gpus", "16", "--gpu", "h100", "--dispatcher", "hierarchical",
           "--layout", "tp=1,pp=1,cp=1,dp=16,ep=16,zero=1,mb=1,recompute=none", *base]
    code, out, _ = run(capsys, monkeypatch, *moe)
    found = json.loads(out)
    notes = [note for note in found["notes"] if "a layer pass" in note]
    layout = found["layouts"][0]
    per_pass = layout["step_time"]["total"] / (48 * layout["microbatches"])
    assert code == 0 and len(notes) == 1 and per_pass < MOE_HOST_FLOOR_S
    assert f"priced at {per_pass * 1e3:.1f} ms a layer pass" in notes[0]
    assert f"this layout {MOE_HOST_FLOOR_S / per_pass - 1:.0%} slower; not priced" in notes[0]
    quiet = [["qwen3-235b-a22b", "--gpus", "256", "--gpu", "h100", "--dispatcher", "hierarchical",
              "--layout", "tp=2,pp=8,vpp=4,cp=1,dp=16,ep=32,zero=1,mb=1,recompute=none,sp=on"],
             ["llama-3-8b", "--gpus", "16", "--gpu", "h100"],
             ["qwen3-30b-a3b", "--gpus", "8", "--gpu", "b200"]]
    for argv in quiet:
        code, out, _ = run(capsys, monkeypatch, "plan", *argv, "--seq", "4096", "--global-batch-tokens",
                           "8388608", "--json")
        assert code == 0 and not any("a layer pass" in note for note in json.loads(out)["notes"])


def test_fewer_kv_heads_than_tp_says_what_the_figures_assume(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3-235B's 4 KV heads over tp=8 under the megatron engine: the note names the gather
    (priced) and the gathered output (not priced); at tp=4, or under --states fsdp2 (whose engine
    frees it), there is none."""
    base = ["qwen3-235b-a22b", "--gpus", "256", "--gpu", "h100", "--seq", "4096", "--global-batch-tokens", "8388608",
            "--json"]
    layout = "cp=1,pp=8,vpp=4,ep=8,zero=1,mb=1,recompute=none,sp=on"

    def notes(*argv: str) -> list[str]:
        code, out, _ = run(capsys, monkeypatch, "plan", *base, *argv)
        assert code == 0
        return [note for note in json.loads(out)["notes"] if "KV head" in note]

    found = notes("--layout", f"tp=8,dp=4,{layout}")
    assert len(found) == 1 and "runs 4 KV heads over tp=8" in found[0] and "(priced)" in found[0]
    assert notes("--layout", f"tp=4,dp=8,{layout}") == []
    assert notes("--layout", f"tp=8,dp=4,{layout}", "--states", "fsdp2") == []


def test_fp8_params_keeps_the_gemm_weights_in_fp8_where_megatron_core_can(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`--fp8-params` (Megatron-Core's FP8 primary weights): on B200 the parameters take a byte per
    GEMM weight, on H100 two (the transpose Transformer Engine keeps there) though they are gathered
    in one; the output says so; without --precision fp8, or under --states fsdp2, a one-line error."""
    base = ["plan", "llama-3-70b", "--gpus", "64", "--seq", "8192", "--global-batch-tokens", "2M",
            "--layout", "tp=4,pp=2,cp=1,dp=8,zero=1,recompute=full,mb=1", "--precision", "fp8", "--json"]

    def parameters(gpu: str, *extra: str) -> tuple[float, str]:
        code, out, _ = run(capsys, monkeypatch, *base, "--gpu", gpu, *extra)
        found = json.loads(out)
        assert code == 0 and found["fp8_params"] == ("--fp8-params" in extra)
        return found["layouts"][0]["memory"]["parameters"], found["states"]["description"]

    b200, _ = parameters("b200")
    b200_fp8, said = parameters("b200", "--fp8-params")
    assert 0.5 < b200_fp8 / b200 < 0.55 and said.endswith("GEMM weights in fp8 (1 B)")
    h100, _ = parameters("h100")
    h100_fp8, said = parameters("h100", "--fp8-params")
    assert h100_fp8 == h100 and said.endswith("GEMM weights in fp8 (1 B + its 1 B transpose)")
    for argv, why in ((["--precision", "bf16"], "needs --precision fp8"),
                      (["--states", "fsdp2"], "--states megatron")):
        code, _, err = run(capsys, monkeypatch, *base, "--gpu", "h100", "--fp8-params", *argv)
        assert code == 2 and why in err and "Traceback" not in err


def test_recompute_modules_mla_up_proj_drops_q_k_v_and_reruns_the_up_projections(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`--recompute-modules mla_up_proj` (Megatron-Core's `recompute_modules=["mla_up_proj"]`): each
    MLA layer keeps its latents but not Q, K and V, heads·(2·qk + v) 16-bit values a token, split
    over tp as the heads are; the backward re-runs q_b and kv_b, their forward GEMM time once more;
    under full recompute it changes nothing; with no MLA layer, under --states fsdp2 or with an
    unknown module, a one-line error."""
    from archplan.planning.cluster import model_data
    from archplan.planning.layout import Layout
    from archplan.planning.parallel import Evaluator, Settings, interconnect
    from archplan.planning.pricing import is_up_projection

    plan = resolve(load_spec("deepseek-v3"))
    data = model_data(plan, 4096)
    mla = plan.layers[5].mixer
    up = frozenset({"mla_up_proj"})
    for layout in (Layout(tp=1, dp=8), Layout(tp=2, dp=4, sp=True), Layout(tp=4, dp=2, sp=False)):
        plain = data.layer_acts(layout, "none", "flash", "megatron")
        dropped = data.layer_acts(layout, "none", "flash", "megatron", up)
        qkv = 2 * 4096 * mla.n_heads * (2 * mla.qk_head_dim + mla.v_head_dim) / layout.tp
        assert [a - b for a, b in zip(plain, dropped)] == pytest.approx([qkv] * len(plain))
        assert data.layer_acts(layout, "full", "flash", "megatron", up) == data.layer_acts(
            layout, "full", "flash", "megatron")
    gpu = accelerator("b200")
    layout = Layout(tp=1, pp=16, dp=16, ep=8, mb=1)
    evaluators = [Evaluator(plan, gpu, interconnect(gpu), 4096, Settings(recompute_modules=mods), 1 << 40)
                  for mods in (frozenset(), up)]
    plain, rerun = (e.pricer.layers(layout, "flash")[5] for e in evaluators)
    assert plain.recompute == 0.0
    up_gemms = [name for name in (t.name for t in data.layer_tensors[5]) if is_up_projection(name)]
    assert up_gemms == ["layers.5.mixer.q_b_proj.weight", "layers.5.mixer.kv_b_proj.weight"]
    assert 0 < rerun.recompute < 0.1 * rerun.forward
    base = ["plan", "deepseek-v3", "--gpus", "256", "--gpu", "b200", "--seq", "4096", "--global-batch-tokens", "16M",
            "--layout", "tp=1,pp=16,cp=1,dp=16,ep=8,zero=1,recompute=none,mb=1", "--json"]
    code, out, _ = run(capsys, monkeypatch, *base)
    before = json.loads(out)
    code, out, _ = run(capsys, monkeypatch, *base, "--recompute-modules", "mla_up_proj")
    after = json.loads(out)
    assert code == 0 and after["recompute_modules"] == ["mla_up_proj"] and before["recompute_modules"] == []
    assert after["layouts"][0]["memory"]["activations"] < before["layouts"][0]["memory"]["activations"]
    assert after["layouts"][0]["step_time"]["recompute"] > before["layouts"][0]["step_time"]["recompute"]
    for argv, why in ((["plan", "llama-3-8b", "--gpus", "8", "--recompute-modules", "mla_up_proj"], "no MLA layer"),
                      ([*base, "--states", "fsdp2", "--recompute-modules", "mla_up_proj"], "Megatron-style"),
                      ([*base, "--recompute-modules", "moe"], "unknown moe")):
        code, _, err = run(capsys, monkeypatch, *argv)
        assert code == 2 and why in err and "Traceback" not in err


def test_recompute_modules_mla_up_proj_re_runs_nothing_in_other_attention() -> None:
    """A standard attention layer's query projection shares MLA's q_proj name (no query latent):
    the module recompute re-runs only MLA layers' projections, so a GQA layer's time is unchanged."""
    from archplan.planning.layout import Layout
    from archplan.planning.parallel import Evaluator, Settings, interconnect
    from archplan.planning.pricing import _layer_micro

    plan = resolve(load_spec("llama-3-8b"))
    gpu = accelerator("h100")
    evaluator = Evaluator(plan, gpu, interconnect(gpu), 4096, Settings(), 1 << 40)
    layout = Layout(tp=1, dp=8)
    plain = _layer_micro(evaluator.data, 1, layout, evaluator.pricer.rates, "flash", "none", False)
    rerun = _layer_micro(evaluator.data, 1, layout, evaluator.pricer.rates, "flash", "none", False,
                         modules=frozenset({"mla_up_proj"}))
    assert plain.recompute == rerun.recompute == 0.0


def test_the_footer_names_each_batch_the_layouts_shown_run(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layout rounds --global-batch-tokens to its own whole micro-batches: at 4.5M the footer
    printed layout 1's 4,194,304 "as run", beside layouts running 4,718,592, and not the 4,500,000
    asked."""
    argv = ("plan", "llama-3-8b", "--gpus", "64", "--global-batch-tokens", "4.5M")
    code, out, _ = run(capsys, monkeypatch, *argv, "--json")
    batches = sorted({layout["global_batch_tokens"] for layout in json.loads(out)["layouts"]})
    assert code == 0 and len(batches) > 1
    code, out, _ = run(capsys, monkeypatch, *argv)
    footer = " ".join(out[out.index("training on"):].split())
    assert f"(the layouts shown run {batches[0]:,} to {batches[-1]:,}), for the 4,500,000 asked" in footer, footer
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "64", "--global-batch-tokens", "4Mi")
    footer = " ".join(out[out.index("training on"):].split())
    assert "4,194,304 tokens per step as run; MFU" in footer, footer


def test_the_footer_says_a_batch_nobody_gave_is_the_default(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --global-batch-tokens the footer said "for the 4,000,000 asked", where nobody asked:
    a 16,384-GPU search ranked for that default leaves its pipelines unfilled, and the user should
    see where the figure came from. Its MFU line names the --seq `size` must be given to count the
    same FLOPs (`size` defaults to 4,096 tokens, `plan` to 8,192)."""
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3.1-405b", "--gpus", "16384", "--gpu", "h100")
    footer = " ".join(out[out.index("training on"):].split())
    assert "for the default 4,000,000 (--global-batch-tokens)" in footer and " asked" not in footer, footer
    assert "`size --seq 8192 --attention causal` counts the same" in footer, footer


def test_plans_attention_kernel_takes_sizes_name(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`--attention` is the FLOP convention in size and compare and was the kernel in plan, which
    refused size's `--attention-kernel`. plan takes that name now and its old one too."""
    argv = ("plan", "llama-3-8b", "--gpus", "8", "--json")
    kernels = {json.loads(run(capsys, monkeypatch, *argv, option, "eager")[1])["attention_kernel"]
               for option in ("--attention-kernel", "--attention")}
    assert kernels == {"eager"}


def test_size_names_the_law_choices_plan_takes(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """size's caption sent the user to "--law", whose choices in size (hoffmann2022, besiroglu2024)
    plan refuses: it names plan's own."""
    code, out, _ = run(capsys, monkeypatch, "size", "llama-3-8b")
    named = re.search(r"plan's --law (\S+) sets the fit", " ".join(out.split()))
    assert code == 0 and named is not None and named.group(1).split("|") == [c.value for c in LawOption]


def test_plan_json_names_its_flop_conventions(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout search's `model_flops_per_token` and `mfu`, and the budget's `compute`, came with
    no convention in --json, where the text output states it beside them."""
    code, out, _ = run(capsys, monkeypatch, "plan", "llama-3-8b", "--gpus", "64", "--gpu", "h100", "--json")
    layouts = json.loads(out)
    assert code == 0 and "attention causal" in layouts["flops_convention"]
    assert "no recompute" in layouts["flops_convention"] and "bf16 peak" in layouts["flops_convention"]
    for family, counted in (("dense", "every parameter"), ("moe", "the active parameters")):
        code, out, _ = run(capsys, monkeypatch, "plan", "--compute", "1e22", "--family", family, "--json")
        assert json.loads(out)["compute_convention"] == f"C = 6·N·D; N counts {counted}, embeddings included" + (
            ": the dense law at N_active" if family == "moe" else "")


def test_solve_json_keys_are_all_in_the_docs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Any) -> None:
    """docs/plan.md lists the solve mode's `--json` keys, as it lists the budget's and the layout
    search's (docs/json.md points there, "one list per mode"; the solve's was missing)."""
    partial = tmp_path / "partial.yaml"
    partial.write_text((PRESETS_DIR / "llama-3-8b.yaml").read_text().replace("d_ff: 14336", "d_ff: solve"))
    code, out, _ = run(capsys, monkeypatch, "plan", "--solve", str(partial), "--total", "8030261248", "--json")
    printed = json.loads(out)
    docs = (Path(__file__).parents[1] / "docs" / "plan.md").read_text()
    start = docs.index('`--json` prints `mode` ("solve")')
    paragraph = docs[start:docs.index("\n\n", start)]
    named = {name for quoted in re.findall(r"`([^`]+)`", paragraph) for name in re.findall(r"[a-z_0-9]+", quoted)}
    assert code == 0 and set(printed) - named == set()
    assert set(printed["candidates"][0]) - named == set()


@pytest.mark.parametrize("args", [("--compute", "1e22", "--force"), ("--solve", "PARTIAL", "--total", "8e9", "--force")])
def test_force_with_nothing_to_write_is_refused_in_every_mode(args: tuple[str, ...], capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The layout search refused --force without --plot; the budget and the solve ignored it."""
    partial = tmp_path / "partial.yaml"
    partial.write_text((PRESETS_DIR / "llama-3-8b.yaml").read_text().replace("d_ff: 14336", "d_ff: solve"))
    code, _, err = run(capsys, monkeypatch, "plan", *(str(partial) if a == "PARTIAL" else a for a in args))
    assert code == 2 and "without either nothing is written" in err


def test_a_target_past_the_specs_limits_names_the_target_not_the_file(tmp_path: Any) -> None:
    """--total 1e18 asks for a d_ff past the spec's bound: the error blamed the partial file's
    line, which says `d_ff: solve`. The width is tried at the spec's cap (where a target may still
    be met within --tol), and the note says the cap is what falls short."""
    partial = tmp_path / "partial.yaml"
    partial.write_text((PRESETS_DIR / "llama-3-8b.yaml").read_text().replace("d_ff: 14336", "d_ff: solve"))
    result = solve(partial, Targets(total=1e18, active=None))
    assert not result.solved and result.nearest.values == {"ffn.d_ff": 1 << 24}
    assert result.floor_note is not None and result.floor_note.startswith(
        "at the spec's most (ffn.d_ff = 16,777,216) the widths reach only ")


@pytest.mark.parametrize(("args", "message"), [
    (("deepseek-v3", "--gpus", "256", "--recompute-modules", "mla_up_proj", "--layout", "recompute=full"),
     "and the given --layout has recompute=full"),
    (("llama-3-8b", "--gpus", "64", "--layout", ""), "--layout: no fields given"),
    # as tp and pp are: nothing crosses ranks at ep=1 (they ran, and changed nothing)
    (("mixtral-8x7b", "--gpus", "64", "--overlap", "dp,ep", "--layout", "ep=1"),
     "--overlap ep hides the experts' all-to-all behind compute, and the given --layout has ep=1"),
    (("mixtral-8x7b", "--gpus", "64", "--dispatcher", "hierarchical", "--layout", "ep=1"),
     "the given --layout has ep=1, which sends none: drop --dispatcher"),
])
def test_options_a_given_layout_makes_moot_are_refused(args: tuple[str, ...], message: str,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ran as if not given: module recompute under full recompute, and an empty --layout."""
    code, _, err = run(capsys, monkeypatch, "plan", *args)
    assert code == 2 and message in err
