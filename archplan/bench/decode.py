"""What one decode step dispatches, and what it costs on this device (docs/benchmarks.md, "`bench`
decode model"). Imports torch: only `archplan bench` uses it.

A dispatch mode records one decode step of the built model, at the context of the median timed step
(`record_step_at`), call by call, by layer kind (block hooks set the kind; everything outside the
blocks is "embed+head"), in three groups:

- weight matmuls: matmuls with an operand on a parameter's storage (mm, addmm, grouped_mm, ...).
  Their time is priced as the weights' bytes over a GEMV bandwidth calibrated on those same calls:
  each distinct call re-issued at its recorded shapes, strides and dtype on fresh copies of the
  weight, streamed past the last-level cache (CPU) or L2 (GPU), between the timed steps
  (`WeightStreams.sample`);
- attention kernels (SDPA), and
- every other op (norms, rotary, cache writes, views, activations, argmax, matmuls on the cache):
  priced by re-issuing the recorded calls with their recorded arguments (`Replay.sample`, between
  the timed steps so that both see the same load). What a dispatched op costs then comes from the
  op kinds and shapes the step really dispatches, not from a stand-in chain of simple ops.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from archplan.bench.device import synchronize
from archplan.bench.roofline import DecodeRates, OpCount, kind_counts, layer_kind
from archplan.modules.cache import ModelCache
from archplan.modules.positions import RotaryEmbedding
from archplan.resolve import ModelPlan

MATMULS = ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "_grouped_mm", "convolution")
GROUPS = ("matmuls", "attention", "others")
# Fresh weights streamed per calibrated call: beyond a CPU last-level cache (32 MiB here) and a
# GPU's L2 (50 MB on H100, 60 MB on H200), so every call reads its weight from memory, as a step of
# a real model does; at most MAX_COPIES copies, so a toy model's weights stay cache-sized, as in its step.
STREAM_BYTES = 1 << 27
MAX_COPIES = 64


@dataclass(frozen=True)
class Call:
    """One dispatched aten call, as recorded: replayable with `run`."""

    func: Any  # torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    weight: int | None  # index in args of the parameter operand (weight matmuls only)

    def run(self, args: tuple[Any, ...] | None = None) -> object:
        return self.func(*(self.args if args is None else args), **self.kwargs)


class StepRecorder(TorchDispatchMode):
    """Records the calls of a step by layer kind and group (see the module docstring); with
    `keep=False` it only counts them, keeping none of their tensors (a prefill's activations would
    stay alive in a recording).

    A recorded call that writes into a tensor (a cache write, an in-place update of an SSM state)
    runs on the private copy its replays write into (`_private`), so recording a step leaves the
    model's state as it was: only the cache's counters move (`record_step_at` sets them back).
    What the step computes after such a write reads the unwritten tensor: its values are not a
    decode's, its shapes, strides and kernels are, which is what the replays time.

    The copies are one buffer per layout, shared by every call that writes a tensor of that layout:
    a cache write's target is a one-position view whose strides span the layer's whole cache, so a
    copy per call held a second cache (every layer's K and V); shared, they hold one layer's. No
    replay reads what another wrote back as a value that matters, only as an operand of its shape.
    """

    def __init__(self, parameters: Iterable[Tensor], keep: bool = True) -> None:
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.scratch: dict[tuple[object, ...], Tensor] = {}
        self.keep = keep
        self.kind = "embed+head"
        self.calls: dict[str, dict[str, list[Call]]] = defaultdict(lambda: defaultdict(list))
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def _weight(self, args: tuple[Any, ...]) -> int | None:
        """The largest operand on a parameter's storage (a weight, or its transposed view)."""
        found = [(a.numel(), i) for i, a in enumerate(args)
                 if isinstance(a, Tensor) and a.untyped_storage().data_ptr() in self.storages]
        return max(found)[1] if found else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        weight = self._weight(args) if name in MATMULS else None
        if weight is not None:
            group = "matmuls"
        elif name.startswith(("_scaled_dot_product", "scaled_dot_product")):
            group = "attention"
        else:
            group = "others"
        kwargs = kwargs or {}
        self.counts[self.kind][group] += 1
        if not self.keep:
            return func(*args, **kwargs)
        written = {a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        names = [a.name for a in func._schema.arguments]
        call = Call(func, tuple(self._private(a) if names[i] in written else a for i, a in enumerate(args)),
                    {k: self._private(v) if k in written else v for k, v in kwargs.items()}, weight)
        self.calls[self.kind][group].append(call)
        return call.run()

    def _private(self, arg: object) -> object:
        """A copy, same layout and values, for a call that writes into `arg` (a cache write, an
        in-place update of an SSM state) to write into, recorded and replayed: the model's state is
        left alone. The layout's shared buffer (see the class docstring)."""
        if not isinstance(arg, Tensor):
            return arg
        key = (arg.shape, arg.stride(), arg.dtype, arg.device)
        if key not in self.scratch:
            self.scratch[key] = torch.empty_strided(arg.shape, arg.stride(), dtype=arg.dtype, device=arg.device)
        return self.scratch[key].copy_(arg)


@dataclass
class RecordedStep:
    """One decode step's calls by kind and group, and how many built layers each kind has."""

    calls: dict[str, dict[str, list[Call]]]
    built: dict[str, int]  # built layers per kind, and "embed+head": 1

    def ops(self) -> dict[str, OpCount]:
        """Calls per ONE layer of each kind (the built layers of a kind averaged)."""
        return _per_layer({kind: {g: len(calls) for g, calls in groups.items()}
                           for kind, groups in self.calls.items()}, self.built)


def _per_layer(counts: dict[str, dict[str, int]], built: dict[str, int]) -> dict[str, OpCount]:
    """Calls per ONE layer of each kind from the calls of all its built layers, by group."""
    return {kind: OpCount(*(round(counts.get(kind, {}).get(g, 0) / n) for g in GROUPS)) for kind, n in built.items()}


def _run_by_kind(mode: StepRecorder, model: torch.nn.Module, plan: ModelPlan, step: Callable[[], object]) -> None:
    """Run `step` once under `mode`, block hooks switching its layer kind."""
    handles = []
    for layer, block in zip(plan.layers, model.layers):  # type: ignore[attr-defined]

        def enter(_m: object, _a: object, kind: str = layer_kind(layer)) -> None:
            mode.kind = kind

        def leave(_m: object, _a: object, _o: object) -> None:
            mode.kind = "embed+head"

        handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    try:
        with mode:
            step()
    finally:
        for h in handles:
            h.remove()


def record_step(model: torch.nn.Module, plan: ModelPlan, step: Callable[[], object]) -> RecordedStep:
    """Run `step` once under a `StepRecorder` (its writes into private copies)."""
    recorder = StepRecorder(model.parameters())
    _run_by_kind(recorder, model, plan, step)
    built = kind_counts(plan)
    return RecordedStep({kind: {g: recorder.calls[kind][g] for g in GROUPS} for kind in built}, built)


def record_step_at(model: torch.nn.Module, plan: ModelPlan, cache: ModelCache, step: Callable[[], object],
                   context: int) -> RecordedStep:
    """Record the decode `step` as it runs attending `context` keys (itself included), then set the
    cache's counters back: the replays then re-issue the attention, and the ops on the cache, of
    the step the decode model prices, not of the first step after the prompt (a prompt of 16 tokens
    and 256 steps: 17 keys against a median 145). The cache's tensors are as they were: the
    recorded writes went into private copies (`StepRecorder`), and the rotary tables the model
    keeps for its last position sets are put back: the recorded step's would spare a timed step at
    its position the work the priced step includes."""
    seen = cache.seen
    tables = {id(m.tables): m.tables for m in model.modules() if isinstance(m, RotaryEmbedding)}
    kept = {key: dict(t.built) for key, t in tables.items()}
    cache.seek(context - 1)
    try:
        return record_step(model, plan, step)
    finally:
        cache.seek(seen)
        for key, t in tables.items():
            t.built = kept[key]


def count_pass(model: torch.nn.Module, plan: ModelPlan, step: Callable[[], object]) -> dict[str, OpCount]:
    """Calls per ONE layer of each kind (and of "embed+head") that `step` dispatches, as
    `RecordedStep.ops` counts them, without recording them."""
    counter = StepRecorder(model.parameters(), keep=False)
    _run_by_kind(counter, model, plan, step)
    return _per_layer(counter.counts, kind_counts(plan))


class Replay:
    """Per-layer seconds of each kind's attention kernels and other ops, re-issued as recorded.

    Replayed under inference mode with the recorded arguments (the real cache included), so each
    call sees the shapes, strides, dtypes and kernels of the step; a call that writes into a tensor
    (a cache write) writes into a private copy of it made when recorded. On CUDA one
    synchronisation ends each group: a group of small ops measures the host's issue rate, which is
    what bounds it there. Medians over the samples.
    """

    def __init__(self, recorded: RecordedStep, device: torch.device) -> None:
        self.recorded, self.device = recorded, device
        self.samples: dict[tuple[str, str], list[float]] = defaultdict(list)

    def sample(self) -> None:
        with torch.inference_mode():
            for kind, groups in self.recorded.calls.items():
                for group in ("attention", "others"):
                    if not groups[group]:
                        continue
                    synchronize(self.device)
                    start = time.perf_counter()
                    for call in groups[group]:
                        call.run()
                    synchronize(self.device)
                    self.samples[kind, group].append(time.perf_counter() - start)

    def per_layer(self, group: str) -> dict[str, float]:
        return {kind: statistics.median(self.samples[kind, group]) / n if self.samples[kind, group] else 0.0
                for kind, n in self.recorded.built.items()}


def _weight_bytes(call: Call) -> float:
    """Bytes of weight one call reads: the operand, or for grouped_mm only the experts that own rows
    (its `offs` are each group's end row; an empty group reads nothing)."""
    assert call.weight is not None
    w = call.args[call.weight]
    if call.func.overloadpacket.__name__ == "_grouped_mm":
        offs = call.kwargs.get("offs", call.args[2] if len(call.args) > 2 else None)
        assert isinstance(offs, Tensor)
        ends = offs.tolist()
        owned = sum(1 for start, end in zip([0, *ends[:-1]], ends) if end > start)
        return w.numel() // w.shape[0] * owned * w.element_size()
    return w.numel() * w.element_size()


def _key(arg: object) -> object:
    """What a call's speed depends on: a float tensor's layout, an index tensor's values (grouped_mm's
    offsets choose the experts it reads)."""
    match arg:
        case Tensor() if arg.is_floating_point():
            return arg.shape, arg.stride(), arg.dtype
        case Tensor():
            return tuple(arg.flatten().tolist())
        case list() | tuple():
            return tuple(_key(a) for a in arg)
        case _:
            return arg


def _signature(call: Call) -> object:
    return call.func, _key(call.args), _key(sorted(call.kwargs.items()))


class WeightStreams:
    """Each distinct weight matmul of the step, re-issued on fresh copies of its weight (enough to
    stream STREAM_BYTES past the caches, at most MAX_COPIES). `sample` (between the timed steps, as
    `Replay.sample`: memory bandwidth on a shared machine drifts too) times one pass over each:
    seconds per call, and the host's seconds to issue it."""

    def __init__(self, recorded: RecordedStep, device: torch.device) -> None:
        self.device = device
        self.streams: dict[object, tuple[Call, list[tuple[Any, ...]]]] = {}
        self.samples: dict[object, list[tuple[float, float]]] = defaultdict(list)
        for groups in recorded.calls.values():
            for call in groups["matmuls"]:
                key = _signature(call)
                if key in self.streams:
                    continue
                assert call.weight is not None
                w = call.args[call.weight]
                n = min(MAX_COPIES, max(1, math.ceil(STREAM_BYTES / max(w.numel() * w.element_size(), 1))))
                copies = [torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=device).fill_(1 / 64)
                          for _ in range(n)]
                self.streams[key] = (call, [call.args[:call.weight] + (c,) + call.args[call.weight + 1:]
                                            for c in copies])
        self._pass(record=False)  # first touch of the fresh pages

    def _pass(self, record: bool) -> None:
        with torch.inference_mode():
            for key, (call, argss) in self.streams.items():
                synchronize(self.device)
                start = time.perf_counter()
                for args in argss:
                    call.run(args)
                issued = time.perf_counter()
                synchronize(self.device)
                if record:
                    self.samples[key].append(((time.perf_counter() - start) / len(argss),
                                              (issued - start) / len(argss)))

    def sample(self) -> None:
        self._pass(record=True)

    def per_call(self, call: Call) -> tuple[float, float]:
        """Median seconds of one call, and of its host issue."""
        total, host = zip(*self.samples[_signature(call)])
        return statistics.median(total), statistics.median(host)


def decode_rates(recorded: RecordedStep, replay: Replay, streams: WeightStreams) -> DecodeRates:
    """GEMV bandwidth per layer kind from its own weight matmuls (their weight bytes over their
    calibrated seconds), with the replayed per-layer costs. A weight matmul's call cost is inside its
    calibrated time, so on CPU (all in sequence) the bandwidth prices it; on CUDA the host issues it
    ahead of the device, so its host cost joins the overhead instead (`matmul_seconds`)."""
    bandwidth: dict[str, float] = {}
    host_total = calls_total = 0.0
    for kind, groups in recorded.calls.items():
        nbytes = seconds = 0.0
        for call in groups["matmuls"]:
            total, host = streams.per_call(call)
            nbytes += _weight_bytes(call)
            seconds += total
            host_total += host
            calls_total += 1
        if seconds > 0:
            bandwidth[kind] = nbytes / seconds
    # a kind without weight matmuls (none in the presets) reads weights at the step's typical rate
    typical = statistics.median(bandwidth.values())
    cuda = streams.device.type == "cuda"
    return DecodeRates(
        gemv_bandwidth={kind: bandwidth.get(kind, typical) for kind in recorded.built},
        matmul_seconds=host_total / calls_total if cuda else 0.0,
        attention_seconds=replay.per_layer("attention"), op_seconds=replay.per_layer("others"), overlap=cuda,
    )
