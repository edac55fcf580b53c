"""One cluster layout, parsed and validated once, read by both interpreters of it:
`planning/` (analytic per-rank memory, collectives, step time) and `distributed/` (torch's
DeviceMesh, DTensor plans, FSDP2, the fake process group, and torch's interleaved 1F1B order over
point-to-point sends).

Neither side re-derives degrees or pipeline-stage boundaries: both read `Layout` and
`pipeline_chunks`.

Degrees (Megatron-LM's conventions, Narayanan et al. 2021 §2–3; Korthikanti et al. 2022):
- world = tp · cp · pp · dp. Ranks are ordered tp fastest, then cp, dp, pp (Megatron's default
  `order="tp-cp-ep-dp-pp"`), so a TP group is tp consecutive ranks inside one node.
- ep divides tp · cp · dp, the ranks of one pipeline stage: experts are whole on every rank that
  holds them (expert tensor parallelism 1) and sharded over ep consecutive ranks of the stage,
  whatever their tp, cp and dp coordinates; the tp·cp·dp/ep ranks at the same place of each EP
  group replicate them (expert data parallelism, `expert_dp`, stride ep). This is Megatron-Core's
  "parallel folding" (Liu et al. 2025, "MoE Parallel Folding"; its expert rank generator orders
  "tp-ep-dp-pp" with ETP = 1, so an EP group is ep consecutive ranks) and torchtitan's
  ETP = 1 mesh (EP flattened over dp_shard_in_ep × cp × tp): attention keeps its TP×CP×DP mesh
  while the experts fold another over the same ranks, so EP can span the TP ranks of a node.
- vpp: virtual pipeline stages (model chunks) per pipeline rank, for the interleaved 1F1B schedule.
- group: N, the micro-batches a pipeline rank runs through one model chunk before the next, in the
  interleaved schedule (Llama Team 2024 §3.3.2, Figure 6: the "tunable" schedule between
  depth-first, N = pp, and breadth-first, N = m; Megatron-LM's
  `microbatch_group_size_per_vp_stage`). Not given (0 in `Layout`): torch's rounds (`round_size`),
  pp, Megatron's default, when pp divides the micro-batches. Refused at vpp = 1, where it means nothing.
- zero: 0 (plain DP), 1 (optimizer states sharded over dp), 2 (+ gradients), 3 (+ parameters,
  FSDP). Rajbhandari et al. 2020 §5.
- recompute: none | selective (Korthikanti §5: the attention core) | full (every layer's input
  kept, the layer recomputed in the backward).
- mb: sequences per micro-batch.
- sp: sequence parallelism over the TP group for the norms/dropout regions (Korthikanti §4.2.2);
  meaningless (and ignored) at tp = 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import get_args

from archplan.analytic.memory import RECOMPUTE_MODES, Recompute
from archplan.errors import ArchplanError
from archplan.units import things

INT_FIELDS: tuple[str, ...] = ("tp", "cp", "pp", "vpp", "group", "dp", "ep", "zero", "mb")
LAYOUT_FIELDS: tuple[str, ...] = (*INT_FIELDS, "recompute", "sp")
_ON = {"on", "true", "1", "yes"}
_OFF = {"off", "false", "0", "no"}


@dataclass(frozen=True)
class Layout:
    """A complete layout: every degree and mode fixed."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    vpp: int = 1
    group: int = 0
    dp: int = 1
    ep: int = 1
    zero: int = 1
    recompute: Recompute = "none"
    mb: int = 1
    sp: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def stage_ranks(self) -> int:
        """Ranks of one pipeline stage, over which the expert mesh (ep × expert_dp) folds."""
        return self.tp * self.cp * self.dp

    @property
    def expert_dp(self) -> int:
        """Ranks that replicate one expert shard, over which the experts' gradients reduce (the
        expert weights' data-parallel group): experts are whole on every rank holding them (expert
        tensor parallelism 1, `shards.py`) and each tp rank routes its own tokens to them, so
        Megatron-Core's expert data-parallel group with ETP = 1 spans the tensor-parallel ranks
        too."""
        return self.stage_ranks // self.ep

    @property
    def sequence_parallel(self) -> bool:
        return self.sp and self.tp > 1

    @property
    def label(self) -> str:
        return self.named()

    def named(self, zero3: str = "FSDP/ZeRO-3") -> str:
        """The label, its ZeRO-3 as the states' engine names it (DeepSpeed's is not FSDP)."""
        parts = [f"TP{self.tp}"]
        if self.cp > 1:
            parts.append(f"CP{self.cp}")
        parts.append(f"PP{self.pp}" + (f"×v{self.vpp}" if self.vpp > 1 else "")
                     + (f" N{self.group}" if self.vpp > 1 and self.group not in (0, self.pp) else ""))
        parts.append(f"DP{self.dp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        parts.append(zero3 if self.zero == 3 else f"ZeRO-{self.zero}")
        parts.append(f"{self.recompute} mb{self.mb}" + (" SP" if self.sequence_parallel else ""))
        return " ".join(parts)

    @property
    def spec(self) -> str:
        """The `--layout` text that reproduces exactly this layout (group only when it is not the
        default round, pp; sp as it runs: off at tp=1, where there is no group to split over)."""
        return _layout_text((f.name, self.sequence_parallel if f.name == "sp" else getattr(self, f.name))
                            for f in fields(self) if not (f.name == "group" and getattr(self, f.name) == 0))


@dataclass(frozen=True)
class PartialLayout:
    """What the user fixed with `--layout`; None = let the search choose."""

    tp: int | None = None
    cp: int | None = None
    pp: int | None = None
    vpp: int | None = None
    group: int | None = None
    dp: int | None = None
    ep: int | None = None
    zero: int | None = None
    recompute: Recompute | None = None
    mb: int | None = None
    sp: bool | None = None

    @property
    def given(self) -> dict[str, int | str | bool]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def spec(self) -> str:
        """The given fields as `--layout` text (tp=2,sp=on)."""
        return _layout_text(self.given.items())

    def sp_problem(self) -> str | None:
        """A given sp=on at a given tp=1, which Megatron-LM turns off with a warning: a layout the
        user writes out should not say it runs what it cannot."""
        if self.sp and self.tp == 1:
            return ("sp=on needs tp > 1: sequence parallelism splits the norms' and dropouts' activations "
                    "over the TP group (Korthikanti et al. 2022 §4.2.2), and tp=1 has none (sp=off, or tp "
                    "above 1)")
        return None

    def for_model(self, n_experts: int) -> PartialLayout:
        """ep fixed at 1 for a model without routed experts, the only degree it can take: a dense
        model's layout is complete without it."""
        return replace(self, ep=1) if not n_experts and self.ep is None else self

    def chosen(self, routed: bool) -> PartialLayout:
        """The fields the user fixed: a model without routed experts has its ep=1 from
        `for_model`, not from a choice, and it is not shown as one."""
        return self if routed else replace(self, ep=None)

    def missing(self) -> tuple[str, ...]:
        """The fields a complete layout needs that this does not give, in `LAYOUT_FIELDS` order (sp,
        vpp and group have defaults; `for_model` gives a dense model its ep)."""
        return tuple(name for name in LAYOUT_FIELDS if name not in {"sp", "vpp", "group"} | self.given.keys())

    def complete(self) -> Layout | None:
        """The one layout this fixes, when every field is given (sp, vpp and group default to on, 1
        and the engine's rounds, `round_size`; `for_model` gives a dense model its ep)."""
        return None if self.missing() else replace(Layout(), **self.given)


def _layout_text(items: Iterable[tuple[str, object]]) -> str:
    return ",".join(f"{name}={'on' if value is True else 'off' if value is False else value}"
                    for name, value in items)


def parse_layout(text: str) -> PartialLayout:
    """`tp=8,cp=1,pp=16,vpp=2,group=16,dp=128,ep=1,zero=1,recompute=none,mb=1,sp=on` (any subset)."""
    values: dict[str, int | str | bool] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, raw = item.partition("=")
        name, raw = name.strip().lower(), raw.strip().lower()
        if not sep or not raw:
            raise ArchplanError(f"--layout: '{item}' is not NAME=VALUE (names: {', '.join(LAYOUT_FIELDS)})")
        if name not in LAYOUT_FIELDS:
            raise ArchplanError(f"--layout: unknown field '{name}' (expected one of {', '.join(LAYOUT_FIELDS)})")
        if name in values:
            raise ArchplanError(f"--layout: '{name}' is given twice")
        if name == "recompute":
            if raw not in get_args(Recompute):
                raise ArchplanError(f"--layout: recompute={raw} is not one of {', '.join(RECOMPUTE_MODES)}")
            values[name] = raw
        elif name == "sp":
            if raw not in _ON | _OFF:
                raise ArchplanError(f"--layout: sp={raw} is not on or off")
            values[name] = raw in _ON
        else:
            # plain ASCII digits: int() would also read `1_6` as 16 and other scripts' digits
            if not re.fullmatch(r"[+-]?[0-9]+", raw):
                hint = "; separate the fields with commas (tp=2,pp=4)" if "=" in raw or " " in raw else ""
                raise ArchplanError(f"--layout: {name}={raw} is not an integer{hint}")
            try:
                number = int(raw)
            except ValueError:  # past Python's 4,300-digit limit for int()
                raise ArchplanError(f"--layout: {name}= has {len(raw):,} digits; no degree is that large") from None
            low = 0 if name == "zero" else 1
            if number < low or (name == "zero" and number > 3):
                expected = "0, 1, 2 or 3" if name == "zero" else "a positive integer"
                raise ArchplanError(f"--layout: {name}={raw} must be {expected}")
            values[name] = number
    return PartialLayout(**values)  # type: ignore[arg-type]


def _node_problem(tp: int, gpus_per_node: int) -> str | None:
    """Why tensor parallelism of `tp` cannot stay within nodes of `gpus_per_node` GPUs (None: it can)."""
    if tp > gpus_per_node:
        return f"tp={tp} spans more than one node of {gpus_per_node} GPUs (tensor parallelism needs the in-node links)"
    if gpus_per_node % tp:
        used = gpus_per_node // tp * tp
        # an NVL72 job often takes 64 GPUs of each rack: Slurm segments of 16 four-GPU trays
        hint = (f"; a job that uses {used} GPUs of each node says so with --gpus-per-node {used}"
                if gpus_per_node > 8 else "")
        return (f"tp={tp} does not divide the node's {gpus_per_node} GPUs: TP groups of consecutive "
                f"ranks would straddle two nodes (tensor parallelism needs the in-node links){hint}")
    return None


def layout_problem(layout: Layout, *, n_layers: int, gpus_per_node: int | None, n_experts: int = 0,
                   seq: int | None = None) -> str | None:
    """Why the layout cannot exist whatever the cluster's size (None: it can); fitting in memory is
    not judged here (a layout that exists but does not fit is printed with its breakdown).
    `gpus_per_node` None: no nodes to keep tensor parallelism within (the fake process group, one
    host's torchrun workers)."""
    if gpus_per_node is not None and (why := _node_problem(layout.tp, gpus_per_node)):
        return why
    if layout.stage_ranks % layout.ep:
        return (f"ep={layout.ep} must divide the {layout.stage_ranks} ranks of a pipeline stage "
                f"(tp·cp·dp = {layout.tp}·{layout.cp}·{layout.dp}), over which the experts fold")
    if layout.ep > 1 and not n_experts:
        return f"ep={layout.ep} but the model has no routed experts"
    if n_experts and n_experts % layout.ep:
        return f"ep={layout.ep} does not divide the {n_experts} routed experts"
    if layout.pp * layout.vpp > n_layers + 2:
        return (f"pp·vpp = {layout.pp * layout.vpp} model chunks, more than the {things(n_layers, 'layer')} "
                f"with the embedding and the head ({n_layers + 2}) can fill: a chunk holds at least one of them")
    if layout.vpp > 1 and layout.pp == 1:
        return "vpp > 1 needs pp > 1 (virtual stages interleave a pipeline)"
    if seq is not None and seq % layout.cp:
        return f"cp={layout.cp} does not divide --seq {seq}"
    # load-balanced CP gives each rank chunks i and 2·cp − 1 − i of 2·cp (Megatron-Core's
    # get_batch_on_this_cp_rank views the sequence so; `distributed.context.shard_sequence`)
    if seq is not None and layout.cp > 1 and seq % (2 * layout.cp):
        return (f"cp={layout.cp}: --seq {seq} does not split into 2·cp = {2 * layout.cp} chunks (load-balanced "
                "context parallelism gives each rank two)")
    # Megatron-LM's sequence parallelism scatters each context shard's tokens over the TP group and
    # refuses a length the group does not divide (Korthikanti et al. 2022 §4.2.2)
    if seq is not None and layout.sequence_parallel and (seq // layout.cp) % layout.tp:
        return (f"sequence parallelism splits each rank's {seq // layout.cp} tokens over tp={layout.tp}, "
                "which does not divide them (sp=off, or a --seq tp divides)")
    return None


def check_layout(layout: Layout, *, n_layers: int, gpus: int | None, gpus_per_node: int | None,
                 n_experts: int = 0, seq: int | None = None) -> None:
    """Raise ArchplanError (one line) when the layout cannot exist on `gpus` GPUs."""
    if gpus is not None and layout.world != gpus:
        raise ArchplanError(f"--layout: tp·cp·pp·dp = {layout.tp}·{layout.cp}·{layout.pp}·{layout.dp} "
                            f"= {layout.world} ranks, but --gpus is {gpus}")
    why = layout_problem(layout, n_layers=n_layers, gpus_per_node=gpus_per_node, n_experts=n_experts, seq=seq)
    if why:
        raise ArchplanError(f"--layout: {why}")


def torch_rounds(pp: int, microbatches: int) -> int:
    """How many rounds torch's `ScheduleInterleaved1F1B` runs m micro-batches in: max(1, m div pp)
    (`number_of_rounds`), each of m / rounds; it refuses an m the rounds do not divide."""
    return max(1, microbatches // pp)


def round_size(layout: Layout, microbatches: int) -> int:
    """N, the micro-batches a rank runs through one model chunk before the next, over m
    micro-batches: `group` when given (Megatron-LM's `microbatch_group_size_per_vp_stage`), else
    torch's rounds (`torch_rounds`), m / rounds each: pp (Megatron's default) when pp divides m,
    one round of all m below 2·pp."""
    if layout.group:
        return layout.group
    return microbatches // torch_rounds(layout.pp, microbatches)


def group_problem(layout: Layout, microbatches: int) -> str | None:
    """Why the interleaved schedule cannot run its rounds over m micro-batches. A given round N
    (Megatron-LM `forward_backward_pipelining_with_interleaving`): N in [pp, m], and the last round,
    m mod N, is 0 or at least pp (a shorter round waits on its own earlier chunks — a dependency
    bubble). No round given: torch's `ScheduleInterleaved1F1B` needs its rounds to divide m."""
    if layout.vpp == 1:
        return (f"group={layout.group} orders the rounds of an interleaved schedule: it needs vpp > 1"
                if layout.group else None)
    p, m = layout.pp, microbatches
    if not layout.group:
        rounds = torch_rounds(p, m)
        if m % rounds:
            return (f"the interleaved schedule runs m = {m} micro-batches in {rounds} rounds of at least "
                    f"pp = {p}, which do not divide them (give group=N, or a batch pp divides)")
        return None
    n = layout.group
    if m < p:
        # fewer micro-batches than stages: one round of all m, the round the search reports
        return None if n == m else f"group={n}: m = {m} micro-batches, fewer than pp = {p}, run in one round: group={m}"
    if not p <= n <= m:
        return f"group={n} must lie in [pp, m] = [{p}, {m}] (m micro-batches per step)"
    if 0 < m % n < p:
        return f"group={n}: the last round holds m mod N = {m % n} < pp = {p} micro-batches"
    return None


def check_partial(fixed: PartialLayout, *, gpus: int, gpus_per_node: int, n_layers: int, n_experts: int,
                  seq: int) -> None:
    """The checks the given fields of a partial layout allow alone, before the search fills in the
    rest (one-line ArchplanError): each rule of `layout_problem` whose fields are all given, and
    the given degrees dividing the GPUs. The search then keeps only candidates that pass it whole."""
    given = fixed.given
    degrees = {name: int(given[name]) for name in ("tp", "cp", "pp", "dp") if name in given}
    product = math.prod(degrees.values())
    named = "·".join(f"{name}={value}" for name, value in degrees.items())
    if gpus % product:
        raise ArchplanError(f"--layout: {named} = {product} ranks does not divide --gpus {gpus}")
    if len(degrees) == 4 and product != gpus:
        # all four given: nothing left for the search to fill, whatever mb or the batch
        raise ArchplanError(f"--layout: tp·cp·pp·dp = {'·'.join(map(str, degrees.values()))} = {product} ranks, "
                            f"but --gpus is {gpus}")
    # the given fields on an otherwise neutral layout: ep's divisibility by the stage's ranks, vpp's need of a
    # pipeline and sp's of a seq the tp group divides involve fields the search still chooses (sp
    # itself where not given: off where the seq does not split, `parallel.candidates`)
    probe = Layout(tp=int(given.get("tp", 1)), cp=int(given.get("cp", 1)), pp=int(given.get("pp", 1)),
                   vpp=int(given.get("vpp", 1)) if "pp" in given else 1,
                   dp=int(given.get("ep", 1)), ep=int(given.get("ep", 1)),
                   sp=given.get("sp") is True and "tp" in given and "cp" in given)
    why = layout_problem(probe, n_layers=n_layers, gpus_per_node=gpus_per_node, n_experts=n_experts, seq=seq)
    if why:
        raise ArchplanError(f"--layout: {why}")
    if why := fixed.sp_problem():
        raise ArchplanError(f"--layout: {why}")


def _balanced(blocks: int, chunks: int) -> list[int]:
    """`blocks` over `chunks` with the embedding and the head counted as one block each (torchtitan's
    `generate_llm_fqn_per_model_part`): the blocks + 2 as evenly as they split, the extra ones on
    the first chunks, less one block on the first chunk and one on the last."""
    base, extra = divmod(blocks + 2, chunks)
    sizes = [base + (1 if c < extra else 0) for c in range(chunks)]
    sizes[0] -= 1
    sizes[-1] -= 1
    return sizes


# cached: the search asks for the same few (pp, vpp) splits once per layout and stage
@lru_cache(maxsize=4096)
def pipeline_chunks(n_layers: int, pp: int, vpp: int = 1, tail: int = 0) -> tuple[tuple[range, ...], ...]:
    """Layer ranges per pipeline rank, one range per virtual stage (model chunk).

    Chunk c (of pp·vpp, in model order) lives on rank c % pp (Narayanan et al. 2021 §2.2.2,
    interleaved schedule). Where n_layers divide the chunks, every chunk holds as many, the
    embedding and the head beside the first and the last (Megatron-LM's default, which asks for
    that division). Otherwise the embedding and the LM head count as one layer's worth of work
    each, and the n_layers + 2 split as torchtitan's `generate_llm_fqn_per_model_part` splits them
    (input and output weight 1): as evenly as they can, the extra ones on the first chunks, then the
    first chunk gives one layer up for the embedding and the last one for the head, so the head's
    chunk never holds more layers than another. Where n_layers + 2 divide the chunks this is the
    Llama 3 405B run's split (Llama Team 2024 §3.3.2: 126 layers on 16 stages, one layer fewer on
    the first and the last); at one layer a chunk the first chunk holds the embedding alone and the
    last the head alone, as that run's v = 8 did (Megatron-LM's `--pipeline-model-parallel-layout`
    writes such stages `E` and `L`).

    `tail`: blocks that follow the n_layers and must sit on the last chunk, beside the head (the
    multi-token-prediction modules', which Megatron-Core builds on the last stage; indices n_layers
    on). Then the layers split as Megatron-Bridge's layout maps for DeepSeek-V3 write them:
    ⌈n_layers / chunks⌉ on every chunk but the last, which holds the rest, the tail and the loss
    (61 layers on 16 chunks: 4 each and 1; on 8: 8 each and 5; on 4: 16, 16, 16, 13). Where that
    leaves the last chunk no layer of its own to drop, the n_layers + tail blocks split as above,
    unless that would leave part of the tail on another chunk: then the n_layers split alone and the
    whole tail joins the last chunk. The tail shares the head's chunk, so the chunks are at most
    n_layers + 2, with or without it (`layout_problem`).
    """
    chunks = pp * vpp
    front = math.ceil(n_layers / chunks)
    if tail and chunks > 1 and n_layers - front * (chunks - 1) >= 1:
        sizes = [front] * (chunks - 1) + [n_layers - front * (chunks - 1) + tail]
    elif (n_layers + tail) % chunks == 0:
        sizes = [(n_layers + tail) // chunks] * chunks
    else:
        sizes = _balanced(n_layers + tail, chunks)
    if sizes[-1] < tail:  # a balanced split would leave an MTP module off the last chunk, which runs them
        sizes = _balanced(n_layers, chunks)
        sizes[-1] += tail
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return tuple(tuple(ranges[c] for c in range(rank, chunks, pp)) for rank in range(pp))
