"""`archplan bench`: timed forward passes through the real modules, MFU, and a roofline prediction."""

from __future__ import annotations

import os

from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from archplan import jsonout
from archplan.commands.options import JsonOpt, SpecsArg, refuse_force_without_plot, refuse_foreign_options
from archplan.commands.requires import require_torch
from archplan.commands.size import RecomputeChoice
from archplan.console import echo
from archplan.errors import ArchplanError
from archplan.render import report_console
from archplan.units import bandwidth, count, flops, nbytes, percent, things

if TYPE_CHECKING:  # torch's: only the annotations name it
    from archplan.bench.timing import Timing


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class BenchDType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Backend(str, Enum):
    auto = "auto"
    math = "math"
    flash = "flash"
    efficient = "efficient"
    cudnn = "cudnn"


DEFAULT_SEQ = 512


def _default_seq(specs: list[str], decode_steps: int) -> tuple[int, str | None]:
    """--seq when not given: 512, or the most every spec takes (its max_seq_len less the decode
    steps, where some prompt is left, so that the run stays within the length it was trained to;
    past a learned table or Hyena filter no position exists at all: `runner.check_positions`),
    and why it is less than 512."""
    from archplan.loader import load_spec
    from archplan.resolve import resolve

    seq, why = DEFAULT_SEQ, None
    for spec in specs:
        plan = resolve(load_spec(spec))
        trained = plan.max_seq_len - decode_steps if plan.max_seq_len > decode_steps else plan.max_seq_len
        if trained < seq:
            seq, why = trained, f"the max_seq_len of {plan.name}" + (
                f" less the decode cache's {decode_steps} positions" if trained < plan.max_seq_len else "")
        limit = plan.position_limit()
        if limit is not None and decode_steps and limit.positions - decode_steps < seq:
            seq = limit.positions - decode_steps
            why = (f"{limit.what} of {plan.name} ({limit.field} {limit.positions}) less the decode "
                   f"cache's {decode_steps} positions")
    if seq < 1:
        fewer = f"--decode-tokens {decode_steps + seq - 2} or fewer, or " if decode_steps + seq > 2 else ""
        raise ArchplanError(f"no prompt fits: {why}; give {fewer}--decode-tokens 0 (prefill only)")
    return seq, why


def _past_notes(specs: list[str], seq: int, cached: int) -> list[str | None]:
    """Per spec, what `size` would say of this length (RoPE past max_seq_len), counting the
    `cached` positions decode adds to the prompt; `--json` carries it as `past_max_seq_len`."""
    from archplan.loader import load_spec
    from archplan.resolve import resolve

    what = f"seq {seq:,} + {cached} decode positions =" if cached else "seq"
    return [resolve(load_spec(spec)).past_trained_note(what, seq + cached, "timed as asked") for spec in specs]


def _run_notes(specs: list[str], past: list[str | None], layers: int | None) -> list[str]:
    """The `past` notes, and a `--layers` beyond every layer kind's count, which builds the whole
    model: runs as asked, but worth a line."""
    from archplan.bench.fit import truncate
    from archplan.loader import load_spec
    from archplan.resolve import resolve

    notes = [f"note: {note}" for note in past if note is not None]
    for spec in specs:
        plan = resolve(load_spec(spec))
        if layers is not None and layers > 1 and truncate(plan, layers - 1).n_layers == plan.n_layers:
            notes.append(f"note: --layers {layers} builds all {plan.n_layers} layers of {plan.name} (no layer kind "
                         "has more): nothing was extrapolated")
    return notes


# What each mode reads. An option given on the command line that its mode does not read is refused
# rather than ignored (`--device` was once ignored by --layout).
# --force is answered in every mode by `refuse_force_without_plot`: it belongs to --plot, not to a mode.
MODE_OPTIONS: dict[str, frozenset[str]] = {
    "--layout": frozenset({"device", "seq", "warmup", "iters", "as_json", "layout", "nproc", "microbatches",
                           "force"}),
    "--train": frozenset({"device", "dtype", "batch", "seq", "iters", "as_json", "layers", "train", "recompute",
                          "force"}),
    "a --seq sweep": frozenset({"device", "dtype", "batch", "seq", "layers", "warmup", "iters", "attn_backend",
                                "as_json", "plot", "force"}),
    "prefill and decode": frozenset({"device", "dtype", "batch", "seq", "decode_tokens", "layers", "warmup",
                                     "iters", "compile", "attn_backend", "compare_backends", "as_json", "force"}),
}


def bench(
    ctx: typer.Context,
    specs: SpecsArg,
    device: Annotated[Device, typer.Option(help="auto = cuda when available, else cpu.")] = Device.auto,
    dtype: Annotated[BenchDType, typer.Option(help="Weights and activations dtype.")] = BenchDType.bf16,
    batch: Annotated[int, typer.Option(min=1, help="Sequences per forward.")] = 1,
    seq: Annotated[str | None, typer.Option(help=(
        "Prompt length (prefill tokens per sequence); several, comma-separated (1k,2k,4k; k = 1024), "
        "sweep it: time and memory vs length with their growth exponents \\[512, or the most the spec "
        "takes; several specs or --plot: a quarter, half and all of that]."), show_default=False)] = None,
    decode_tokens: Annotated[int, typer.Option(min=0, help="Incremental decode steps with the real cache.")] = 16,
    layers: Annotated[int | None, typer.Option(
        min=1, help="Build K layers of each layer kind: prefill and decode extrapolate to the full depth; "
                    "a --seq sweep and --train report the model as built.")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed forwards first (--layout: untimed steps).")] = 2,
    iters: Annotated[int, typer.Option(min=1, help="Timed forwards (--train, --layout: timed steps).")] = 5,
    compile: Annotated[bool, typer.Option(
        "--compile", help="Run the prefill under torch.compile (the decode steps run eager).",
        metavar="")] = False,
    attn_backend: Annotated[Backend, typer.Option(help="SDPA backend to force.")] = Backend.auto,
    compare_backends: Annotated[bool, typer.Option(
        "--compare-backends", help="Repeat the prefill under every SDPA backend available here.", metavar="")] = False,
    as_json: JsonOpt = False,
    plot: Annotated[str | None, typer.Option(help="With a --seq sweep: write time and memory vs length "
                                             "(PNG/SVG/PDF by suffix); needs matplotlib.")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --plot: overwrite an existing file.", metavar="")] = False,
    layout: Annotated[str | None, typer.Option(
        help="Run a cluster layout on torch.distributed, every field given (tp cp pp dp zero recompute mb; "
             "ep with routed experts; vpp, sp optional; see the examples): timed training steps and prefill "
             "through the sharded modules, and each rank's model states counted from its tensors against "
             "plan's, exit 1 where they differ (docs/distributed.md).",
        show_default=False)] = None,
    nproc: Annotated[int | None, typer.Option(
        min=1, help="With --layout: start this many local workers through torchrun (default: the layout's "
                    "world size); under torchrun / SLURM this process is a worker instead.",
        show_default=False)] = None,
    microbatches: Annotated[int | None, typer.Option(
        min=1, help="With --layout: micro-batches per step (default: 2 at pp=1, pp, or 2·pp under vpp > 1, "
                    "as verify's).", show_default=False)] = None,
    train: Annotated[bool, typer.Option(
        "--train", help="Time a single-device training step (forward + backward + AdamW) and compare its "
                        "peak memory with size's training memory.", metavar="")] = False,
    recompute: Annotated[RecomputeChoice, typer.Option(help="With --train: activation recompute.")] = RecomputeChoice.none,
) -> None:
    require_torch("bench")
    from archplan.bench.growth import parse_lengths
    from archplan.bench.runner import cache_steps
    from archplan.dtypes import DType

    if seq is None:
        from archplan.bench.sweep import length

        single = train or layout is not None
        swept = not single and (len(specs) > 1 or plot is not None)
        decoding = not single and not swept
        default, why = _default_seq(list(specs), cache_steps(decode_tokens) if decoding else 0)
        if swept:
            # several specs or a figure make a sweep: a quarter, half and all of the one length
            lengths = sorted({max(1, default >> shift) for shift in (2, 1, 0)})
            shown = ",".join(length(t) for t in lengths)
            note = f"--seq {shown}" + (f", up to {default} ({why})" if why else "") + ": the default sweep"
        else:
            lengths = [default]
            note = None if why is None else f"--seq {default}, not {DEFAULT_SEQ}: {why}"
        note = None if note is None or as_json else f"note: {note}"
    else:
        lengths, note = parse_lengths(seq), None

    sweep = len(lengths) > 1 or len(specs) > 1 or plot is not None
    mode = ("--layout" if layout is not None else "--train" if train
            else "a --seq sweep" if sweep else "prefill and decode")
    cached = cache_steps(decode_tokens) if mode == "prefill and decode" else 0
    # under torchrun every worker runs this command: rank 0 alone says what the run is past
    past = _past_notes(list(specs), max(lengths), cached)
    notes = ([] if note is None else [note]) + ([] if as_json or os.environ.get("RANK", "0") != "0" else
                                                _run_notes(list(specs), past, layers))
    refuse_foreign_options(ctx, mode, MODE_OPTIONS)
    refuse_force_without_plot(force, plot)
    if compile and warmup == 0:
        # the first call compiles: timed, it would be reported as the prefill (18.6 s for gpt2's
        # 20 ms), and the layer extrapolation would scale it up
        raise ArchplanError("--compile needs --warmup 1 or more: the first call compiles the model")
    ok = True
    if train or layout is not None:
        if len(specs) > 1:
            raise ArchplanError(f"{mode} runs one spec, got {len(specs)}: {', '.join(specs)}")
        if len(lengths) > 1:
            raise ArchplanError(f"{mode} runs one length, got --seq {seq}: drop the sweep")
        if train:
            from archplan.distributed.train_render import bench_train

            ok = bench_train(specs[0], device=device.value, dtype=dtype.value, batch=batch, seq=lengths[0],
                             recompute=recompute.value, iters=iters, as_json=as_json, layers=layers,
                             past_max_seq_len=past[0])
        else:
            from archplan.distributed.bench import bench_layout  # imports torch.distributed

            ok = bench_layout(specs[0], layout, nproc=nproc, seq=lengths[0], microbatches=microbatches,
                              warmup=warmup, steps=iters, as_json=as_json, device=device.value,
                              past_max_seq_len=past[0])
    elif sweep:
        from archplan.bench.sweep import SweepConfig, sweep_command

        sweep_command(specs, SweepConfig(tuple(lengths), device.value, DType(dtype.value), batch, layers,
                                         warmup, iters, attn_backend.value), plot, as_json, force=force,
                      past=past)
    else:
        from archplan.bench.runner import BenchConfig, attention_calls, run_bench
        from archplan.bench.sweep import compare_backend_names
        from archplan.bench.sweep import compare_backends as run_backends
        from archplan.loader import load_spec
        from archplan.resolve import resolve

        plan = resolve(load_spec(specs[0]))
        if compare_backends and not attention_calls(plan):
            raise ArchplanError(f"--compare-backends: {plan.name} has no attention layer, so no SDPA backend "
                                "to compare")
        cfg = BenchConfig(device=device.value, dtype=DType(dtype.value), batch=batch, seq=lengths[0],
                          decode_tokens=decode_tokens, layers=layers, warmup=warmup, iters=iters,
                          compile=compile, attn_backend=attn_backend.value)
        if compare_backends:
            compare_backend_names(plan, cfg)
        result = run_bench(plan, cfg)
        if compare_backends:
            result.backends = run_backends(plan, cfg)
        if as_json:
            echo(jsonout.dumps({**result.to_json(), "past_max_seq_len": past[0]}, indent=2))
        else:
            _render(result, plan.name)
            notes += [f"note: {line}" for line in (result.prefill.noise_note("prefill"), result.decode_noise,
                                                   result.peak_note()) if line]
    for line in notes:  # after the run: a refused option stays a one-line error
        Console(stderr=True).print(line)
    if not ok:
        raise typer.Exit(1)


def _measured(timing: Timing, unit: str, extrapolated: bool, samples_flag: str) -> str:
    """A row's note on its timed samples: under --layers the row's figure is the full depth,
    extrapolated, while the median and spread here were measured on the layers built.
    `samples_flag`: the option that sets how many samples there are."""
    from archplan.bench.timing import MIN_JUDGED_SAMPLES

    spread = f"p10 {1e3 * timing.quantile(0.1):.2f} / p90 {1e3 * timing.quantile(0.9):.2f} ms"
    judged = len(timing.samples) >= MIN_JUDGED_SAMPLES
    if not judged:
        # one or two passes show no spread, which is not the same as none (`Timing.noise_note`)
        spread = (f"{things(len(timing.samples), 'timed pass')}: spread not judged "
                  f"({samples_flag} {MIN_JUDGED_SAMPLES} or more)")
    if extrapolated:
        return f"full depth, extrapolated; the built layers measured {1e3 * timing.median:.2f} {unit}, {spread}"
    return f"{spread} measured" if judged else spread


def _render(result: object, name: str) -> None:
    from archplan.bench.runner import BACKENDS, EXTRAPOLATION_METHOD, PREFILL_FLOPS_CONVENTION, BenchResult

    assert isinstance(result, BenchResult)
    console = report_console()
    cfg = result.config
    title = (f"{escape(name)} on {result.device}, {result.dtype}, batch {cfg.batch} × seq {cfg.seq}"
             + (", torch.compile" if cfg.compile else "")
             + (f", SDPA {cfg.attn_backend}" if cfg.attn_backend != "auto" else ""))
    table = Table(title=title, show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")
    extrapolated = result.extrapolation is not None
    table.add_row("prefill median", f"{1e3 * result.prefill_seconds:.2f} ms",
                  _measured(result.prefill, "ms", extrapolated, "--iters"))
    table.add_row("prefill tokens/s", count(result.tokens_per_s), "")
    table.add_row("achieved", flops(result.achieved_flops_per_s, "FLOP/s"),
                  f"{flops(result.prefill_flops)} per forward ({PREFILL_FLOPS_CONVENTION})")
    table.add_row("MFU", percent(result.mfu), f"peak {flops(result.peak.peak_flops, 'FLOP/s')} ({result.peak.source})")
    predicted = result.predicted_prefill
    host_floor = ""
    if predicted.overlap:  # CUDA: the host's issue of the pass's calls beside the roofline's sum
        host_floor = (f"; the larger of the roofline's {1e3 * predicted.work_seconds:.2f} ms and "
                      f"the host's issue of {sum(r.ops for r in predicted.rows):,} calls, "
                      f"{1e3 * predicted.overhead_seconds:.2f} ms at the decode calibration's cost per call")
    table.add_row("roofline prediction", f"{1e3 * predicted.seconds:.2f} ms",
                  f"error {100 * result.prediction_error:+.1f}% vs measured; bandwidth "
                  f"{bandwidth(result.peak.bandwidth)}{host_floor}")
    if result.decode_seconds_per_token is not None:
        assert result.predicted_decode is not None
        # one step is one new token for each of the batch's sequences
        per_token = "" if cfg.batch == 1 else f", {1e3 * result.decode_seconds_per_token / cfg.batch:.2f} ms a token"
        assert result.decode is not None  # the timed steps behind decode_seconds_per_token
        table.add_row("decode" + (" (eager)" if cfg.compile else ""),
                      f"{1e3 * result.decode_seconds_per_token:.2f} ms/step",
                      f"{_measured(result.decode, 'ms/step', extrapolated, '--decode-tokens')}; a step: {cfg.batch} × 1 new token{per_token}; "
                      f"{count(cfg.batch / result.decode_seconds_per_token)} tokens/s; predicted "
                      f"{1e3 * result.predicted_decode.seconds:.2f} ms, error "
                      f"{100 * (result.decode_prediction_error or 0):+.1f}% (decode model, docs/benchmarks.md)")
    table.add_row("peak memory, one prefill", nbytes(result.peak_memory_bytes), result.peak_memory_method)
    table.add_row("predicted", nbytes(result.analytic_memory_bytes),
                  "weights + the largest layer's working set + the logits (as the --seq sweep predicts), "
                  f"{result.peak_memory_bytes / result.analytic_memory_bytes:.2f}× measured / predicted")
    console.print(table)
    for message in result.compile_warnings:
        console.print(f"  torch.compile warned: {escape(message)}", style="dim")

    kinds = Table(title="roofline by layer kind", show_header=True, caption=f"FLOPs: {PREFILL_FLOPS_CONVENTION}")
    for col in ("kind", "layers", "FLOPs", "bytes", "predicted", "bound"):
        kinds.add_column(col, justify="right" if col not in ("kind", "bound") else "left")
    for row in result.predicted_prefill.rows:
        kinds.add_row(row.kind, str(row.count), flops(row.flops), nbytes(row.bytes),
                      f"{1e3 * row.seconds:.3f} ms", row.bound)
    console.print(kinds)
    if result.extrapolation is not None:
        built, full = result.extrapolation.built_layers, result.extrapolation.full_layers
        depths = ", ".join(f"{kind} {built[kind]} → {full[kind]}" for kind in full)
        console.print(f"[bold]extrapolated[/bold] from the layers built to the full depth ({escape(depths)}): "
                      f"{EXTRAPOLATION_METHOD}")
    if result.backends:
        # the medians are each backend's run as the main table's (extrapolated to the full depth under
        # --layers); the memory is one forward of the model as built, by the sweep's method
        built = sum(result.extrapolation.built_layers.values()) if result.extrapolation is not None else 0
        depth = f"full depth, extrapolated from {things(built, 'layer')} built" if built else "as built"
        backends = Table(title=f"SDPA backends (median: {depth}; peak memory: one forward of the model as built)",
                         show_header=True)
        for col in ("backend", "median", "tokens/s", "peak memory"):
            backends.add_column(col)
        for row in result.backends:
            backends.add_row(str(row["backend"]), f"{1e3 * float(row['median_s']):.2f} ms",  # type: ignore[arg-type]
                             count(float(row["tokens_per_s"])), nbytes(float(row["peak_memory_bytes"])))  # type: ignore[arg-type]
        console.print(backends)
        console.print(f"  backends' peak memory: {escape(str(result.backends[0]['peak_memory_method']))}", style="dim")
        ran = {str(row["backend"]) for row in result.backends}
        if left := [name for name in BACKENDS if name not in ran]:
            console.print(f"  not available here, so not timed: {', '.join(left)} (on {escape(result.device)} in "
                          f"{result.dtype} with this model's attention calls; `--attn-backend NAME` says why)",
                          style="dim")
        for row in result.backends:
            if row.get("noise"):
                Console(stderr=True).print(f"note: {row['noise']}")


# help= as one string per paragraph: in rich markup mode a docstring's line breaks are printed
BENCH_HELP = (
    "Time prefill and decode of SPEC through the real modules and compare with the roofline.\n\n"
    "FLOP/s and MFU use the analytic forward FLOPs (2 FLOPs per multiply-add, attention counted "
    "causal; --train: forward + backward of the step, without the recompute's re-run, which HFU "
    "counts) against the device's DENSE peak (datasheet for known GPUs; on CPU and unknown devices "
    "a matmul and a copy are calibrated in the same run). Peak memory: torch.cuda.max_memory_allocated "
    "on GPU; on CPU the process's peak RSS (prefill and decode), the profiler's allocator peak of a "
    "forward plus the weights (a --seq sweep, --compare-backends), torch's MemTracker (--train).\n\n"
    "Four modes: prefill and decode (one spec, one length), a --seq sweep, --train and --layout. An "
    "option that the chosen mode does not read (--batch with --layout, say) is refused, not ignored.\n\n"
    "Examples:\n\n"
    "  archplan bench 7b --device cuda --layers 4\n\n"
    "  archplan bench mixtral-8x7b --layers 1 --seq 256 --json\n\n"
    "  archplan bench llama-3-8b --layers 2 --compare-backends\n\n"
    "  archplan bench gpt2 --train --seq 256 --recompute full\n\n"
    "  archplan bench llama-3-8b --nproc 2 --seq 128 "
    "--layout tp=2,cp=1,pp=1,dp=1,ep=1,zero=3,recompute=none,mb=1  # two GPUs: on CPU each rank "
    "holds its stage's fp32 states, so a CPU host takes a small spec\n\n"
    "  archplan bench llama-3-8b mamba-2.8b --layers 1 --seq 1k,2k,4k --plot sweep.png"
)


def register(app: typer.Typer) -> None:
    app.command("bench", help=BENCH_HELP)(bench)

