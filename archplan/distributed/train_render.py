"""`archplan bench --train`: the table and the exit code (`train` measures)."""

from __future__ import annotations

from dataclasses import asdict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from archplan import jsonout
from archplan.console import echo, settle
from archplan.bench.fit import truncate
from archplan.bench.runner import TRAINING_FLOPS_CONVENTION
from archplan.distributed.tolerance import ACTIVATION_JUDGED, PEAK_TOLERANCE
from archplan.distributed.train import TrainBench, train_bench
from archplan.errors import ArchplanError
from archplan.loader import load_spec
from archplan.render import busy, report_console
from archplan.resolve import resolve
from archplan.units import flops, nbytes, percent, things

OK, BAD = "[green]✓[/green]", "[red]✗[/red]"


def bench_train(spec: str, *, device: str, dtype: str, batch: int, seq: int, recompute: str, iters: int,
                as_json: bool, layers: int | None = None, past_max_seq_len: str | None = None) -> bool:
    """Run and show `bench --train`; whether every figure is within its tolerance (exit 1 if not)."""
    if dtype not in ("bf16", "fp32"):
        raise ArchplanError(f"--train --dtype {dtype}: training runs fp32 weights with bf16 autocast or plain fp32")
    plan = resolve(load_spec(spec))
    in_spec = plan.n_layers
    if layers is not None:
        plan = truncate(plan, layers)  # the truncated model itself is compared, not extrapolated
    plan.check_length(seq, "--seq")
    with busy(f"{plan.name} on {device}: a warm-up step, {things(iters, 'timed step')} and a tracked one",
              enabled=not as_json):
        result = train_bench(plan, device=device, dtype=dtype, batch=batch, seq=seq,
                             recompute=recompute, iters=iters)  # type: ignore[arg-type]
    settle(0 if result.ok else 1)
    if as_json:
        echo(jsonout.dumps({**asdict(result), "layers_built": plan.n_layers, "layers_in_spec": in_spec,
                            "flops_convention": TRAINING_FLOPS_CONVENTION,
                            "mfu": result.mfu, "hfu": result.hfu, "noise": result.noise, "ok": result.ok,
                            "past_max_seq_len": past_max_seq_len}, indent=2))
    else:
        render(result, plan.n_layers, in_spec)
    return result.ok


def _mark(ok: bool) -> str:
    return OK if ok else BAD


def render(r: TrainBench, built: int, in_spec: int) -> None:
    step = r.median_seconds
    # --layers K builds and compares the truncated model; its figures are not the spec's
    layers = f" ({built} of its {in_spec} layers, as built)" if built < in_spec else ""
    table = Table(title=f"{escape(r.name)}{layers} training step on {r.device}, {r.dtype}, batch {r.batch} × seq "
                        f"{r.seq}, recompute {r.recompute}: {1e3 * step:,.1f} ms median")
    for col in ("figure", "analytic (size)", "measured", ""):
        table.add_column(col, justify="left" if col == "figure" else "right")
    m = r.measured
    states = m["Parameter"] + m["Gradient"] + m["Optstate"]
    table.add_row("model states (16 B/param)", nbytes(r.analytic_states), nbytes(states), _mark(r.states_ok))
    table.add_row(f"activations kept ({ACTIVATION_JUDGED})", nbytes(r.analytic_activations),
                  nbytes(r.measured_activations), _mark(r.activations_ok))
    table.add_row("autocast weight copies (beside the states)", "", nbytes(m["WeightCopies"]), "")
    if "Temp" in m:
        table.add_row("temporary", "", nbytes(m["Temp"]), "")
    if "Workspace" in m:
        table.add_row("cuBLAS workspaces (not the model's: outside the peak)", "", nbytes(m["Workspace"]), "")
    total = m["Total"]
    table.add_row(f"peak total (±{PEAK_TOLERANCE:.0%}), {r.analytic_peak_phase}", nbytes(r.analytic_total),
                  nbytes(total), _mark(r.total_ok))
    console = report_console(table)
    console.print(table)
    units = ", Mamba layers as archplan's units keep them (not mamba_ssm's kernels)" if r.ssd_unit else ""
    if r.moe_routing:
        units += ", MoE layers with the routing metadata archplan's router keeps (fp32 scores, int64 indices)"
    residual = (", under autocast: the residual stream in fp32, each projection's own 16-bit cast of its "
                "input and S4's kernel in autocast's casts (size --autocast)" if r.dtype == "bf16" else "")
    console.print(f"  measured with {r.method}; size's activations with attention kernel "
                  f"{r.attention_kernel}{residual}{units}, and the rotary tables, ALiBi biases and window masks "
                  "archplan's modules share, once for the model (size's count leaves them out); GiB = 2^30 B")
    rerun = f"; with the recompute's re-run, HFU {percent(r.hfu)}" if r.hardware_flops != r.model_flops else ""
    console.print(f"  speed: {flops(r.model_flops / step, 'FLOP/s')} of model FLOPs ({flops(r.model_flops)} per "
                  f"step: {TRAINING_FLOPS_CONVENTION}), MFU "
                  f"{percent(r.mfu)} of the dense {r.dtype} peak {flops(r.peak_flops, 'FLOP/s')} "
                  f"({r.peak_source}){rerun}")
    if r.noise is not None:
        Console(stderr=True).print(f"note: {r.noise}")
