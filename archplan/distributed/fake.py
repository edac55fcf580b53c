"""`verify --layout`: one rank's training step at full world size, in one process, allocating nothing.

The recipe (docs/distributed.md): the fake process group acting as the first rank of the measured
pipeline stage; the DeviceMesh, the stage built on meta from archplan's modules and sharded with
torch's own APIs (`shard`) outside FakeTensorMode (FSDP2 + TP builds its meshes with a
data-dependent op that FakeTensorMode refuses); then, inside FakeTensorMode, `to_empty`, AdamW, and
two training steps of the 1F1B schedule (`step`): the first (one micro-batch) creates the optimizer
states, the second is measured by `FSDPMemTracker` (per-category peak, statistics reset on re-entry) and by
`CollectiveRecorder` (every collective of one step, FSDP2's copies around them and, flagged by
`fsdp2_accumulation_counted`, its gradient accumulation), both counting in one dispatch mode (`StepTracker`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
import gc
import inspect
import logging
import weakref
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch._decomp import decomposition_table, meta_table
from torch._dynamo import config as dynamo_config
from torch._library import simple_registry
from torch._subclasses.fake_impls import has_meta, op_implementations_checks
from torch._subclasses.fake_tensor import (_DISPATCH_HANDLE_DIRECTLY, _DISPATCH_META_HANDLERS, FakeTensor,
                                          FakeTensorConfig, FakeTensorMode, _device_handler)
from torch._subclasses.fake_tensor import log as _FAKE_LOG
import torch.distributed.tensor.parallel.loss as parallel_loss
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType, _FSDPState
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, _UpdateType, _WeakRefInfo
from torch._C import _get_dispatch_stack_at, _len_torch_dispatch_stack
from torch import nn
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves

from archplan.distributed.comms import CollectiveRecorder, fsdp2_accumulation_counted
from archplan.distributed.mesh import build_mesh, init_fake_world, stage_rank
from archplan.distributed.shard import Sharded, accumulated_grad_bytes, shard_stage
from archplan.distributed.stage import build_chunks
from archplan.distributed.step import MicroBatch, StageRunner
from archplan.planning.layout import Layout
from archplan.planning.records import Collective, RankMemory
from archplan.resolve import ModelPlan

DEVICE = torch.device("cpu")
_T = TypeVar("_T")

# FSDPMemTracker's reference types → the categories of `records.RankMemory`. The bf16 compute
# copies FSDP2 gathers (and frees) are temporary; buffers (RoPE tables, the router's correction
# bias) are not parameters and are counted as temporary too. AdamW's per-parameter `step` is a
# 0-d fp32 tensor that torch keeps on the CPU beside CUDA parameters (torch.optim.adam, `_init_group`
# without capturable/fused); here the device is the CPU, so its bytes are taken out of `optimizer`
# and reported apart (`adam_step_bytes`).
# ZeRO-0/1 on FSDP2: gradients accumulate unreduced over the micro-batches before the last (no
# gradient sync), upcast to fp32 in each FSDPParam's `unsharded_accumulated_grad`
# (`to_accumulated_grad_if_needed`), a tensor FSDPMemTracker files as "Temp"; `sample` reads them
# off the FSDP units and files them under this name, as gradients
ACCUMULATED_GRAD = "Accumulated Grad"
CATEGORY = {
    ACCUMULATED_GRAD: "gradients",
    "Sharded Param": "parameters",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "temporary",  # a unit's whole gradient before its reduce-scatter
    "OptState": "optimizer",
    "Activation": "activations",
    "Inputs": "activations",
    "Temp": "temporary",
    "Unsharded Param": "temporary",
    "Buffer": "temporary",
    "All Gather": "collective_buffers",
    "Reduce Scatter": "collective_buffers",
}


@dataclass(frozen=True)
class Measured:
    layout: Layout
    stage: int
    rank: int
    seq: int
    microbatches: int
    in_flight: int
    layers: tuple[int, ...]
    mtp: tuple[int, ...]  # the multi-token-prediction modules on the rank, by depth
    memory: RankMemory
    peak_by_reftype: dict[str, int]
    adam_step_bytes: int
    collectives: tuple[Collective, ...]
    fsdp2_copy_bytes: int  # what FSDP2's copy ops around its collectives read and wrote
    fsdp2_accumulate_bytes: int  # what its accumulation of unsharded gradients read and wrote


@contextmanager
def _patched(owner: object, name: str, replacement: object) -> Iterator[None]:
    """`owner.name` replaced by `replacement` while the block runs, restored however it ends."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def _shape_propagation_untracked() -> Iterator[None]:
    """DTensor derives each output's global shape by running the op on fake tensors of the global
    shape, in the fake mode it detects: ours, so the memory tracker counted them. A real run uses a
    private fake mode there and allocates nothing; here both run with the current modes popped,
    which gives them a private one again. Two places do it:
    - loss_parallel's op handlers (`parallel.loss._propagate_tensor_meta`): two tokens ×
      whole-vocabulary fp32 tensors on the last stage;
    - DTensor's sharding propagation of an op schema not seen before
      (`ShardingPropagator._propagate_tensor_meta_non_cached`): at zero 0/1 over several
      micro-batches, the first stage's peak fell at FSDP2's accumulation of the vocabulary-parallel
      embedding's Replicate gradient, where the global-shape tensors of its upcast and sum added
      2 B per element of the whole vocabulary matrix to the measured temporary (Llama 3 8B, TP8
      PP4 DP4: 1.05 GB)."""
    loss_original = parallel_loss._propagate_tensor_meta
    schema_original = ShardingPropagator._propagate_tensor_meta_non_cached

    def loss_untracked(*args: object, **kwargs: object) -> object:
        with _disable_current_modes():
            return loss_original(*args, **kwargs)  # type: ignore[arg-type]

    def schema_untracked(self: ShardingPropagator, op_schema: object) -> object:
        with _disable_current_modes():
            return schema_original(self, op_schema)  # type: ignore[arg-type]

    with (_patched(parallel_loss, "_propagate_tensor_meta", loss_untracked),
          _patched(ShardingPropagator, "_propagate_tensor_meta_non_cached", schema_untracked)):
        yield


@contextmanager
def _cuda_attention_kernel() -> Iterator[None]:
    """SDPA with a value head size other than the query's (MLA: 128 against 192 for DeepSeek-V3)
    through the kernel CUDA's selector picks for it, the memory-efficient one (torch sdp_utils:
    flash needs equal head sizes, memory-efficient does not), rather than the CPU's choice, the
    math kernel (flash-for-CPU needs them equal too), whose autograd keeps the T × S
    probabilities per head, and whose backward makes their gradient: 2 × 4.3 GB for a
    DeepSeek-V3 layer at 4,096 tokens (128 heads, bf16). The memory-efficient kernel keeps its
    output and the fp32 log-sum-exp, what `planning.cluster`'s "flash" model counts. Under
    FakeTensorMode the kernel's meta function gives its outputs (nothing runs), autograd its
    derivative (`_scaled_dot_product_efficient_attention_backward`), and DTensor has sharding
    rules for both. Equal head sizes keep the CPU's flash kernel (no s×s either). Patched on
    `torch.nn.functional` as `_shape_propagation_untracked` patches: a torch-function mode would not
    reach the layers re-run by activation checkpointing inside the backward."""
    original = F.scaled_dot_product_attention

    def cuda_choice(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        if query.shape[-1] == value.shape[-1]:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        assert not enable_gqa and dropout_p == 0.0, "MLA's attention: no GQA, no dropout"
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, grad, 0.0, is_causal, scale=scale)[0]

    with _patched(F, "scaled_dot_product_attention", cuda_choice):
        yield


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """The objects alive before the step (torch's modules and those of the imports, the mesh's
    process groups, the stage built on meta) left out of the cyclic collector's full
    collections while the step runs (`gc.freeze`): each full collection traversed all of them.
    None of them holds a tracked tensor (the fake ones are made inside the step); the step's own
    cycles are collected as before (the same `--json`, byte for byte, on the layouts of
    benchmarks/verify_layout_scale.md)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def _cast_filed_as_gradient(tracker: StepTracker) -> Iterator[None]:
    """FSDP2's first cast of a unit's gradient (`FSDPParam.to_accumulated_grad_if_needed`) makes
    the fp32 accumulated gradient while the bf16 one it casts is alive, and a peak set there sees
    the new tensor before it is the parameter's `unsharded_accumulated_grad`: the accumulated
    gradients are read again once it is, so the peak files it as a gradient, as the samples do,
    not as temporary too (Llama 3 8B TP8 PP4 DP4 ZeRO-1, first stage: the vocabulary matrix's
    2.10 GB at its embedding's cast)."""
    original = FSDPParam.to_accumulated_grad_if_needed

    def cast(param: FSDPParam) -> None:
        peak = dict(tracker._peak_mem)
        original(param)
        if tracker.accumulated is not None and tracker._peak_mem != peak:
            tracker.peak_accumulated = tracker.accumulated()

    with _patched(FSDPParam, "to_accumulated_grad_if_needed", cast):
        yield


def _name(reftype: object) -> str:
    return reftype.value if isinstance(reftype, Enum) else str(reftype)


def _file_accumulated(snapshot: dict[str, int], accumulated: int) -> dict[str, int]:
    """A tracker snapshot with ZeRO-0/1's accumulated gradients taken out of "Temp" (where the
    tracker files them) and filed as gradients."""
    if accumulated:
        snapshot["Temp"] = snapshot.get("Temp", 0) - accumulated
        snapshot[ACCUMULATED_GRAD] = accumulated
    return snapshot


def _categories(snapshot: dict[str, int]) -> dict[str, int]:
    totals = dict.fromkeys(RankMemory.__dataclass_fields__, 0)
    for reftype, nbytes in snapshot.items():
        if _name(reftype) in CATEGORY:
            totals[CATEGORY[_name(reftype)]] += nbytes
    return totals


def _rank_memory(peak: dict[str, int], samples: list[dict[str, int]], peak_in_run: bool) -> RankMemory:
    """Each category's largest value over the snapshots: the tracker's peak (where the transient
    gathered weights and collective buffers are largest), one before each backward (where the
    in-flight micro-batches' activations are, the most of them before the first backward, and
    ZeRO-1's accumulated gradients before the last), one at the end of each layer's re-run under
    full recompute (where that layer's tensors join the held inputs: the activations' peak) and
    one before the optimizer step (where every gradient exists). The tracker files what AdamW's
    step allocates while it runs (foreach intermediates) as optimizer state: at the peak,
    whatever exceeds the states held between steps (the samples') is temporary. It files what a
    forward allocates as activations, its transients too, and so what a layer's re-run allocates;
    every tensor a forward keeps for the backward is alive at the sample before that backward, and
    every tensor a re-run keeps at the sample at its end, so at a peak inside either the
    activations beyond the most any sample held are transients no backward reads (the last head
    pass's bf16 logits and their fp32 copy for the loss; S4's kernel generation re-run,
    docs/distributed.md), and are temporary."""
    per = [_categories(s) for s in samples]
    at_peak = _categories(peak)
    held = max(p["optimizer"] for p in per)
    step_buffers = max(at_peak["optimizer"] - held, 0)
    at_peak["optimizer"] -= step_buffers
    at_peak["temporary"] += step_buffers
    if peak_in_run:
        transients = max(at_peak["activations"] - max(p["activations"] for p in per), 0)
        at_peak["activations"] -= transients
        at_peak["temporary"] += transients
    per.append(at_peak)
    return RankMemory(**{name: max(p[name] for p in per) for name in RankMemory.__dataclass_fields__})


_DEVICE = torch.ops.prim.device.default
_WAIT_TENSOR = torch.ops._c10d_functional.wait_tensor.default
_ALL_GATHER = torch.ops.c10d._allgather_base_.default
_REDUCE_SCATTER = torch.ops.c10d._reduce_scatter_base_.default


def _active_fake_mode() -> FakeTensorMode | None:
    """`torch._guards.active_fake_mode` without building the mode-stack list on every op."""
    for i in range(_len_torch_dispatch_stack() - 1, -1, -1):
        mode = _get_dispatch_stack_at(i)
        if isinstance(mode, FakeTensorMode):
            return mode
    return None


# arguments torch's key takes as they are (with their type)
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format})


class StepFakeMode(FakeTensorMode):
    """FakeTensorMode with the same outputs at a lower cost per op:
    - its dispatch cache's key (`_cache_key`) describes a plain fake tensor of this mode by one
      tuple of the metadata torch flattens field by field (`extract_tensor_metadata`,
      `TensorMetadata._flatten_into`): dtype, shape, strides (which decide the memory format
      torch derives from them), device, storage offset and size, requires_grad, conj, neg,
      inference, quantized; a sparse, symbolic, constant or other mode's tensor, and every
      other argument, takes torch's path. Computing torch's key cost more than the misses it
      saves (docs/distributed.md, Scale);
    - cached outputs, new tensors and views alike, rebuilt with less Python
      (`_get_output_tensor_from_cache_entry`, `_fake_tensor`);
    - the ops its cache never holds answered without the checks that do not apply (`dispatch`);
    - no `torch._disable_dynamo` around its `__torch_dispatch__` (see `StepTracker`)."""

    def _prep_args_for_hash(self, result: list[object], args: Any, state: Any,  # type: ignore[override]
                            id_hashed_objects: list[object]) -> None:
        if not isinstance(args, (list, tuple)):
            super()._prep_args_for_hash(result, args, state, id_hashed_objects)
            return
        result.append(type(args))
        result.append(f"length_{len(args)}")
        for arg in args:
            if type(arg) is FakeTensor and arg.fake_mode is self and arg.constant is None \
                    and arg.layout == torch.strided and not arg._has_symbolic_sizes_strides:
                result.append((arg.dtype, tuple(arg.shape), arg.stride(), arg.fake_device, arg.storage_offset(),
                               arg.untyped_storage().nbytes(), arg.requires_grad, arg.is_quantized,
                               arg.is_conj(), arg.is_neg(), arg.is_inference()))
            elif type(arg) in _PLAIN:
                result.append(type(arg))  # as torch's: 1 and 1.0 hash alike
                result.append(arg)
            elif isinstance(arg, (list, tuple)):
                self._prep_args_for_hash(result, arg, state, id_hashed_objects)
            else:
                super()._prep_args_for_hash(result, (arg,), state, id_hashed_objects)

    def _get_output_tensor_from_cache_entry(self, state: Any, entry: Any, key: Any, func: Any,  # type: ignore[override]
                                            args: Any) -> FakeTensor | None:
        """torch's, for a strided output without symbolic sizes (no shape environment here), new or
        a view of an argument: the same meta tensor, made the same way (`empty_strided`, then for a
        view `set_` onto the argument's storage), without torch's per-size checks for symbolic
        stubs, under one kernel-invocation guard where torch enters two, and wrapped by
        `_fake_tensor`. Views are half the cached outputs of a step (`view`, `detach`, `t`,
        `split`, ...). In-place outputs (the argument itself), constants and the rest take
        torch's path."""
        meta = entry.metadata
        if self.shape_env is not None or meta is None or entry.inplace_idx is not None \
                or meta.layout != torch.strided or meta.device.type != "cpu" or FakeTensorConfig.debug:
            return super()._get_output_tensor_from_cache_entry(state, entry, key, func, args)
        storage = None
        if entry.view_idx is not None and isinstance(func, torch._ops.OpOverload) and func.is_view:
            view_arg = args[entry.view_idx]
            if not isinstance(view_arg, FakeTensor):
                return super()._get_output_tensor_from_cache_entry(state, entry, key, func, args)
            storage = view_arg.untyped_storage()

        def build() -> torch.Tensor:
            empty = torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, layout=meta.layout,
                                        device="meta", requires_grad=meta.requires_grad)
            if storage is not None:
                empty.set_(storage, meta.storage_offset, meta.shape, meta.stride)
            return empty

        # with no dispatch mode left on the stack (the usual case: this mode and the tracker above
        # it are popped while they answer) and no fake tensor among its arguments, `build` reaches
        # the meta kernels without the kernel-invocation guard, which only acts on those two
        empty = build() if _len_torch_dispatch_stack() == 0 else self._in_kernel(build)
        if meta.is_conj:
            torch._C._set_conj(empty, True)
        if meta.is_neg:
            torch._C._set_neg(empty, True)
        return _fake_tensor(self, empty, meta.device)

    def _in_kernel(self, run: Callable[[], _T]) -> _T:
        """`run()` as torch runs a kernel under this mode (`in_kernel_invocation_manager`: no Python
        dispatch, meta kernels, fake tensors seen as meta), as a plain block where torch's is a
        generator context manager."""
        prev = self.in_kernel_invocation
        with torch._C._DisableTorchDispatch(), torch._C._PreserveDispatchKeyGuard():
            self.in_kernel_invocation = True
            torch._C._set_meta_in_tls_dispatch_include(True)
            try:
                return run()
            finally:
                self.in_kernel_invocation = prev

    def dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        """torch's `FakeTensorMode.dispatch` with less per op:
        - its debug logging (a logger-level lookup and a `no_dispatch` generator context on every
          op) skipped while its logger is not enabled for debug (else torch's dispatch runs);
        - the ops its cache never holds (`_UNCACHED`: FSDP2's `record_function`, DTensor's
          `_unsafe_view`, the collectives and FSDP2's copy ops) answered by the branch of torch's
          `_dispatch_impl` that answers them, without the checks before it (subclasses, constants,
          real tensors, symbolic sizes, decompositions, the fake-impl registry, a loop over
          torch's special-case ops), when no argument needs them (`_plain`): two milliseconds an
          op on this host, a few hundred ops per micro-batch."""
        kwargs = kwargs or {}
        if not self.cache_enabled or func in _DISPATCH_HANDLE_DIRECTLY or _FAKE_LOG.isEnabledFor(logging.DEBUG):
            return super().dispatch(func, types, args, kwargs)
        if func in _DISPATCH_META_HANDLERS:
            return _DISPATCH_META_HANDLERS[func](args)
        answer = _UNCACHED.get(func)
        if answer is not None and self._plain(args, kwargs):
            return answer(self, func, types, args, kwargs)
        return self._cached_dispatch_impl(func, types, args, kwargs)

    def _plain(self, args: Any, kwargs: Any) -> bool:
        """Whether torch's checks before an op's kernel have nothing to act on: no shape
        environment, real-tensor propagation or debug mode, and every tensor argument a plain fake
        tensor of this mode without a constant value (torch propagates constants through real
        kernels) or symbolic sizes."""
        if self.shape_env is not None or self.propagate_real_tensors or FakeTensorConfig.debug:
            return False
        return all(type(arg) is FakeTensor and arg.fake_mode is self and arg.constant is None
                   and not arg._has_symbolic_sizes_strides
                   for arg in tree_leaves((args, kwargs)) if isinstance(arg, torch.Tensor))

    def _record_function(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        """torch's fake implementation (`fake_impls._record_function_enter_new`): the real op, which
        takes and returns no tensor (a profiler handle), run as a kernel."""
        return self._in_kernel(lambda: func(*args, **kwargs))

    def _unsafe_view(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        """torch's path for `_unsafe_view` is its decomposition (`torch._decomp`'s `_reshape_alias`:
        `aten.view(x, shape)` under this mode), a `view` whose output shares the input's storage
        and which this mode's cache answers; called here without the decomposition's wrappers."""
        return self.dispatch(_VIEW, types, args, kwargs)

    def _meta_kernel(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        """torch's last branch of `_dispatch_impl`, which answers ops with a meta kernel and no
        decomposition, fake implementation or special case (`_meta_kernel_only`): the meta kernel
        run as a kernel, its meta outputs wrapped as fake tensors on the inputs' device, the input
        tensors it returns (in-place collectives) as they are."""
        out = self._in_kernel(lambda: func(*args, **kwargs))
        return self.wrap_meta_outputs_with_default_device_logic(out, func, tree_leaves((args, kwargs)),
                                                              device=kwargs.get("device"))


def _meta_kernel_only(op: torch._ops.OpOverload) -> bool:
    """Whether torch's `FakeTensorMode._dispatch_impl` answers `op` (for plain fake inputs) by its
    meta kernel alone: a meta kernel, and none of the branches before that one (a Python meta or
    decomposition, a composite-implicit kernel it decomposes, a prim, dynamo's custom-op profiles,
    a registered fake implementation, one of `fake_impls`' special cases)."""
    return (has_meta(op) and op not in meta_table and op not in decomposition_table
            and dynamo_config._custom_ops_profile is None
            and not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
            and "prims::" not in op._schema.name
            and simple_registry.singleton.find(op.name()).fake_impl.kernel is None
            and not any(check(op) for check, _ in op_implementations_checks))


_VIEW = torch.ops.aten.view.default
# the collectives (DTensor's functional ones, FSDP2's and the pipeline's c10d ones) and FSDP2's
# copy-in / copy-out ops: custom ops, which FakeTensorMode's cache refuses ("non-builtin")
_COLLECTIVE_OPS = (
    torch.ops._c10d_functional.all_gather_into_tensor.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_reduce.default,
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops.c10d._allgather_base_.default,
    torch.ops.c10d._reduce_scatter_base_.default,
    torch.ops.c10d.allreduce_.default,
    torch.ops.c10d.send.default,
    torch.ops.c10d.recv_.default,
    torch.ops.fsdp.all_gather_copy_in.default,
    torch.ops.fsdp.split_with_sizes_copy.default,
    torch.ops.fsdp.chunk_cat.default,
)
_UNCACHED: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    torch.ops.profiler._record_function_enter_new.default: StepFakeMode._record_function,
    torch.ops.aten._unsafe_view.default: StepFakeMode._unsafe_view,
} | {op: StepFakeMode._meta_kernel for op in _COLLECTIVE_OPS if _meta_kernel_only(op)}


def _fake_tensor(mode: FakeTensorMode, elem: torch.Tensor, device: torch.device) -> FakeTensor:
    """`FakeTensor(mode, elem, device)` for a CPU fake device, the same object built with less Python:
    torch's `FakeTensor.__new__` (torch/_subclasses/fake_tensor.py) normalises the device (the
    identity for "cpu", which has no index), makes the subclass, marks its data pointer, then sets
    its attributes one by one, five memo fields through descriptors that each store three
    entries; here the attributes of a FakeTensor built by torch (`_FAKE_STATE`, all None but the
    mode and the device) are copied into the instance's dict at once.
    `tests/test_step_tracker.py` compares the two constructions."""
    out = torch.Tensor._make_subclass(FakeTensor, elem, elem.requires_grad, dispatch_device=True,
                                      device_for_backend_keys=device)
    if not mode._allow_unsafe_data_ptr_access:
        torch._C._set_throw_on_mutable_data_ptr(out)
    else:
        torch._C._set_warn_deprecated_on_mutable_data_ptr(out)
    out.__dict__.update(_fake_device=device, fake_mode=mode)  # torch's order
    out.__dict__.update(_FAKE_STATE)
    return out


def _fake_state() -> dict[str, object]:
    """The instance attributes torch's constructor gives a plain FakeTensor, none of which depends
    on the tensor but the mode and the device (checked: every other one is None)."""
    with FakeTensorMode() as mode:
        state = dict(torch.empty(0).__dict__)
    own_mode, device = state.pop("fake_mode"), state.pop("_fake_device")
    if own_mode is not mode or device != torch.device("cpu") or any(v is not None for v in state.values()):
        raise RuntimeError(f"FakeTensor's attributes are not as fake._fake_tensor expects: {state}")
    return state


_FAKE_STATE = _fake_state()


StepFakeMode.__torch_dispatch__ = inspect.unwrap(FakeTensorMode.__torch_dispatch__)  # type: ignore[method-assign]


class RecomputeAsActivations(FSDPMemTracker):
    """FSDPMemTracker, corrected: what a checkpointed layer's recompute allocates in the backward is
    filed as activations, as torch's trackers define them ("tensors produced during the forward
    pass and recomputation in activation checkpointing", `_FSDPRefType.ACT`). FSDPMemTracker
    detects a recompute by an FSDP unit's pre-forward running in the backward; with the units
    around the checkpoint wrappers (torchtitan's order, `checkpointing.apply_recompute`) the
    recompute re-runs the wrapped layer inside its unit and no unit's pre-forward runs, so the re-run
    layer's tensors were filed as temporary (only an MoE layer's experts, a unit of their own
    inside the layer, were seen). The wrapped layers' forward hooks mark the region instead;
    the exit hook runs on the exception too (`always_call`): the non-reentrant checkpoint stops
    the recompute early by raising once the last tensor it needs is recomputed."""

    _recompute_hooks: tuple[Any, ...] = ()
    # called at the end of each layer's re-run in the backward, where the re-run layer's tensors
    # are all alive: the activations' peak under full recompute, which no other sample holds
    rerun_sample: Callable[[], None] | None = None
    # ZeRO-0/1's accumulated gradients (filed as "Temp" by the tracker), read whenever the peak is
    # set: `measure` files them at the peak as its samples do
    accumulated: Callable[[], int] | None = None
    peak_accumulated: int = 0
    # whether the peak fell where activations are made, a forward or a layer's re-run in the
    # backward: `_rank_memory` files that run's transients as temporary
    peak_in_run: bool = False

    def _update_peak_stats(self, peak_state: Any) -> None:
        peaks = dict(self._peak_mem)
        super()._update_peak_stats(peak_state)
        if self._peak_mem != peaks:
            self.peak_in_run = not self._mod_tracker.is_bw or self._in_ac
            if self.accumulated is not None:
                self.peak_accumulated = self.accumulated()

    def _register_module_and_optimizer_hooks(self) -> None:
        super()._register_module_and_optimizer_hooks()
        layers = [m._checkpoint_wrapped_module for m in self._root_mod.modules()
                  if isinstance(m, CheckpointWrapper)]
        self._recompute_hooks = tuple(
            h for layer in layers
            for h in (layer.register_forward_pre_hook(self._recompute_begins),
                      layer.register_forward_hook(self._recompute_ends, always_call=True)))

    def _deregister_module_and_optimizer_hooks(self) -> None:
        super()._deregister_module_and_optimizer_hooks()
        for handle in self._recompute_hooks:
            handle.remove()
        self._recompute_hooks = ()

    def _recompute_begins(self, layer: nn.Module, args: object) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is None:
            self._ac_mod = weakref.ref(layer)
            self._in_ac = True

    def _recompute_ends(self, layer: nn.Module, args: object, output: object) -> None:
        if self._ac_mod is not None and self._ac_mod() is layer:
            if self.rerun_sample is not None:
                self.rerun_sample()
            self._ac_mod = None
            self._in_ac = False


class StepTracker(RecomputeAsActivations):
    """RecomputeAsActivations with the same figures at a lower cost per op (every op of the step
    passes through it):
    - the global peak only: torch's `_update_peak_stats` also walks every FSDP unit it tracks on
      each op to update the per-module peaks of `memory_tracking`, which `measure` never reads
      (a weak-reference dereference per unit per op, through `checkpoint_wrapper.__getattr__`);
      the global peak below is torch's own second loop, which also reads the accumulated
      gradients at a new peak, as `RecomputeAsActivations._update_peak_stats` does;
    - collectives counted in this dispatch (`recorder`, when set) rather than by a second mode
      stacked above it: the same ops, DTensor's deferred alike (`CollectiveRecorder`);
    - `prim.device` (a fake tensor's `.device`, about half of the ops it sees: autograd and
      DTensor ask every tensor's device) returns a device, no tensor: of torch's handling only
      the peak update applies (an unsharded weight's `resize_` raises the current snapshot
      between ops), the rest (reference type, tracking the outputs) has nothing to act on;
    - FSDPMemTracker's `__torch_dispatch__` (torch/distributed/_tools/fsdp2_mem_tracker.py) is
      run inline, step for step, with the outputs' storages visited in pytree order
      (`tree_leaves`, where torch's `tree_map_only` also rebuilds the output it discards) and the
      fake-mode lookup of `active_fake_mode` without building the mode-stack list;
    - no `torch._disable_dynamo` around it (`TorchDispatchMode.__init_subclass__` wraps every
      mode's `__torch_dispatch__` so that dynamo does not trace into it: four eval-frame switches
      per op; nothing here runs under dynamo)."""

    recorder: CollectiveRecorder | None = None

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = deepcopy(dev_snap)
                self.peak_in_run = not self._mod_tracker.is_bw or self._in_ac
                if self.accumulated is not None:
                    self.peak_accumulated = self.accumulated()

    def _track(self, reftype: Any, t: torch.Tensor) -> None:
        """torch's `MemTracker._track` for a fake tensor (its one storage: FakeTensor is no
        traceable wrapper subclass, so `get_untyped_storages` returns the set of it), step for step;
        other tensors take torch's."""
        if type(t) is not FakeTensor:
            super()._track(reftype, t)
            return
        st = t.untyped_storage()
        winfo, _ = self._WINFO.get(st, (None, None))
        if winfo is not None:
            if winfo.size != st.size():
                old_mem_consumed = winfo.mem_consumed
                winfo.update_mem_consumed(st)
                self._update_snap(_UpdateType.SIZE, winfo, old_mem_consumed=old_mem_consumed)
            return
        winfo, w_st = _WeakRefInfo.create_winfo(st, t.device, reftype, self._delete_callback)
        self._WINFO[st] = (winfo, w_st)
        if winfo.mem_consumed > 0:
            self._update_snap(_UpdateType.ADD, winfo)

    def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: int | None = None,
                     old_reftype: Any = None) -> None:
        """torch's `MemTracker._update_snap` for a storage added or freed on a device the current
        snapshot holds, the two updates of nearly every op, without the fresh device entry
        (`dict.fromkeys` over the reference types) torch builds as `setdefault`'s default on every
        call; a new device and the other updates take torch's."""
        dev_snap = self._curr_mem_snap.get(winfo.device)
        if dev_snap is None or _TOTAL_KEY not in dev_snap or winfo.reftype not in dev_snap:
            super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
        elif u_type is _UpdateType.ADD:
            dev_snap[winfo.reftype] += winfo.mem_consumed
            dev_snap[_TOTAL_KEY] += winfo.mem_consumed
        elif u_type is _UpdateType.DEL:
            dev_snap[winfo.reftype] -= winfo.mem_consumed
            dev_snap[_TOTAL_KEY] -= winfo.mem_consumed
            if dev_snap[_TOTAL_KEY] == 0:
                del self._curr_mem_snap[winfo.device]
        else:
            super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)

    def _dispatch(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        for t in types:
            if issubclass(t, DTensor):
                return NotImplemented  # as torch's: DTensor runs first, its local ops come back here
        # the fake mode below this one: the op runs between it and us, and the stack is the same
        # after it (modes nest), so one look serves the three questions torch's asks
        active = _active_fake_mode()
        if func is _DEVICE:
            # what FakeTensorMode answers (its `_DISPATCH_META_HANDLERS`), without the redispatch
            device = _device_handler(args) if isinstance(args[0], FakeTensor) else func(*args, **(kwargs or {}))
            if active is self._fake_mode_on_entry:
                self._update_peak_stats(None)
            return device
        if self.recorder is not None:
            self.recorder.count(func, args, kwargs or {})
        if func is _WAIT_TENSOR and active is not None:
            res = args[0]  # torch's override of the wait's meta function (a new tensor)
        else:
            res = func(*args, **(kwargs or {}))
        if active is not self._fake_mode_on_entry:
            return res  # DTensor's sharding propagation in its own fake mode
        if self._in_opt:
            reftype = _FSDPRefType.OPT
        elif (self._mod_tracker.is_bw and not self._in_ac) or self._fsdp_state is _FSDPState.PRE_FW:
            # what FSDP2's pre-forward allocates is its unit's gathered weights (a unit whose
            # all-gather outputs it re-creates each time, `FSDPParam.init_all_gather_outputs`):
            # temporary, as the same tensors made in the pre-backward are; torch's tracker files
            # them as activations
            reftype = _FSDPRefType.TEMP
        else:
            reftype = _FSDPRefType.ACT
        if func is _ALL_GATHER and self._fsdp_state in (_FSDPState.PRE_FW, _FSDPState.PRE_BW):
            self._update_and_maybe_create_winfos(args[0], _FSDPRefType.ALL_GATHER, update_existing=True)
        if func is _REDUCE_SCATTER and self._fsdp_state == _FSDPState.POST_BW:
            self._update_and_maybe_create_winfos(args[1], _FSDPRefType.REDUCE_SCATTER, update_existing=True)
        if isinstance(res, torch.Tensor):
            self._track(reftype, res)
        elif res is not None:
            for leaf in tree_leaves(res):
                if isinstance(leaf, torch.Tensor):
                    self._track(reftype, leaf)
        self._update_peak_stats(None)
        return res


StepTracker.__torch_dispatch__ = StepTracker._dispatch  # type: ignore[method-assign]


def _tracker(chunks: tuple[Sharded, ...], optimizer: torch.optim.Optimizer) -> StepTracker:
    """StepTracker over every model chunk of the rank. It takes one FSDP module and walks
    `.modules()` / `.buffers()` of it to instrument the units; a rank's chunks under vpp > 1 are
    separate FSDP roots, each run on its own (torchtitan's model parts), and a container of them
    cannot be an FSDP module without being their root. So the tracker is built on the first chunk
    and walks all of them."""
    tracker = StepTracker(chunks[0].stage, optimizer)
    if len(chunks) > 1:
        tracker._root_mod = nn.ModuleList(c.stage for c in chunks)
    return tracker


def measure(plan: ModelPlan, layout: Layout, seq: int, *, microbatches: int, stage: int) -> Measured:
    """Rank `stage_rank(layout, stage)`'s peak memory by category and its collectives in one step."""
    rank = stage_rank(layout, stage)
    init_fake_world(layout.world, rank)
    mesh = build_mesh(layout, "cpu")
    chunks = tuple(shard_stage(chunk, mesh, balanced=True) for chunk in build_chunks(plan, layout, stage, "meta"))
    module = nn.ModuleList(c.stage for c in chunks)
    local_seq = seq // layout.cp // (layout.tp if layout.sequence_parallel else 1)
    hidden = (layout.mb, local_seq, plan.d_model)
    dims_by_group = mesh.dims_by_group
    group_sizes = mesh.group_sizes
    for tied in (c.tied for c in chunks if c.tied is not None):  # the end stages' embedding group: a pp pair
        dims_by_group[tied.group_name] = ("pp",)
        group_sizes[tied.group_name] = tied.size()
    recorder = CollectiveRecorder(dims_by_group, group_sizes)
    units = tuple(u for c in chunks for u in c.units)
    with _frozen_heap(), _shape_propagation_untracked(), _cuda_attention_kernel(), StepFakeMode(allow_non_fake_inputs=True):
        module.to_empty(device=DEVICE)
        for sub in module.modules():
            if hasattr(sub, "reset_buffers"):
                sub.reset_buffers()
        # fused, as torchtitan runs it (`implementation = "fused"`) and as Megatron-Core's and
        # DeepSpeed's Adam are: in place, no temporaries; the default on a CPU loops one tensor at a
        # time, whose per-tensor temporaries were the peak of a zero-0 stage, and on CUDA (foreach)
        # allocates sqrt(v) of every parameter at once
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
        tracker = _tracker(chunks, optimizer)
        # FSDPMemTracker refuses a second forward of its root in one iteration (it keeps per-module
        # statistics per call); the micro-batches are such calls. Clearing the per-module
        # statistics before each forward, as its error message advises (`reset_mod_stats`), keeps
        # the global peak; only the chunk about to run forward: the others' backwards look theirs up.
        samples: list[dict[str, int]] = []

        def forget(chunk: nn.Module) -> None:
            for sub in chunk.modules():
                tracker.memory_tracking.pop(sub, None)

        def sample() -> None:
            current = dict(next(iter(tracker.get_tracker_snapshot("current").values()), {}))
            samples.append(_file_accumulated(current, accumulated_grad_bytes(units)))

        runner = StageRunner(chunks, mesh, optimizer, hidden, DEVICE, before_forward=forget,
                             sample=sample)
        tracker.rerun_sample = sample
        # the rank's tokens: seq / cp of each sequence (their values do not matter here)
        # (the whole sequences too where MTP modules read them ahead of the rank's chunks)
        batches = [MicroBatch(torch.randint(0, plan.vocab_size, (layout.mb, seq // layout.cp), device=DEVICE),
                              torch.randint(0, plan.vocab_size, (layout.mb, seq // layout.cp), device=DEVICE),
                              torch.randint(0, plan.vocab_size, (layout.mb, seq), device=DEVICE)
                              if plan.mtp and layout.cp > 1 else None)
                   for _ in range(microbatches)]
        with tracker:
            # the first step creates AdamW's states, and the measured one is not a first call:
            # state creation alone (FSDP2's lazy init, AdamW on zero gradients) left the measured
            # step with a different tracked peak (first-call work, e.g. DTensor's sharding-cache
            # misses, is tracked). One micro-batch does it (pp of them, one round, under the
            # interleaved schedule)
            runner.train_step(batches[:1 if layout.vpp == 1 else layout.pp])
        samples.clear()
        tracker.recorder = recorder
        tracker.accumulated = lambda: accumulated_grad_bytes(units)
        with tracker, fsdp2_accumulation_counted(recorder), _cast_filed_as_gradient(tracker):
            runner.train_step(batches)
    peak = _file_accumulated(dict(next(iter(tracker.get_tracker_snapshot("peak").values()))),
                             tracker.peak_accumulated)
    steps = sum(state["step"].numel() * state["step"].element_size() for state in optimizer.state.values())
    memory = _rank_memory(peak, samples, tracker.peak_in_run)
    layers = tuple(int(i) for c in chunks for i in c.stage.layers)
    mtp = tuple(int(k) for c in chunks for k in c.stage.mtp)
    return Measured(layout, stage, rank, seq, microbatches, runner.most_in_flight,
                    layers, mtp, replace(memory, optimizer=memory.optimizer - steps),
                    {_name(k): v for k, v in peak.items()}, steps, recorder.records(), recorder.copy_bytes,
                    recorder.accumulate_bytes)
