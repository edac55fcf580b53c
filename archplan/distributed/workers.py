"""`archplan bench SPEC --layout ... [--nproc N]`: real processes, real collectives.

Each worker (a torchrun process: gloo on CPU, NCCL on CUDA) builds its pipeline stage from
archplan's modules, shards it exactly as `verify --layout` does (`shard.shard_stage`), and times
training steps (1F1B micro-batches, backward, AdamW; `step.StageRunner`) and forward-only prefill
through the same sharded modules. Rank 0 gathers every rank's peak memory and reports tokens/s,
MFU and `plan`'s predicted step time for the layout on that GPU. After the timed work, one more
step counts each rank's model states from its tensors (its shards of the parameters, of their
gradients, FSDP2's unsharded ZeRO-0/1 accumulation included, and AdamW's moments), judged exactly
against `plan`'s FSDP2 figures for that rank's pipeline stage, as `verify --layout` judges one
rank on the fake process group.

On one machine `launch` starts the workers itself through `torch.distributed.run`; under a user's
torchrun / SLURM launcher (RANK and WORLD_SIZE set) the same `archplan bench` runs as a worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from archplan.analytic.flops import training_flops_per_token
from archplan.bench.device import device_peak, peak_memory, reset_peak_memory, synchronize
from archplan.dtypes import DType
from archplan.distributed.context import shard_sequence
from archplan.distributed.mesh import build_mesh
from archplan.distributed.shard import (Sharded, accumulated_grad_bytes, local_bytes, shard_stage, sharded_params,
                                       unit_view_outputs)
from archplan.distributed.stage import build_chunks
from archplan.distributed.step import MicroBatch, StageRunner
from archplan.errors import ArchplanError
from archplan.modules.model import resolve_device
from archplan.planning.cluster import FSDP2, rank_memory
from archplan.planning.layout import Layout
from archplan.resolve import ModelPlan

STATES = ("parameters", "gradients", "optimizer")
OUT_ENV = "ARCHPLAN_BENCH_OUT"  # where rank 0 writes its JSON when `launch` started the workers
SEED = 0


@dataclass(frozen=True)
class DistBench:
    name: str
    layout: str
    world: int
    backend: str
    device: str
    seq: int
    microbatches: int
    steps: int
    step_seconds: list[float]
    prefill_seconds: list[float]
    tokens_per_step: int
    train_tokens_per_s: float
    prefill_tokens_per_s: float
    flops_per_token: int  # training, causal attention, 2 FLOPs per multiply-add
    peak_flops: float  # per device, dense bf16 (datasheet on known GPUs; calibrated on CPU)
    peak_source: str
    mfu: float
    peak_memory_bytes: list[int]  # per rank
    peak_memory_method: str
    predicted_step_seconds: float | None
    prediction_note: str
    # per rank: {"rank", "stage", "measured": {STATES: bytes}, "plan": {STATES: bytes}, "ok"}
    states: list[dict[str, object]]
    states_ok: bool


def _device(kind: str) -> torch.device:
    """This worker's device of `kind` (cpu, cuda, or auto: cuda when available): one GPU per
    local rank."""
    device = resolve_device(kind)
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class _StateCount:
    """A rank's model states counted from its tensors: parameters and AdamW's moments (its 0-d
    `step` tensors aside, as `verify --layout` leaves them) after a step, and the gradients at
    their most, sampled where `StageRunner` samples: before each backward (ZeRO-0/1's accumulated
    micro-batches) and before the optimizer step (every gradient)."""

    def __init__(self, chunks: tuple[Sharded, ...], optimizer: torch.optim.Optimizer) -> None:
        self.units = tuple(u for c in chunks for u in c.units)
        # FSDP2's sharded parameters, which hold the gradients: between a ZeRO-1/2 forward and its
        # step the module's attributes are the gathered bf16 copies instead
        self.params = sharded_params(self.units)
        self.optimizer = optimizer
        self.gradients = 0

    def sample(self) -> None:
        held = sum(local_bytes(p.grad) for p in self.params if p.grad is not None)
        self.gradients = max(self.gradients, held + accumulated_grad_bytes(self.units))

    def counted(self) -> dict[str, int]:
        moments = sum(local_bytes(t) for state in self.optimizer.state.values() for t in state.values()
                      if isinstance(t, torch.Tensor) and t.dim() > 0)
        return {"parameters": sum(local_bytes(p) for p in self.params), "gradients": self.gradients,
                "optimizer": moments}


def _judged_states(plan: ModelPlan, layout: Layout, seq: int, m: int,
                   counted: list[dict[str, int]]) -> list[dict[str, object]]:
    """Each rank's counted states beside plan's FSDP2 figures for its pipeline stage. plan prices
    a stage's first rank, which holds the most: FSDP2 splits dim 0 as torch.chunk does, the
    first ranks taking the rounded-up share. So the first rank of each stage must equal plan's
    figures and the others may hold less, never more. plan's figures are one set per stage, priced
    once each, not once per rank."""
    priced = [rank_memory(plan, layout, seq, microbatches=m, stage=stage, states=FSDP2, loss="eager")
              for stage in range(layout.pp)]
    rows: list[dict[str, object]] = []
    for rank, measured in enumerate(counted):
        stage, first = divmod(rank, layout.stage_ranks)
        expected = {name: getattr(priced[stage], name) for name in STATES}
        ok = all(measured[n] == expected[n] if first == 0 else measured[n] <= expected[n] for n in STATES)
        rows.append({"rank": rank, "stage": stage, "measured": measured, "plan": expected, "ok": ok})
    return rows


def _prediction(plan: ModelPlan, layout: Layout, seq: int, m: int, device: torch.device) -> tuple[float | None, str]:
    """plan's step time for this layout on this GPU (none on CPU: no accelerator model)."""
    if device.type != "cuda":
        return None, "plan models GPUs only; no prediction on CPU"
    from archplan.hardware import match_device_name
    from archplan.planning.cluster import FSDP2
    from archplan.planning.parallel import Evaluator, Settings, interconnect

    gpu = match_device_name(torch.cuda.get_device_name(device))
    if gpu is None:
        return None, f"{torch.cuda.get_device_name(device)} is not in archplan's hardware table"
    # the workers' loss is F.cross_entropy on fp32 logits (`step.StageRunner.loss`), not plan's
    # default fused one (at 2,048 tokens, DP2 on H100: gemma-2b's step 2.6% longer so, gpt2's 6.5%)
    settings = Settings(states=FSDP2, grad_reduce=4, cross_entropy="eager")
    evaluator = Evaluator(plan, gpu, interconnect(gpu), seq, settings, usable=1 << 62)
    return (evaluator.evaluate(layout, m).time.total,
            f"plan --layout on {gpu.name}, FSDP2 states, fp32 reduce, eager cross-entropy")


def _batches(plan: ModelPlan, layout: Layout, seq: int, m: int, device: torch.device, dp_rank: int,
             cp_rank: int) -> list[MicroBatch]:
    """The data-parallel replica's sequences, this cp rank's chunks of them."""
    gen = torch.Generator().manual_seed(SEED + 1 + dp_rank)
    out = []
    for _ in range(m):
        tokens = torch.randint(0, plan.vocab_size, (layout.mb, seq), generator=gen)
        labels = torch.roll(tokens, -1, dims=1)
        out.append(MicroBatch(*(shard_sequence(x, cp_rank, layout.cp).to(device) for x in (tokens, labels)),
                              sequence_BT=tokens.to(device) if layout.cp > 1 else None))
    return out


def _prefill(runner: StageRunner, batches: list[MicroBatch]) -> None:
    """Forward-only through the pipeline: each of the rank's model chunks, in model order,
    receives, computes and sends each micro-batch. Chunk by chunk, then micro-batch by micro-batch,
    every rank waits only on work that comes earlier in that order on another rank (chunk c of
    micro-batch i needs chunk c of i on the previous rank, or chunk c − 1 of i on the last), and the
    sends do not block, so interleaved chunks (vpp > 1) cannot deadlock."""
    with torch.no_grad():
        for chunk in runner.chunks:
            stage = chunk.stage
            for batch in batches:
                if stage.first:
                    x = batch.tokens_BT
                else:
                    x = torch.empty(runner.hidden_shape, dtype=chunk.compute_dtype, device=runner.device)
                    dist.recv(x, runner.peer(-1), group=runner.pp_group)
                with unit_view_outputs():
                    out = stage(x)
                if not stage.last:
                    runner.send(out, 1)
        for work in runner.pending:
            work.wait()
        runner.pending.clear()


def _timed(fn, device: torch.device, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(n):
        synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        synchronize(device)
        dist.barrier()
        samples.append(time.perf_counter() - start)
    return samples


def run_worker(plan: ModelPlan, layout: Layout, seq: int, *, microbatches: int, steps: int,
               warmup: int, device_kind: str = "auto") -> DistBench | None:
    """One worker's part; rank 0 returns the gathered result, the others None."""
    device = _device(device_kind)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    if dist.get_world_size() != layout.world:
        raise ArchplanError(f"--layout needs {layout.world} ranks; this run has {dist.get_world_size()}")
    mesh = build_mesh(layout, device.type)
    torch.manual_seed(SEED)  # every replica of a shard starts from the same weights
    chunks = tuple(shard_stage(chunk, mesh, balanced=False)
                   for chunk in build_chunks(plan, layout, mesh.stage, device, torch.float32))
    # fused, as `verify --layout` measures it (`fake.measure`) and `plan` prices the torch engine's
    optimizer = torch.optim.AdamW([p for c in chunks for p in c.stage.parameters()], lr=1e-4, fused=True)
    local_seq = seq // layout.cp // (layout.tp if layout.sequence_parallel else 1)
    runner = StageRunner(chunks, mesh, optimizer, (layout.mb, local_seq, plan.d_model), device)
    batches = _batches(plan, layout, seq, microbatches, device, mesh.data_rank, mesh["cp"].get_local_rank())
    for _ in range(warmup):
        runner.train_step(batches)
    reset_peak_memory(device)
    step_s = _timed(lambda: runner.train_step(batches), device, steps)
    memory, method = peak_memory(device, since="the warm-up steps")
    prefill_s = _timed(lambda: _prefill(runner, batches), device, steps)
    states = _StateCount(chunks, optimizer)
    runner.sample = states.sample
    runner.train_step(batches)
    counted: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(counted, states.counted())
    memories: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(memories, memory)
    if dist.get_rank() != 0:
        return None
    tokens = microbatches * layout.mb * seq * layout.dp
    step, prefill = statistics.median(step_s), statistics.median(prefill_s)
    flops_per_token = training_flops_per_token(plan, seq, "causal", "none", layout.mb)
    peak = device_peak(device, DType.bf16)  # FSDP2 computes in bf16 (shard.MIXED)
    predicted, note = _prediction(plan, layout, seq, microbatches, device)
    judged = _judged_states(plan, layout, seq, microbatches, [c for c in counted if c is not None])
    return DistBench(
        plan.name, layout.spec, layout.world, dist.get_backend(), device.type, seq, microbatches, steps,
        step_s, prefill_s, tokens, tokens / step, tokens / prefill, flops_per_token, peak.peak_flops,
        peak.source, flops_per_token * tokens / step / (layout.world * peak.peak_flops),
        [int(m) for m in memories if m is not None], method, predicted, note, judged,
        all(row["ok"] for row in judged))


def under_launcher() -> bool:
    """True inside torchrun / a SLURM job started through torchrun (the worker side)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def write_result(result: DistBench) -> bool:
    """Hand rank 0's result to the `launch` that started the workers, if one did."""
    out = os.environ.get(OUT_ENV)
    if out:
        Path(out).write_text(json.dumps(asdict(result)))
    return bool(out)


def launch(argv: list[str], nproc: int) -> DistBench:
    """Start `nproc` workers of `archplan bench argv` on this machine through torch.distributed.run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "rank0.json")
        # PYTHONSAFEPATH (Python 3.11+): `-m` would put the working folder first on sys.path, where
        # a folder named archplan (the one above a checkout) would shadow the installed package;
        # the folder this process imported archplan from goes first instead, so that the workers
        # run the parent's code, not another install's (or none)
        paths = [_package_root(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, OUT_ENV: str(out), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONSAFEPATH": "1", "PYTHONPATH": os.pathsep.join(paths)}
        # --log-dir: torchrun's own folder (its workers' error files) inside this one, removed with
        # it; by default torchrun makes a torchelastic_* folder in the system's and leaves it there
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--log-dir={Path(tmp, 'torchrun')}", "-m", "archplan.cli", "bench", *argv]
        done = _run_group(cmd, env)
        if done.returncode != 0 or not out.exists():
            output = done.stdout + done.stderr
            error = ArchplanError if _input_refused(_lines(output)) else WorkersFailed
            raise error(f"bench --nproc {nproc}: the workers failed: {failure(output)}")
        return DistBench(**json.loads(out.read_text()))


def _package_root() -> str:
    """The folder holding the archplan package this process runs (a checkout, an editable
    install's source, site-packages)."""
    return str(Path(__file__).resolve().parents[2])


def _run_group(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run torchrun in a session of its own and take its whole process group down with this one:
    a SIGTERM sent to this process alone (`kill`, a CI job's timeout, a supervisor) left torchrun
    and its workers running, holding their devices. A new session no longer hears the terminal's
    Ctrl-C or hangup, so this process passes on the signals a terminal, a CI job or a batch system
    ends a process with (`ENDING_SIGNALS`; SIGKILL cannot be caught, and leaves them running). Off
    the main thread, where no handler can be installed, torchrun stays in this process's group
    instead, and the signals sent to the group reach it directly."""
    separate = threading.current_thread() is threading.main_thread() and hasattr(os, "killpg")  # POSIX only
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=separate)
    try:
        with ending_signals_exit(enabled=separate):
            stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            _stop(proc, separate)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@contextmanager
def ending_signals_exit(enabled: bool = True) -> Iterator[None]:
    """While the block runs, the signals that would end this process by their default action
    (`ENDING_SIGNALS`) raise SystemExit(128 + signum) instead, so that its `finally` and `with`
    exits run: torchrun's group is taken down, the workers' private files removed. A signal
    ignored (nohup's SIGHUP) or handled by the caller keeps its meaning; off the main thread no
    handler can be installed, and the block runs as it is."""
    enabled = enabled and threading.current_thread() is threading.main_thread()
    present = [getattr(signal, name) for name in ENDING_SIGNALS if hasattr(signal, name)] if enabled else []
    passed_on = [signum for signum in present if signal.getsignal(signum) == signal.SIG_DFL]
    previous = {signum: signal.getsignal(signum) for signum in passed_on}

    def stop(signum: int, _frame: object) -> None:
        # a second signal, while the exits run (torchrun's group stopping), ends the process
        for passed, handler in previous.items():
            signal.signal(passed, handler)
        raise SystemExit(128 + signum)

    for signum in passed_on:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(proc: subprocess.Popen[str], group: bool) -> None:
    """SIGTERM to torchrun's group (torchrun passes it to its workers), SIGKILL after GROUP_STOP_S."""
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.terminate()
    try:
        proc.wait(timeout=GROUP_STOP_S)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()


# the signals a terminal (hangup, quit), a CI job or supervisor (term) and a batch system's CPU
# limit (xcpu) end a process with, by their default action (Ctrl-C raises KeyboardInterrupt, which
# the `finally` above sees already)
ENDING_SIGNALS = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGXCPU")
# how long torchrun and its workers get to stop on SIGTERM before they are killed
GROUP_STOP_S = 30


class WorkersFailed(ArchplanError):
    """The workers crashed or were killed: one line, as bad input is, but exit code 3, since the
    input was not at fault (2 is bad input, 1 a check that disagrees)."""

    exit_code = 3


# the last line of a Python traceback: `torch.OutOfMemoryError: CUDA out of memory. ...`
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)(: |$)")
# `python -m` that finds no module prints no traceback, only this line:
# `python: Error while finding module specification for 'archplan.cli' (ModuleNotFoundError: ...)`
_MODULE_SPEC = re.compile(r"^.*Error while finding module specification for .*? \((\w+Error: .*)\)$")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:")
# a worker's report that a collective or the rendezvous failed under it (bench's `WorkersFailed`
# in the worker, exit 3): the peers' failure seen from one rank, not a refusal of the input
_PEER_FAILED = re.compile(r"^archplan: error: rank (\d+|\?): ")


def _input_refused(lines: list[str]) -> bool:
    """Whether a worker refused its input (exit 2, as archplan does): then the input is at fault.
    torchrun's root cause says which exit came first where it printed one; a worker that reports
    its peers' failure (`WorkersFailed`) prints an `archplan: error:` line too, but exits 3."""
    root = _root_cause(lines)
    if root is not None:
        return root[1] == "2" and not root[2]
    return bool(_refusals(lines))


def failure(output: str) -> str:
    """Why the workers failed, in one line: a worker killed by a signal (torchrun's root cause: the
    ranks that survive it then fail on the broken connection, "Connection reset by peer", and say
    so in their own line, which is not why), else a worker's refusal of its input, else the last
    exception a worker raised (e.g. torch's out-of-memory error, where its peers then report the
    aborted collective), else a worker's report of its peers' failure, else the root cause's rank
    and exit code, else the last line that is not a rule."""
    lines = _lines(output)
    root = _root_cause(lines)
    if root is not None and root[2]:
        return _root_cause_text(*root)
    ours = _refusals(lines)
    if ours:
        return ours[-1].removeprefix("archplan: error:").strip()
    raised = [_MODULE_SPEC.sub(r"\1", line) for line in lines
              if (_EXCEPTION_LINE.match(line) or _MODULE_SPEC.match(line)) and "ChildFailedError" not in line]
    if raised:
        return raised[-1]
    peers = [line for line in lines if _PEER_FAILED.match(line)]
    if peers:
        return peers[-1].removeprefix("archplan: error:").strip()
    if root is not None:
        return _root_cause_text(*root)
    told = [line for line in lines if line and set(line) - set("=-")]
    return told[-1] if told else "no output"


def _lines(output: str) -> list[str]:
    # torchrun prefixes what a worker prints with its rank ("[rank1]: RuntimeError: ...")
    return [_RANK_PREFIX.sub("", line.strip()).strip() for line in output.splitlines()]


def _refusals(lines: list[str]) -> list[str]:
    """The workers' refusals of their input: their own `archplan: error:` lines, but for the
    reports of a failed peer (`_PEER_FAILED`)."""
    return [line for line in lines if line.startswith("archplan: error:") and not _PEER_FAILED.match(line)]


def _root_cause(lines: list[str]) -> tuple[str, str, str] | None:
    """(rank, exit code, signal name or "") of torchrun's failure summary, if it printed one."""
    if "Root Cause (first observed failure):" not in lines:
        return None
    root = lines[lines.index("Root Cause (first observed failure):"):]
    pairs = (line.split(":", 1) for line in root if ":" in line)
    fields = {key.strip(): value.strip() for key, value in pairs}
    signal = re.search(r"\((SIG[A-Z]+)\)", fields.get("exitcode", ""))
    return (fields.get("rank", "?").split(" ")[0], fields.get("exitcode", "?").split(" ")[0],
            signal.group(1) if signal else "")


def _root_cause_text(rank: str, code: str, signal: str) -> str:
    oom = ": killed by the system, most often for lack of memory" if signal == "SIGKILL" else ""
    return f"rank {rank} exited with code {code}" + (f" ({signal}{oom})" if signal else "")
