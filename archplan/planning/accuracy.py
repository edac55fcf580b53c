"""How close the layout model came on published training runs it was not calibrated on, per GPU
family: the figures `plan` prints beside its step times, so a user can size a margin.
docs/validation.md ("How accurate `plan` is") lists the runs and the misses;
tests/test_mosaicml_benchmarks.py recomputes these figures from both benchmark sets, so they
cannot drift from the model.

The held-out runs: tests/fixtures/published_runs.yaml's held-out rows (other frameworks, GPU
generations and sequence lengths than the calibration runs) and every row of MosaicML's benchmark
tables (tests/fixtures/mosaicml_benchmarks.yaml), each run counted once. They are grouped by the
kernel-efficiency family their GPU is priced with (`hardware.FAMILY_OF`), as a family's constants
are what the figures judge; GPUs outside every family fall under `UNCALIBRATED`.

Within a family the runs differ by stack, and so does the model's error: on Hopper the runs on
Megatron-style engines (NeMo, Megatron-Bridge) lean −1.2% with half within ±5.1%, the PyTorch FSDP
runs (Composer's) +2.2% with half within ±3.6%: opposite ways (docs/validation.md). So `plan` quotes the runs
of the engine its `--states` runs on (`StatesConvention.engine`, `HELD_OUT_BY_ENGINE`) where a family
has at least `MIN_ENGINE_RUNS` of them, and the family's figures otherwise.

Models that route tokens to experts are judged apart (`HELD_OUT_MOE`): the model's pricing of
fine-grained MoE misses by far more than its pricing of dense models (Megatron-Bridge's Qwen3-30B-A3B
runs measured up to 3.0× slower than priced in the releases NVIDIA filed as a 2× regression, and
Qwen3-235B-A22B's up to 2.1× at the NCCL all-to-all on B300, 1.8× elsewhere; docs/validation.md,
"The Qwen3 MoE rows" and "The archive's newer containers"), and their misses would otherwise widen
every dense plan's statement. The family and engine figures are over the dense runs; the MoE
figures over every MoE run, whatever its GPU or engine (too few to split)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from archplan.hardware import FAMILY_OF, Accelerator, accelerator
from archplan.planning.cluster import Engine
from archplan.spec import Spec
from archplan.units import percent

UNCALIBRATED = "uncalibrated"
# fewer runs than this say too little about a spread's 5th and 95th percentiles to stand in for the
# family's figures
MIN_ENGINE_RUNS = 10
# how the sentence names the runs of each engine
ENGINE_RUNS: dict[Engine, str] = {"megatron": "Megatron-style", "torch": "PyTorch FSDP"}


def family(gpu: Accelerator) -> str:
    """The key of `HELD_OUT` whose runs judge the constants `gpu` is priced with."""
    return FAMILY_OF.get(gpu.key, UNCALIBRATED)


def label(gpu: Accelerator) -> str:
    """How `HeldOutAccuracy.gpus` names a GPU: its key's model, h100-sxm -> H100; a PCIe card
    apart from the SXM modules of its model (lower clocks and power, no NVSwitch), a100-pcie-80gb
    -> A100 PCIe."""
    model = gpu.key.split("-")[0].upper()
    return f"{model} PCIe" if "-pcie" in gpu.key else model


# how the accuracy line names the mixers no held-out run had
MIXER_NAMES = {"mamba1": "Mamba", "mamba2": "Mamba-2", "s4": "S4", "s4d": "S4D", "hyena": "Hyena",
               "stripedhyena": "StripedHyena"}


def unjudged_mixers(spec: Spec) -> str | None:
    """The mixers of `spec` that no held-out run had ("Mamba-2", "S4D", ...), or None. Every
    held-out run is of a model whose mixers are all attention (the dense and MoE transformers of
    both fixtures), so their errors say nothing of how the SSM or long-convolution pricing fares."""
    kinds = [MIXER_NAMES[mixer.kind] for mixer in (spec.ssm, spec.long_conv) if mixer is not None]
    return " and ".join(kinds) or None


def model_in_runs(gpu: Accelerator, accuracy: HeldOutAccuracy) -> bool:
    """Whether some of the runs behind `accuracy` ran on `gpu`'s own model (H200's are H100 runs:
    its family's, not its own)."""
    return label(gpu) in accuracy.gpus.split("/")


def own_runs(gpu: Accelerator, accuracy: HeldOutAccuracy) -> bool:
    """Whether the runs behind `accuracy` judge `gpu`'s own constants: some of them ran on a GPU of
    its family (H200 is priced as H100); outside every family only on that very GPU. Otherwise
    (another vendor's GPU, say) they are merely the nearest check."""
    if family(gpu) == UNCALIBRATED:
        return model_in_runs(gpu, accuracy)
    # the labels back to keys: "A100 PCIe" is a100-pcie
    return any(family(accelerator(name.lower().replace(" ", "-"))) == family(gpu)
               for name in accuracy.gpus.split("/"))


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
    engine: Engine | None = None  # the runs of one engine only (None: all of the family's)
    moe: bool = False  # the runs of models that route tokens to experts (else of dense models)

    def described(self, kind: str) -> str:
        """The runs, for a sentence: "96 published H100 runs", "19 held-out H100 runs on Megatron-style
        stacks", "13 held-out B200/H100/H800 runs of MoE models" (`kind` "published" or "held-out")."""
        return (f"{self.runs} {kind} {self.gpus} runs" + (" of MoE models" if self.moe else "")
                + (f" on {ENGINE_RUNS[self.engine]} stacks" if self.engine else ""))

    def text(self, none_on: str | None = None) -> str:
        """The sentence; `none_on`: a GPU of the runs' family that none of them ran on, named."""
        leaning = "optimistic" if self.bias > 0 else "pessimistic" if self.bias < 0 else "no lean"
        runs = self.described("published") + (f" (none on the {none_on})" if none_on else "")
        return (f"accuracy: on {runs} held out from calibration, tokens/s "
                f"per GPU within ±{percent(self.median)} of the measured for half, ±{percent(self.p90)} "
                f"for nine in ten (median error {self.bias:+.1%}, {leaning}; docs/validation.md)")

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {"held_out_runs": self.runs, "gpus": self.gpus, "engine": self.engine, "moe_models": self.moe,
                "median_abs_error": self.median, "p90_abs_error": self.p90, "median_error": self.bias,
                "p05_error": self.low, "p95_error": self.high}

    def time_range(self) -> tuple[float, float]:
        """The factors on a predicted duration between which nine held-out runs in ten fell: an
        error e is predicted / published − 1 of tokens/s, so the time the run measured was the
        predicted time × (1 + e)."""
        return 1 + self.low, 1 + self.high


def summarize(errors: Sequence[float], gpus: str, engine: Engine | None = None,
              moe: bool = False) -> HeldOutAccuracy:
    """The accuracy figures of signed errors (predicted / published − 1), rounded as stored."""
    magnitudes = [abs(e) for e in errors]
    p90 = statistics.quantiles(magnitudes, n=10, method="inclusive")[-1]
    ventiles = statistics.quantiles(errors, n=20, method="inclusive")
    return HeldOutAccuracy(len(errors), round(statistics.median(magnitudes), 3), round(p90, 3),
                           round(statistics.median(errors), 3), round(ventiles[0], 3),
                           round(ventiles[-1], 3), gpus, engine, moe)


def for_plan(gpu: Accelerator, engine: Engine, moe: bool) -> HeldOutAccuracy:
    """The figures `plan` quotes for a layout on `gpu` under states that run on `engine`: for a
    model with routed experts the MoE runs'; else the family's dense runs of that engine where it
    has enough of them, else the family's dense runs."""
    if moe:
        return HELD_OUT_MOE
    return HELD_OUT_BY_ENGINE.get((family(gpu), engine), HELD_OUT[family(gpu)])


# benchmarks/mosaicml_benchmarks.py's `accuracy()` on the model as it stands (2026-12-06: the pipeline's
# receives run with its sends, and Hopper's GEMM efficiency refitted, 0.62 → 0.59; 2026-12-07: NeMo's
# own tables of 24.03.01 on H100, 25.02 on B200 and 25.04 on GB200 held out): the dense models' runs
# per family
HELD_OUT: dict[str, HeldOutAccuracy] = {
    "ampere": HeldOutAccuracy(runs=155, median=0.05, p90=0.155, bias=-0.022, low=-0.135, high=0.171,
                              gpus="A100"),
    "hopper": HeldOutAccuracy(runs=110, median=0.041, p90=0.115, bias=0.008, low=-0.078, high=0.132,
                              gpus="H100"),
    UNCALIBRATED: HeldOutAccuracy(runs=42, median=0.065, p90=0.195, bias=0.033, low=-0.141, high=0.213,
                                  gpus="B200/GB200/GB300"),
}
# the same, of the MoE models' runs (DeepSeek-V3 and Qwen3 on H800, H100, B200, B300, GB200 and GB300),
# 2026-12-06: the pipeline split counts the embedding and the head as a layer each where the layers
# do not divide the chunks, the ranks standing for the others are told apart by their layers, the
# DeepSeek-V3 rows of Megatron-Bridge 25.09 and 26.02 are priced with the MTP layer they ran, 25.11's
# B200 row is added, the pipeline's receives run with its sends and Hopper's GEMM efficiency is
# refitted; 2026-12-07: NeMo's Mixtral 8x7B on 64 B200 (25.02) and 64 GB200 (25.04) held out, and
# the routed copies' elementwise passes priced over the tokens a rank routes (its SP shard)
HELD_OUT_MOE = HeldOutAccuracy(runs=99, median=0.144, p90=0.385, bias=-0.029, low=-0.224, high=1.044,
                               gpus="B200/B300/GB200/GB300/H100/H800", moe=True)
# benchmarks/mosaicml_benchmarks.py's `engine_accuracy()` on the model as it stands (2026-12-07): the
# dense models' runs split by the engine of their states (the Blackwell runs all Megatron-style)
HELD_OUT_BY_ENGINE: dict[tuple[str, Engine], HeldOutAccuracy] = {
    ("ampere", "megatron"): HeldOutAccuracy(runs=13, median=0.062, p90=0.176, bias=0.062, low=-0.026,
                                            high=0.185, gpus="A100", engine="megatron"),
    ("ampere", "torch"): HeldOutAccuracy(runs=142, median=0.047, p90=0.145, bias=-0.028, low=-0.137,
                                         high=0.163, gpus="A100", engine="torch"),
    ("hopper", "megatron"): HeldOutAccuracy(runs=33, median=0.051, p90=0.113, bias=-0.012, low=-0.112,
                                            high=0.114, gpus="H100", engine="megatron"),
    ("hopper", "torch"): HeldOutAccuracy(runs=77, median=0.036, p90=0.116, bias=0.022, low=-0.041,
                                         high=0.134, gpus="H100", engine="torch"),
    (UNCALIBRATED, "megatron"): HeldOutAccuracy(runs=42, median=0.065, p90=0.195, bias=0.033, low=-0.141,
                                                high=0.213, gpus="B200/GB200/GB300", engine="megatron"),
}
