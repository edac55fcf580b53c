"""Cross-check the analytic sizer against a real torch model built from the same plan.

The analytic half (`archplan.analytic`, pure Python) and the torch half (`archplan.modules`)
never share counting code; this module is where they meet, component by component (module path,
docs/architecture.md). What it compares (docs/architecture.md "Cross-check", docs/formulas.md §2.7 and §2.10):

- parameters: every named parameter of the meta model is mapped to its component by the longest
  dotted prefix among the analytic `by_component` keys; `numel` per component must equal the
  analytic count exactly (an unmapped parameter is a failure row of its own);
- forward FLOPs: one forward on meta under `torch.utils.flop_counter.FlopCounterMode` at
  (batch, seq); the counter keys its figures by module ("ArchplanModel.layers.0.mixer", every
  enclosing module included), so each module's *exclusive* count is recovered by subtracting its
  nearest counted descendants, then mapped to a component like the parameters. Every aten op the
  counter executed, in the forward and in the backward, is listed with its count and the source
  of its formula (`flop_registry`), 0 for those it has none for; an op without a formula whose
  signature contracts a dimension (`archplan.contraction`) fails the check, since the counted
  total would miss its FLOPs. The analytic elementwise part (norms, softmax, activations, scan
  updates) is shown as analytic-only;
- training FLOPs: a real forward + backward on meta under the counter, against the analytic
  training FLOPs (backward = 2 x forward matmuls, Kaplan et al. 2020 §2.1; PaLM App. B);
- the KV/SSM cache, measured on the meta model after a prefill with the real cache (bf16; a cache
  tensor's size is its shape's, so this runs for any model, no memory allocated) against
  `analytic.kv_cache`;
- on a small real instance (CPU by default): fvcore's `FlopCountAnalysis` (multiply-adds, so x2;
  docs/formulas.md §2.7), with norms switched off since they are elementwise in our convention, compared
  per component on the ops fvcore counts, the ops it skips priced apart (`FvcoreRow`); and the
  cache measured again on that instance (fp32), after a prefill with real values.

Each check reports whether it ran (`CrossCheck.checks`): an fvcore that is absent or fails, or a
check that was not requested, is "not run" with its reason, never a match.

torch is imported here; only `archplan verify` (lazily) and the tests import this module.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

from archplan.analytic import count_params, forward_flops, kv_cache, per_token_rounded
from archplan.bench.device import free_memory
from archplan.bench.fit import FIT_FRACTION
from archplan.contraction import ContractionDetector
from archplan.dtypes import DType
from archplan.errors import ArchplanError, first_line
from archplan.flop_registry import FVCORE_FORMULAS, counter_mapping, formula_source
from archplan.modules.model import ArchplanModel, build_model
from archplan.resolve import (
    AttentionPlan,
    HyenaPlan,
    LayerPlan,
    Mamba1Plan,
    Mamba2Plan,
    MLAPlan,
    ModelPlan,
    MoEPlan,
    S4Plan,
    StripedHyenaPlan,
    check_mtp_length,
)
from archplan.units import nbytes
from typing_extensions import assert_never

# A real (non-meta) instance is built only below this size unless asked for (fp32 on CPU: 200 MB).
SMALL_MODEL_PARAMS = 50_000_000
UNMAPPED = "(unmapped)"
# fvcore counts norms at ~5 FLOPs per element ("5 is just a rough estimate", fvcore flop_count.py);
# in our convention they are elementwise (analytic-only), so their handles are neutralised.
FVCORE_ELEMENTWISE_OPS = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
)
# fvcore op keys of the ops priced by `flop_registry.FVCORE_FORMULAS` (FLOPs, not fvcore's count)
KNOWN_PREFIX = "known:"

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class Row:
    """One component: the analytic figure against what the built model has or does."""

    component: str
    analytic: int
    built: int

    @property
    def ok(self) -> bool:
        return self.analytic == self.built


@dataclass(frozen=True)
class FlopRow(Row):
    """Counted forward FLOPs of one component; `elementwise` is the analytic-only remainder."""

    elementwise: int = 0
    ops: Mapping[str, int] = field(default_factory=dict)  # counted FLOPs per aten op


@dataclass(frozen=True)
class OpCount:
    """An aten op the model dispatched: how often, the FLOPs the counter gave it, and why."""

    op: str
    calls: int
    flops: int
    formula: str | None  # where the counter's formula comes from; None: counted as 0
    contracting: bool = False  # some call had a matmul-shaped signature (`contraction_shaped`)

    @property
    def has_formula(self) -> bool:
        return self.formula is not None

    @property
    def suspicious(self) -> bool:
        """Matmul work the counter cannot see: the counted total would silently miss it."""
        return not self.has_formula and self.contracting


@dataclass(frozen=True)
class FvcoreRow:
    """fvcore's count of one component against the analytic counted FLOPs.

    `fvcore` is what fvcore itself counted (multiply-adds x 2); `known` are the ops fvcore has
    no handle for, priced by the counter's own formulas from their traced shapes
    (`flop_registry.FVCORE_FORMULAS`). The row matches when analytic = fvcore + known: every
    other op of the component is checked by fvcore, and a skipped op nobody prices shows up as a
    mismatch (listed in `skipped`), never as an excuse.
    """

    component: str
    analytic: int
    fvcore: int
    known: Mapping[str, int]  # traced op -> FLOPs by formula (not counted by fvcore)
    skipped: Mapping[str, int]  # traced ops fvcore skipped without a formula -> calls
    ops: Mapping[str, int] = field(default_factory=dict)  # fvcore's own count per op (x 2)

    @property
    def ok(self) -> bool:
        return self.analytic == self.fvcore + sum(self.known.values())


@dataclass(frozen=True)
class FvcoreCheck:
    """fvcore's run: its rows, or why it did not run (absent, or failed while tracing)."""

    rows: tuple[FvcoreRow, ...]
    not_run: str | None = None

    @property
    def total(self) -> int:
        return sum(row.fvcore for row in self.rows)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)


@dataclass(frozen=True)
class RealCheck:
    """Checks on a real (allocated) instance: the measured cache and fvcore."""

    device: str
    dtype_bytes: int
    kv: tuple[Row, ...]  # layers.i.mixer -> cache bytes after prefilling seq tokens
    fvcore: FvcoreCheck


CheckStatus = Literal["match", "mismatch", "not run"]


@dataclass(frozen=True)
class Check:
    """One of verify's checks: whether it ran, and whether every figure in it matched."""

    name: str
    status: CheckStatus
    detail: str = ""  # why it did not run, or what disagreed


def _check(name: str, ran: str | None, ok: bool, detail: str = "") -> Check:
    """`ran`: None when the check ran, else the reason it did not."""
    if ran is not None:
        return Check(name, "not run", ran)
    return Check(name, "match" if ok else "mismatch", "" if ok else detail)


@dataclass(frozen=True)
class CrossCheck:
    name: str
    batch: int
    seq_len: int
    params: tuple[Row, ...]
    flops: tuple[FlopRow, ...]
    ops: tuple[OpCount, ...]  # forward
    backward_ops: tuple[OpCount, ...]  # backward only (empty without a backward)
    training: Row | None  # one forward + backward at (batch, seq) against the analytic training FLOPs
    # the analytic training total over the run's batch × seq tokens, rounded half up: a long
    # convolution makes its filters once per batch, so it is the batch's, not batch 1's
    training_per_token: int | None
    training_ops: Mapping[str, int]
    kv: tuple[Row, ...]  # layers.i.mixer -> cache bytes after prefilling seq tokens on meta (bf16)
    real: RealCheck | None
    real_not_run: str  # why there is no real instance (when `real` is None)
    real_hint: str  # how to get it ("--cpu-check forces them"; a smaller run where it would not fit)
    layer_kinds: Mapping[str, str]  # layers.i -> "gqa S4096 + moe", for display

    @property
    def params_analytic(self) -> int:
        return sum(row.analytic for row in self.params)

    @property
    def params_built(self) -> int:
        return sum(row.built for row in self.params)

    @property
    def flops_analytic(self) -> int:
        return sum(row.analytic for row in self.flops)

    @property
    def flops_counted(self) -> int:
        return sum(row.built for row in self.flops)

    @property
    def suspicious_ops(self) -> tuple[OpCount, ...]:
        """Forward and backward ops with matmul work and no formula (each fails verify)."""
        return tuple(op for op in (*self.ops, *self.backward_ops) if op.suspicious)

    @property
    def labelled_failures(self) -> tuple[tuple[str, Row], ...]:
        """Each disagreeing row with the figure it is: the same component can fail as parameters,
        FLOPs and cache bytes on two devices, which a component name alone does not tell apart."""
        groups: list[tuple[str, Iterable[Row]]] = [
            ("parameters", self.params), ("forward FLOPs", self.flops),
            ("training FLOPs", () if self.training is None else (self.training,)),
            ("KV cache bytes (meta, a 2-byte cache)", self.kv),
        ]
        if self.real is not None:
            groups.append((f"KV cache bytes ({self.real.device}, a {self.real.dtype_bytes}-byte cache)", self.real.kv))
        return tuple((label, row) for label, rows in groups for row in rows if not row.ok)

    @property
    def failures(self) -> tuple[Row, ...]:
        return tuple(row for _, row in self.labelled_failures)

    @property
    def checks(self) -> tuple[Check, ...]:
        """Every check, in the order verify runs them: ran and matched, mismatched, or not run."""
        def uncounted(ops: Iterable[OpCount]) -> str:
            names = [op.op for op in ops if op.suspicious]
            return f"matmul work with no FLOP formula: {', '.join(names)}" if names else ""

        real, why_not_real = self.real, self.real_not_run
        fv = real.fvcore if real is not None else None
        return (
            _check("parameters", None, all(row.ok for row in self.params), "components differ"),
            _check("forward FLOPs", None,
                   all(row.ok for row in self.flops) and not uncounted(self.ops),
                   uncounted(self.ops) or "components differ"),
            _check("training FLOPs", None if self.training is not None else "no backward requested",
                   self.training is not None and self.training.ok and not uncounted(self.backward_ops),
                   uncounted(self.backward_ops) or "forward + backward total differs"),
            _check("KV cache", None,
                   all(row.ok for row in self.kv) and (real is None or all(row.ok for row in real.kv)),
                   "layers differ"),
            _check("fvcore", why_not_real if fv is None else fv.not_run,
                   fv is not None and fv.ok, "components differ"),
        )

    @property
    def ok(self) -> bool:
        """No check disagreed. A check that did not run is not a failure, nor a match."""
        return all(check.status != "mismatch" for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        params = {row.component: row for row in self.params}
        flops = {row.component: row for row in self.flops}
        components = []
        for name in ordered(params.keys() | flops.keys()):
            p, f = params.get(name), flops.get(name)
            components.append({
                "component": name,
                "ok": (p is None or p.ok) and (f is None or f.ok),
                "params": {"analytic": p.analytic, "built": p.built} if p else None,
                "flops": (
                    {"analytic": f.analytic, "counted": f.built, "elementwise": f.elementwise,
                     "ops": dict(f.ops)} if f else None
                ),
            })
        real = None
        if self.real is not None:
            fv = self.real.fvcore
            real = {
                "device": self.real.device,
                "dtype_bytes": self.real.dtype_bytes,
                "kv_cache": [_row_json(row) for row in self.real.kv],
                "fvcore": {
                    "ran": fv.not_run is None, "not_run": fv.not_run, "ok": fv.ok, "total": fv.total,
                    "rows": [
                        {"component": r.component, "analytic": r.analytic, "fvcore": r.fvcore,
                         "ops": dict(r.ops), "known": dict(r.known), "skipped": dict(r.skipped),
                         "ok": r.ok}
                        for r in fv.rows
                    ],
                },
            }
        return {
            "ok": self.ok,
            "checks": [
                {"check": c.name, "status": c.status, "detail": c.detail} for c in self.checks
            ],
            "spec": self.name,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "params": {"analytic": self.params_analytic, "built": self.params_built},
            "flops": {"analytic": self.flops_analytic, "counted": self.flops_counted},
            "training_flops": None if self.training is None else {
                "analytic": self.training.analytic, "counted": self.training.built,
                "analytic_per_token": self.training_per_token, "ops": dict(self.training_ops),
            },
            "components": components,
            "ops": [_op_json(o) for o in self.ops],
            "backward_ops": [_op_json(o) for o in self.backward_ops],
            "uncounted_matmul_ops": [o.op for o in self.suspicious_ops],
            "kv_cache": [_row_json(row) for row in self.kv],
            "real": real,
        }


def _op_json(op: OpCount) -> dict[str, Any]:
    # Only an op without a formula has its signatures examined (`_OpLog.contracting`): for one with
    # a formula the question was never asked, and `false` would read as an answer.
    return {"op": op.op, "calls": op.calls, "flops": op.flops, "formula": op.formula,
            "contracting": None if op.has_formula else op.contracting}


def _row_json(row: Row) -> dict[str, Any]:
    return {"component": row.component, "analytic": row.analytic, "built": row.built, "ok": row.ok}


def _order_key(name: str) -> tuple[int, int, str]:
    """Model order: embedding, then layer by layer, then the head, then the multi-token-prediction
    modules; unmapped rows last."""
    head = {"embed": 0, "pos_embed": 1, "embed_norm": 2, "final_norm": 4, "lm_head": 5}
    if name in head:
        return (head[name], 0, "")
    parts = name.split(".")
    where = {"layers": 3, "mtp": 6}
    if parts[0] in where and len(parts) > 1 and parts[1].isdigit():
        suffix = ".".join(parts[2:])
        return (where[parts[0]], int(parts[1]) * 100 + _IN_LAYER.get(suffix, 99), suffix)
    return (7, 0, name)


# forward order inside a block (sandwich: norm1, mixer, post_norm1, norm2, ffn, post_norm2), with a
# multi-token-prediction module's own parts around it
_IN_LAYER = {name: rank for rank, name in enumerate((
    "enorm", "hnorm", "proj", "norm1", "mixer", "post_norm1", "norm2", "ffn", "ffn.router", "ffn.experts",
    "ffn.shared", "ffn.shared_gate", "post_norm2", "final_norm",
))}


def ordered(names: Iterable[str]) -> list[str]:
    return sorted(names, key=_order_key)


def component_lookup(components: Iterable[str]) -> Callable[[str], str | None]:
    """name -> the longest component that is `name` or a dotted prefix of it (docs/architecture.md).

    A dict probe per prefix, O(depth) per name: DeepSeek-V3 has ~10^3 parameters and components.
    """
    known = set(components)

    def lookup(name: str) -> str | None:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            candidate = ".".join(parts[:cut])
            if candidate in known:
                return candidate
        return None

    return lookup


def exclusive_counts(inclusive: Mapping[str, Mapping[str, int]]) -> dict[str, Counter[str]]:
    """Per-module exclusive op counts from counts that include every enclosing module.

    FlopCounterMode (and fvcore's by_module) add an op's count to every module active around it.
    A module's own share is its count minus that of its nearest descendants that have one (a
    container such as `layers`, a ModuleList that never runs, has no entry of its own).
    """
    names = set(inclusive)
    own = {name: Counter(dict(ops)) for name, ops in inclusive.items()}
    for name in names:
        parent = _nearest_ancestor(name, names)
        if parent is not None:
            own[parent].subtract(inclusive[name])
    return {name: Counter({op: n for op, n in ops.items() if n}) for name, ops in own.items()}


def _nearest_ancestor(name: str, names: set[str]) -> str | None:
    if name == "":
        return None
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:cut])
        if candidate in names:
            return candidate
    return "" if "" in names else None


def _op_name(op: Any) -> str:
    """`aten.mm`, `aten._grouped_mm`: the overload packet's name, stable across overloads."""
    return str(op).removeprefix("<OpOverloadPacket(op='").removesuffix("')>")


def layer_kind(layer: LayerPlan) -> str:
    """Short label of what a layer is, e.g. `gqa S4096 + glu` or `mamba2`."""
    mixer = layer.mixer
    match mixer:
        case AttentionPlan():
            label = mixer.kind + (f" S{mixer.window}" if mixer.window is not None else "")
        case MLAPlan():
            label = "mla" + (f" S{mixer.window}" if mixer.window is not None else "")
        case Mamba1Plan():
            label = "mamba1"
        case Mamba2Plan():
            label = "mamba2"
        case S4Plan():
            label = "s4" if mixer.dplr else "s4d"
        case HyenaPlan():
            label = f"hyena order {mixer.order}"
        case StripedHyenaPlan():
            label = "stripedhyena"
        case _:
            assert_never(mixer)
    ffn = layer.ffn
    if ffn is None:
        return label
    if isinstance(ffn, MoEPlan):
        return f"{label} + moe {ffn.top_k}/{ffn.n_experts}"
    return f"{label} + {ffn.kind}"


def _model_inputs(plan: ModelPlan, batch: int, seq_len: int, device: str) -> torch.Tensor:
    if device == "meta":
        return torch.zeros((batch, seq_len), dtype=torch.long, device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens_BT = torch.randint(0, plan.vocab_size, (batch, seq_len), generator=generator)
    return tokens_BT.to(device)


@contextmanager
def _layer_progress(model: ArchplanModel, stage: str, progress: Progress | None) -> Iterator[None]:
    """Advance `progress` as each layer finishes its forward (big models take seconds per pass)."""
    if progress is None:
        yield
        return
    total = len(model.layers)
    done = [0]

    def hook(*_: Any) -> None:
        done[0] += 1
        progress(stage, done[0], total)

    handles = [layer.register_forward_hook(hook) for layer in model.layers]
    progress(stage, 0, total)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _ForwardTracker:
    """The module attribution FlopCounterMode reads (`parents`), tracked in the forward only.

    torch's ModuleTracker also registers two multi-grad hooks per module call to attribute the
    backward, approximately (torch/utils/module_tracker.py); training is compared on the global
    total, so those hooks (and the per-module bookkeeping of every backward op they cause) are
    pure overhead here. Names follow ModuleTracker's: the root by its class, children
    "Root.fqn", so FlopCounterMode's keys are unchanged. During the backward `parents` is just
    {"Global"}.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        root = type(model).__name__
        self._names = {mod: f"{root}.{fqn}" if fqn else root for fqn, mod in model.named_modules()}
        self.parents: set[str] = {"Global"}
        self._handles: list[Any] = []

    def _name(self, mod: torch.nn.Module) -> str:
        return self._names.get(mod) or type(mod).__name__

    def _enter(self, mod: torch.nn.Module, _: Any) -> None:
        self.parents.add(self._name(mod))

    def _exit(self, mod: torch.nn.Module, _: Any, __: Any) -> None:
        self.parents.discard(self._name(mod))

    def __enter__(self) -> _ForwardTracker:
        self._handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
            torch.nn.modules.module.register_module_forward_hook(self._exit),
        ]
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.parents = {"Global"}


# Metadata queries torch's dispatch mode declines (NotImplemented) before anything else
# (torch/utils/flop_counter.py `_FlopCounterMode.__torch_dispatch__`): left to it unchanged.
_METADATA_QUERIES = frozenset({
    torch.ops.aten.sym_is_contiguous.default, torch.ops.aten.is_contiguous.default,
    torch.ops.aten.is_contiguous.memory_format, torch.ops.aten.is_strides_like_format.default,
    torch.ops.aten.is_non_overlapping_and_dense.default, torch.ops.aten.size.default,
    torch.ops.aten.sym_size.default, torch.ops.aten.stride.default, torch.ops.aten.sym_stride.default,
    torch.ops.aten.storage_offset.default, torch.ops.aten.sym_storage_offset.default,
    torch.ops.aten.numel.default, torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default,
    torch.ops.prim.layout.default,
})


class _DirectMode(_FlopCounterMode):
    """FlopCounterMode's dispatch mode, decomposing only what can decompose, noting every op.

    torch's mode re-enters itself and calls `func.decompose()` for every op (its "has a formula"
    test compares the OpOverload with the registry's OpOverloadPacket keys, so it never
    matches), then executes and counts the op when that returns NotImplemented
    (torch/utils/flop_counter.py). `decompose` does something only for an op with a
    CompositeImplicitAutograd kernel (torch/_ops.py `OpOverload.decompose`, `_can_decompose`);
    any other op goes straight to execute-and-count here, the very path torch's mode ends on,
    where `_count_flops` applies the formulas, after `_ListingCounter.note` has seen the call.
    Metadata queries and higher-order ops stay torch's.
    """

    counter: _ListingCounter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not isinstance(func, torch._ops.OpOverload) or func in _METADATA_QUERIES:
            return super().__torch_dispatch__(func, types, args, kwargs)
        kwargs = kwargs or {}
        if func._can_decompose():
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        self.counter.note(func, args, kwargs, out)
        return self.counter._count_flops(func._overloadpacket, out, args, kwargs)


@dataclass
class _OpLog:
    """The ops one phase (forward, or backward) executed: calls, and which contracted."""

    calls: Counter[Any] = field(default_factory=Counter)
    contracting: set[Any] = field(default_factory=set)


class _ListingCounter(FlopCounterMode):
    """FlopCounterMode that also lists every op it executes, so ops without a formula show as 0.

    `_DirectMode` hands every executed op (after decompositions) to `note`, which logs the call
    and, for an op without a formula, whether its signature contracts a dimension
    (`archplan.contraction`); `log` is swapped between the forward and the backward. Formulas:
    torch's registry plus `flop_registry.COUNTER_FORMULAS`. Module attribution comes from
    `_ForwardTracker` instead of torch's ModuleTracker (same names, forward only).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(display=False, custom_mapping=counter_mapping())
        self.mod_tracker = _ForwardTracker(model)  # type: ignore[assignment]
        self.log = _OpLog()
        self._contracts = ContractionDetector(self.flop_registry)

    def __enter__(self) -> _ListingCounter:
        # FlopCounterMode.__enter__ with `_DirectMode` in place of torch's dispatch mode
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = _DirectMode(self)
        self.mode.__enter__()
        return self

    def note(self, func: Any, args: Any, kwargs: Mapping[str, Any], out: Any) -> None:
        packet = func._overloadpacket
        self.log.calls[packet] += 1
        if packet not in self.flop_registry and packet not in self.log.contracting:
            if self._contracts(func, args, kwargs, out):
                self.log.contracting.add(packet)


@dataclass(frozen=True)
class _Counted:
    own: dict[str, Counter[str]]  # forward: exclusive FLOPs per module path, per op
    forward: _OpLog
    backward: _OpLog | None
    training: Counter[str] | None  # forward + backward, per op (FlopCounterMode's "Global")


def _count(model: ArchplanModel, tokens_BT: torch.Tensor, backward: bool) -> _Counted:
    """One forward (and its backward) under FlopCounterMode and the op log.

    The forward's figures are read before the backward starts, so one pass serves both checks.
    Module attribution is exact in the forward; in the backward it could only be approximate
    (torch's ModuleTracker uses multi-grad hooks), so training is compared on the global total
    and `_ForwardTracker` follows the forward alone.
    """
    root = type(model).__name__
    backward_log = None
    with _ListingCounter(model) as counter:
        with torch.set_grad_enabled(backward):
            # a training forward: with the multi-token-prediction modules where the model has them,
            # a method of the root, which the root's forward hooks do not see
            if model.plan.mtp:
                counter.mod_tracker._enter(model, None)
                main_BTV, depths = model.mtp_logits(tokens_BT)
                counter.mod_tracker._exit(model, None, None)
            else:
                main_BTV, depths = model(tokens_BT), []
        forward_counts = counter.get_flop_counts()  # copies
        forward_log, counter.log = counter.log, _OpLog()
        if backward:
            sum((logits_BTV.float().sum() for logits_BTV in depths), main_BTV.float().sum()).backward()
            backward_log = counter.log
    training = None
    if backward:
        training = Counter({_op_name(op): n for op, n in counter.get_flop_counts()["Global"].items()})
    inclusive: dict[str, dict[str, int]] = {}
    for module, ops in forward_counts.items():
        if module == "Global":
            continue
        # ModuleTracker names the root by its class and children "Root.fqn" (torch/utils/module_tracker.py)
        path = "" if module == root else module.removeprefix(root + ".")
        inclusive[path] = {_op_name(op): n for op, n in ops.items()}
    # FLOPs outside the model's own forward (none expected) are kept under the pseudo-path "(outside)".
    outside = Counter({_op_name(op): n for op, n in forward_counts.get("Global", {}).items()})
    outside.subtract(inclusive.get("", {}))
    own = exclusive_counts(inclusive)
    if +outside:
        own["(outside)"] = +outside
    return _Counted(own, forward_log, backward_log, training)


def _op_rows(log: _OpLog, flops: Mapping[str, int]) -> tuple[OpCount, ...]:
    """One row per executed op, largest FLOPs first; `flops` per op name (0 when absent)."""
    return tuple(sorted(
        (
            OpCount(_op_name(op), n, flops.get(_op_name(op), 0), formula_source(op),
                    op in log.contracting)
            for op, n in log.calls.items()
        ),
        key=lambda o: (-o.flops, o.op),
    ))


def _by_component(
    own: Mapping[str, Counter[str]], lookup: Callable[[str], str | None]
) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for path, ops in own.items():
        if not ops:
            continue
        comp = lookup(path) or f"{UNMAPPED} {path or '(root)'}"
        out.setdefault(comp, Counter()).update(ops)
    return out


def crosscheck(
    plan: ModelPlan,
    *,
    seq_len: int,
    batch: int = 1,
    backward: bool = True,
    real: bool | None = None,
    real_device: str = "cpu",
    fvcore: bool = True,
    progress: Progress | None = None,
) -> CrossCheck:
    """Compare the analytic figures with a model built from `plan`.

    `real`: build an allocated instance for fvcore and the measured cache; None = only when the
    model has fewer than SMALL_MODEL_PARAMS parameters.
    """
    if plan.mtp:
        # the counted forward is training's, whose multi-token-prediction modules each need a
        # target further ahead: a shorter step is one `training_loss` refuses, not one to count
        check_mtp_length(len(plan.mtp), seq_len)
    params = count_params(plan)
    # the training forward (the MTP modules included) is what the meta model runs and counts; the
    # real instance's fvcore count and cache are inference's
    flops = forward_flops(plan, seq_len, batch, mtp=True)
    inference = forward_flops(plan, seq_len, batch) if plan.mtp else flops

    if progress is not None:
        progress("build (meta, bf16)", 0, 1)
    # bf16: on meta grouped_mm's shape check wants bf16 inputs (docs/architecture.md "Torch modules")
    model = build_model(plan, device="meta", dtype=torch.bfloat16)
    if progress is not None:
        progress("build (meta, bf16)", 1, 1)

    lookup_params = component_lookup(params.by_component)
    built: Counter[str] = Counter()
    for name, param in model.named_parameters():
        built[lookup_params(name) or f"{UNMAPPED} {name}"] += param.numel()
    param_rows = tuple(
        Row(comp, params.by_component.get(comp, 0), built.get(comp, 0))
        for comp in ordered(params.by_component.keys() | built.keys())
    )

    tokens_BT = _model_inputs(plan, batch, seq_len, "meta")
    for p in model.parameters():
        p.requires_grad_(backward)
    stage = "count forward+backward FLOPs (meta)" if backward else "count forward FLOPs (meta)"
    with _layer_progress(model, stage, progress):
        counts = _count(model, tokens_BT, backward)
    own = counts.own
    flop_keys = flops.counted_by_component.keys() | flops.elementwise_by_component.keys()
    counted = _by_component(own, component_lookup(flop_keys))
    flop_rows = tuple(
        FlopRow(
            comp,
            flops.counted_by_component.get(comp, 0),
            sum(counted.get(comp, Counter()).values()),
            elementwise=flops.elementwise_by_component.get(comp, 0),
            ops=dict(counted.get(comp, Counter())),
        )
        for comp in ordered(flop_keys | counted.keys())
    )
    per_op: Counter[str] = Counter()
    for ops in own.values():
        per_op.update(ops)
    op_rows = _op_rows(counts.forward, per_op)
    backward_rows: tuple[OpCount, ...] = ()
    if counts.backward is not None and counts.training is not None:
        backward_rows = _op_rows(counts.backward, counts.training - per_op)

    training: Row | None = None
    training_per_token: int | None = None
    training_ops: dict[str, int] = {}
    if counts.training is not None:
        training_ops = dict(counts.training)
        # 3 x the analytic forward + the FFT convolutions' backward adjustment (analytic/s4.py),
        # exactly: compared in total; the per-token figure is that total over the tokens, rounded.
        training = Row("forward+backward", flops.training("full"), sum(training_ops.values()))
        training_per_token = per_token_rounded(training.analytic, batch * seq_len)
    model.eval()  # the cache is inference's, as on the real instance
    kv_rows = _measure_cache(model, plan, tokens_BT, "meta", progress)

    real_check: RealCheck | None = None
    real_not_run, real_hint = "no real instance requested", "--cpu-check forces them"
    if real is None and params.total >= SMALL_MODEL_PARAMS:
        real, real_not_run = False, f"model ≥ {SMALL_MODEL_PARAMS // 1_000_000}M parameters"
    elif real is None:
        # verify's own choice, not the user's: a run that would not fit is a check not run, and the
        # meta checks above still stand (only an explicit --cpu-check is refused for it)
        short = _real_shortfall(plan, seq_len, batch, real_device)
        real = short is None
        if short is not None:
            real_not_run = f"would not fit: it {short[0]}"
            real_hint = "a smaller --seq or --batch lets them run" if short[1] else "they need more memory"
    elif real and (short := _real_shortfall(plan, seq_len, batch, real_device)) is not None:
        raise ArchplanError(f"--cpu-check {short[0]}; give {short[1]}--no-cpu-check")
    if real:
        real_check = _real_check(plan, seq_len, batch, real_device, fvcore, inference.counted_by_component,
                                 progress)

    return CrossCheck(
        name=plan.name,
        batch=batch,
        seq_len=seq_len,
        params=param_rows,
        flops=flop_rows,
        ops=op_rows,
        backward_ops=backward_rows,
        training=training,
        training_per_token=training_per_token,
        training_ops=training_ops,
        kv=kv_rows,
        real=real_check,
        real_not_run=real_not_run,
        real_hint=real_hint,
        layer_kinds={layer.path: layer_kind(layer) for layer in plan.layers},
    )


def _measure_cache(model: ArchplanModel, plan: ModelPlan, tokens_BT: torch.Tensor, device: str,
                   progress: Progress | None) -> tuple[Row, ...]:
    """Each layer's cache bytes after prefilling `tokens_BT` through the model with its real cache
    (`new_cache`, in the model's dtype), beside `analytic.kv_cache` in that dtype."""
    batch, seq_len = tokens_BT.shape
    cache = model.new_cache(batch, seq_len)
    with torch.no_grad(), _layer_progress(model, f"prefill with the cache ({device})", progress):
        model(tokens_BT, cache=cache)
    analytic = kv_cache(plan, seq_len, batch, model.embed.weight.element_size())
    return tuple(
        Row(f"{layer.path}.mixer", analytic.by_component.get(f"{layer.path}.mixer", 0), state.nbytes())
        for layer, state in zip(plan.layers, cache.layers, strict=True)
    )


def _real_shortfall(plan: ModelPlan, seq_len: int, batch: int, device: str) -> tuple[str, str] | None:
    """Why the fp32 instance would not fit `device`'s free memory, and what a smaller run needs
    ("a smaller --seq or --batch, or "), or None where it fits. Judged before allocating: past the
    host's memory the system kills the process. Priced as bench prices a prefill without decode
    steps: the weights alone let batch 65,536 × seq 256 of a tiny model through, to ask the
    allocator for 34 GB of logits."""
    from archplan.bench.runner import BenchConfig, estimate_bytes

    weights = 4 * count_params(plan).total
    free = free_memory(torch.device(device))
    if weights > FIT_FRACTION * free:
        return (f"builds the model in fp32 on {device}: its weights alone take {nbytes(weights)}, and {device} "
                f"has {nbytes(free)} free", "")
    need = estimate_bytes(plan, BenchConfig(dtype=DType.fp32, batch=batch, seq=seq_len, decode_tokens=0))
    if need > FIT_FRACTION * free:
        return (f"runs batch {batch} × seq {seq_len} through the fp32 model on {device}: about {nbytes(need)} "
                f"(its weights, the cache, the logits, a few activations of width D and the attention masks), "
                f"and {device} has {nbytes(free)} free", "a smaller --seq or --batch, or ")
    return None


def _real_check(
    plan: ModelPlan,
    seq_len: int,
    batch: int,
    device: str,
    fvcore: bool,
    counted_by_component: Mapping[str, int],
    progress: Progress | None,
) -> RealCheck:
    """Allocate the model (fp32), prefill the real cache, and let fvcore count the forward."""
    if progress is not None:
        progress(f"build ({device}, fp32)", 0, 1)
    torch.manual_seed(0)
    model = build_model(plan, device=device, dtype=torch.float32)
    model.eval()
    if progress is not None:
        progress(f"build ({device}, fp32)", 1, 1)
    tokens_BT = _model_inputs(plan, batch, seq_len, device)
    dtype_bytes = torch.finfo(torch.float32).bits // 8

    kv_rows = _measure_cache(model, plan, tokens_BT, device, progress)
    fv = (
        _fvcore_check(model, tokens_BT, counted_by_component) if fvcore
        else FvcoreCheck(rows=(), not_run="not requested")
    )
    return RealCheck(device=device, dtype_bytes=dtype_bytes, kv=kv_rows, fvcore=fv)


def _fvcore_check(
    model: ArchplanModel, tokens_BT: torch.Tensor, counted_by_component: Mapping[str, int]
) -> FvcoreCheck:
    """fvcore's count per component, or why it did not run (absent, or failed while tracing)."""
    with warnings.catch_warnings():
        # fvcore traces with torch.jit, which warns about its own deprecation (on import, too)
        warnings.simplefilter("ignore")
        try:
            from fvcore.nn import FlopCountAnalysis  # optional dependency, imported when used
        except ImportError as exc:
            reason = f"fvcore is not installed ({first_line(exc)}): pip install fvcore"
            return FvcoreCheck(rows=(), not_run=reason)
        try:
            analysis = FlopCountAnalysis(model, (tokens_BT,))
            analysis.set_op_handle(**{op: _no_flops for op in FVCORE_ELEMENTWISE_OPS})
            analysis.set_op_handle(**{op: _known_handle(op) for op in FVCORE_FORMULAS})
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            by_module = analysis.by_module_and_operator()
            skipped_by_module = {name: analysis.unsupported_ops(name) for name in by_module}
        except Exception as exc:  # noqa: BLE001  any failure of the optional tool is reported, not raised
            return FvcoreCheck(rows=(), not_run=f"fvcore failed: {type(exc).__name__}: {first_line(exc)}")
    # fvcore counts one multiply-add as one flop (fvcore/nn/flop_count.py): x2 to compare; the
    # known ops' handles return FLOPs already
    own = exclusive_counts({
        name: {op: n if op.startswith(KNOWN_PREFIX) else 2 * int(n) for op, n in ops.items()}
        for name, ops in by_module.items()
    })
    lookup = component_lookup(counted_by_component)
    by_comp = _by_component(own, lookup)
    skipped_by_comp = _by_component(exclusive_counts(skipped_by_module), lookup)
    shown = counted_by_component.keys() | {comp for comp, ops in by_comp.items() if sum(ops.values())}
    rows = []
    for comp in ordered(shown):
        ops = by_comp.get(comp, Counter())
        own_ops = {op: n for op, n in ops.items() if not op.startswith(KNOWN_PREFIX)}
        rows.append(FvcoreRow(
            comp,
            counted_by_component.get(comp, 0),
            sum(own_ops.values()),
            {op.removeprefix(KNOWN_PREFIX): n for op, n in ops.items() if op.startswith(KNOWN_PREFIX)},
            dict(skipped_by_comp.get(comp, Counter())),
            own_ops,
        ))
    return FvcoreCheck(rows=tuple(rows))


def _no_flops(inputs: Any, outputs: Any) -> int:
    return 0


def _known_handle(jit_op: str) -> Callable[[list[Any], list[Any]], Counter[str]]:
    """An fvcore handle giving the op's FLOPs by formula, under a key kept apart from fvcore's."""
    formula = FVCORE_FORMULAS[jit_op].formula

    def handle(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
        return Counter({KNOWN_PREFIX + jit_op: formula([_traced(v) for v in inputs],
                                                       [_traced(v) for v in outputs])})

    return handle


def _traced(value: Any) -> Any:
    """A traced input as `flop_registry.Traced` has it: a tensor's shape, a constant's value, or None."""
    if value.isCompleteTensor():
        return value.type().sizes()
    constant = value.toIValue()  # None unless the value is a constant of the trace
    return None if isinstance(constant, torch.Tensor) else constant
