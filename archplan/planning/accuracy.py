"""How close the layout model came on published training runs it was not calibrated on: the
figures `plan` prints beside its step times, so a user can size a margin. docs/validation.md
("How accurate `plan` is") lists the runs and the misses; tests/test_mosaicml_benchmarks.py
recomputes these figures from both benchmark sets, so they cannot drift from the model.

The held-out runs: tests/fixtures/published_runs.yaml's held-out rows (other frameworks, GPU
generations and sequence lengths than the calibration runs) and every row of MosaicML's benchmark
tables (tests/fixtures/mosaicml_benchmarks.yaml), each run counted once."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from archplan.units import percent


@dataclass(frozen=True)
class HeldOutAccuracy:
    """|predicted / published − 1| of tokens/s per GPU over the held-out runs."""

    runs: int
    median: float
    p90: float  # nine runs in ten are within it
    bias: float  # the median signed error: > 0 where the model is optimistic

    def text(self) -> str:
        leaning = "optimistic" if self.bias > 0 else "pessimistic"
        return (f"accuracy: on {self.runs} published runs held out from calibration, tokens/s per GPU "
                f"within ±{percent(self.median)} of the measured for half, ±{percent(self.p90)} for nine "
                f"in ten (median error {self.bias:+.1%}, {leaning}; docs/validation.md)")

    def as_dict(self) -> dict[str, float | int]:
        return {"held_out_runs": self.runs, "median_abs_error": self.median,
                "p90_abs_error": self.p90, "median_error": self.bias}


def summarize(errors: Sequence[float]) -> HeldOutAccuracy:
    """The accuracy figures of signed errors (predicted / published − 1), rounded as stored."""
    magnitudes = [abs(e) for e in errors]
    p90 = statistics.quantiles(magnitudes, n=10, method="inclusive")[-1]
    return HeldOutAccuracy(len(errors), round(statistics.median(magnitudes), 3), round(p90, 3),
                           round(statistics.median(errors), 3))


# benchmarks/mosaicml_benchmarks.py's `held_out_errors()` on the model as it stands (2026-12-01)
HELD_OUT = HeldOutAccuracy(runs=259, median=0.066, p90=0.203, bias=0.041)
