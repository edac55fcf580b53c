"""Blind checks: published runs that archplan models only in part (tests/fixtures/blind_checks.yaml),
each evaluated at its published layout as a user would, at every recompute mode that brackets it.
Not held-out rows: no figure here enters `plan`'s accuracy statement or any constant.

    python benchmarks/blind_checks.py             # table
    python benchmarks/blind_checks.py --markdown  # the tables of docs/validation.md, "Blind checks"
    python benchmarks/blind_checks.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import published_runs  # noqa: E402

FIXTURE = published_runs.ROOT / "tests" / "fixtures" / "blind_checks.yaml"
# what every torchtitan-era run shares (the fixture's header says why)
DEFAULTS = {"kernel": "flash", "states": "fsdp2", "overlap": ["dp"], "cross_entropy": "eager"}


@dataclass(frozen=True)
class Row:
    source: str
    name: str
    recompute: str
    layout: str  # as evaluated
    published: float
    predicted: float
    published_gib: float | None  # None where the source prints no memory figure
    predicted_gib: float
    not_modelled: str

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1


def load() -> dict[str, Any]:
    return yaml.safe_load(FIXTURE.read_text(encoding="utf-8"))


def rows() -> list[Row]:
    found = []
    for run in load()["runs"]:
        for recompute in run["recompute"]:
            data = DEFAULTS | run | {"layout": f"{run['layout']},recompute={recompute}"}
            result = published_runs.evaluate_run(data, {}, {}, with_search=False)
            found.append(Row(run["source"], run["name"], recompute, result.layout,
                             float(run["published_tokens_per_s_per_gpu"]), result.predicted,
                             run["published_gib"], result.memory_gib, run["not_modelled"]))
    return found


def _gib(gib: float | None) -> str:
    return "—" if gib is None else f"{gib:.1f}"


def markdown(found: list[Row]) -> None:
    sources = load()["sources"]
    for key, source in sources.items():
        print(f"**{source['title']}** ({source['where']}; {source['hardware']}).\n")
        print("| run | recompute | layout evaluated | published | predicted | error | GiB published / "
              "predicted | not modelled |")
        print("|---|---|---|---|---|---|---|---|")
        for r in found:
            if r.source == key:
                print(f"| {r.name} | {r.recompute} | {r.layout} | {r.published:,.0f} | {r.predicted:,.0f} | "
                      f"{r.error:+.1%} | {_gib(r.published_gib)} / {r.predicted_gib:.1f} | {r.not_modelled} |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="the tables of docs/validation.md")
    args = parser.parse_args()
    found = rows()
    if args.markdown:
        markdown(found)
    elif args.json:
        print(json.dumps([asdict(r) | {"error": r.error} for r in found], indent=2))
    else:
        head = ("source", "run", "recompute", "published tok/s/GPU", "predicted", "error",
                "GiB published / predicted")
        table = [head, *((r.source, r.name, r.recompute, f"{r.published:,.0f}", f"{r.predicted:,.0f}",
                          f"{r.error:+.1%}", f"{_gib(r.published_gib)} / {r.predicted_gib:.1f}") for r in found)]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:  # text left, figures right, each column as wide as its widest cell
            print("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
