"""Cross-check the analytic sizer against a real torch model built from the same plan.

The analytic half (`archplan.analytic`, pure Python) and the torch half (`archplan.modules`)
never share counting code; this module is where they meet, component by component (module path,
docs/architecture.md). What it compares (DESIGN.md §5, FORMULAS.md §2.7 and §2.10):

- parameters: every named parameter of the meta model is mapped to its component by the longest
  dotted prefix among the analytic `by_component` keys; `numel` per component must equal the
  analytic count exactly (an unmapped parameter is a failure row of its own);
- forward FLOPs: one forward on meta under `torch.utils.flop_counter.FlopCounterMode` at
  (batch, seq); the counter keys its figures by module ("ArchplanModel.layers.0.mixer", every
  enclosing module included), so each module's *exclusive* count is recovered by subtracting its
  nearest counted descendants, then mapped to a component like the parameters. Every aten op the
  counter executed in the forward is listed with its count, 0 for those it has no formula for; the
  analytic elementwise part (norms, softmax, activations, scan updates) is shown as analytic-only;
- training FLOPs: a real forward + backward on meta under the counter, against the analytic
  training FLOPs (backward = 2 x forward matmuls, Kaplan et al. 2020 §2.1; PaLM App. B);
- on a small real instance (CPU by default): fvcore's `FlopCountAnalysis` (multiply-adds, so x2;
  FORMULAS §2.7), with norms switched off since they are elementwise in our convention, and the
  KV/SSM cache measured after a prefill with the real cache against `analytic.kv_cache`.

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
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode, flop_registry

from archplan.analytic import count_params, forward_flops, kv_cache, training_flops_per_token
from archplan.modules import fft_flops, flop_formulas  # noqa: F401  register aten._grouped_mm and FFT formulas
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
)
from typing_extensions import assert_never

# A real (non-meta) instance is built only below this size unless asked for (fp32 on CPU: 200 MB).
SMALL_MODEL_PARAMS = 50_000_000
UNMAPPED = "(unmapped)"
# Ops that carry matmul-like work: if the counter saw one without a formula, the counted total is
# missing real FLOPs (e.g. CPU SDPA kernels, pytorch issue 195460), so verify flags it. FFTs count
# too: fvcore has no handle for them, so a long-conv row there is "incomplete", not a mismatch.
MATMUL_LIKE = ("mm", "matmul", "conv", "einsum", "attention", "linear", "addbmm", "baddbmm", "dot", "fft")
# fvcore counts norms at ~5 FLOPs per element ("5 is just a rough estimate", fvcore flop_count.py);
# in our convention they are elementwise (analytic-only), so their handles are neutralised.
FVCORE_ELEMENTWISE_OPS = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
)

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
    """An aten op the forward dispatched: how often, and the FLOPs the counter gave it."""

    op: str
    calls: int
    flops: int
    has_formula: bool

    @property
    def suspicious(self) -> bool:
        """Matmul-like work the counter cannot see: the counted total would silently miss it."""
        return not self.has_formula and _matmul_like(self.op)


def _matmul_like(op: str) -> bool:
    """`aten._grouped_mm`, `aten::scaled_dot_product_attention`, ...: ops that carry matmul work."""
    name = op.replace("::", ".").split(".")[-1]
    return any(word in name for word in MATMUL_LIKE)


@dataclass(frozen=True)
class FvcoreRow:
    """fvcore's count (multiply-adds x 2) of one component against the analytic counted FLOPs."""

    component: str
    analytic: int
    fvcore: int
    skipped: Mapping[str, int]  # ops fvcore could not count inside this component

    @property
    def status(self) -> Literal["ok", "mismatch", "incomplete"]:
        if self.analytic == self.fvcore:
            return "ok"
        # A difference where fvcore skipped ops is fvcore's blind spot, reported, not a failure.
        return "incomplete" if self.skipped else "mismatch"


@dataclass(frozen=True)
class FvcoreCheck:
    rows: tuple[FvcoreRow, ...]
    total: int
    error: str | None  # fvcore failed outright (JIT trace): the message, shown as is

    @property
    def ok(self) -> bool:
        return all(row.status != "mismatch" for row in self.rows)


@dataclass(frozen=True)
class RealCheck:
    """Checks on a real (allocated) instance: the measured cache and fvcore."""

    device: str
    dtype_bytes: int
    kv: tuple[Row, ...]  # layers.i.mixer -> cache bytes after prefilling seq tokens
    fvcore: FvcoreCheck | None

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.kv) and (self.fvcore is None or self.fvcore.ok)


@dataclass(frozen=True)
class CrossCheck:
    name: str
    batch: int
    seq_len: int
    params: tuple[Row, ...]
    flops: tuple[FlopRow, ...]
    ops: tuple[OpCount, ...]
    training: Row | None  # one forward + backward at (batch, seq) against the analytic training FLOPs
    training_per_token: int | None  # analytic training_flops_per_token at seq (batch-independent)
    training_ops: Mapping[str, int]
    real: RealCheck | None
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
        return tuple(op for op in self.ops if op.suspicious)

    @property
    def failures(self) -> tuple[Row, ...]:
        rows: list[Row] = [row for row in (*self.params, *self.flops) if not row.ok]
        if self.training is not None and not self.training.ok:
            rows.append(self.training)
        if self.real is not None:
            rows.extend(row for row in self.real.kv if not row.ok)
        return tuple(rows)

    @property
    def ok(self) -> bool:
        return (
            not self.failures
            and not self.suspicious_ops
            and (self.real is None or self.real.ok)
        )

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
                "ok": self.real.ok,
                "kv_cache": [_row_json(row) for row in self.real.kv],
                "fvcore": None if fv is None else {
                    "ok": fv.ok, "total": fv.total, "error": fv.error,
                    "rows": [
                        {"component": r.component, "analytic": r.analytic, "fvcore": r.fvcore,
                         "skipped": dict(r.skipped), "status": r.status}
                        for r in fv.rows
                    ],
                },
            }
        return {
            "ok": self.ok,
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
            "ops": [
                {"op": o.op, "calls": o.calls, "flops": o.flops, "has_formula": o.has_formula}
                for o in self.ops
            ],
            "uncounted_matmul_ops": [o.op for o in self.suspicious_ops],
            "real": real,
        }


def _row_json(row: Row) -> dict[str, Any]:
    return {"component": row.component, "analytic": row.analytic, "built": row.built, "ok": row.ok}


def _order_key(name: str) -> tuple[int, int, str]:
    """Model order: embedding, then layer by layer, then the head; unmapped rows last."""
    head = {"embed": 0, "pos_embed": 1, "embed_norm": 2, "final_norm": 4, "lm_head": 5}
    if name in head:
        return (head[name], 0, "")
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
        suffix = ".".join(parts[2:])
        return (3, int(parts[1]) * 100 + _IN_LAYER.get(suffix, 99), suffix)
    return (6, 0, name)


# forward order inside a block (sandwich: norm1, mixer, post_norm1, norm2, ffn, post_norm2)
_IN_LAYER = {name: rank for rank, name in enumerate((
    "norm1", "mixer", "post_norm1", "norm2", "ffn", "ffn.router", "ffn.experts", "ffn.shared",
    "ffn.shared_gate", "post_norm2",
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


_TORCH_CONV_BACKWARD = flop_registry[torch.ops.aten.convolution_backward]


def _conv_backward_flop(
    grad_out: Any, x: Any, w: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
    transposed: bool, output_padding: Any, groups: int, output_mask: list[bool],
    out_val: Any = None, **kwargs: Any,
) -> int:
    """torch's convolution_backward formula with grad_weight divided by `groups`.

    torch 2.13 `conv_backward_flop` computes grad_weight as a conv over transposed shapes that
    lose the group division, so a depthwise conv (Mamba's, groups = channels) has its weight
    gradient counted `channels` times over (fixed upstream in pytorch PR 183405, `// _groups`).
    With the fix the backward of every conv is exactly 2 x its forward, as for matmuls.
    """
    common = (grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = _TORCH_CONV_BACKWARD(*common, [output_mask[0], False], out_val=out_val)
    grad_weight = _TORCH_CONV_BACKWARD(*common, [False, output_mask[1]], out_val=out_val)
    return int(grad_input) + int(grad_weight) // groups


_conv_backward_flop._get_raw = True  # type: ignore[attr-defined]  # takes tensors; torch's formula maps shapes
COUNTER_FIXES = {torch.ops.aten.convolution_backward: _conv_backward_flop}


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
    """FlopCounterMode's dispatch mode without its per-op re-entry for ops that cannot decompose.

    torch's mode re-enters itself and calls `func.decompose()` for every op (its "has a formula"
    test compares the OpOverload with the registry's OpOverloadPacket keys, so it never
    matches), then executes and counts the op when that returns NotImplemented
    (torch/utils/flop_counter.py). `decompose` does something only for an op with a
    CompositeImplicitAutograd kernel (torch/_ops.py `OpOverload.decompose`, `_can_decompose`);
    any other op goes straight to execute-and-count here, the very path torch's mode ends on,
    where `_count_flops` applies the formulas. Metadata queries, higher-order ops and
    decompositions stay torch's.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if (
            isinstance(func, torch._ops.OpOverload)
            and func not in _METADATA_QUERIES
            and not func._can_decompose()
        ):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            return self.counter._count_flops(func._overloadpacket, out, args, kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)


class _ListingCounter(FlopCounterMode):
    """FlopCounterMode that also lists every op it executes, so ops without a formula show as 0.

    `_count_flops` is where FlopCounterMode's dispatch mode hands over every executed op (after
    its own decompositions, torch/utils/flop_counter.py); hooking it lists exactly the ops the
    counter evaluated, without a second dispatch mode on the stack. Module attribution comes
    from `_ForwardTracker` instead of torch's ModuleTracker (same names, forward only), dispatch
    from `_DirectMode`.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(display=False, custom_mapping=COUNTER_FIXES)
        self.mod_tracker = _ForwardTracker(model)  # type: ignore[assignment]
        self.calls: Counter[Any] = Counter()

    def __enter__(self) -> _ListingCounter:
        # FlopCounterMode.__enter__ with `_DirectMode` in place of torch's dispatch mode
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = _DirectMode(self)
        self.mode.__enter__()
        return self

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        self.calls[func_packet] += 1
        return super()._count_flops(func_packet, out, args, kwargs)


@dataclass(frozen=True)
class _Counted:
    own: dict[str, Counter[str]]  # forward: exclusive FLOPs per module path, per op
    calls: dict[Any, tuple[int, bool]]  # forward: every executed op packet -> (calls, has a formula)
    training: Counter[str] | None  # forward + backward, per op (FlopCounterMode's "Global")


def _count(model: ArchplanModel, tokens_BT: torch.Tensor, backward: bool) -> _Counted:
    """One forward (and its backward) under FlopCounterMode and the op log.

    The forward's figures are read before the backward starts, so one pass serves both checks.
    Module attribution is exact in the forward; in the backward it could only be approximate
    (torch's ModuleTracker uses multi-grad hooks), so training is compared on the global total
    and `_ForwardTracker` follows the forward alone.
    """
    root = type(model).__name__
    with _ListingCounter(model) as counter:
        with torch.set_grad_enabled(backward):
            logits_BTV = model(tokens_BT)
        forward_counts = counter.get_flop_counts()  # copies
        calls = {op: (n, op in counter.flop_registry) for op, n in counter.calls.items()}
        if backward:
            logits_BTV.float().sum().backward()
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
    return _Counted(own, calls, training)


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
    params = count_params(plan)
    flops = forward_flops(plan, seq_len, batch)

    if progress is not None:
        progress("build (meta, bf16)", 0, 1)
    # bf16: on meta grouped_mm's shape check wants bf16 inputs (DESIGN.md §4)
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
    own, calls = counts.own, counts.calls
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
    op_rows = tuple(sorted(
        (
            OpCount(_op_name(op), n, per_op.get(_op_name(op), 0), has_formula)
            for op, (n, has_formula) in calls.items()
        ),
        key=lambda o: (-o.flops, o.op),
    ))

    training: Row | None = None
    training_per_token: int | None = None
    training_ops: dict[str, int] = {}
    if counts.training is not None:
        training_ops = dict(counts.training)
        # 3 x the analytic forward + the FFT convolutions' backward adjustment (analytic/s4.py),
        # exactly: training_flops_per_token is this total divided by the tokens and rounded, so it
        # is compared in total, not per token.
        training = Row("forward+backward", flops.training("full"), sum(training_ops.values()))
        training_per_token = training_flops_per_token(plan, seq_len)

    real_check: RealCheck | None = None
    if real is None:
        real = params.total < SMALL_MODEL_PARAMS
    if real:
        real_check = _real_check(plan, seq_len, batch, real_device, fvcore, flops.counted_by_component,
                                 progress)

    return CrossCheck(
        name=plan.name,
        batch=batch,
        seq_len=seq_len,
        params=param_rows,
        flops=flop_rows,
        ops=op_rows,
        training=training,
        training_per_token=training_per_token,
        training_ops=training_ops,
        real=real_check,
        layer_kinds={layer.path: layer_kind(layer) for layer in plan.layers},
    )


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

    cache = model.new_cache(batch, seq_len)
    with torch.no_grad(), _layer_progress(model, f"prefill with the cache ({device})", progress):
        model(tokens_BT, cache=cache)
    analytic = kv_cache(plan, seq_len, batch, dtype_bytes)
    kv_rows = tuple(
        Row(f"{layer.path}.mixer", analytic.by_component.get(f"{layer.path}.mixer", 0), state.nbytes())
        for layer, state in zip(plan.layers, cache.layers, strict=True)
    )

    fv = _fvcore_check(model, tokens_BT, counted_by_component) if fvcore else None
    return RealCheck(device=device, dtype_bytes=dtype_bytes, kv=kv_rows, fvcore=fv)


def _fvcore_check(
    model: ArchplanModel, tokens_BT: torch.Tensor, counted_by_component: Mapping[str, int]
) -> FvcoreCheck:
    def no_flops(inputs: Any, outputs: Any) -> int:
        return 0

    try:
        with warnings.catch_warnings():
            # fvcore traces with torch.jit, which warns about its own deprecation on every call
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis  # optional dependency, imported when used

            analysis = FlopCountAnalysis(model, (tokens_BT,))
            analysis.set_op_handle(**{op: no_flops for op in FVCORE_ELEMENTWISE_OPS})
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            by_module = analysis.by_module_and_operator()
            skipped_by_module = {name: analysis.unsupported_ops(name) for name in by_module}
    except Exception as exc:  # noqa: BLE001  fvcore's JIT tracing fails on some models: report it
        return FvcoreCheck(rows=(), total=0, error=f"{type(exc).__name__}: {exc}".strip())
    # fvcore counts one multiply-add as one flop (fvcore/nn/flop_count.py): x2 to compare
    own = exclusive_counts({name: {op: 2 * int(n) for op, n in ops.items()} for name, ops in by_module.items()})
    skipped_own = exclusive_counts(skipped_by_module)
    lookup = component_lookup(counted_by_component)
    fv_by_comp = {comp: sum(ops.values()) for comp, ops in _by_component(own, lookup).items()}
    skipped_by_comp = _by_component(skipped_own, lookup)
    # fvcore also lists every elementwise op it skips; only matmul-like ones can hide counted FLOPs
    shown = counted_by_component.keys() | {comp for comp, n in fv_by_comp.items() if n}
    rows = tuple(
        FvcoreRow(
            comp,
            counted_by_component.get(comp, 0),
            fv_by_comp.get(comp, 0),
            {op: n for op, n in skipped_by_comp.get(comp, Counter()).items() if _matmul_like(op)},
        )
        for comp in ordered(shown)
    )
    return FvcoreCheck(rows=rows, total=sum(row.fvcore for row in rows), error=None)
