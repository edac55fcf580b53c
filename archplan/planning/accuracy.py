"""How close the layout model came on published training runs it was not calibrated on, per GPU
family: the figures `plan` prints beside its step times, so a user can size a margin.
docs/validation.md ("How accurate `plan` is") lists the runs and the misses;
tests/test_mosaicml_benchmarks.py recomputes these figures from both benchmark sets, so they
cannot drift from the model.

The held-out runs: tests/fixtures/published_runs.yaml's held-out rows (other frameworks, GPU
generations and sequence lengths than the calibration runs) and every row of MosaicML's benchmark
tables (tests/fixtures/mosaicml_benchmarks.yaml), each run counted once. They are grouped by the
kernel-efficiency family their GPU is priced with (`hardware.FAMILY_OF`), as a family's constants
are what the figures judge; GPUs outside every family fall under `UNCALIBRATED`."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from archplan.hardware import FAMILY_OF, Accelerator
from archplan.units import percent

UNCALIBRATED = "uncalibrated"


def family(gpu: Accelerator) -> str:
    """The key of `HELD_OUT` whose runs judge the constants `gpu` is priced with."""
    return FAMILY_OF.get(gpu.key, UNCALIBRATED)


def label(gpu: Accelerator) -> str:
    """How `HeldOutAccuracy.gpus` names a GPU: its key's model, h100-sxm -> H100."""
    return gpu.key.split("-")[0].upper()


def own_runs(gpu: Accelerator) -> bool:
    """Whether the held-out runs of `gpu`'s family judge its own constants: a family's GPUs share
    theirs (H200 is priced as H100); outside every family only a GPU that some uncalibrated run
    used is judged by them, the others (another vendor's, say) merely get the nearest check."""
    return family(gpu) != UNCALIBRATED or label(gpu) in HELD_OUT[UNCALIBRATED].gpus.split("/")


@dataclass(frozen=True)
class HeldOutAccuracy:
    """|predicted / published − 1| of tokens/s per GPU over one family's held-out runs."""

    runs: int
    median: float
    p90: float  # nine runs in ten are within it
    bias: float  # the median signed error: > 0 where the model is optimistic
    low: float  # the 5th and 95th percentiles of the signed error: nine runs in ten between them
    high: float
    gpus: str  # the GPUs those runs used, for the sentence

    def text(self) -> str:
        leaning = "optimistic" if self.bias > 0 else "pessimistic" if self.bias < 0 else "no lean"
        return (f"accuracy: on {self.runs} published {self.gpus} runs held out from calibration, tokens/s "
                f"per GPU within ±{percent(self.median)} of the measured for half, ±{percent(self.p90)} "
                f"for nine in ten (median error {self.bias:+.1%}, {leaning}; docs/validation.md)")

    def as_dict(self) -> dict[str, float | int | str]:
        return {"held_out_runs": self.runs, "gpus": self.gpus, "median_abs_error": self.median,
                "p90_abs_error": self.p90, "median_error": self.bias, "p05_error": self.low,
                "p95_error": self.high}

    def time_range(self) -> tuple[float, float]:
        """The factors on a predicted duration between which nine held-out runs in ten fell: an
        error e is predicted / published − 1 of tokens/s, so the time the run measured was the
        predicted time × (1 + e)."""
        return 1 + self.low, 1 + self.high


def summarize(errors: Sequence[float], gpus: str) -> HeldOutAccuracy:
    """The accuracy figures of signed errors (predicted / published − 1), rounded as stored."""
    magnitudes = [abs(e) for e in errors]
    p90 = statistics.quantiles(magnitudes, n=10, method="inclusive")[-1]
    ventiles = statistics.quantiles(errors, n=20, method="inclusive")
    return HeldOutAccuracy(len(errors), round(statistics.median(magnitudes), 3), round(p90, 3),
                           round(statistics.median(errors), 3), round(ventiles[0], 3),
                           round(ventiles[-1], 3), gpus)


# benchmarks/mosaicml_benchmarks.py's `accuracy()` on the model as it stands (2026-12-01)
HELD_OUT: dict[str, HeldOutAccuracy] = {
    "ampere": HeldOutAccuracy(runs=155, median=0.051, p90=0.134, bias=0.006, low=-0.131, high=0.134,
                              gpus="A100"),
    "hopper": HeldOutAccuracy(runs=98, median=0.079, p90=0.216, bias=0.057, low=-0.175, high=0.216,
                              gpus="H100/H800"),
    UNCALIBRATED: HeldOutAccuracy(runs=6, median=0.021, p90=0.078, bias=0.019, low=-0.008, high=0.1,
                                  gpus="B200"),
}
