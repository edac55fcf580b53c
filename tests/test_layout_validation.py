"""Published training runs at their published layouts (tests/fixtures/published_runs.yaml): the
visible rows stay within their tolerance (issue 10: median |error| ≤ 10%, each row ≤ 20% unless the
fixture says why), every published layout that ran fits, and the published out-of-memory cases do
not. The table itself is benchmarks/published_runs.py's, written up in docs/validation.md."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOLERANCE = 0.20
MEDIAN_GOAL = 0.10


def _benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("published_runs", ROOT / "benchmarks" / "published_runs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["published_runs"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows() -> list[tuple[dict[str, Any], Any]]:
    bench = _benchmark()
    runs = bench.load()["runs"]
    found = bench.rows(with_search=False)
    assert [r.name for r in found] == [run["name"] for run in runs]
    return list(zip(runs, found))


def test_visible_rows_within_tolerance(rows: list[tuple[dict[str, Any], Any]]) -> None:
    visible = [(run, row) for run, row in rows if not row.holdout and row.error is not None]
    assert len(visible) >= 15
    for run, row in visible:
        assert abs(row.error) <= run.get("tolerance", DEFAULT_TOLERANCE), (row.name, row.error)
    assert statistics.median(abs(row.error) for _, row in visible) <= MEDIAN_GOAL


def test_published_layouts_fit_and_published_ooms_do_not(rows: list[tuple[dict[str, Any], Any]]) -> None:
    for _, row in rows:
        assert row.fits == row.expected_fit, row.name
    assert sum(not row.expected_fit for _, row in rows) >= 3


def test_holdouts_are_marked_and_converted(rows: list[tuple[dict[str, Any], Any]]) -> None:
    holdouts = [row for _, row in rows if row.holdout]
    names = " ".join(row.name for row in holdouts)
    assert "BLOOM" in names and "OPT" in names and "Narayanan T2" in names
    assert all(row.published and row.published > 0 for row in holdouts)


def test_published_figures_use_the_sources_conventions() -> None:
    """Narayanan's 137 TF/s for the 1.7B model is 3.53 s/iter (its Table 1 arithmetic); Llama 3's
    41% BF16 MFU of 989 TF/s with 6N + 12·L·H·Q·T."""
    bench = _benchmark()
    data = bench.load()
    by_name = {run["name"]: run for run in data["runs"]}
    run = by_name["Narayanan T1 1.7B"]
    plan = bench.plan_for(run["model"], data["models"], data["gpt_sizes"])
    tokens = bench.published_tokens(run, plan)
    assert 512 * 2048 / (tokens * 32) == pytest.approx(3.53, abs=0.01)
    llama = by_name["Llama 3 405B 8K, 16,384 GPUs"]
    plan = bench.plan_for(llama["model"], data["models"], data["gpt_sizes"])
    assert bench.published_tokens(llama, plan) == pytest.approx(400e12 / (6 * 405.85e9 + 12 * 126 * 128 * 128 * 8192), rel=1e-3)
