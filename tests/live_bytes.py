"""A live-bytes trace for tests that check a memory moment independently of the analytic model:
every op's new storages, counted until their finalizers run (torch only; import after
`pytest.importorskip("torch")`)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """`now`: the bytes of the storages ops made that are still alive; `peak`: the most of it since
    the trace began or since `mark()`."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:  # no new storage: a view or an in-place write
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = storage.nbytes()
                self.now += storage.nbytes()
                weakref.finalize(storage, self.free, storage.data_ptr())
        self.peak = max(self.peak, self.now)
        return out

    def free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def mark(self) -> int:
        """Start a new peak from now; returns the bytes alive at the mark."""
        self.peak = self.now
        return self.now
