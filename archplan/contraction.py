"""Does an op carry matmul work? Decided from its operands' shapes and what it decomposes into.

`verify` fails when the model dispatches an op that FlopCounterMode has no formula for and that
contracts a dimension: the counted total would silently miss those FLOPs (CPU SDPA kernels,
pytorch issue 195460; `aten.mv`; a custom kernel). The test looks at the call itself, never at
the op's name:

- shapes: two floating operands, one at least 2-D, where the first's last dimension K (> 1)
  meets the other's contracted dimension, and an output has the shape that contraction gives:
  `a (…, M, K) · b (…, K, N) -> (…, M, N)`, `a · bᵀ` with `b (…, N, K)` (linear), a vector
  `b (K,) -> (…, M)` (mv), and one chained product on a third operand `(…, M, N) · c (…, N, P)`
  (attention: softmax(QKᵀ)V). An output shaped like the right (matrix) operand is an update
  of it (scatter, softmax backward), not a product, and so is an output shaped like any
  operand when the op also takes integer index tensors (index_put with accumulate);
  pointwise ops (the op's `pointwise` tag) never contract;
- decomposition: an op torch can decompose (torch._decomp) carries matmul work when its
  decomposition, run on the same operands, dispatches ops the counter prices above 0 FLOPs.
  This catches what shapes cannot tell from an update, e.g. square attention (T = S, Dv = D)
  in `_scaled_dot_product_flash_attention_for_cpu`.

An op that is fully square (every operand and output the same shape) and has no
decomposition stays undetectable from its signature: that is the limit of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import permutations
from typing import Any

import torch
from torch._decomp import decomposition_table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

Shape = tuple[int, ...]


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def _products(a: Shape, b: Shape) -> Iterator[Shape]:
    """Shapes a contraction of `a`'s last dimension with `b` produces (none if they don't meet)."""
    k = a[-1]
    if k <= 1:
        return
    if len(b) == 1:
        if b[0] == k:
            yield a[:-1]
        return
    if b[-2] == k:
        yield (*a[:-1], b[-1])
    if b[-1] == k:
        yield (*a[:-1], b[-2])


def contraction_shaped(operands: Sequence[Shape], outputs: Sequence[Shape], indexed: bool = False) -> bool:
    """True when some output is the product of two operands (or of a chain of three).

    `indexed`: the op also takes integer tensors (indices, offsets); then an output shaped like
    one of its operands is that operand updated by index (index_put, scatter), not a product.
    """
    outs = {shape for shape in outputs if len(shape) >= 1}
    if indexed:
        outs -= set(operands)
    for i, j in permutations(range(len(operands)), 2):
        a, b = operands[i], operands[j]
        if len(a) < 2:
            continue
        for product in _products(a, b):
            # an output shaped like a matrix operand updates it; a vector's shape is no such sign
            if product in outs and (len(b) == 1 or product != b):
                return True
            chained = (
                (*product[:-1], c[-1])
                for n, c in enumerate(operands)
                if n not in (i, j) and len(c) >= 2 and len(product) >= 1 and c[-2] == product[-1]
            )
            if any(shape in outs and shape != b for shape in chained):
                return True
    return False


class _DecomposedFlops(TorchDispatchMode):
    """Sums the counter's formulas over the ops a decomposition dispatches."""

    def __init__(self, registry: Mapping[Any, Callable[..., int]]) -> None:
        super().__init__()
        self.registry = registry
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.OpOverload) and func._can_decompose():
            # run inside another mode (verify's counter), a composite op reaches this one whole:
            # SDPA's math kernel, with no formula, whose own decomposition dispatches the products
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = self.registry.get(getattr(func, "_overloadpacket", None))
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out


def _signature(func: Any, args: Any, kwargs: Any) -> tuple[Any, ...]:
    def key(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype)
        return repr(value)

    return (func, tuple(key(v) for v in tree_leaves(args)), tuple(sorted(
        (name, key(v)) for name, v in kwargs.items()
    )))


class ContractionDetector:
    """Remembers, per call signature, whether an op without a formula carries matmul work."""

    def __init__(self, registry: Mapping[Any, Callable[..., int]]) -> None:
        self.registry = registry
        self._seen: dict[tuple[Any, ...], bool] = {}

    def __call__(self, func: Any, args: Any, kwargs: Mapping[str, Any], out: Any) -> bool:
        if torch.Tag.pointwise in getattr(func, "tags", ()):
            return False
        operands = [tuple(a.shape) for a in args if _floating(a) and a.dim() >= 1]
        if len(operands) < 2 or max(len(shape) for shape in operands) < 2:
            return False
        signature = _signature(func, args, kwargs)
        if signature not in self._seen:
            outputs = [tuple(o.shape) for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
            indexed = any(
                isinstance(a, torch.Tensor) and not a.is_floating_point() and not a.is_complex()
                for a in tree_leaves((args, kwargs))
            )
            self._seen[signature] = (
                contraction_shaped(operands, outputs, indexed)
                or self._decomposes_to_flops(func, args, kwargs)
            )
        return self._seen[signature]

    def _decomposes_to_flops(self, func: Any, args: Any, kwargs: Mapping[str, Any]) -> bool:
        decomposition = decomposition_table.get(func)
        if decomposition is None or func._schema.is_mutable:
            return False  # a mutating op's decomposition would write into the model's tensors
        counting = _DecomposedFlops(self.registry)
        try:
            with torch.no_grad(), counting:
                decomposition(*args, **kwargs)
        except (RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError):
            # a decomposition that does not accept these operands tells nothing; the shapes
            # (already checked) are the verdict
            return False
        return counting.flops > 0
