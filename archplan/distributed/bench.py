"""`archplan bench --layout`: the launcher / worker dispatch and the table (`workers` runs it)."""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

from archplan import jsonout
from archplan.bench.runner import LAYOUT_FLOPS_CONVENTION
from archplan.commands.requires import INSTALL
from archplan.console import echo, settle
from archplan.distributed.mesh import available_host_bytes
from archplan.distributed.render import default_microbatches, given_layout, schedule_name
from archplan.distributed.step import interleaved_1f1b
from archplan.distributed.workers import (
    DistBench,
    WorkersFailed,
    ending_signals_exit,
    launch,
    run_worker,
    under_launcher,
    write_result,
)
from archplan.errors import ArchplanError, first_line
from archplan.loader import load_spec, spec_as_file
from archplan.modules.model import resolve_device
from archplan.planning.layout import Layout, parse_layout
from archplan.render import busy, report_console
from archplan.resolve import ModelPlan, resolve
from archplan.units import count, flops, nbytes, percent, things


def bench_layout(spec: str, layout_text: str, *, nproc: int | None, seq: int, microbatches: int | None,
                 warmup: int, steps: int, as_json: bool, device: str = "auto",
                 past_max_seq_len: str | None = None) -> bool:
    """Run (or, under a launcher, take part in) the layout's benchmark and print it; whether every
    rank's model states are plan's (True on the workers that print nothing)."""
    if importlib.util.find_spec("numpy") is None:
        # the ranks gather their counts with all_gather_object, which torch runs through NumPy
        raise ArchplanError(f"`archplan bench --layout` needs NumPy, which is not installed: {INSTALL}")
    plan = resolve(load_spec(spec))
    layout = given_layout(plan, layout_text, seq, "bench")
    plan.check_length(seq, "--seq")
    m = microbatches or default_microbatches(layout)
    if under_launcher():
        if "MASTER_ADDR" not in os.environ:
            # RANK and WORLD_SIZE left in the environment, not a torchrun worker: init_process_group
            # would stop at the missing rendezvous address with a traceback
            raise ArchplanError("RANK and WORLD_SIZE are set but MASTER_ADDR is not: start the workers with "
                                "torchrun, or unset RANK and WORLD_SIZE and let bench launch its own (--nproc)")
        if nproc is not None:
            raise ArchplanError(f"--nproc {nproc}: under a launcher (RANK and WORLD_SIZE set) this process is one "
                                "worker and the launcher starts the others; drop --nproc")
        if (world := os.environ["WORLD_SIZE"]) != str(layout.world):
            raise ArchplanError(f"WORLD_SIZE {world}: the layout has {things(layout.world, 'rank')}")
        try:
            result = run_worker(plan, layout, seq, microbatches=m, steps=steps, warmup=warmup, device_kind=device)
        except RuntimeError as exc:
            # the rendezvous or a collective failed (a peer that never joined or died, a network
            # error): one line, exit 3, as the launching process reports its workers' failures.
            # torch raises DistError for what it names; gloo's transport a plain RuntimeError
            if not isinstance(exc, torch.distributed.DistError) and not _transport_error(exc):
                raise
            # "rank N: ..." is the form the launching process tells from a refusal (`workers._PEER_FAILED`)
            raise WorkersFailed(f"rank {os.environ.get('RANK', '?')}: {type(exc).__name__}: {first_line(exc)}") from exc
        if result is None:
            return True
        if write_result(result):
            return True  # `launch` started this worker: the parent process judges and exits
    else:
        n = nproc or layout.world
        if n != layout.world:
            raise ArchplanError(f"--nproc {n}: the layout has {things(layout.world, 'rank')}")
        kind = resolve_device(device).type  # an unusable device fails here, before any worker starts
        _check_splits(plan, layout)
        interleaved_1f1b(0, layout.pp, layout.vpp, m)  # the schedule's refusal of m, before any worker
        if kind == "cpu":
            _check_host_memory(plan, layout, seq, m, n)
        # a signal that ends this process ends it through the block's exits from the start: a
        # piped spec's copy is removed even if the signal comes before torchrun does
        with ending_signals_exit(), spec_as_file(spec) as path, \
                busy(f"{n} torchrun workers ({kind}): warm-up and {things(steps, 'timed step')}", enabled=not as_json):
            argv = [path, "--layout", layout.spec, "--seq", str(seq), "--microbatches", str(m),
                    "--warmup", str(warmup), "--iters", str(steps), "--device", kind]
            result = launch(argv, n)
    settle(0 if result.states_ok else 1)
    if as_json:
        echo(jsonout.dumps({**asdict(result), "flops_convention": LAYOUT_FLOPS_CONVENTION,
                            "past_max_seq_len": past_max_seq_len}, indent=2))
    else:
        render(result)
    return result.states_ok


# what gloo's TCP transport says when a peer is gone (gloo/transport/tcp/pair.cc)
_TRANSPORT_ERRORS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer")


def _transport_error(exc: RuntimeError) -> bool:
    return any(text in str(exc) for text in _TRANSPORT_ERRORS)


def _check_splits(plan: ModelPlan, layout: Layout) -> None:
    """What every worker would refuse when it shards its stage (heads that do not split over tp, a
    mixer context parallelism cannot shard), asked once here on a meta-device stage holding every
    layer, before torchrun starts workers to fail the same way."""
    from archplan.distributed.context import check_cp
    from archplan.distributed.plans import check_tp
    from archplan.distributed.stage import Stage

    with torch.device("meta"):
        stage = Stage(plan, list(range(len(plan.layers))), first=True, last=True)
    check_tp(plan, stage, layout.tp, layout.sequence_parallel)
    check_cp(stage, layout.cp)


# What a worker's interpreter holds before its model: the CLI, torch, torch.distributed and
# archplan's worker loaded, as VmRSS of /proc/self/status (Linux; 0 elsewhere, where the check is
# skipped)
_RESIDENT_PROBE = ("import archplan.cli, archplan.distributed.bench, re; "
                   "print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")


def _resident_bytes() -> int:
    """The resident set of a fresh interpreter with what a worker imports, measured in one (this
    process's own may hold far more: a test run's, a notebook's)."""
    if not Path("/proc/self/status").exists():
        return 0
    probe = subprocess.run([sys.executable, "-c", _RESIDENT_PROBE], capture_output=True, text=True,
                           env={**os.environ, "PYTHONSAFEPATH": "1"})
    return int(probe.stdout.strip()) * 1024 if probe.returncode == 0 and probe.stdout.strip().isdigit() else 0


def _check_host_memory(plan: ModelPlan, layout: Layout, seq: int, microbatches: int, nproc: int) -> None:
    """CPU workers share the host's memory: refuse, before launching, a layout whose ranks need more
    than it has available, rather than let the system kill a worker mid-step. A rank needs `plan`'s
    FSDP2 figure for its tensors and a runtime of its own: the interpreter with torch and archplan
    loaded, measured in a fresh one (0.31 GiB), twice over for what gloo, the step's autograd and
    the allocator's arenas add. gpt2 at dp 4 and 12, 16 tokens, measured 0.56–0.75 GiB a rank
    (VmHWM) beyond plan's figure; 2 × 0.31 GiB was the runtime's share of it."""
    from archplan.planning.cluster import FSDP2, rank_memory

    available = available_host_bytes()
    if available is None:
        return
    tensors = rank_memory(plan, layout, seq, microbatches=microbatches, states=FSDP2, loss="eager").total
    runtime = 2 * _resident_bytes()
    need = nproc * (tensors + runtime)
    if need > available:
        raise ArchplanError(f"bench --nproc {nproc} on CPU: the ranks need about {nbytes(need)} "
                            f"({nproc} × plan's FSDP2 figure for the most loaded stage, {nbytes(tensors)}, "
                            f"and a worker's runtime, {nbytes(runtime)}), more than the {nbytes(available)} "
                            "this machine has available; try a smaller spec, a shorter --seq or fewer ranks")


def _states_text(states: dict[str, int]) -> str:
    return " + ".join(f"{name} {nbytes(b)}" for name, b in states.items())


def render(r: DistBench) -> None:
    table = Table(title=f"{escape(r.name)}: {r.layout} on {r.world} {r.device} processes ({r.backend}), seq {r.seq}, "
                        f"{things(r.microbatches, 'micro-batch')}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")
    step = statistics.median(r.step_seconds)  # the median the tokens/s and MFU rows come from
    table.add_row("training step median", f"{1e3 * step:,.1f} ms",
                  f"{r.steps} timed; forward + backward ({schedule_name(parse_layout(r.layout).complete())}) + AdamW; "
                  f"{count(r.tokens_per_step)} tokens")
    table.add_row("training tokens/s", count(r.train_tokens_per_s), "all ranks")
    table.add_row("MFU", percent(r.mfu), f"{flops(r.flops_per_token)}/token (model FLOPs: below); "
                  f"peak {flops(r.peak_flops, 'FLOP/s')} per device ({r.peak_source})")
    table.add_row("prefill tokens/s", count(r.prefill_tokens_per_s), "forward only, same sharded modules")
    table.add_row("peak memory per rank", " / ".join(nbytes(b) for b in r.peak_memory_bytes), r.peak_memory_method)
    predicted = f"{1e3 * r.predicted_step_seconds:,.1f} ms" if r.predicted_step_seconds is not None else "—"
    table.add_row("plan's predicted step", predicted, r.prediction_note)
    wrong = [row for row in r.states if not row["ok"]]
    verdict = ("✓ plan's FSDP2 figures" if not wrong else
               "✗ " + "; ".join(f"rank {row['rank']}: {_states_text(row['measured'])}, plan "
                                f"{_states_text(row['plan'])}" for row in wrong))
    table.add_row("model states per rank", " / ".join(nbytes(sum(row["measured"].values())) for row in r.states),
                  f"{verdict} (parameters + gradients + AdamW moments, counted from each rank's tensors; "
                  "exact on each stage's first rank)")
    table.caption = f"model FLOPs: {LAYOUT_FLOPS_CONVENTION}"
    report_console(table).print(table)
