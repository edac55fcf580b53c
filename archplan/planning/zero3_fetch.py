"""ZeRO-3 as DeepSpeed runs it: parameters fetched module by module, not layer by layer.

FSDP (and the `zero` / `fsdp2` conventions) gathers a whole block at a time and prefetches the
next block while this one computes. DeepSpeed's ZeRO-3 of 2021 (v0.3, the implementation of
Narayanan et al. 2021's ZeRO-3 comparison; `deepspeed/runtime/zero/stage3.py`,
`PartitionedParameterCoordinator`) hooks every module that owns parameters, and its defaults
decide how much of the traffic hides:

- **Blocking fetch.** A module's pre-forward / pre-backward hook (`fetch_sub_module`) all-gathers
  its parameters that are not gathered and waits for them with a device-wide synchronisation
  (`_synchronize_communication` ends in `torch.cuda.synchronize()`), so it also waits for every
  gradient reduce-scatter in flight.
- **Prefetching changes nothing here.** The hook also prefetches the next modules of the recorded
  trace (`prefetch_next_sub_modules`: up to `stage3_prefetch_bucket_size` elements, one prefetch in
  flight, under `stage3_max_live_parameters`), but the host reaches the next module's hook right
  after a synchronisation (between them it only launches kernels, far ahead of the GPU), so a
  blocking fetch is issued as early as a prefetch would be: each gather starts at the previous
  synchronisation and hides behind the compute queued before it.
- **Release unless reused soon.** After a module runs its parameters are released unless the
  trace uses them again within `stage3_max_reuse_distance` (10⁹) elements of the modules in between
  (`_keep_for_later`). Under full recompute a layer's recompute and backward use each module twice
  in a row, so a module is gathered a third time in the backward when the modules after it in the
  layer hold more than 5·10⁸ elements (GPT-3 175B: every projection but the FFN's last).
- **Persistent small parameters.** Parameters under `stage3_param_persistence_threshold` (10⁵
  elements: norms, biases) stay gathered: no fetch.
- **Gradients** reduce-scatter on a side stream once their module's backward has run
  (`reduce_ipg_grads`; DeepSpeed fills buckets of `reduce_bucket_size`, here one per module),
  sharing the network with the gathers, and the next blocking fetch waits for them.

`step_seconds` replays one micro-batch's trace with those rules: compute on one stream, the
gathers and reduce-scatters queued on the network one after another, the host waiting at each
fetch. The ops (which module, its compute seconds, whether its gradients reduce after it) come
from the layout model (`pricing.price`); the fetch counts feed the collective records
(`cluster.step_collectives`), and `peak_gathered` the gathered parameters a rank holds at once
(`cluster.rank_memory`'s temporary).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from archplan.planning.shards import Tensor

# DeepSpeed's ZeRO-3 defaults (`deepspeed/runtime/zero/constants.py`, 2021)
MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance
PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold


@dataclass(frozen=True)
class Module:
    """One module's parameters on a rank: `gathered` the elements fetched (those at or above the
    persistence threshold), `elements` all of them (what the reuse distance counts)."""

    name: str
    gathered: int
    elements: int
    expert: bool


@dataclass(frozen=True)
class Op:
    """One use of a module in the trace: its compute seconds, and whether its gradients are
    reduce-scattered after it (a backward use)."""

    module: Module
    compute: float
    reduces: bool


def _module_path(tensor: Tensor) -> str:
    return tensor.name.rsplit(".", 1)[0]


def modules(tensors: Iterable[Tensor], tp: int, ep: int) -> list[tuple[Module, tuple[Tensor, ...]]]:
    """The modules owning `tensors` (in their order of first appearance) with their tensors; modules
    whose parameters are all persistent are left out (nothing to fetch)."""
    grouped: dict[str, list[Tensor]] = {}
    for t in tensors:
        grouped.setdefault(_module_path(t), []).append(t)
    out = []
    for name, owned in grouped.items():
        sizes = [t.local_numel(tp, ep) for t in owned]
        gathered = sum(n for n in sizes if n >= PERSISTENCE_THRESHOLD)
        if gathered:
            out.append((Module(name, gathered, sum(sizes), any(t.expert for t in owned)), tuple(owned)))
    return out


def _kept(trace: Sequence[Module]) -> list[bool]:
    """Per use, whether the module stays gathered after it: its next use comes within
    MAX_REUSE_DISTANCE elements of the modules used in between (`_keep_for_later`)."""
    before = [0]
    for m in trace:
        before.append(before[-1] + m.elements)
    kept = [False] * len(trace)
    seen: dict[str, int] = {}
    for i in reversed(range(len(trace))):
        j = seen.get(trace[i].name)
        kept[i] = j is not None and before[j] - before[i + 1] < MAX_REUSE_DISTANCE
        seen[trace[i].name] = i
    return kept


def _needs(trace: Sequence[Module]) -> list[bool]:
    """Per use, whether the module must be gathered first (not gathered, or released since)."""
    need = []
    live: set[str] = set()
    for m, keep in zip(trace, _kept(trace)):
        need.append(bool(m.gathered) and m.name not in live)
        live.add(m.name)
        if not keep:
            live.discard(m.name)
    return need


def fetch_counts(trace: Sequence[Module]) -> dict[str, int]:
    """How many times one pass of `trace` gathers each module."""
    counts: dict[str, int] = {}
    for m, need in zip(trace, _needs(trace)):
        if need:
            counts[m.name] = counts.get(m.name, 0) + 1
    return counts


def _following(need: Sequence[bool]) -> tuple[list[int | None], int | None]:
    """Per use, the next use after it that needs a gather; and the first one."""
    following: list[int | None] = [None] * len(need)
    ahead: int | None = None
    for i in reversed(range(len(need))):
        following[i] = ahead
        if need[i]:
            ahead = i
    return following, ahead


def peak_gathered(trace: Sequence[Module]) -> int:
    """The most parameter elements gathered at once over one pass of `trace`: the modules kept
    gathered, the one running, and the next one being gathered (issued at the last fetch)."""
    kept, need = _kept(trace), _needs(trace)
    following, _ = _following(need)
    live: dict[str, int] = {}
    peak = 0
    for i, m in enumerate(trace):
        live[m.name] = m.gathered
        nxt = following[i]
        coming = trace[nxt].gathered if nxt is not None and trace[nxt].name not in live else 0
        peak = max(peak, sum(live.values()) + coming)
        if not kept[i]:
            live.pop(m.name)
    return peak


def step_seconds(ops: Sequence[Op], gather: Callable[[Module], float],
                 reduce: Callable[[Module], float]) -> float:
    """Seconds of one pass of `ops` under the rules of the module docstring."""
    need = _needs([op.module for op in ops])
    following, ahead = _following(need)
    seconds: dict[str, float] = {}
    host = gpu = net = pending = 0.0  # the host stands at the last synchronisation
    arrival: dict[int, float] = {}

    def issue(k: int | None) -> None:
        # the host reaches use k's hook right after the synchronisation before it
        nonlocal net
        if k is not None:
            m = ops[k].module
            if m.name not in seconds:
                seconds[m.name] = gather(m)
            net = max(host, net) + seconds[m.name]
            arrival[k] = net

    issue(ahead)
    for i, op in enumerate(ops):
        if need[i]:
            host = gpu = max(gpu, arrival.pop(i), pending)  # torch.cuda.synchronize(): every stream
            issue(following[i])
        gpu += op.compute
        if op.reduces and op.module.elements:
            net = max(gpu, net) + reduce(op.module)
            pending = max(pending, net)
    return max(gpu, pending)
