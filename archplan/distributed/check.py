"""`verify --layout`: the measured rank (`fake.measure`) beside the layout model
(`planning.cluster`), component by component, with the tolerances of docs/distributed.md:

- model states (parameters, gradients, optimizer states): exact, under the FSDP2 convention of
  `cluster` (what this side runs) and its fp32 gradient reduction (`shard.MIXED.reduce_dtype`);
- activations: within ACTIVATION_TOLERANCE of the analytic figure, or ACTIVATION_FLOOR_BYTES (the "flash" kernel of
  `cluster`, what SDPA is on CPU: no s×s probabilities kept). Plain torch autograd keeps tensors the
  analytic per-tensor model of fused kernels does not (RoPE's cos/sin casts, small statistics);
- collectives: the tally of (kind, mesh dim, group size, bytes) → calls, exact on both sides:
  every call the model prices is seen, every call seen is priced;
- FSDP2's copies around them (the gathered parameters copied out, the gradients copied into the
  reduce buffer): the bytes its copy ops read and write, exact (`pricing.fsdp2_copy_bytes`);
- FSDP2's accumulation of unsharded gradients over micro-batches that do not reduce (zero 0/1):
  the bytes its casts and adds read and write, exact (`pricing.fsdp2_accumulation_bytes`).
Temporary and collective buffers are shown, not judged (the tracker's peak of transient copies):
their rows carry no verdict (`ok` None, JSON null, a neutral mark) and count toward none.
"""

from __future__ import annotations

from dataclasses import dataclass

from archplan.distributed.fake import Measured, measure
from archplan.distributed.tolerance import (
    ACTIVATION_FLOOR_BYTES,
    ACTIVATION_JUDGED,
    ACTIVATION_TOLERANCE,
    activations_within,
)
from archplan.planning import cluster
from archplan.planning.layout import Layout
from archplan.planning.pricing import fsdp2_accumulation_bytes, fsdp2_copy_bytes
from archplan.planning.records import MEMORY_CATEGORIES, Collective, RankMemory, tally
from archplan.resolve import ModelPlan

EXACT = ("parameters", "gradients", "optimizer")
REDUCE_BYTES = 4  # fp32 gradient reduction (shard.MIXED)
# the torch engine's loss: F.cross_entropy on fp32 logits (`step.StageRunner.loss`), so the analytic
# side is plan's with FSDP2's states and the eager loss, which its default fused loss is not
ANALYTIC_LOSS: cluster.CrossEntropyImpl = "eager"
ANALYTIC_AS = f"planning.cluster as plan --states fsdp2 --cross-entropy {ANALYTIC_LOSS} prices it"


@dataclass(frozen=True)
class MemoryRow:
    category: str
    analytic: int
    measured: int
    judged: str  # "exact" | ACTIVATION_JUDGED | "shown"

    @property
    def ok(self) -> bool | None:
        """Whether the row matches; None for a row shown, not judged, which neither passes nor fails."""
        match self.judged:
            case "exact":
                return self.analytic == self.measured
            case "shown":
                return None
            case _:
                return activations_within(self.analytic, self.measured)


@dataclass(frozen=True)
class CollectiveRow:
    kind: str
    mesh_dim: str
    group_size: int
    bytes: int
    analytic: int  # calls per step
    measured: int

    @property
    def ok(self) -> bool:
        return self.analytic == self.measured


@dataclass(frozen=True)
class LayoutCheck:
    name: str
    measured: Measured
    memory: tuple[MemoryRow, ...]
    collectives: tuple[CollectiveRow, ...]
    copy_bytes: int  # analytic FSDP2 copy bytes per step (`pricing.fsdp2_copy_bytes`)
    accumulate_bytes: int  # analytic FSDP2 accumulation bytes per step (`pricing.fsdp2_accumulation_bytes`)

    @property
    def step_peak(self) -> tuple[int, int]:
        """The rank's peak as one moment, shown, not judged: the analytic categories' sum (plan's
        peak, each category at its most) and the tracker's snapshot at its highest total, less
        AdamW's 0-d `step` tensors. The measured rows are each category's most over the step's samples, which
        need not coincide (a layer's re-run holds the most activations, its backward the most
        temporaries), so their sum can exceed any moment's."""
        m = self.measured
        return sum(r.analytic for r in self.memory), m.peak_by_reftype["Total"] - m.adam_step_bytes

    @property
    def copies_ok(self) -> bool:
        return self.copy_bytes == self.measured.fsdp2_copy_bytes

    @property
    def accumulation_ok(self) -> bool:
        return self.accumulate_bytes == self.measured.fsdp2_accumulate_bytes

    @property
    def ok(self) -> bool:
        return (all(r.ok is not False for r in self.memory) and all(r.ok for r in self.collectives)
                and self.copies_ok and self.accumulation_ok)

    def to_json(self) -> dict[str, object]:
        m = self.measured
        return {
            "name": self.name, "layout": m.layout.spec, "world": m.layout.world, "stage": m.stage,
            "rank": m.rank, "seq": m.seq, "microbatches": m.microbatches, "in_flight": m.in_flight,
            "layers": list(m.layers), "mtp_modules": list(m.mtp), "ok": self.ok,
            "analytic_as": ANALYTIC_AS, "activation_tolerance": ACTIVATION_TOLERANCE,
            "activation_floor_bytes": ACTIVATION_FLOOR_BYTES,
            "memory": [{"category": r.category, "analytic": r.analytic, "measured": r.measured,
                        "judged": r.judged, "ok": r.ok} for r in self.memory],
            "tracker_peak": m.peak_by_reftype,
            "step_peak": dict(zip(("analytic", "measured"), self.step_peak)),
            "collectives": [{"kind": r.kind, "mesh_dim": r.mesh_dim, "group_size": r.group_size,
                             "bytes": r.bytes, "analytic": r.analytic, "measured": r.measured,
                             "ok": r.ok} for r in self.collectives],
            "fsdp2_copy_bytes": {"analytic": self.copy_bytes, "measured": m.fsdp2_copy_bytes,
                                 "ok": self.copies_ok},
            "fsdp2_accumulate_bytes": {"analytic": self.accumulate_bytes, "measured": m.fsdp2_accumulate_bytes,
                                       "ok": self.accumulation_ok},
        }


def _memory_rows(analytic: RankMemory, measured: RankMemory) -> tuple[MemoryRow, ...]:
    def judged(name: str) -> str:
        return "exact" if name in EXACT else ACTIVATION_JUDGED if name == "activations" else "shown"

    return tuple(MemoryRow(name, getattr(analytic, name), getattr(measured, name), judged(name))
                 for name in MEMORY_CATEGORIES)


def _collective_rows(analytic: tuple[Collective, ...], measured: tuple[Collective, ...]) -> tuple[CollectiveRow, ...]:
    a, m = tally(analytic), tally(measured)
    return tuple(CollectiveRow(*key, a.get(key, 0), m.get(key, 0)) for key in sorted(a.keys() | m.keys()))


def check_layout_run(plan: ModelPlan, layout: Layout, seq: int, *, microbatches: int,
                     stage: int | None = None) -> LayoutCheck:
    """`stage`'s rank measured against the analytic figures (None: the most loaded stage's)."""
    states, loss = cluster.FSDP2, ANALYTIC_LOSS
    if stage is None:
        stage = cluster.most_loaded_stage(plan, layout, seq, microbatches=microbatches, states=states, loss=loss)
    analytic_memory = cluster.rank_memory(plan, layout, seq, microbatches=microbatches, stage=stage, states=states,
                                          loss=loss)
    analytic_calls = cluster.step_collectives(plan, layout, seq, microbatches=microbatches, stage=stage,
                                              states=states, grad_reduce=REDUCE_BYTES)
    measured = measure(plan, layout, seq, microbatches=microbatches, stage=stage)
    copies = fsdp2_copy_bytes(analytic_calls, states, REDUCE_BYTES, layout, microbatches)
    accumulated = cluster.fsdp2_accumulated_numel(cluster.model_data(plan, seq), layout, stage, microbatches, states)
    return LayoutCheck(plan.name, measured, _memory_rows(analytic_memory, measured.memory),
                       _collective_rows(analytic_calls, measured.collectives), copies,
                       fsdp2_accumulation_bytes(accumulated, REDUCE_BYTES, microbatches))
