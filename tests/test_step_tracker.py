"""verify --layout's `fake.StepTracker` (torch's FSDPMemTracker at a lower cost per op, collectives
counted in its own dispatch) under `fake.StepFakeMode` (FakeTensorMode with a cheaper cache key)
and `gc.freeze` measures exactly what FSDPMemTracker (with recomputed tensors filed as
activations, `fake.RecomputeAsActivations`) with `comms.CollectiveRecorder` stacked above it
measures under torch's FakeTensorMode: every memory figure, the tracker's peak by reference type and every collective record
(so its own per-tensor bookkeeping, `_track` and `_update_snap`: a mutant that frees a storage
without lowering the total fails it),
on a TP + SP + FSDP layout with selective recompute (one layer, one micro-batch after the warm-up
step: cheap, CI budget); `fake.StepFakeMode` gives FakeTensorMode's outputs, cached and uncached
ops alike (aliasing included); and MLA-shaped attention keeps no T × S scores in the fake run."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from archplan.distributed import fake  # noqa: E402
from archplan.distributed.comms import CollectiveRecorder  # noqa: E402
from archplan.loader import load_spec  # noqa: E402
from archplan.planning.layout import parse_layout  # noqa: E402
from archplan.resolve import resolve  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "distributed"


class TorchTracker(fake.RecomputeAsActivations):
    """The reference: torch's tracker (with verify's filing of recomputed tensors as activations,
    `fake.RecomputeAsActivations`), the recorder its own dispatch mode above it."""

    recorder: CollectiveRecorder | None = None

    def __enter__(self) -> TorchTracker:
        super().__enter__()
        if self.recorder is not None:
            self.recorder.__enter__()
        return self

    def __exit__(self, *args: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.recorder is not None:
            self.recorder.__exit__(*args)
        super().__exit__(*args)


@pytest.fixture()
def fake_world():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.slow
def test_step_tracker_measures_what_torchs_tracker_does(fake_world: None, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    import yaml

    spec = tmp_path / "one-layer-llama.yaml"
    spec.write_text(yaml.safe_dump(yaml.safe_load((FIXTURES / "tiny-llama.yaml").read_text()) | {"n_layers": 1}))
    plan = resolve(load_spec(spec))
    layout = parse_layout("tp=2,cp=1,pp=1,dp=2,ep=1,zero=3,recompute=selective,mb=1").complete()
    assert layout is not None
    ours = fake.measure(plan, layout, 32, microbatches=1, stage=0)
    from contextlib import nullcontext
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(fake, "StepTracker", TorchTracker)
    monkeypatch.setattr(fake, "StepFakeMode", FakeTensorMode)
    monkeypatch.setattr(fake, "_frozen_heap", nullcontext)
    reference = fake.measure(plan, layout, 32, microbatches=1, stage=0)
    assert ours.collectives and ours.memory.activations > 0
    assert ours == reference


def test_unequal_head_sizes_run_cudas_kernel_keeping_no_scores() -> None:
    """MLA's attention (value heads narrower than the query's) under verify's fake run keeps what
    CUDA's memory-efficient kernel keeps, no T × S probabilities (the CPU's math kernel's);
    equal head sizes keep SDPA's own choice."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    heads, t = 2, 64
    saved: list[tuple[int, ...]] = []
    with fake._cuda_attention_kernel(), FakeTensorMode(), \
            torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(tuple(x.shape)) or x, lambda x: x):
        q = torch.randn(1, heads, t, 24, requires_grad=True)
        out = F.scaled_dot_product_attention(q, q, q[..., :16], is_causal=True)
        out.sum().backward()
        equal = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert out.shape == (1, heads, t, 16) and q.grad is not None and q.grad.shape == q.shape
    assert equal.shape == q.shape
    assert saved and not any(shape[-2:] == (t, t) for shape in saved), saved
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


def test_step_fake_mode_gives_torchs_outputs() -> None:
    """`fake.StepFakeMode`'s cache key tells apart inputs that differ only in strides, dtype,
    storage offset or requires_grad, and its cached outputs, new tensors and views of an input
    (sharing its storage), are FakeTensorMode's, miss and hit, down to the instance attributes
    (`fake._fake_tensor`) and dispatch keys."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    def outputs(mode: FakeTensorMode) -> list[tuple[object, ...]]:
        seen = []
        with mode:
            x = torch.empty(4, 6)
            inputs = [x, x.t().contiguous().t(), x.to(torch.bfloat16), x[1:], torch.empty(4, 6, requires_grad=True),
                      torch.empty(6, 4).t()]
            for _ in range(2):  # a miss, then a hit
                for t in inputs:
                    for out in (torch.exp(t), t * 2, t.sum(0), t @ t.t(), t.transpose(0, 1) + 1,  # new
                                t.t(), t.detach(), t[1:, 2:], t.reshape(-1) if t.is_contiguous() else t.t(),  # views
                                *t.split(2), t.view(torch.int32) if t.dtype == torch.float32 else t.unsqueeze(0)):
                        assert isinstance(out, FakeTensor) and out.fake_mode is mode
                        state = {k: v for k, v in out.__dict__.items() if k != "fake_mode"}
                        seen.append((out.shape, out.stride(), out.dtype, out.requires_grad, out.storage_offset(),
                                     out.device, out.is_contiguous(), out._is_view(), str(torch._C._dispatch_keys(out)),
                                     out.untyped_storage()._cdata == t.untyped_storage()._cdata,
                                     out.untyped_storage().nbytes(), list(state.items())))
        return seen

    hits = FakeTensorMode.cache_hits
    ours = outputs(fake.StepFakeMode())
    assert FakeTensorMode.cache_hits > hits  # the second round came from the cache
    assert ours == outputs(FakeTensorMode())


def _describe(out: object, inputs: list[torch.Tensor]) -> list[tuple[object, ...]]:
    """Every tensor of an op's output as the tracker and autograd see it: metadata, view and
    autograd state, dispatch keys, the instance attributes, which input it is (in-place) and which
    inputs' storage it shares (aliasing decides what the memory tracker counts)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._pytree import tree_leaves

    seen: list[tuple[object, ...]] = []
    for leaf in tree_leaves(out):
        if not isinstance(leaf, torch.Tensor):
            seen.append((type(leaf).__name__,))
            continue
        assert isinstance(leaf, FakeTensor)
        state = sorted((k, v) for k, v in leaf.__dict__.items() if k != "fake_mode")
        seen.append((leaf.shape, leaf.stride(), leaf.dtype, leaf.requires_grad, leaf.storage_offset(), leaf.device,
                     leaf._is_view(), leaf._base is not None, type(leaf.grad_fn).__name__,
                     str(torch._C._dispatch_keys(leaf)), leaf.untyped_storage().nbytes(), state,
                     [leaf is t for t in inputs],
                     [leaf.untyped_storage()._cdata == t.untyped_storage()._cdata for t in inputs]))
    return seen


# c10d's _allgather_base_ / _reduce_scatter_base_ (what FSDP2 dispatches) are reached from Python
# only through these deprecated names
@pytest.mark.filterwarnings("ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning",
                            "ignore:`torch.distributed.reduce_scatter_tensor` is deprecated:FutureWarning")
def test_step_fake_mode_answers_uncached_ops_as_torch(fake_world: None) -> None:
    """The ops FakeTensorMode's cache never holds, which `fake.StepFakeMode` answers by the branch
    of torch's dispatch that answers them (`fake._UNCACHED`): DTensor's `_unsafe_view` (aliasing
    its input like torch's decomposition), FSDP2's `record_function`, the functional and c10d
    collectives and FSDP2's copy ops give torch's FakeTensorMode's outputs, in-place and aliasing
    alike; a constant input takes torch's path."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import torch.distributed.fsdp  # noqa: F401  (registers FSDP2's ops)
    from archplan.distributed.mesh import init_fake_world

    init_fake_world(4, 1)
    group = dist.group.WORLD
    name = group.group_name
    fc = torch.ops._c10d_functional
    assert {fc.all_gather_into_tensor.default, fc.reduce_scatter_tensor.default, fc.all_reduce.default,
            fc.all_to_all_single.default, torch.ops.c10d._allgather_base_.default,
            torch.ops.fsdp.all_gather_copy_in.default, torch.ops.fsdp.chunk_cat.default,
            torch.ops.fsdp.split_with_sizes_copy.default, torch.ops.aten._unsafe_view.default,
            torch.ops.profiler._record_function_enter_new.default} <= set(fake._UNCACHED)

    def outputs(mode: FakeTensorMode) -> list[object]:
        seen: list[object] = []
        with mode:
            x = torch.empty(8, 6, requires_grad=True)
            y = (x * 2)[2:]  # a view with an offset, in the autograd graph
            constant = torch.tensor(2.0)  # one element: FakeTensorMode keeps its value
            for t in (x.detach(), y, x.unsqueeze(0), constant):
                seen += _describe(torch.ops.aten._unsafe_view(t, [-1]), [t])
                seen += _describe(torch.ops.aten._unsafe_view(t.reshape(-1), [1, -1]), [t])
            with torch.autograd.profiler.record_function("unit"):
                z = x + 1
            seen += _describe(z, [x])
            w = torch.empty(8, 6, dtype=torch.bfloat16)
            seen += _describe(fc.all_gather_into_tensor(w, 4, name), [w])
            seen += _describe(fc.reduce_scatter_tensor(w, "sum", 4, name), [w])
            seen += _describe(fc.all_reduce(w, "sum", name), [w])
            seen += _describe(fc.all_to_all_single(w, [2, 2, 2, 2], [2, 2, 2, 2], name), [w])
            gathered = torch.empty(32, 6, dtype=torch.bfloat16)
            seen += _describe(dist.all_gather_into_tensor(gathered, w, async_op=True), [gathered, w])
            seen += _describe(dist.reduce_scatter_tensor(w[:2], w, async_op=True), [w])
            seen += _describe(dist.all_reduce(w, async_op=True), [w])
            buffer = torch.empty(4 * 20, dtype=torch.bfloat16)
            inputs = [torch.empty(12, dtype=torch.bfloat16), torch.empty(8, dtype=torch.bfloat16)]
            seen += _describe(torch.ops.fsdp.all_gather_copy_in(inputs, buffer, [12, 8], 20, 1), [buffer, *inputs])
            outs = [torch.empty(4, 12, dtype=torch.bfloat16), torch.empty(4, 8, dtype=torch.bfloat16)]
            seen += _describe(torch.ops.fsdp.split_with_sizes_copy(buffer.view(4, 20), [12, 8], dim=1, out=outs), outs)
            flat = torch.empty(4, 14)  # 4 chunks of 2·6 + 1·2 elements
            seen += _describe(torch.ops.fsdp.chunk_cat([torch.empty(8, 6), torch.empty(4, 2)], 0, 4, out=flat), [flat])
        return seen

    ours = outputs(fake.StepFakeMode(allow_non_fake_inputs=True))
    assert ours == outputs(FakeTensorMode(allow_non_fake_inputs=True))
