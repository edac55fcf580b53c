"""`archplan bench --train`: one device, forward + backward + AdamW, measured peak memory beside
`size`'s training memory (`analytic.memory.training_memory`) for the same micro-batch, recompute
mode and dtype.

Mixed precision as torch runs it on one device: fp32 weights (the master copy), bf16 compute under
`torch.autocast`, fp32 gradients, AdamW m and v in fp32: 4 + 4 + 8 = 16 B/param, the total of the
ZeRO convention `size` prints (its split is 2 + 2 + 12: bf16 weights and grads, fp32 master + m + v).
So model states are compared as one total, exactly; activations within the verify tolerance.
`--dtype fp32` runs without autocast (the same 16 B/param, fp32 activations).

Memory: on CPU torch's `MemTracker` over real tensors (parameters, gradients, optimizer states,
activations, temporaries, at the tracked peak); on CUDA the same categories from the caching
allocator, the peak by `torch.cuda.max_memory_allocated` less cuBLAS's workspaces (`_cuda_step`).
Two steps run first so AdamW's states exist; the measured step follows a reset of the statistics.
Recompute uses the same checkpointing as the distributed stages (`modules.checkpointing.apply_recompute`);
nothing here imports the fake-process-group engine or FSDP2.

The analytic side is `size`'s peak of the step at the run's activation dtype, the fp32 residual
stream of fp32 weights, and with the attention kernel SDPA runs on the device (`attention_kernel`):
`archplan size SPEC --micro-batch B --seq S --recompute R --autocast --attention-kernel K` in bf16
(autocast: each projection keeps its own 16-bit cast of its input), `--activation-dtype fp32`
in fp32, K = flash on CUDA (a fused kernel for every head size, no s x s
probabilities kept) and torch-cpu on a CPU (the same, but the math kernel for MLA's unequal q and v
head sizes). Mamba layers are priced as archplan's units keep them, not as mamba_ssm's kernels
(size's figure), MoE layers with the routing metadata archplan's router keeps, and the rotary
tables, ALiBi biases and window masks archplan's modules share once for the model: `units="torch"`
of `training_memory`. The step is the one that model describes: the
logits are dropped before the backward (torchtitan's train step does `del pred` for the same
reason), and AdamW runs its foreach implementation on every device (torch's default on GPUs).
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import set_checkpoint_early_stop

from archplan.analytic import count_params, training_flops_of_batch
from archplan.analytic.memory import AttentionKernel, Recompute, TrainingMemory, training_memory
from archplan.bench.device import device_peak, free_memory, synchronize
from archplan.bench.fit import refuse_unless_fits
from archplan.bench.timing import Timing
from archplan.distributed.tolerance import PEAK_TOLERANCE, activations_within
from archplan.dtypes import DType
from archplan.modules.attention import Attention
from archplan.modules.checkpointing import apply_recompute
from archplan.modules.mla import MLA
from archplan.modules.model import TrainingLoss, build_model, resolve_device
from archplan.modules.moe import balance_routers
from archplan.modules.positions import RotaryEmbedding
from archplan.resolve import Mamba1Plan, Mamba2Plan, ModelPlan, MoEPlan

WARMUP_STEPS = 2  # the first creates AdamW's states


@dataclass(frozen=True)
class TrainBench:
    name: str
    device: str
    dtype: str
    batch: int
    seq: int
    recompute: str
    step_seconds: list[float]
    # MemTracker's categories (CPU) or the same read from CUDA's allocator, with cuBLAS's "Workspace"
    measured: dict[str, int]
    method: str
    analytic_states: int
    analytic_activations: int  # kept by the forward
    analytic_total: int  # the peak of the step
    analytic_peak_phase: str
    states_ok: bool
    activations_ok: bool
    total_ok: bool
    attention_kernel: str  # the one size's activations are priced with (`attention_kernel`)
    ssd_unit: bool  # Mamba layers priced as archplan's units keep them (`units="torch"`)
    moe_routing: bool  # MoE layers priced with the routing metadata archplan's router keeps (`units="torch"`)
    # what `activations_ok` judges: the activations after the forward less autocast's weight copies
    measured_activations: int
    # forward + backward of the step's sequences, attention causal (`training_flops_of_batch`):
    # without the recompute's re-run (model FLOPs, MFU) and with it (hardware FLOPs, HFU)
    model_flops: int
    hardware_flops: int
    peak_flops: float  # the device's dense peak in the step's dtype (`bench.device.device_peak`)
    peak_source: str

    @property
    def ok(self) -> bool:
        return self.total_ok and self.states_ok and self.activations_ok

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def noise(self) -> str | None:
        """The timed steps' spread, judged as `bench`'s prefill is (`Timing.noise_note`)."""
        return Timing(tuple(self.step_seconds)).noise_note("training step")

    @property
    def mfu(self) -> float:
        return self.model_flops / self.median_seconds / self.peak_flops

    @property
    def hfu(self) -> float:
        return self.hardware_flops / self.median_seconds / self.peak_flops


class WeightCopies(TorchDispatchMode):
    """Autocast's low-precision copies of the parameters (`aten._to_copy` of a Parameter): saved by
    the matmuls for the backward, they are the 16-bit compute weights of size's model states,
    which MemTracker files under activations. `alive()`: the bytes of those not yet freed (a
    checkpointed layer frees its copies with the rest of its forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[weakref.ref[torch.UntypedStorage]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], nn.Parameter):
            self.copies.append(weakref.ref(out.untyped_storage()))
        return out

    def alive(self) -> int:
        return sum(storage.nbytes() for ref in self.copies if (storage := ref()) is not None)


def _name(reftype: object) -> str:
    return reftype.value if isinstance(reftype, Enum) else str(reftype)


def attention_kernel(dev: torch.device) -> AttentionKernel:
    """The attention kernel whose activations size prices for a step on `dev`: torch's SDPA runs a
    fused kernel on CUDA for every head-size pair (memory-efficient where v's differs from q's), on
    a CPU only for equal head sizes (MLA's run its math kernel there)."""
    return "torch-cpu" if dev.type == "cpu" else "flash"


def _storage_bytes(tensors: Iterable[torch.Tensor], dev: torch.device) -> int:
    """The bytes of the distinct storages behind `tensors` on `dev` (AdamW's 0-d `step` counters
    live on the host beside CUDA parameters: not model states)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type == dev.type}
    return sum(storages.values())


def shared_tables(model: nn.Module) -> list[torch.Tensor]:
    """The ALiBi biases and window masks the attention modules share (`BiasCache`) and the rotary
    tables the rotary layers share (`RopeTables`): built in the warm-up and held from step to
    step, as in any run after its first step, so the measured step finds them built (their fp32
    build-up is no part of it). Neither tracker sees a tensor made before it starts, so they are
    handed to it (MemTracker's `Other`; CUDA's allocator holds them already) and added to the
    step's activations, where size's count keeps them (`analytic.memory.shared_mask_bytes`,
    `shared_rope_bytes`)."""
    masks = {id(module.biases): module.biases for module in model.modules()
             if isinstance(module, Attention | MLA) and module.biases is not None}
    rope = {id(module.tables): module.tables for module in model.modules() if isinstance(module, RotaryEmbedding)}
    return [*(tensor for cache in masks.values() for tensor in cache.built.values()),
            *(table for cache in rope.values() for tables, _ in cache.built.values() for table in tables)]


def _cuda_step(dev: torch.device, step: Callable[..., None], model: nn.Module,
               optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """One step measured by CUDA's caching allocator, in MemTracker's categories where it can.

    cuBLAS keeps a workspace per handle (one per thread and stream: the forward's and autograd's
    backward thread each get one, 32 MiB apiece on Hopper) in the caching allocator; size prices
    the model's tensors, not a library's scratch, so the workspaces are measured (freed, the bytes
    that go) and re-created by one more step before the measured one, alive through all of it, and
    the judged peak leaves them out. They were the whole of a tiny model's peak on an H200
    (3.4 MiB priced, 68.1 MiB measured)."""
    synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch._C._cuda_clearCublasWorkspaces()
    workspaces = before - torch.cuda.memory_allocated(dev)
    step()  # re-creates them
    synchronize(dev)
    probes: dict[str, int] = {}
    copies = WeightCopies()

    def probe(when: str) -> None:
        probes[when] = torch.cuda.memory_allocated(dev)
        if when == "after forward":
            probes["copies"] = copies.alive()
        if when == "before step":
            probes["states"] = _storage_bytes(model.parameters(), dev)
            probes["grads"] = _storage_bytes((p.grad for p in model.parameters() if p.grad is not None), dev)
            probes["optstate"] = _storage_bytes(
                (t for state in optimizer.state.values() for t in state.values()), dev)

    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)  # parameters, AdamW's states, the inputs, the workspaces
    step(probe, copies)
    return {"Parameter": probes["states"], "Gradient": probes["grads"], "Optstate": probes["optstate"],
            "Activation": probes["after forward"] - start + _storage_bytes(shared_tables(model), dev),
            "WeightCopies": probes["copies"],
            "Workspace": workspaces, "Total": torch.cuda.max_memory_allocated(dev) - workspaces}


def train_bench(plan: ModelPlan, *, device: str, dtype: str, batch: int, seq: int, recompute: Recompute,
                iters: int) -> TrainBench:
    """One training step of `plan` as built (the caller truncates it for `--layers`)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    dev = resolve_device(device)
    # the residual stream is fp32 whatever the dtype: the weights are (the embedding's output and
    # every residual add are fp32 under autocast)
    kernel = attention_kernel(dev)

    def step_bytes(built: ModelPlan, batch: int, seq: int) -> TrainingMemory:
        return training_memory(built, count_params(built), batch, seq, recompute, activation_dtype=dtype,
                               attention_kernel=kernel, residual_dtype="fp32", units="torch", autocast=dtype == "bf16")

    refuse_unless_fits(plan, lambda built, b, s: step_bytes(built, b, s).total, batch, seq, device=dev.type,
                       free=free_memory(dev), run="--train", priced="size's training memory")
    analytic = step_bytes(plan, batch, seq)
    torch.manual_seed(0)
    model = build_model(plan, dev, torch.float32)
    apply_recompute(model.layers, recompute)
    apply_recompute(model.mtp, recompute)  # the MTP blocks recompute as the layers do (`activation_memory`)
    training_loss = TrainingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    balance_routers(model, start=True)  # DeepSeek-V3's aux-loss-free balancing is part of its step
    tokens = torch.randint(0, plan.vocab_size, (batch, seq), device=dev)
    labels = torch.roll(tokens, -1, dims=1)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step(probe: Callable[[str], None] = lambda _: None, copies: WeightCopies | None = None) -> None:
        # full recompute re-runs each block whole, the hardware FLOPs' convention (Megatron-LM's);
        # torch's non-reentrant checkpoint would stop before the block's last GEMM, whose output no
        # backward reads
        with autocast, copies if copies is not None else nullcontext(), set_checkpoint_early_stop(False):
            # with multi-token prediction, the main loss and each module's, weighted λ/depth (DeepSeek-V3 §2.2)
            out = training_loss(tokens) if plan.mtp else model(tokens)
        loss = out if plan.mtp else F.cross_entropy(out.flatten(0, 1).float(), labels.flatten())
        del out  # only the cross-entropy's fp32 log-probabilities stay for the backward
        probe("after forward")  # every saved activation alive
        loss.backward()
        probe("before step")  # parameters, every gradient, AdamW's states
        optimizer.step()
        # the gradients stay allocated between steps, as the convention size prices keeps them
        # (ZeRO's and Megatron's gradient buffers); freed (`set_to_none`), the loss backward held
        # 4 B/param fewer than priced, a quarter of the fp32 states
        optimizer.zero_grad(set_to_none=False)
        balance_routers(model)

    for _ in range(WARMUP_STEPS):
        step()
    samples = []
    for _ in range(iters):
        synchronize(dev)
        start = time.perf_counter()
        step()
        synchronize(dev)
        samples.append(time.perf_counter() - start)
    analytic_states = analytic.states.total
    if dev.type == "cuda":
        measured = _cuda_step(dev, step, model, optimizer)
        method = ("torch.cuda's allocator: states from the live tensors before the optimizer step, activations "
                  "as the bytes the forward left allocated (less autocast's weight copies), the peak by "
                  "max_memory_allocated less cuBLAS's workspaces")
        total = measured["Total"]
    else:
        tracker = MemTracker()
        tables = shared_tables(model)
        tracker.track_external(model, optimizer, *tables)
        probes: dict[str, dict[str, int]] = {}

        copies = WeightCopies()

        def probe(when: str) -> None:
            snapshot = next(iter(tracker.get_tracker_snapshot("current").values()))
            probes[when] = {_name(k): v for k, v in snapshot.items()} | {"WeightCopies": copies.alive()}

        with tracker:
            step(probe, copies)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
        # AdamW's 0-d `step` tensors: on the host beside CUDA parameters, not model states
        steps = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
        at_step = probes["before step"]
        measured = {
            "Parameter": at_step.get("Parameter", 0), "Gradient": at_step.get("Gradient", 0),
            "Optstate": at_step.get("Optstate", 0) - steps,
            "Activation": probes["after forward"].get("Activation", 0) + _storage_bytes(tables, dev),
            "WeightCopies": probes["after forward"]["WeightCopies"],
            "Temp": next((v for k, v in peak.items() if _name(k) == "Temp"), 0),
            "Total": next(v for k, v in peak.items() if _name(k) == "Total") - steps,
        }
        total = measured["Total"]
        method = ("torch.distributed._tools.MemTracker on real CPU tensors: states before the optimizer step, "
                  "activations after the forward (less autocast's weight copies), total and temporaries at the peak")
    states_ok = measured["Parameter"] + measured["Gradient"] + measured["Optstate"] == analytic_states
    acts = measured["Activation"] - measured["WeightCopies"]
    kept = analytic.activations.kept
    activations_ok = activations_within(kept, acts)
    total_ok = abs(total - analytic.total) <= PEAK_TOLERANCE * analytic.total
    peak = device_peak(dev, DType(dtype))
    return TrainBench(plan.name, str(dev), dtype, batch, seq, recompute, samples, measured, method,
                      analytic_states, analytic.activations.kept, analytic.total, analytic.peak_phase,
                      states_ok, activations_ok, total_ok, kernel,
                      any(isinstance(layer.mixer, Mamba1Plan | Mamba2Plan) for layer in plan.layers),
                      any(isinstance(layer.ffn, MoEPlan) for layer in (*plan.layers, *plan.mtp)), acts,
                      training_flops_of_batch(plan, seq, batch, "causal"),
                      training_flops_of_batch(plan, seq, batch, "causal", recompute),
                      peak.peak_flops, peak.source)
