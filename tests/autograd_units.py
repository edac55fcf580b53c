"""Checks shared by the tests of the autograd units that keep only some tensors and recompute the
rest in their backward (archplan/modules/recompute.py and its users): what autograd saves during a
call, and that a unit's backward runs plain autograd's counted ops with plain autograd's gradients,
under bf16 autocast too."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def saved_during(call: Callable[[], T]) -> tuple[T, list[torch.Tensor]]:
    """`call()`'s result and every tensor autograd saved for the backward while it ran."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = call()
    return out, saved


def assert_same_backward(unit: torch.Tensor, plain: torch.Tensor, wanted: Sequence[torch.Tensor],
                         tol: float) -> None:
    """The unit's backward and plain autograd's count the same FLOPs by op (some) and give the
    same gradients to `wanted`, for one random output gradient."""
    probe = torch.randn_like(unit)
    counts, grads = [], []
    for out in (unit, plain):
        with FlopCounterMode(display=False) as counter:
            grads.append(torch.autograd.grad((out * probe).sum(), wanted))
        counts.append(dict(counter.get_flop_counts()["Global"]))
    assert counts[0] == counts[1] and counts[0]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def held_by_graph(out: torch.Tensor) -> dict[int, int]:
    """Bytes of each distinct storage the autograd graph behind `out` holds for its backward, read
    off the graph's nodes: what the backward will read. A hook on every saved tensor
    (`saved_during`) also sees those of nodes freed during the forward, as a graph whose outputs
    go unused is (a router's selection). Python numbers that autograd keeps as 0-dim float64 /
    int64 tensors are not device memory and are left out."""
    held: dict[int, int] = {}
    nodes, seen = [out.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):  # an autograd.Function's ctx
            saved += list(node.saved_tensors)
        for t in tree_leaves(saved):
            if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.dtype in (torch.float64, torch.int64)):
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        nodes += [next_node for next_node, _ in node.next_functions]
    return held


def storages(tensors: Sequence[torch.Tensor]) -> set[int]:
    """The storages the tensors live in (a view and its base share one)."""
    return {t.untyped_storage().data_ptr() for t in tensors}


def assert_bf16_autocast_backward(unit: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]],
                                  plain: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]],
                                  wanted: Sequence[torch.Tensor], tol: float = 5e-2) -> None:
    """With the forward under CPU bf16 autocast and the backward outside it, as a training step runs
    them (archplan/distributed/train.py), the unit's gradients are finite, are plain autograd's for
    the same ops under the same autocast (each matmul differentiated in bf16; equal here, the
    tolerance is far below bf16's rounding), and are within bf16 rounding (relative norm `tol`) of
    the unit's fp32 gradients."""
    torch.manual_seed(0)
    probes = [torch.randn(o.shape) for o in _outputs(unit)]
    fp32 = _probed_grads(unit, wanted, probes, autocast=False)
    bf16 = _probed_grads(unit, wanted, probes, autocast=True)
    for got, ref, same in zip(bf16, fp32, _probed_grads(plain, wanted, probes, autocast=True)):
        assert got.dtype == ref.dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got, same, rtol=1e-5, atol=1e-7)
        assert (got - ref).norm() <= tol * ref.norm()


def _outputs(call: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    out = call()
    return out if isinstance(out, tuple) else (out,)


def _probed_grads(call: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], wanted: Sequence[torch.Tensor],
                  probes: Sequence[torch.Tensor], autocast: bool) -> tuple[torch.Tensor, ...]:
    """The gradients of Σ ⟨output, probe⟩, the forward under bf16 autocast or none."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = _outputs(call)
    return torch.autograd.grad(sum((o.float() * p).sum() for o, p in zip(outs, probes)), wanted)
