"""`archplan bench SPEC... --seq 1k,2k,...`: prefill time and peak memory against sequence length,
each beside its analytic prediction, and the growth exponents of both fitted over the sweep.

One model is built per spec and run at every length. Timed passes go round the lengths in turn
(warm-up round, then `iters` rounds), so a burst of load on a shared machine lands on every length
alike; each length keeps the fastest of its samples (contention only ever adds time, the reasoning
of Python's `timeit`). Peak memory is measured in one extra pass per length: on CUDA with
`torch.cuda.max_memory_allocated`, elsewhere with the torch profiler's memory tracking, which sees
every allocation of the CPU allocator during the real forward (inside fused kernels too), added to
the bytes of the weights. Both include the weights.

On CPU under glibc the sweep keeps freed memory in the process (`bench.peak.keep_freed_memory`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from archplan import jsonout
from archplan.analytic import count_params, forward_flops
from archplan.bench.device import TORCH_DTYPES, DevicePeak, device_peak
from archplan.bench.growth import fit_exponent, prefill_peak_bytes
from archplan.bench.peak import forward_peak_bytes, keep_freed_memory
from archplan.bench.roofline import predict_prefill
from archplan.bench.fit import truncate
from archplan.bench.runner import (
    BenchConfig,
    attention_calls,
    attention_core,
    attention_mask_kind,
    available_backends,
    check_backend,
    check_fits,
    run_bench,
    sdpa_backend,
)
from archplan.bench.timing import Timing, progress_bar, time_calls
from archplan.console import echo, figure_written
from archplan.dtypes import DType, nbytes
from archplan.errors import ArchplanError
from archplan.modules.model import build_model, resolve_device
from archplan.render import report_console
from archplan.resolve import ModelPlan
from archplan.units import amount, count, nbytes as fmt_bytes

TIME_CONVENTION = ("fastest of the timed passes; analytic = roofline of the analytic forward FLOPs "
                   "(2 FLOPs/MAC, attention causal) and bytes against the device peak")
MEMORY_CONVENTION = ("weights + the largest layer's activations + logits, at the run's dtype "
                     "(attention scores where the backend materialises them, auto's fallback to math "
                     "included; an ALiBi bias or window mask beside them)")


@dataclass(frozen=True)
class SweepConfig:
    lengths: tuple[int, ...]
    device: str = "auto"
    dtype: DType = DType.bf16
    batch: int = 1
    layers: int | None = None
    warmup: int = 1
    iters: int = 3
    attn_backend: str = "auto"


@dataclass(frozen=True)
class SweepPoint:
    seq: int
    samples: tuple[float, ...]  # seconds of each timed pass
    peak_bytes: int  # measured
    predicted_seconds: float  # roofline of the built model
    predicted_bytes: int  # prefill_peak_bytes of the built model
    flops: int  # analytic forward FLOPs of the built model, attention causal

    @property
    def seconds(self) -> float:
        return min(self.samples)

    def noise_note(self, name: str) -> str | None:
        """The line `Timing.noise_note` says when this length's passes spread as an idle host's do
        not: the growth exponents are fitted on these times."""
        return Timing(self.samples).noise_note(f"{name} at seq {self.seq:,}", reported="the fastest pass")


@dataclass(frozen=True)
class SweepResult:
    name: str
    device: str
    dtype: str
    config: SweepConfig
    peak: DevicePeak
    built_layers: int
    full_layers: int
    params: int  # parameters of the built model
    memory_method: str
    points: tuple[SweepPoint, ...]

    def _exponent(self, values: list[float]) -> float:
        return fit_exponent([p.seq for p in self.points], values)

    @property
    def time_exponent(self) -> float:
        return self._exponent([p.seconds for p in self.points])

    @property
    def analytic_time_exponent(self) -> float:
        return self._exponent([p.predicted_seconds for p in self.points])

    @property
    def memory_exponent(self) -> float:
        return self._exponent([float(p.peak_bytes) for p in self.points])

    @property
    def analytic_memory_exponent(self) -> float:
        return self._exponent([float(p.predicted_bytes) for p in self.points])

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "batch": self.config.batch,
            "attn_backend": self.config.attn_backend,
            "built_layers": self.built_layers,
            "full_layers": self.full_layers,
            "params": self.params,
            "peak": {"flops_per_s": self.peak.peak_flops, "bandwidth_bytes_per_s": self.peak.bandwidth,
                     "source": self.peak.source},
            "time_convention": TIME_CONVENTION,
            "memory_convention": MEMORY_CONVENTION,
            "memory_method": self.memory_method,
            "points": [{
                "seq": p.seq,
                "seconds": p.seconds,
                "samples_s": list(p.samples),
                "noise": p.noise_note(self.name),
                "tokens_per_s": self.config.batch * p.seq / p.seconds,
                "predicted_s": p.predicted_seconds,
                "flops": p.flops,
                "peak_memory_bytes": p.peak_bytes,
                "predicted_memory_bytes": p.predicted_bytes,
            } for p in self.points],
            "exponent": {
                "range": [self.points[0].seq, self.points[-1].seq],
                "fit": "least squares of log y on log seq",
                "time": self.time_exponent,
                "time_analytic": self.analytic_time_exponent,
                "memory": self.memory_exponent,
                "memory_analytic": self.analytic_memory_exponent,
            },
        }


def _check_sweep(plan: ModelPlan, cfg: SweepConfig) -> None:
    """Refuse a spec the sweep cannot run (its backend, its positions, the device's memory)."""
    device = resolve_device(cfg.device)
    check_backend(plan, cfg.attn_backend, device, cfg.dtype)
    longest = max(cfg.lengths)
    plan.check_length(longest, "--seq")
    check_fits(plan, BenchConfig(device=cfg.device, dtype=cfg.dtype, batch=cfg.batch, seq=longest,
                                 decode_tokens=0, layers=cfg.layers, attn_backend=cfg.attn_backend),
               device, run="the --seq sweep")


def _run_sweep(plan: ModelPlan, cfg: SweepConfig, peak: DevicePeak, console: Console) -> SweepResult:
    """Prefill of `plan` at every length of `cfg.lengths` through one built model (`_check_sweep`
    passed)."""
    device = resolve_device(cfg.device)
    built = plan if cfg.layers is None else truncate(plan, cfg.layers)
    b = nbytes(cfg.dtype)
    core = attention_core(built, cfg.attn_backend, device, cfg.dtype)

    torch.manual_seed(0)
    model = build_model(built, device=device.type, dtype=TORCH_DTYPES[cfg.dtype]).eval()
    tokens = {t: torch.randint(0, plan.vocab_size, (cfg.batch, t), device=device) for t in cfg.lengths}

    def prefill(t: int) -> object:
        with torch.inference_mode(), sdpa_backend(cfg.attn_backend):
            return model(tokens[t])

    samples: dict[int, list[float]] = {t: [] for t in cfg.lengths}
    with keep_freed_memory(device), progress_bar(console) as progress:
        for round_ in range(cfg.warmup + cfg.iters):
            for t in cfg.lengths:
                label = f"{plan.name}: {'warm-up' if round_ < cfg.warmup else 'prefill'} {cfg.batch}×{t}"
                timing = time_calls(lambda t=t: prefill(t), device, 1, progress, label)
                if round_ >= cfg.warmup:
                    samples[t].extend(timing.samples)
    points = []
    method = ""
    for t in cfg.lengths:
        measured, method = forward_peak_bytes(model, lambda t=t: prefill(t), device)
        points.append(SweepPoint(
            seq=t, samples=tuple(samples[t]), peak_bytes=measured,
            predicted_seconds=predict_prefill(built, cfg.batch, t, b, peak.peak_flops, peak.bandwidth).seconds,
            predicted_bytes=prefill_peak_bytes(built, cfg.batch, t, b, core),
            flops=forward_flops(built, t, cfg.batch).forward("causal"),
        ))
    return SweepResult(
        name=plan.name, device=peak.name, dtype=cfg.dtype.value, config=cfg, peak=peak,
        built_layers=built.n_layers, full_layers=plan.n_layers, params=count_params(built).total,
        memory_method=method, points=tuple(points),
    )


def run_sweeps(plans: list[ModelPlan], cfg: SweepConfig, console: Console | None = None,
               peak: DevicePeak | None = None) -> list[SweepResult]:
    """Every plan over the same lengths, against one device calibration (`peak`, or made now)."""
    if len(cfg.lengths) < 2:
        # several specs, or --plot, make a sweep: one length would draw points, not curves
        raise ArchplanError("several specs or --plot run a sweep, which needs at least two lengths "
                            "(e.g. --seq 1k,2k,4k); bench one spec at a time for prefill and decode", field="--seq")
    if cfg.dtype not in TORCH_DTYPES:
        raise ArchplanError(f"--dtype {cfg.dtype.value}: bench runs fp32, bf16 or fp16")
    for plan in plans:  # every spec's refusal before any is timed
        _check_sweep(plan, cfg)
    peak = peak or device_peak(resolve_device(cfg.device), cfg.dtype)
    return [_run_sweep(plan, cfg, peak, console or Console(stderr=True)) for plan in plans]


def compare_backend_names(plan: ModelPlan, cfg: BenchConfig) -> list[str]:
    """The SDPA backends `compare_backends` times here, each refused before anything is timed if it
    would not fit (the math backend materialises the scores the others never hold): a refusal after
    the main run was timed threw that run away and blamed `bench`."""
    device = resolve_device(cfg.device)
    names = available_backends(device, TORCH_DTYPES[cfg.dtype], attention_mask_kind(plan), attention_calls(plan))
    for name in names:
        check_fits(plan, replace(cfg, attn_backend=name, decode_tokens=0), device,
                   run=f"--compare-backends' {name} backend")
    return names


def compare_backends(plan: ModelPlan, cfg: BenchConfig) -> list[dict[str, object]]:
    """The same prefill under each SDPA backend available here: its time from `run_bench`, its peak
    memory as the sweep measures it (`bench.peak.forward_peak_bytes`: the allocator's peak of one forward, weights
    included), on one model built after the timed runs so that two are never alive at once. A
    process high-water mark would read the torch runtime's hundreds of MiB and the largest backend
    so far, and could not tell the backends apart."""
    device = resolve_device(cfg.device)
    names = compare_backend_names(plan, cfg)
    timed = {name: run_bench(plan, replace(cfg, attn_backend=name, decode_tokens=0)) for name in names}
    built = plan if cfg.layers is None else truncate(plan, cfg.layers)
    torch.manual_seed(0)
    model = build_model(built, device=device.type, dtype=TORCH_DTYPES[cfg.dtype]).eval()
    tokens = torch.randint(0, plan.vocab_size, (cfg.batch, cfg.seq), device=device)
    rows: list[dict[str, object]] = []
    with keep_freed_memory(device):
        for name, result in timed.items():
            def prefill(name: str = name) -> object:
                with torch.inference_mode(), sdpa_backend(name):
                    return model(tokens)

            peak, method = forward_peak_bytes(model, prefill, device)
            rows.append({"backend": name, "median_s": result.prefill_seconds, "tokens_per_s": result.tokens_per_s,
                         "peak_memory_bytes": peak, "peak_memory_method": method,
                         "noise": result.prefill.noise_note(f"{name} backend's prefill")})
    return rows


def length(tokens: int) -> str:
    """A sequence length as it is spoken: 16384 -> 16k, 1048576 -> 1M (binary, as --seq reads it)."""
    for unit, suffix in ((1 << 20, "M"), (1 << 10, "k")):
        if tokens % unit == 0:
            return f"{tokens // unit}{suffix}"
    return str(tokens)


def render(results: list[SweepResult], console: Console | None = None) -> None:
    console = console or report_console()
    for r in results:
        layers = (f"{r.built_layers} of {r.full_layers} layers built" if r.built_layers < r.full_layers
                  else f"{r.built_layers} layers")
        table = Table(title=f"{escape(r.name)} on {r.device}, {r.dtype}, batch {r.config.batch}, {layers}, "
                            f"{count(r.params)} params, SDPA {r.config.attn_backend}")
        for col in ("seq", "prefill", "analytic", "tokens/s", "peak memory", "analytic memory"):
            table.add_column(col, justify="right")
        for p in r.points:
            table.add_row(length(p.seq), f"{amount(1e3 * p.seconds)} ms", f"{amount(1e3 * p.predicted_seconds)} ms",
                          count(r.config.batch * p.seq / p.seconds), fmt_bytes(p.peak_bytes),
                          fmt_bytes(p.predicted_bytes))
        table.add_row("exponent k", f"{r.time_exponent:.2f}", f"{r.analytic_time_exponent:.2f}", "",
                      f"{r.memory_exponent:.2f}", f"{r.analytic_memory_exponent:.2f}", style="bold")
        console.print(table)
    console.print(f"time: {TIME_CONVENTION}.\nmemory: measured by {results[0].memory_method}; analytic = "
                  f"{MEMORY_CONVENTION}.\nexponent k: least-squares slope of log y on log seq over "
                  f"{length(results[0].points[0].seq)}–{length(results[0].points[-1].seq)} (y ∝ seq^k).")


def sweep_command(specs: list[str], cfg: SweepConfig, plot: str | None, as_json: bool, *,
                  force: bool = False, past: Sequence[str | None] = ()) -> None:
    """`archplan bench SPEC... --seq a,b,c [--plot FILE [--force]] [--json]`; `past`, per spec,
    the note on its longest length past max_seq_len, which `--json` carries."""
    from archplan.loader import load_spec
    from archplan.resolve import resolve

    if plot is not None:
        from archplan.plot import figure_target, pyplot

        figure_target(plot, force=force)  # a bad path or a missing matplotlib fails before the sweep runs
        pyplot()
    results = run_sweeps([resolve(load_spec(spec)) for spec in specs], cfg)
    report = [r.to_json() for r in results]
    if plot is not None:
        from archplan.plot import plot_sweep

        plot_sweep(report, plot, force=force)
    if as_json:
        notes = list(past) or [None] * len(report)
        echo(jsonout.dumps([{**entry, "past_max_seq_len": note} for entry, note in zip(report, notes)], indent=2))
        figure_written(plot, json_out=True)
        return
    render(results)
    figure_written(plot, json_out=False)
    noisy = [note for r in results for p in r.points if (note := p.noise_note(r.name))]
    for note in noisy:  # on stderr, as the prefill's: the exponents above were fitted on these times
        Console(stderr=True).print(f"note: {note}")
