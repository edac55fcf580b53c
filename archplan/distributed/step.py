"""One training step of a pipeline stage: its micro-batches in 1F1B order, then AdamW.

1F1B (Narayanan et al. 2021 §2.2.1; torch.distributed.pipelining `Schedule1F1B`): stage j of p
runs min(p − j − 1, m) warm-up forwards, then alternates one forward and one backward, then
drains the remaining backwards; so it holds at most min(p − j, m) micro-batches' activations at
once. Between stages the hidden states go forward and their gradients back with send / recv over
the pp mesh dimension (what `PipelineStage` does, written out here: its shape-inference handshake
and batched P2P need data that the fake process group does not move).

Interleaved 1F1B (Narayanan et al. 2021 §2.2.2; Megatron-LM
`forward_backward_pipelining_with_interleaving`; torch's `ScheduleInterleaved1F1B`): rank j holds v
model chunks (each its own `Stage` and FSDP root, as torchtitan's model parts) and runs the m
micro-batches in max(1, m div p) rounds of N (p where p divides m; one round of all m below 2·p;
the rounds must divide m), min(2(p − j − 1) + (v − 1)·N, m·v) warm-up chunk forwards, then one
forward and one backward alternately; forward k runs chunk (k mod N·v) div N on micro-batch
(k div N·v)·N + k mod N, backwards the chunks in reverse. The
first chunk of rank 0 receives nothing and the last chunk of rank p − 1 sends nothing; every other
chunk receives from rank j − 1 and sends to rank j + 1, modulo p.

ZeRO on FSDP2 (see `shard`): every backward of a chunk but its last keeps the gathered weights
under ZeRO-1/2 and skips the gradient reduction under ZeRO-0/1, as
`PipelineStage.backward_maybe_with_nosync` does for FSDP.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from archplan.distributed.mesh import LayoutMesh
from archplan.errors import ArchplanError
from archplan.distributed.shard import Sharded, unit_view_outputs
from archplan.modules.moe import scale_aux_gradients
from archplan.planning.layout import torch_rounds


@dataclass(frozen=True)
class MicroBatch:
    tokens_BT: Tensor  # the first stage's input (under cp, the rank's chunks of the sequences)
    labels_BT: Tensor  # the last stage's targets (likewise)
    # the whole sequences, which the multi-token-prediction modules read ahead of the rank's
    # positions (None: tokens_BT is whole, cp = 1)
    sequence_BT: Tensor | None = None


def one_f_one_b(stage: int, pp: int, m: int) -> list[tuple[str, int]]:
    """("F" | "B", micro-batch) in the order stage `stage` runs them."""
    warmup = min(pp - stage - 1, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(m - warmup, m)]
    return order


def interleaved_1f1b(stage: int, pp: int, vpp: int, m: int) -> list[tuple[str, int, int]]:
    """("F" | "B", chunk, micro-batch) in the order pipeline rank `stage` runs them."""
    if vpp == 1:
        return [(op, 0, i) for op, i in one_f_one_b(stage, pp, m)]
    rounds = torch_rounds(pp, m)  # torch's `ScheduleInterleaved1F1B`: rounds of N micro-batches each
    if m % rounds:
        raise ArchplanError(f"--microbatches {m}: the interleaved schedule (vpp > 1) runs them in max(1, m div "
                            f"pp) = {rounds} rounds, which must divide them (a multiple of pp={pp} always does)")
    n = m // rounds
    total, group = m * vpp, n * vpp
    warmup = min(2 * (pp - stage - 1) + (vpp - 1) * n, total)

    def chunk(k: int, forward: bool) -> int:
        c = (k % group) // n
        return c if forward else vpp - 1 - c

    def micro(k: int) -> int:
        return (k // group) * n + k % n

    order = [("F", chunk(k, True), micro(k)) for k in range(warmup)]
    for i in range(total - warmup):
        order += [("F", chunk(warmup + i, True), micro(warmup + i)), ("B", chunk(i, False), micro(i))]
    order += [("B", chunk(i, False), micro(i)) for i in range(total - warmup, total)]
    return order


class StageRunner:
    """Runs training steps of one pipeline rank's sharded model chunks (one unless vpp > 1);
    `hidden_shape` is the hidden states' local shape."""

    def __init__(self, chunks: tuple[Sharded, ...], mesh: LayoutMesh, optimizer: torch.optim.Optimizer,
                 hidden_shape: tuple[int, ...], device: torch.device,
                 before_forward: Callable[[nn.Module], None] | None = None,
                 sample: Callable[[], None] | None = None) -> None:
        self.chunks = chunks
        self.stage = chunks[0].stage  # the rank's first chunk (its only one at vpp = 1)
        self.mesh = mesh
        self.optimizer = optimizer
        self.hidden_shape = hidden_shape
        self.device = device
        self.pp_group = mesh["pp"].get_group() if mesh.layout.pp > 1 else None
        self.index = mesh.stage
        self.losses: list[Tensor] = []
        self.most_in_flight = 0  # micro-batches whose activations were held at once (all chunks)
        self.pending: list[dist.Work] = []
        self.before_forward = before_forward
        self.sample = sample

    def peer(self, offset: int) -> int:
        """The pipeline rank `offset` away (modulo pp: interleaved chunks wrap around)."""
        assert self.pp_group is not None
        return dist.get_global_rank(self.pp_group, (self.index + offset) % self.mesh.layout.pp)

    def send(self, tensor: Tensor, offset: int) -> None:
        """Non-blocking, as PipelineStage's batched P2P: with blocking sends, stage j's forward
        send and stage j+1's backward send wait on each other in 1F1B's steady state."""
        self.pending.append(dist.isend(tensor, self.peer(offset), group=self.pp_group))

    def loss(self, logits: Tensor, labels_BT: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels_BT.flatten())

    def loss_context(self) -> Callable[[], object]:
        return loss_parallel if self.mesh.layout.tp > 1 else nullcontext

    def forward(self, chunk: Sharded, batch: MicroBatch, m: int) -> tuple[Tensor, Tensor | None]:
        stage = chunk.stage
        if self.before_forward is not None:
            self.before_forward(stage)
        if stage.first:
            inp = batch.tokens_BT
        else:
            inp = torch.empty(self.hidden_shape, dtype=chunk.compute_dtype, device=self.device)
            dist.recv(inp, self.peer(-1), group=self.pp_group)
            inp.requires_grad_(True)
        if stage.mtp:
            # with multi-token prediction the last stage reads the tokens too and returns the loss,
            # its vocabulary-parallel cross-entropies computed inside
            with unit_view_outputs(), self.loss_context()():
                out = stage(inp, batch.tokens_BT if batch.sequence_BT is None else batch.sequence_BT)
        else:
            with unit_view_outputs():
                out = stage(inp)
        if stage.last:
            with self.loss_context()():
                out = (out if stage.mtp else self.loss(out, batch.labels_BT)) / m
            self.losses.append(out.detach())
        else:
            self.send(out.detach(), 1)
        return out, (inp if not stage.first else None)

    def backward(self, chunk: Sharded, out: Tensor, inp: Tensor | None, last: bool) -> None:
        root = chunk.units[-1]
        zero = self.mesh.layout.zero
        root.set_is_last_backward(last)
        if zero in (1, 2):
            root.set_reshard_after_backward(last)
        if zero in (0, 1):
            root.set_requires_gradient_sync(last)
        grad = None
        if not chunk.stage.last:
            grad = torch.empty_like(out)
            dist.recv(grad, self.peer(1), group=self.pp_group)
        # sampled once the output's gradient has arrived: the chunk's backward starts with it
        # beside every held activation
        if self.sample is not None:
            self.sample()
        if grad is None:
            with self.loss_context()():
                out.backward()
        else:
            out.backward(grad)
        if inp is not None:
            assert inp.grad is not None
            self.send(inp.grad, -1)
            # torch's ModTracker (inside the memory trackers) hooks every module input with a
            # multi-grad hook whose closure holds the input's grad node; that node reaches this leaf
            # (its AccumulateGrad holds it) and is held from C++, a cycle gc never frees. Megatron's
            # pseudo-free (`deallocate_output_tensor`: swap `.data` for an empty tensor) releases
            # the storage whoever holds the leaf, as a run without a tracker frees it here.
            inp.grad = None
            inp.data = torch.empty(0, dtype=inp.dtype, device=inp.device)

    def sync_tied_gradient(self) -> None:
        """Sum the embedding's gradient with its copy's on the other end stage (Megatron's
        `_allreduce_word_embedding_grads`, after the data-parallel reduction): this rank's shard
        of it, which its peer's shard matches row for row (the same FSDP2 split of the same shape)."""
        for chunk in self.chunks:
            if chunk.tied is None:
                continue
            embed = chunk.stage.token_embedding
            assert embed is not None
            grad = embed.weight.grad
            assert grad is not None
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=chunk.tied)

    def train_step(self, batches: list[MicroBatch]) -> None:
        m = len(batches)
        for chunk in self.chunks:
            scale_aux_gradients(chunk.stage, 1 / m)
        layout = self.mesh.layout
        held: dict[tuple[int, int], tuple[Tensor, Tensor | None]] = {}
        done = [0] * len(self.chunks)
        for op, c, i in interleaved_1f1b(self.index, layout.pp, layout.vpp, m):
            if op == "F":
                held[c, i] = self.forward(self.chunks[c], batches[i], m)
                self.most_in_flight = max(self.most_in_flight, len(held))
            else:
                done[c] += 1
                self.backward(self.chunks[c], *held.pop((c, i)), last=done[c] == m)
        self.sync_tied_gradient()
        if self.sample is not None:
            self.sample()  # the gradients' peak: all of them, before the step frees them
        for work in self.pending:
            work.wait()
        self.pending.clear()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def full_logits(logits: Tensor) -> Tensor:
    """Logits of a stage's head as one plain tensor (a vocabulary-sharded DTensor under TP)."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits
