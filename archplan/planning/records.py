"""The records both interpreters of a layout produce, so their cross-check is a diff of two lists:
the analytic model (`planning/`) lists them before pricing them; the torch side (`distributed/`)
records the same from torch's trackers on the fake process group.

Byte convention of a collective (one rank's view, one call):
- all_reduce: the tensor reduced;
- all_gather: the gathered (output) tensor;
- reduce_scatter: the input tensor, before scattering;
- all_to_all: the rank's send buffer;
- send / recv: the tensor sent or received.
A ring moves (n−1)/n of those bytes per rank for all-gather, reduce-scatter and all-to-all, and
2·(n−1)/n for all-reduce (Patarasuk & Yuan 2009; NCCL's bus-bandwidth convention); point-to-point
moves all of them. Pricing applies those factors; the records hold the raw tensor bytes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

CollectiveKind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send", "recv"]
MeshDim = Literal["tp", "cp", "pp", "dp", "ep", "dp_cp", "expert_dp"]
# the dimensions whose collectives are data parallelism's (the states' gathers and gradient
# reductions): plain, folded with context parallelism, and the experts' replicas
DATA_PARALLEL_DIMS: tuple[MeshDim, ...] = ("dp", "dp_cp", "expert_dp")
MemoryCategory = Literal["parameters", "gradients", "optimizer", "activations", "temporary",
                         "collective_buffers"]
MEMORY_CATEGORIES: tuple[MemoryCategory, ...] = ("parameters", "gradients", "optimizer", "activations",
                                                  "temporary", "collective_buffers")


@dataclass(frozen=True)
class Collective:
    """`count` calls of one collective per optimizer step on one rank, each of `bytes` (above)."""

    kind: CollectiveKind
    mesh_dim: MeshDim
    group_size: int
    bytes: int
    count: int
    what: str  # which tensor, e.g. "layers.3.mixer output (TP, forward)"
    overlappable: bool = False  # can hide behind compute (DP grad reduce, FSDP prefetch, ...)
    # a data-parallel gradient reduction's elements before FSDP2's dim-0 padding: what its copy-in
    # reads (`pricing.fsdp2_copy_bytes`); 0 on every other record
    unpadded: int = 0
    # an all-gather whose output FSDP2 drops without copying it out (`cluster.fsdp2_stale_prefetch`)
    discarded: bool = False

    @property
    def key(self) -> tuple[str, str, int, int]:
        """What the cross-check compares: kind, mesh dimension, group size, bytes per call."""
        return (self.kind, self.mesh_dim, self.group_size, self.bytes)

    @property
    def wire_bytes(self) -> float:
        """Bytes one rank sends per call over a ring (or point-to-point)."""
        n = self.group_size
        if n <= 1:
            return 0.0
        match self.kind:
            case "all_reduce":
                return 2 * (n - 1) / n * self.bytes
            case "all_gather" | "reduce_scatter" | "all_to_all":
                return (n - 1) / n * self.bytes
            case "send" | "recv":
                return float(self.bytes)


def tally(records: list[Collective] | tuple[Collective, ...]) -> Counter[tuple[str, str, int, int]]:
    """Calls per (kind, mesh dim, group size, bytes): the form both sides are compared in."""
    counts: Counter[tuple[str, str, int, int]] = Counter()
    for record in records:
        counts[record.key] += record.count
    return counts


@dataclass(frozen=True)
class RankMemory:
    """Peak bytes on one rank by category (the most loaded pipeline stage's rank 0)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    temporary: int = 0
    collective_buffers: int = 0

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.temporary + self.collective_buffers

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MEMORY_CATEGORIES}
