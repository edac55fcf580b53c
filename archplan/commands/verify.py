"""`archplan verify SPEC`: the analytic figures against a real model built from the same spec.

Builds the model on meta, compares parameters and counted forward FLOPs component by component,
checks training FLOPs with a real backward, measures the KV/SSM cache the model's own cache holds
after a prefill on meta, and on small models also runs fvcore and measures the cache again on a real
instance (`archplan.crosscheck`). Exit 0 when no check disagrees, 1 with
the diff, 2 on bad input; a check that did not run (fvcore absent or failing, no real instance)
is reported as "not run" with its reason and never counted as a match. torch is imported inside
the command only (cli.py loads every command module, and `size`/`lint` must stay torch-free).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Protocol, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from archplan import jsonout, units
from archplan.commands.options import JsonOpt, SpecArg, length_option, refuse_foreign_options
from archplan.commands.requires import require_torch
from archplan.console import echo, settle
from archplan.errors import ArchplanError
from archplan.loader import load_spec
from archplan.render import report_console, table_width
from archplan.resolve import ModelPlan, check_mtp_length, layer_index, resolve
from archplan.spec import MAX_BATCH, MAX_SEQ_LEN

if TYPE_CHECKING:
    from archplan.crosscheck import Check, CrossCheck, FlopRow, Row

DEFAULT_SEQ = 128
# Above this many layers, runs of identical passing layers are shown as one row (failures never are).
AGGREGATE_ABOVE_LAYERS = 8
# Progress bars only where a pass takes long enough to watch.
PROGRESS_ABOVE_LAYERS = 16

OK, BAD = "[green]✓[/green]", "[red]✗[/red]"


class Device(str, Enum):
    auto = "auto"  # as bench takes it: cuda where available, else cpu
    cpu = "cpu"
    cuda = "cuda"


def register(app: typer.Typer) -> None:
    app.command(
        "verify",
        help=(
            "Build the model (meta device) and check every analytic number against it, component by "
            "component: parameters (numel), forward FLOPs (FlopCounterMode), training FLOPs (a real "
            "backward), the KV/SSM cache the model's own cache holds after a prefill (meta, any size); on "
            "small models also fvcore and the cache measured again on a real instance. An op with no FLOP "
            "formula and a matmul-shaped signature fails. Exit 0 when no check disagrees (checks that "
            "could not run are listed as not run), 1 with the diff, 2 on bad input.\n\n"
            "Examples:\n\n  archplan verify deepseek-v3 --seq 64 --json\n\n"
            "  archplan verify llama-3.1-405b --seq 8192 "
            "--layout tp=8,cp=1,pp=16,dp=128,ep=1,zero=3,recompute=full,mb=1"
        ),
    )(verify)


SeqOpt = Annotated[int | None, typer.Option(
    "--seq", parser=length_option, metavar="LENGTH",
    help="Sequence length of the counted forward, e.g. 128 or 1k (default: min(128, max_seq_len)).",
    show_default=False)]
BatchOpt = Annotated[int, typer.Option("--batch", min=1, max=MAX_BATCH, help="Batch of the counted forward.")]
DeviceOpt = Annotated[Device, typer.Option(
    "--device", help="Device of the real instance (fvcore, the cache measured with real values); auto: cuda "
    "where available, as bench reads it.")]
CpuCheckOpt = Annotated[bool | None, typer.Option(
    "--cpu-check/--no-cpu-check", show_default=False,
    help="Force (or skip) the real-instance checks (default: below 50M parameters, where the run fits the "
    "free memory; forced, a run that does not fit is refused).", metavar="")]
BackwardOpt = Annotated[bool, typer.Option(
    "--backward/--no-backward", help="Check training FLOPs with a forward+backward on meta.", metavar="")]
AllLayersOpt = Annotated[bool, typer.Option(
    "--all-layers", metavar="",
    help=f"One row per layer. Without it, above {AGGREGATE_ABOVE_LAYERS} layers a run of consecutive identical, "
         "passing layers folds into one row (a hybrid's alternating layers stay one row each).")]
LayoutOpt = Annotated[str | None, typer.Option(
    "--layout", help="Verify a cluster layout instead, every field given (tp cp pp dp zero recompute mb; ep with "
    "routed experts; vpp, sp optional; see the example): one rank's training step at full world size on torch's "
    "fake process group, memory, collectives and "
    "FSDP2's copies around them and its gradient accumulation beside plan's (docs/distributed.md).",
    show_default=False)]
MicrobatchesOpt = Annotated[int | None, typer.Option(
    "--microbatches", min=1, help="Micro-batches per step with --layout (default: the fewest at which plan's "
                                  "memory for the layout holds: 2 at pp=1, pp, or 2·pp under vpp > 1).",
    show_default=False)]
StageOpt = Annotated[int | None, typer.Option(
    "--stage", min=0, help="Pipeline stage whose rank --layout measures, 0 to pp − 1 (default: the most loaded "
    "one by plan's memory model).", show_default=False)]


# what each mode reads (`options.refuse_foreign_options`)
VERIFY_MODES: dict[str, frozenset[str]] = {
    "the model check": frozenset({"seq", "batch", "device", "cpu_check", "backward", "all_layers", "as_json"}),
    "--layout": frozenset({"seq", "as_json", "layout", "microbatches", "stage"}),
}


def verify(
    ctx: typer.Context,
    spec: SpecArg,
    seq: SeqOpt = None,
    batch: BatchOpt = 1,
    device: DeviceOpt = Device.cpu,
    cpu_check: CpuCheckOpt = None,
    backward: BackwardOpt = True,
    all_layers: AllLayersOpt = False,
    as_json: JsonOpt = False,
    layout: LayoutOpt = None,
    microbatches: MicrobatchesOpt = None,
    stage: StageOpt = None,
) -> None:
    require_torch("verify")
    refuse_foreign_options(ctx, "--layout" if layout is not None else "the model check", VERIFY_MODES)
    plan = resolve(load_spec(spec))
    seq_len = _seq_len(plan, seq)
    past = plan.past_trained_note("seq", seq_len, "checked as asked")
    if layout is not None:
        from archplan.distributed.render import verify_layout  # imports torch.distributed

        code = verify_layout(plan, layout, seq_len, microbatches, as_json, stage, past_max_seq_len=past)
    else:
        code = verify_model(plan, seq_len=seq_len, batch=batch, device=device, cpu_check=cpu_check,
                            backward=backward, all_layers=all_layers, as_json=as_json, past_max_seq_len=past)
    # after the run, which ended with its verdict: a refused option stays a one-line error (--json
    # carries it as `past_max_seq_len`)
    if past is not None and not as_json:
        Console(stderr=True).print(f"note: {past}")
    raise typer.Exit(code)


def verify_model(
    plan: ModelPlan,
    *,
    seq_len: int,
    batch: int,
    device: Device,
    cpu_check: bool | None,
    backward: bool,
    all_layers: bool,
    as_json: bool,
    past_max_seq_len: str | None = None,
) -> int:
    """The model check: analytic figures against the built model; returns the exit code."""
    from archplan.crosscheck import crosscheck  # imports torch: only verify and bench may
    from archplan.modules.model import resolve_device

    real_device = resolve_device(device.value).type  # fail before the meta build, not after it

    console = report_console()
    with _progress(enabled=not as_json and len(plan.layers) > PROGRESS_ABOVE_LAYERS) as progress:
        result = crosscheck(
            plan, seq_len=seq_len, batch=batch, backward=backward, real=cpu_check,
            real_device=real_device, progress=progress,
        )
    code = settle(0 if result.ok else 1)
    if as_json:
        echo(jsonout.dumps({**result.to_json(), "convention": JSON_CONVENTION, "past_max_seq_len": past_max_seq_len},
                           indent=2))
    else:
        render(result, console, aggregate=not all_layers and len(plan.layers) > AGGREGATE_ABOVE_LAYERS)
    return code


def _seq_len(plan: ModelPlan, seq: int | None) -> int:
    if seq is None:
        return min(DEFAULT_SEQ, plan.max_seq_len)
    if not 1 <= seq <= MAX_SEQ_LEN:
        raise ArchplanError(f"must be between 1 and {MAX_SEQ_LEN:,}, got {seq:,}", field="--seq")
    plan.check_length(seq, "--seq")
    if plan.mtp:
        check_mtp_length(len(plan.mtp), seq, "--seq")
    return seq


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A transient rich progress bar on stderr (build, forward, backward), only on a terminal."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=True)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done)

    with bar:
        yield update


# ---------------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class _Line:
    """One displayed row: a component, or a run of identical layers folded into one."""

    component: str
    kind: str
    params: Row | None
    flops: FlopRow | None
    repeat: int = 1


def _suffix(component: str) -> str:
    return ".".join(component.split(".")[2:])


def _lines(result: CrossCheck, aggregate: bool) -> list[_Line]:
    params = {row.component: row for row in result.params}
    flops = {row.component: row for row in result.flops}
    from archplan.crosscheck import ordered  # lazy: crosscheck imports torch

    names = ordered(params.keys() | flops.keys())
    lines = []
    labelled: set[str] = set()
    for name in names:
        layer = ".".join(name.split(".")[:2]) if layer_index(name) is not None else ""
        # the layer's kind on its first row only
        kind = result.layer_kinds.get(layer, "") if layer and layer not in labelled else ""
        labelled.add(layer)
        lines.append(_Line(name, kind, params.get(name), flops.get(name)))
    if not aggregate:
        return lines
    return _fold_layers(lines)


def _line_figures(line: _Line) -> tuple:
    return (line.kind,
            None if line.params is None else (line.params.analytic, line.params.built),
            None if line.flops is None else (line.flops.analytic, line.flops.built, line.flops.elementwise))


def _fold_layers(lines: list[_Line]) -> list[_Line]:
    """Fold runs of consecutive layers with identical, passing rows into `layers.a-b.x ×n`."""
    return [line if count == 1 else replace(line, component=name, repeat=count)
            for name, count, line in _folded(lines, _line_figures, _line_ok)]


def _runs(signatures: Sequence[object], passing: Sequence[bool]) -> list[tuple[int, int]]:
    """(first index, count) of each run of consecutive layers with equal signatures, folded only
    where the run's first layer passes (a failing layer keeps its own row)."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(signatures):
        j = i + 1
        while passing[i] and j < len(signatures) and signatures[j] == signatures[i]:
            j += 1
        runs.append((i, j - i))
        i = j
    return runs


class _Named(Protocol):
    @property
    def component(self) -> str: ...


_Row = TypeVar("_Row", bound=_Named)


def _folded(rows: Sequence[_Row], figures: Callable[[_Row], object],
            ok: Callable[[_Row], bool]) -> list[tuple[str, int, _Row]]:
    """(name, count, row) for each row shown: runs of consecutive layers whose rows all pass and
    have equal figures fold into `layers.a-b.x` (count n); rows outside the layers stay as they are.
    The component and fvcore tables fold through it; the cache table, one row per layer, through
    `_runs` itself."""
    out: list[tuple[str, int, _Row]] = []
    blocks: list[tuple[int, list[_Row]]] = []

    def flush() -> None:
        runs = _runs([tuple((_suffix(r.component), figures(r)) for r in block) for _, block in blocks],
                     [all(ok(r) for r in block) for _, block in blocks])
        for first, count in runs:
            start, block = blocks[first]
            end = blocks[first + count - 1][0]
            out.extend((r.component if count == 1 else f"layers.{start}-{end}.{_suffix(r.component)}", count, r)
                       for r in block)
        blocks.clear()

    for row in rows:
        layer = layer_index(row.component)
        if layer is None:
            flush()
            out.append((row.component, 1, row))
        elif blocks and blocks[-1][0] == layer:
            blocks[-1][1].append(row)
        else:
            blocks.append((layer, [row]))
    flush()
    return out


def _line_ok(line: _Line) -> bool:
    return (line.params is None or line.params.ok) and (line.flops is None or line.flops.ok)


def _mark(ok: bool) -> str:
    return OK if ok else BAD


FLOPS_CONVENTION = (
    "FLOPs: counted by FlopCounterMode on meta for one forward (2 per multiply-add; matmuls, "
    "convs, attention full T², FFTs 2.5·n·⌈log2 n⌉ per real transform of length n = 2T). "
    "elementwise: analytic-only (norms, softmax, activations, scan updates)."
)
FLOPS_CAPTION = FLOPS_CONVENTION + " Folded rows (×n) show the per-layer figures."
# what `--json` carries of the tables' captions and titles
# S4/S4D and StripedHyena's modal states stay fp32 (complex64 for S4D) whatever the cache's dtype,
# as `size`'s KV convention says
STATES_FP32 = "S4 and modal states fp32"
JSON_CONVENTION = (FLOPS_CONVENTION + " Parameters: unique elements, tied weights once, buffers excluded. "
                   "kv_cache: bytes after a prefill on meta, a 2-byte cache; real.kv_cache: on the instance, a "
                   f"real.dtype_bytes cache; {STATES_FP32}.")


def _check_table(result: CrossCheck, lines: list[_Line], title: str, *, params: bool, flops: bool) -> Table:
    """The component table, with the parameter columns, the FLOPs columns or both; split (one of
    them), without the outer edge and, in the FLOPs table, without the kinds the parameter table
    already shows, so that each fits 80 columns."""
    both = params and flops
    table = Table(title=title, caption=FLOPS_CAPTION if flops else None, show_edge=both, pad_edge=both)
    kinds = params  # the kind column goes with the parameter columns
    columns: list[tuple[str, str]] = [("component", "left"), ("kind", "left"), ("×", "right")]
    if not kinds:
        del columns[1]
    if params:
        columns += [("params analytic", "right"), ("params built", "right"), ("", "center")]
    if flops:
        columns += [("FLOPs analytic", "right"), ("FLOPs counted", "right"), (" ", "center"),
                    ("elementwise", "right")]
    for col, justify in columns:
        # on a narrow terminal the names fold and the figures and marks stay whole (rich shrinks
        # the columns that may wrap first; all no_wrap, it cut totals and dropped the ✓ column)
        named = col in ("component", "kind")
        table.add_column(col, justify=justify, no_wrap=not named, overflow="fold" if named else "ellipsis",  # type: ignore[arg-type]
                         min_width=1 if col.strip() == "" else None)
    for line in lines:
        p, f = line.params, line.flops
        row = [line.component, line.kind, str(line.repeat) if line.repeat > 1 else ""]
        if not kinds:
            del row[1]
        if params:
            row += [units.count(p.analytic) if p else "", units.count(p.built) if p else "",
                    _mark(p.ok) if p else ""]
        if flops:
            row += [units.flops(f.analytic) if f else "", units.flops(f.built) if f else "",
                    _mark(f.ok) if f else "", units.flops(f.elementwise) if f and f.elementwise else ""]
        table.add_row(*row)
    table.add_section()
    total = ["total", "", ""] if kinds else ["total", ""]
    if params:
        total += [f"{result.params_analytic:,}", f"{result.params_built:,}",
                  _mark(result.params_analytic == result.params_built)]
    if flops:
        total += [f"{result.flops_analytic:,}", f"{result.flops_counted:,}",
                  _mark(result.flops_analytic == result.flops_counted), ""]
    table.add_row(*total)
    return table


def render(result: CrossCheck, console: Console, *, aggregate: bool) -> None:
    lines = _lines(result, aggregate)
    title = f"archplan verify — {escape(result.name)} (batch {result.batch}, seq {result.seq_len})"
    table = _check_table(result, lines, title, params=True, flops=True)
    if table_width(table) <= console.width:
        console.print(table)
    else:
        # a terminal too narrow for both: parameters, then FLOPs, each with its exact total
        console.print(_check_table(result, lines, f"{title}: parameters", params=True, flops=False))
        console.print(_check_table(result, lines, f"{title}: forward FLOPs", params=False, flops=True))
    _render_ops(result, console)
    if result.training is not None:
        t = result.training
        console.print(
            f"training FLOPs (forward + backward on meta, one step at batch {result.batch} × seq "
            f"{result.seq_len}): analytic {t.analytic:,}, counted {t.built:,} {_mark(t.ok)}"
        )
    _render_cache(result, console, aggregate=aggregate)
    _render_real(result, console, aggregate=aggregate)
    _render_diff(result, console)


def _render_ops(result: CrossCheck, console: Console) -> None:
    phases = [("forward", result.ops)]
    if result.training is not None:
        phases.append(("backward", result.backward_ops))
    for phase, ops in phases:
        table = Table(title=f"ops dispatched in the {phase} (FLOPs as FlopCounterMode counts them)")
        for col in ("op", "calls", "FLOPs", "formula"):
            table.add_column(col, justify="left" if col in ("op", "formula") else "right")
        for op in ops:
            if op.has_formula or op.suspicious:
                formula = op.formula or "[red]none: matmul-shaped, its FLOPs are missed[/red]"
                table.add_row(op.op, f"{op.calls:,}", f"{op.flops:,}", formula)
        console.print(table)
        zero = [op for op in ops if not op.has_formula and not op.suspicious]
        if zero:
            console.print(f"0 FLOPs in the {phase} (no formula, no contraction; elementwise, analytic-only): "
                          + ", ".join(f"{op.op} ×{op.calls}" for op in zero))


def _render_cache(result: CrossCheck, console: Console, *, aggregate: bool) -> None:
    """The cache measured on meta (bf16) and, where it ran, on the real instance, layer by layer;
    folded as the component table is, runs of consecutive layers with equal, passing rows."""
    real = result.real
    per_layer = [(m,) if real is None else (m, r) for m, r in
                 zip(result.kv, result.kv if real is None else real.kv, strict=True)]
    runs = (_runs([[(row.analytic, row.built, row.ok) for row in rows] for rows in per_layer],
                  [all(row.ok for row in rows) for rows in per_layer])
            if aggregate else [(i, 1) for i in range(len(per_layer))])
    where = ("meta, a 2-byte cache" + ("" if real is None else f"; {real.device}, a {real.dtype_bytes}-byte cache")
             + f"; {STATES_FP32}")
    table = Table(title=f"KV/SSM cache after a prefill of {result.seq_len} tokens ({where})",
                  caption="Folded rows (×n) show the per-layer figures." if len(runs) < len(per_layer) else None)
    columns = ["component", "×", "analytic bytes", "meta bytes", ""]
    if real is not None:
        columns += ["analytic bytes ", f"{real.device} bytes", " "]
    for col in columns:
        table.add_column(col, justify="left" if col == "component" else "right")
    for first, count in runs:
        rows = per_layer[first]
        name = rows[0].component
        if count > 1:
            name = f"layers.{first}-{first + count - 1}.{_suffix(name)}"
        cells = [name, str(count) if count > 1 else ""]
        for row in rows:
            cells += [f"{row.analytic:,}", f"{row.built:,}", _mark(row.ok)]
        table.add_row(*cells)
    console.print(table)


def _render_real(result: CrossCheck, console: Console, *, aggregate: bool) -> None:
    real = result.real
    if real is None:
        console.print(f"real-instance checks (fvcore, the cache prefilled with real values): not run "
                      f"({result.real_not_run}; {result.real_hint})")
        return
    fv = real.fvcore
    if fv.not_run is not None:
        console.print(f"[yellow]fvcore FlopCountAnalysis: not run[/yellow] ({fv.not_run})")
        return
    table = Table(
        title="fvcore FlopCountAnalysis (multiply-adds × 2; norms elementwise)",
        caption="known: ops fvcore skips, priced by the counter's own formula from their traced "
                "shapes; the row matches when analytic = fvcore × 2 + known.",
    )
    rows = (_folded(fv.rows, lambda r: (r.analytic, r.fvcore, tuple(r.known.items())), lambda r: r.ok)
            if aggregate else [(r.component, 1, r) for r in fv.rows])
    for col in ("component", "×", "analytic counted", "fvcore × 2", "known (skipped by fvcore)", ""):
        table.add_column(col, justify="left" if col in ("component", "known (skipped by fvcore)") else "right")
    for name, count, r in rows:
        known = ", ".join(f"{op} {n:,}" for op, n in r.known.items())
        table.add_row(name, str(count) if count > 1 else "", f"{r.analytic:,}", f"{r.fvcore:,}", known, _mark(r.ok))
    if len(rows) < len(fv.rows):
        table.caption += " Folded rows (×n) show the per-layer figures."
    console.print(table)


def _render_diff(result: CrossCheck, console: Console) -> None:
    failures = result.labelled_failures
    if failures or result.suspicious_ops or not result.ok:
        console.print("[red]differences (analytic vs built):[/red]")
    for label, row in failures:
        ops = getattr(row, "ops", None)
        detail = f"  ops: {dict(ops)}" if ops else ""
        console.print(f"  {label}, {row.component}: analytic {row.analytic:,}, built {row.built:,} "
                      f"(diff {row.built - row.analytic:+,}){detail}", markup=False)
    for op in result.suspicious_ops:
        phase = "forward" if op in result.ops else "backward"
        console.print(f"  op {op.op} ran {op.calls}× in the {phase} with no FLOP formula and a "
                      "matmul-shaped signature: the counted total misses its FLOPs", markup=False)
    if result.real is not None:
        for r in result.real.fvcore.rows:
            if not r.ok:
                counted = ", ".join(f"{op} {n:,}" for op, n in r.ops.items())
                known = ", ".join(f"{op} {n:,}" for op, n in r.known.items())
                skipped = ", ".join(f"{op} ×{n}" for op, n in r.skipped.items())
                console.print(f"  fvcore {r.component}: analytic {r.analytic:,}, fvcore×2 {r.fvcore:,} "
                              f"({counted or 'no ops'}) + known {sum(r.known.values()):,} ({known or 'none'}); "
                              f"fvcore skipped: {skipped or 'nothing'}", markup=False)
    console.print(summary_line(result.checks), soft_wrap=True)


def summary_line(checks: Sequence[Check]) -> str:
    """What ran and matched, what disagreed, what did not run (and why): never "match" for the last."""
    by_status: dict[str, list[Check]] = {"match": [], "mismatch": [], "not run": []}
    for check in checks:
        by_status[check.status].append(check)
    if not by_status["mismatch"] and not by_status["not run"]:
        return "[green]all figures match exactly[/green] (" + ", ".join(c.name for c in checks) + ")"
    parts = []
    if by_status["match"]:
        parts.append("[green]match exactly:[/green] " + ", ".join(c.name for c in by_status["match"]))
    if by_status["mismatch"]:
        parts.append("[red]mismatch:[/red] " + ", ".join(c.name for c in by_status["mismatch"]))
    if by_status["not run"]:
        parts.append("[yellow]not run:[/yellow] " + ", ".join(
            f"{c.name} ({escape(c.detail)})" for c in by_status["not run"]))
    return "; ".join(parts)
