"""Checks shared by the tests of the autograd units that keep only some tensors and recompute the
rest in their backward (archplan/modules/recompute.py and its users): what autograd saves during a
call, and that a unit's backward runs plain autograd's counted ops with plain autograd's gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
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


def storages(tensors: Sequence[torch.Tensor]) -> set[int]:
    """The storages the tensors live in (a view and its base share one)."""
    return {t.untyped_storage().data_ptr() for t in tensors}
