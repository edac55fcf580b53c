"""The equivalence check run by each gloo worker of the tests (and usable under torchrun):
a sharded stage gives the logits and gradients of the same model in one process, and its loss
falls over a few AdamW steps.

Every rank builds the whole model with the same seed (so every rank holds the one-process model),
copies its weights into a stage of pp = 1, shards it (`shard_stage`, fp32), runs the same batch,
and compares: logits gathered from the vocabulary shards, each parameter's gradient gathered from
its DTensor shards (FSDP over dp, TP over tp); a rank's local experts against their rows of the
one-process expert gradients. Under context parallelism each rank runs its chunks of the sequence
(`context.shard_sequence`) and its logits are compared at their positions; its loss is the mean
over its tokens, and FSDP's mean over dp × cp makes the gradients the one-process mean's.

`pipeline_parity` checks a pipeline of pp ranks the same way after one AdamW step: every stage's
weights against the one-process model's, the tied embedding's copy on the last stage included
(it matches only if the two copies' gradients were summed, `StageRunner.sync_tied_gradient`), and
so is the copy the multi-token-prediction modules read, whose loss is the one-process model's
`training_loss`.

`accumulation_parity` checks gradient accumulation: a step of several micro-batches a rank, each
data-parallel rank its own, applies the one-process gradient of the whole batch (SGD at lr 1, so the
weights move by the gradient itself), the MoE load-balancing loss's 1/m share included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from archplan.distributed.context import chunk_positions, shard_sequence
from archplan.distributed.mesh import build_mesh
from archplan.distributed.shard import shard_stage
from archplan.distributed.stage import Stage, build_chunks, build_stage
from archplan.distributed.step import MicroBatch, StageRunner, full_logits
from archplan.modules.model import build_model
from archplan.planning.layout import Layout
from archplan.resolve import ModelPlan

SEED = 0


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _tp_views(stage: torch.nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Parameter name -> how its sharded form reads off the one-process tensor, for parameters
    whose tensor-parallel form is not torch's contiguous split (`plans.FusedColwiseParallel`'s
    rank-grouped rows, `plans.OwnTensors`' plain channel slices)."""
    views = {}
    for path, module in stage.named_modules():
        for name, view in getattr(module, "tp_views", {}).items():
            views[f"{path}.{name}".replace("_checkpoint_wrapped_module.", "")] = view
    return views


def parity(plan: ModelPlan, layout: Layout, *, seq: int = 16, steps: int = 3) -> dict[str, float]:
    """Max abs differences (logits, gradients) after the first of `steps` training steps, and
    the losses of all of them."""
    torch.manual_seed(SEED)
    reference = build_model(plan, "cpu", torch.float32)
    tokens = torch.randint(0, plan.vocab_size, (layout.mb, seq), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, dims=1)
    ref_logits = reference(tokens)
    if plan.mtp:  # the training loss: the main and the MTP modules' cross-entropies (DeepSeek-V3 eq. 25)
        reference.training_loss(tokens).backward()
    else:
        F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten()).backward()
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}

    mesh = build_mesh(layout, "cpu")
    # context parallelism: this rank's chunks of the sequence, compared with the same positions
    # of the one-process logits (cp = 1: the whole sequence)
    cp_rank = mesh["cp"].get_local_rank()
    sequence = tokens
    tokens, labels = (shard_sequence(x, cp_rank, layout.cp) for x in (tokens, labels))
    positions = chunk_positions(cp_rank, layout.cp, seq // layout.cp) if layout.cp > 1 else torch.arange(seq)
    ref_logits = ref_logits[:, positions]
    stage: Stage = build_stage(plan, layout, 0, "cpu", torch.float32)
    stage.load_state_dict(reference.state_dict())
    ep_rank = mesh["ep"].get_local_rank()
    sharded = shard_stage(stage, mesh, balanced=False, mixed=False)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=3e-3)
    runner = StageRunner((sharded,), mesh, optimizer, (layout.mb, seq // layout.cp, plan.d_model), torch.device("cpu"))
    with runner.loss_context()():
        if plan.mtp:  # the logits of inference, which drops the MTP modules, then the training loss
            with torch.no_grad():
                logits = stage(tokens)
            first_loss = stage(tokens, sequence)
        else:
            logits = stage(tokens)
            first_loss = runner.loss(logits, labels)
        logit_diff = (full_logits(logits.detach()) - ref_logits.detach()).abs().max().item()
        first_loss.backward()
    grad_diff = _grad_diff({name: _full(p.grad) for name, p in stage.named_parameters()}, ref_grads,
                           _tp_views(stage), ep_rank)
    # the compared forward and backward are the first of the `steps` training steps
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for _ in range(steps - 1):
        runner.train_step([MicroBatch(tokens, labels, sequence if layout.cp > 1 else None)])
    losses = [float(first_loss.detach()), *(float(x) for x in runner.losses)]
    dist.barrier()
    return {"logits": logit_diff, "grads": grad_diff, "losses": losses}  # type: ignore[dict-item]


def accumulation_parity(plan: ModelPlan, layout: Layout, *, seq: int = 16, microbatches: int = 2) -> dict[str, float]:
    """Max abs difference between the gradient one training step applies on this rank, each data-
    parallel rank running its own `microbatches` micro-batches, and the one-process gradient of the
    whole batch. The step's optimizer is SGD at lr 1, so the weights move by exactly that gradient.

    The loss of the whole batch is the mean of the micro-batches' where every term is a mean over
    equal parts: the cross-entropy over tokens, and a load-balancing loss scoped per sequence (a
    mean over sequences, `moe.load_balancing_loss`). So each micro-batch's aux loss must count 1/m
    of the step, as its cross-entropy does (`moe.scale_aux_gradients`)."""
    torch.manual_seed(SEED)
    reference = build_model(plan, "cpu", torch.float32)
    mesh = build_mesh(layout, "cpu")
    dp = layout.dp
    tokens = torch.randint(0, plan.vocab_size, (dp * microbatches * layout.mb, seq),
                           generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, dims=1)
    F.cross_entropy(reference(tokens).flatten(0, 1), labels.flatten()).backward()
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}

    stage: Stage = build_stage(plan, layout, 0, "cpu", torch.float32)
    stage.load_state_dict(reference.state_dict())
    sharded = shard_stage(stage, mesh, balanced=False, mixed=False)
    runner = StageRunner((sharded,), mesh, torch.optim.SGD(stage.parameters(), lr=1.0),
                         (layout.mb, seq, plan.d_model), torch.device("cpu"))
    before = {name: _full(p.detach()).clone() for name, p in stage.named_parameters()}
    mine = tokens.chunk(dp)[mesh["dp"].get_local_rank()]
    runner.train_step([MicroBatch(t, torch.roll(t, -1, dims=1)) for t in mine.chunk(microbatches)])
    applied = {name: before[name] - _full(p.detach()) for name, p in stage.named_parameters()}
    dist.barrier()
    return {"grads": _grad_diff(applied, ref_grads, _tp_views(stage), mesh["ep"].get_local_rank())}


def _grad_diff(grads: dict[str, torch.Tensor], ref_grads: dict[str, torch.Tensor],
               views: dict[str, Callable[[torch.Tensor], torch.Tensor]], ep_rank: int) -> float:
    """Max abs difference between a stage's gradients (whole tensors, by parameter name) and the
    one-process model's: a rank's local experts against their rows of the one-process experts'."""
    diff = 0.0
    for name, grad in grads.items():
        name = name.replace("_checkpoint_wrapped_module.", "")
        if ".experts.local." in name:
            full_name = name.replace(".experts.local.", ".experts.")
            e_local = grad.shape[0]
            expected = ref_grads[full_name].narrow(0, ep_rank * e_local, e_local)
        else:
            expected = views.get(name, lambda t: t)(ref_grads[name])
        diff = max(diff, (grad - expected).abs().max().item())
    return diff


def pipeline_parity(plan: ModelPlan, layout: Layout, *, seq: int = 16, lr: float = 3e-3) -> dict[str, float]:
    """Max abs difference between this rank's stage weights (every model chunk of it under
    vpp > 1) after one training step of the pipeline and the one-process model's after one step on
    the same batch. The step runs pp micro-batches of that batch (the interleaved schedule's group;
    one at vpp = 1), each loss divided by their count, so the gradient is the one batch's."""
    microbatches = 1 if layout.vpp == 1 else layout.pp
    torch.manual_seed(SEED)
    reference = build_model(plan, "cpu", torch.float32)
    tokens = torch.randint(0, plan.vocab_size, (layout.mb, seq), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, dims=1)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=lr)
    if plan.mtp:  # the last stage computes DeepSeek-V3's combined loss, as the one-process model's
        reference.training_loss(tokens).backward()
    else:
        F.cross_entropy(reference(tokens).flatten(0, 1), labels.flatten()).backward()
    ref_optimizer.step()
    # the last stage's copy of the embedding the MTP modules read is the embedding's
    expected = dict(reference.named_parameters()) | {"mtp_embed.weight": reference.embed.weight}
    initial["mtp_embed.weight"] = initial["embed.weight"]

    mesh = build_mesh(layout, "cpu")
    stages = build_chunks(plan, layout, mesh.stage, "cpu", torch.float32)
    for stage in stages:
        stage.load_state_dict({k: initial[k] for k in stage.state_dict()})
    chunks = tuple(shard_stage(stage, mesh, balanced=False, mixed=False) for stage in stages)
    optimizer = torch.optim.AdamW([p for stage in stages for p in stage.parameters()], lr=lr)
    runner = StageRunner(chunks, mesh, optimizer, (layout.mb, seq, plan.d_model), torch.device("cpu"))
    runner.train_step([MicroBatch(tokens, labels) for _ in range(microbatches)])
    diff = 0.0
    for name, p in ((n, p) for stage in stages for n, p in stage.named_parameters()):
        name = name.replace("_checkpoint_wrapped_module.", "")
        diff = max(diff, (_full(p.detach()) - expected[name].detach()).abs().max().item())
    dist.barrier()
    return {"weights": diff}
