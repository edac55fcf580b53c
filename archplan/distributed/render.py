"""Rich tables (and the exit code) of `verify --layout`."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from archplan import jsonout, units
from archplan.console import echo, settle
from archplan.distributed.check import ANALYTIC_AS, LayoutCheck, check_layout_run
from archplan.distributed.fake import Measured
from archplan.distributed.stage import mtp_refusal
from archplan.errors import ArchplanError
from archplan.planning.layout import Layout, check_layout, parse_layout
from archplan.planning.parallel import MAX_GPUS
from archplan.render import busy, report_console
from archplan.resolve import ModelPlan, MoEPlan, check_mtp_length
from archplan.spec import MAX_BATCH

OK, BAD = "[green]✓[/green]", "[red]✗[/red]"
SHOWN = "[dim]–[/dim]"  # a row shown, not judged (check.MemoryRow.ok is None)


def _spans(layers: tuple[int, ...]) -> str:
    """Layer indices as runs: "12–15, 28–31" (a rank's model chunks under vpp > 1)."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _blocks(m: Measured) -> str:
    """The rank's main layers and multi-token-prediction modules: "layers 56–60, MTP module 0";
    a stage of the embedding or the head alone (pp·vpp up to n + 2 chunks) says which."""
    parts = [f"layers {_spans(m.layers)}"] if m.layers else []
    if m.mtp:
        parts.append(f"MTP {'module' if len(m.mtp) == 1 else 'modules'} {_spans(m.mtp)}")
    return ", ".join(parts) or ("the embedding alone" if m.stage == 0 else "the head alone")


def schedule_name(layout: Layout) -> str:
    return "1F1B" if layout.vpp == 1 else f"interleaved 1F1B, {layout.vpp} chunks"


def render(result: LayoutCheck, console: Console) -> None:
    m = result.measured
    schedule = schedule_name(m.layout)
    micro = units.things(m.microbatches, "micro-batch")
    console.print(f"[bold]archplan verify --layout[/bold] — {escape(result.name)}: {m.layout.label}, "
                  f"{units.things(m.layout.world, 'rank')} (fake process group), seq {m.seq}, {micro}; measured rank {m.rank} = "
                  f"pipeline stage {m.stage} ({_blocks(m)}), {m.in_flight} in flight ({schedule})")
    table = Table(title=f"per-rank peak memory by category (analytic: {ANALYTIC_AS})")
    for col in ("category", "analytic", "measured", "difference", "judged", ""):
        table.add_column(col, justify="left" if col in ("category", "judged") else "right")
    for r in result.memory:
        table.add_row(r.category, units.nbytes(r.analytic), units.nbytes(r.measured),
                      f"{r.measured - r.analytic:+,} B", r.judged, SHOWN if r.ok is None else OK if r.ok else BAD)
    console.print(table)
    console.print(f"  (AdamW's 0-d `step` tensors, kept on the host beside CUDA parameters: {m.adam_step_bytes:,} B, "
                  "not counted)")
    analytic, measured = result.step_peak
    console.print(f"  step peak, one moment (shown): analytic {units.nbytes(analytic)}, measured {units.nbytes(measured)} "
                  f"({analytic / max(measured, 1):.3f}×; the tracker's snapshot at its highest: the measured rows are each "
                  "category's most over the step, which need not coincide)")
    console.print("  (temporary: the analytic row prices FSDP2's bf16 compute copies or gathered layers and the "
                  "gradient copies it makes for the end stages' embedding and head where they are known exactly, "
                  "and the collective buffers too (the reduce-scatter input held into the next micro-batch, a "
                  "gathered layer), so its collective-buffers row reads 0; the measured row is what is alive at the "
                  "step's peak, the other gradient copies, a layer backward's own tensors and a forward's "
                  "transients included: docs/distributed.md)")
    calls = Table(title="collectives per optimizer step (calls; bytes per call, records.py convention)")
    for col in ("kind", "mesh dim", "group", "bytes/call", "analytic", "measured", ""):
        calls.add_column(col, justify="left" if col in ("kind", "mesh dim") else "right")
    for c in result.collectives:
        calls.add_row(c.kind, c.mesh_dim, str(c.group_size), f"{c.bytes:,}", str(c.analytic), str(c.measured),
                      OK if c.ok else BAD)
    console.print(calls)
    console.print(f"FSDP2's copies around them (gathered parameters out, gradients into the reduce buffer), "
                  f"bytes per step: analytic {result.copy_bytes:,}, measured {m.fsdp2_copy_bytes:,} "
                  + (OK if result.copies_ok else BAD))
    console.print(f"FSDP2's accumulation of unsharded gradients over the micro-batches (casts and adds), bytes per "
                  f"step: analytic {result.accumulate_bytes:,}, measured {m.fsdp2_accumulate_bytes:,} "
                  + (OK if result.accumulation_ok else BAD))
    console.print(OK + " all match" if result.ok else BAD + " measured and analytic differ (see ✗ rows)")


def given_layout(plan: ModelPlan, layout_text: str, seq: int, command: str) -> Layout:
    """The one layout `--layout` gives `verify` or `bench`, checked as `plan` checks a given one."""
    experts = max((layer.ffn.n_experts for layer in plan.layers if isinstance(layer.ffn, MoEPlan)), default=0)
    partial = parse_layout(layout_text)
    if why := partial.sp_problem():
        raise ArchplanError(f"--layout: {why}")
    fixed = partial.for_model(experts)
    layout = fixed.complete()
    if layout is None:
        give = ", ".join(f"{name}=" for name in fixed.missing())
        raise ArchplanError(f"--layout: {command} needs every field (tp, cp, pp, dp, zero, recompute, mb; ep "
                            f"for a model with routed experts): give {give}")
    if layout.group:
        # torch's interleaved schedule has no round size to set: a given one would price a schedule
        # the run does not execute
        raise ArchplanError(f"--layout: group={layout.group}: {command} runs the order of torch's "
                            "ScheduleInterleaved1F1B (its own p2p schedule, step.interleaved_1f1b), which sets "
                            "its own rounds (max(1, m div pp) of them); drop group= (plan prices a given one)")
    # no node rule: the fake process group (and one host's torchrun workers) has no nodes, and what
    # is checked, memory and collectives, does not depend on them; plan applies it with its --gpu's
    check_layout(layout, n_layers=len(plan.layers), gpus=None, gpus_per_node=None, n_experts=experts, seq=seq)
    if plan.mtp:  # the modules' targets, as a single-device training step refuses without them
        check_mtp_length(len(plan.mtp), seq)
    if why := mtp_refusal(plan, layout):
        raise ArchplanError(f"--layout: {why}; `plan` prices it, `verify` without --layout and `bench --train` "
                            "run the model")
    # plan's own bounds (its --gpus, size's --micro-batch): the fake process group takes a 32-bit size
    if layout.world > MAX_GPUS:
        raise ArchplanError(f"--layout: {layout.world:,} ranks; at most {MAX_GPUS:,}")
    if layout.mb > MAX_BATCH:
        raise ArchplanError(f"--layout: mb={layout.mb:,}; at most {MAX_BATCH:,}")
    return layout


def default_microbatches(layout: Layout) -> int:
    """The fewest micro-batches at which the rank's memory is what `plan` prices for this layout at
    its own batch (thousands of micro-batches, in rounds of pp under vpp > 1): gradients accumulate
    across micro-batches from 2 on, 1F1B's warm-up fills at pp in flight (Narayanan et al. 2021
    §2.2.1), and the interleaved one at (v − 1)·pp + 2·(pp − 1) + 1 model chunks on stage 0, which
    m·v reaches at m = 2·pp. A smaller count can hold more under vpp > 1: one round of m, pp < m <
    2·pp, fills (v − 1)·m + 2·(pp − 1) + 1 chunks; `--microbatches` runs it, as `plan` prices it."""
    if layout.vpp > 1:
        return 2 * layout.pp
    return max(2, layout.pp)


def verify_layout(plan: ModelPlan, layout_text: str, seq: int, microbatches: int | None, as_json: bool,
                  stage: int | None = None, past_max_seq_len: str | None = None) -> int:
    """Run and show `verify --layout` on `stage` (None: the most loaded); returns the exit code (1
    where a figure disagrees)."""
    layout = given_layout(plan, layout_text, seq, "verify")
    if stage is not None and stage >= layout.pp:
        raise ArchplanError(f"--stage {stage}: the layout has {units.things(layout.pp, 'pipeline stage')}, "
                            f"0 to {layout.pp - 1}")
    with busy(f"one rank's training step of {layout.spec} at {layout.world:,} fake ranks", enabled=not as_json):
        result = check_layout_run(plan, layout, seq, microbatches=microbatches or default_microbatches(layout),
                                  stage=stage)
    code = settle(0 if result.ok else 1)
    if as_json:
        echo(jsonout.dumps({**result.to_json(), "past_max_seq_len": past_max_seq_len}, indent=2))
    else:
        render(result, report_console())
    return code
