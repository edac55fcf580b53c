"""The blind checks (tests/fixtures/blind_checks.yaml, benchmarks/blind_checks.py): every run
evaluates at its published layout, docs/validation.md holds the script's tables as the model now
prices them (a model change that moves a row fails here until the doc is regenerated), and the
figures that do not depend on the GPU's unknown peak hold: the ratios between runs of one source."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
from benchmark_scripts import ROOT, load_benchmark

pytestmark = pytest.mark.xdist_group("test_blind_checks")


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_benchmark("blind_checks")


@pytest.fixture(scope="module")
def rows(bench: Any) -> list[Any]:
    return bench.rows()


def _row(rows: list[Any], name_start: str, recompute: str = "full") -> Any:
    found = [r for r in rows if r.name.startswith(name_start) and r.recompute == recompute]
    assert len(found) == 1, name_start
    return found[0]


def test_every_run_at_every_bracketing_mode(bench: Any, rows: list[Any]) -> None:
    runs = bench.load()["runs"]
    assert len(rows) == sum(len(run["recompute"]) for run in runs) == 40
    assert {r.source for r in rows} == set(bench.load()["sources"])


def test_docs_hold_the_tables_as_now_priced(bench: Any, rows: list[Any]) -> None:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench.markdown(rows)
    lines = [line for line in printed.getvalue().splitlines() if line]
    # an empty printout would leave nothing missing: each source's table holds a row for each of
    # its fixture runs at each of the run's recompute modes, in the fixture's order
    fixture = bench.load()
    expected = [[f"| {run['name']}", recompute] for source in fixture["sources"]
                for run in fixture["runs"] if run["source"] == source for recompute in run["recompute"]]
    printed_rows = [line for line in lines if line.startswith("| ") and not line.startswith("| run |")]
    assert expected and [row.split(" | ")[:2] for row in printed_rows] == expected
    doc = (ROOT / "docs" / "validation.md").read_text(encoding="utf-8")
    missing = [line for line in lines if line not in doc]
    assert not missing, "regenerate with `python benchmarks/blind_checks.py --markdown`"


def test_a_bracketed_run_lies_between_its_ends(rows: list[Any]) -> None:
    """Trainy's H200 runs (torchtitan's per-operator checkpointing) measured between archplan's
    full recompute and its selective one, on both cluster sizes."""
    for name in ("8B, FSDP 32", "8B, FSDP 64"):
        low, high = _row(rows, name, "full"), _row(rows, name, "selective")
        assert low.predicted < low.published < high.predicted


def test_the_interleaved_schedule_gains_what_torchtitan_measured(rows: list[Any]) -> None:
    """Llama 3.1 405B on 512 H100, PP8 with 8 micro-batches: interleaving two stages per rank runs
    128/100 = 1.28× the tokens of 1F1B (Table 5); the bubble (p − 1)/(v·m) priced gives the same
    within 2%, whatever the GPU's peak."""
    plain = _row(rows, "405B, FSDP 8 TP 8 PP 8, 1F1B")
    looped = _row(rows, "405B, FSDP 8 TP 8 PP 8, interleaved")
    measured = looped.published / plain.published
    assert looped.predicted / plain.predicted == pytest.approx(measured, rel=0.02)
