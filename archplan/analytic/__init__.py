"""The analytic sizer: exact integer counts from a resolved plan, pure Python (no torch import).

Every figure is keyed by module path (docs/architecture.md) so it can be compared, component by
component, with the torch model built from the same plan.
"""

from archplan.analytic.flops import (
    FlopCount,
    decode_flops_per_token,
    forward_flops,
    training_flops_per_token,
)
from archplan.analytic.kv import KVCache, kv_cache
from archplan.analytic.model import ParamCount, count_params

__all__ = [
    "FlopCount",
    "KVCache",
    "ParamCount",
    "count_params",
    "decode_flops_per_token",
    "forward_flops",
    "kv_cache",
    "training_flops_per_token",
]
