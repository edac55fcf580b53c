"""Expert parallelism: a rank's E/ep experts behind an all-to-all dispatch and combine
(Lepikhin et al. 2020, GShard §2.2; torchtitan `ExpertParallel._token_dispatch/_token_combine`).

`MoEFFN` routes and sorts its N·K rows by global expert as usual and calls its `experts` with the
group ends; this module (put in place of `experts`) sends each row to the rank owning its expert,
runs the local experts (the same `Experts` module, built with E/ep experts) as one grouped matmul,
and sends the rows back in the order they came.

Split sizes are data: on real tensors they are exchanged first (one all-to-all of the per-expert
counts, as Megatron-LM's `MoEAlltoAllTokenDispatcher` does). Under FakeTensorMode there is no data,
so `balanced=True` sends every rank the same number of rows (uniform routing: the load the
analytic model prices); it is for measurement only and routes rows to the wrong experts on data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed._functional_collectives import all_to_all_single

from archplan.distributed.context import AllToAll
from archplan.modules.moe import Experts


class ExpertParallel(nn.Module):
    def __init__(self, local: Experts, n_experts: int, group: ProcessGroup, *, balanced: bool) -> None:
        super().__init__()
        self.local = local
        self.n_experts = n_experts
        self.group = group
        self.ep = group.size()
        self.balanced = balanced

    def forward(self, x_MD: Tensor, offs_E: Tensor, expert_M: Tensor) -> Tensor:
        e_local = self.n_experts // self.ep
        if self.balanced:
            send: list[int] | None = None
            recv: list[int] | None = None
            rows = x_MD.shape[0]
            local_R = torch.arange(rows, device=x_MD.device) * e_local // rows
        else:
            ends_E = offs_E.long()
            counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
            # recv_counts[src, j]: rows rank src sends to this rank's local expert j
            recv_counts = all_to_all_single(counts_E, None, None, self.group).wait().view(self.ep, e_local)
            send = counts_E.view(self.ep, e_local).sum(1).tolist()
            recv = recv_counts.sum(1).tolist()
            local_R = torch.arange(e_local, device=x_MD.device).repeat(self.ep).repeat_interleave(recv_counts.flatten())
        order_R = local_R.argsort(stable=True)
        local_sorted_R = local_R[order_R]
        ends_L = torch.searchsorted(local_sorted_R, torch.arange(e_local, device=x_MD.device), right=True)
        # The received rows are sorted by local expert at once and only the sorted copy is kept, the
        # one the grouped matmul saves: the all-to-all's output buffer is freed before the experts
        # run, as torchtitan's `ExpertParallel._token_dispatch` (its `_permute` replaces the
        # received tensor) and Megatron-Core's `MoEAlltoAllTokenDispatcher.token_permutation`
        # (`sort_chunks_by_idxs` of the all-to-all's output, returned alone) free it.
        x_RD = AllToAll.apply(x_MD, self.group, recv, send)[order_R]
        y_RD = self.local(x_RD, ends_L.to(torch.int32), local_sorted_R)[order_R.argsort()]
        return AllToAll.apply(y_RD, self.group, send, recv)
