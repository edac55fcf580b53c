"""Every collective a rank issues, as `planning.records.Collective` records: a dispatch mode over
torch's functional collectives (what DTensor redistributions and the expert all-to-all call) and
the c10d ops (what FSDP2 and point-to-point call).

`CommDebugMode` counts the same ops but keeps neither bytes nor process groups; this keeps both,
with the byte convention of `records` (all_gather: output; reduce_scatter: input; all_to_all:
send buffer; all_reduce: the tensor). It records the op as issued, before any backend runs it, so
the fake process group's fallback (all-to-all through all-gather) never shows: the expert
all-to-all is recorded as what the model asked for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.fsdp  # noqa: F401  (importing FSDP2 registers torch.ops.fsdp, its copy ops)
from torch._C._distributed_c10d import ProcessGroup
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from archplan.planning.records import DATA_PARALLEL_DIMS, Collective, CollectiveKind, MeshDim

_f = torch.ops._c10d_functional
_c = torch.ops.c10d


def _nbytes(t: Any) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size()


def _group_name(group: Any) -> str:
    """Functional collectives name their group; c10d ops pass the group as a TorchScript object."""
    if isinstance(group, str):
        return group
    return ProcessGroup.unbox(group).group_name


def _group_size(group: Any) -> int:
    if isinstance(group, str):
        return _resolve_process_group(group).size()
    return ProcessGroup.unbox(group).size()


# op → (kind, (index of the counted tensor(s), index of the group))
_OPS: dict[Any, tuple[CollectiveKind, int, int]] = {
    _f.all_reduce.default: ("all_reduce", 0, 2),
    _f.all_reduce_coalesced.default: ("all_reduce", 0, 2),
    _f.all_gather_into_tensor.default: ("all_gather", 0, 2),  # input × group size, below
    _f.all_gather_into_tensor_coalesced.default: ("all_gather", 0, 2),
    _f.reduce_scatter_tensor.default: ("reduce_scatter", 0, 3),
    _f.reduce_scatter_tensor_coalesced.default: ("reduce_scatter", 0, 3),
    _f.all_to_all_single.default: ("all_to_all", 0, 3),
    _c.allreduce_.default: ("all_reduce", 0, 1),
    _c.allreduce_coalesced_.default: ("all_reduce", 0, 1),
    _c._allgather_base_.default: ("all_gather", 0, 2),
    _c.allgather_into_tensor_coalesced_.default: ("all_gather", 0, 2),
    _c._reduce_scatter_base_.default: ("reduce_scatter", 1, 2),
    _c.reduce_scatter_tensor_coalesced_.default: ("reduce_scatter", 1, 2),
    _c.alltoall_base_.default: ("all_to_all", 1, 2),
    _c.send.default: ("send", 0, 1),
    _c.recv_.default: ("recv", 0, 1),
}
_GATHER_FROM_INPUT = {_f.all_gather_into_tensor.default, _f.all_gather_into_tensor_coalesced.default}
# FSDP2's copies around its collectives, each reading its first argument and writing `out`:
# `foreach_all_gather_copy_out` (the gathered buffer into the unsharded parameters, after an
# all-gather) and `foreach_reduce`'s copy-in (the unsharded gradients into the reduction's buffer,
# before it); what `pricing.fsdp2_copy_bytes` prices
_COPY_OUT = torch.ops.fsdp.split_with_sizes_copy.default
_COPY_IN = torch.ops.fsdp.chunk_cat.default


def _elementwise_bytes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """HBM bytes of one elementwise op: every tensor argument read, and the first one written
    (in place) or a result of its shape in the op's dtype (`_to_copy`'s cast)."""
    reads = sum(_nbytes(a) for a in args if isinstance(a, torch.Tensor))
    first = args[0]
    if func._schema.name.endswith("_"):
        return reads + _nbytes(first)
    dtype = kwargs.get("dtype") or first.dtype
    return reads + first.numel() * dtype.itemsize


# FSDP2's accumulation of unsharded gradients over the micro-batches whose backward does not
# reduce (torch/distributed/fsdp/_fully_shard/_fsdp_param.py): the cast to the reduce dtype after
# the first, the add after each later one; what `pricing.fsdp2_accumulation_bytes` prices
_ACCUMULATION_METHODS = ("to_accumulated_grad_if_needed", "accumulate_unsharded_grad_if_needed")


def _gradient_locals(param: FSDPParam) -> frozenset[int]:
    """Ids of the local tensors of `param`'s unsharded gradient and of its accumulated one: the
    cast reads the first, the add writes into the second."""
    unsharded = getattr(param, "_unsharded_param", None)
    grads = (None if unsharded is None else unsharded.grad, param.unsharded_accumulated_grad)
    return frozenset(id(g._local_tensor if isinstance(g, DTensor) else g) for g in grads if g is not None)


@contextmanager
def fsdp2_accumulation_counted(recorder: CollectiveRecorder) -> Iterator[None]:
    """Inside, the ops FSDP2's accumulation methods run on the gradients count into
    `recorder.accumulate_bytes`: each method runs as torch wrote it, flagged while it runs."""

    def flagged(method: Callable[[FSDPParam], None]) -> Callable[[FSDPParam], None]:
        def run(param: FSDPParam) -> None:
            recorder.accumulating = _gradient_locals(param)
            try:
                method(param)
            finally:
                recorder.accumulating = None
        return run

    originals = {name: getattr(FSDPParam, name) for name in _ACCUMULATION_METHODS}
    for name, method in originals.items():
        setattr(FSDPParam, name, flagged(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(FSDPParam, name, method)


def _dim(kind: CollectiveKind, dims: tuple[MeshDim, ...], functional: bool) -> MeshDim:
    """The mesh dimension of a call on a group that several dimensions share (ep = dp when
    expert_dp = 1, cp = dp × cp when dp = 1, the experts' replicas = tp when dp = 1): only expert
    parallelism calls all-to-all, and only context and tensor parallelism (DTensor) call functional
    collectives on the cp and tp groups (FSDP2 calls c10d ops); the others are data parallelism's."""
    if len(dims) == 1:
        return dims[0]
    if kind == "all_to_all":
        preferred: tuple[MeshDim, ...] = ("ep",)
    elif functional and "cp" in dims:
        preferred = ("cp",)
    elif functional and "tp" in dims:
        preferred = ("tp",)
    else:
        preferred = (*DATA_PARALLEL_DIMS, "tp", "cp", "pp")
    return next(d for d in (*preferred, *dims) if d in dims)


class CollectiveRecorder(TorchDispatchMode):
    """Counts (kind, mesh dim, group size, bytes, op) of every collective issued inside it."""

    def __init__(self, dims_by_group: dict[str, tuple[MeshDim, ...]], group_sizes: dict[str, int]) -> None:
        super().__init__()
        self.dims_by_group = dims_by_group
        self.group_sizes = group_sizes
        self.calls: Counter[tuple[CollectiveKind, MeshDim, int, int, str]] = Counter()
        self.copy_bytes = 0  # HBM bytes FSDP2's copy ops read and write (`_COPY_OUT`, `_COPY_IN`)
        # the last copy-in's bytes, counted when a data-parallel reduction that moves bytes follows
        # it: FSDP2 copies the gradients in over a one-rank group too (dp = 1), where no collective
        # runs and, as for the collectives, the model records nothing
        self._copy_in = 0
        # HBM bytes of FSDP2's gradient accumulation (`fsdp2_accumulation_counted` sets the flag)
        self.accumulate_bytes = 0
        self.accumulating: frozenset[int] | None = None  # ids of the gradients' local tensors, while set
        self.enabled = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if any(issubclass(t, DTensor) for t in types):
            # a mode runs with itself popped; deferring lets DTensor dispatch with this mode still
            # on the stack, so the collectives its op handlers issue inside an op (loss_parallel's
            # all-reduces of the max, the sum of exponentials and the target logit) are seen
            return NotImplemented
        self.count(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))

    def count(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record `func` if it is a collective, one of FSDP2's copies or an op of its gradient
        accumulation: what the mode does for each op, callable from another mode's dispatch
        (`fake.StepTracker` counts in its own, one Python mode per op fewer)."""
        if self.accumulating is not None:
            # only the ops on the gradients themselves: DTensor's sharding propagation runs the
            # same ops on fake copies of them in there, and builds tensors from sizes
            if self.enabled and args and id(args[0]) in self.accumulating:
                self.accumulate_bytes += _elementwise_bytes(func, args, kwargs)
            return
        if func in (_COPY_OUT, _COPY_IN) and self.enabled:
            moved = _nbytes(args[0]) + _nbytes(kwargs["out"])
            if func is _COPY_OUT:
                self.copy_bytes += moved  # only after an all-gather (FSDP2 gathers nothing over one rank)
            else:
                self._copy_in = moved
            return
        entry = _OPS.get(func)
        if entry is not None and self.enabled:
            kind, tensor_at, group_at = entry
            name = _group_name(args[group_at])
            if name not in self.group_sizes and _group_size(args[group_at]) == 1:
                # a one-rank group (FSDP2's replicate over a data-parallel group of 1, for ZeRO-0 at
                # dp = 1 or for the experts at dp = ep) moves nothing; the model records nothing
                return
            size = self.group_sizes[name]
            nbytes = _nbytes(args[tensor_at]) * (size if func in _GATHER_FROM_INPUT else 1)
            dim = _dim(kind, self.dims_by_group[name], func.namespace == "_c10d_functional")
            self.calls[(kind, dim, size, nbytes, func.__name__)] += 1
            if kind in ("reduce_scatter", "all_reduce") and dim in DATA_PARALLEL_DIMS and size > 1:
                self.copy_bytes += self._copy_in
                self._copy_in = 0

    def records(self) -> tuple[Collective, ...]:
        return tuple(Collective(kind, dim, size, nbytes, count, what=op)
                     for (kind, dim, size, nbytes, op), count in sorted(self.calls.items()))
