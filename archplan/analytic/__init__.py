"""The analytic sizer: exact integer counts from a resolved plan, pure Python (no torch import).

Every figure is keyed by module path (docs/architecture.md) so it can be compared, component by
component, with the torch model built from the same plan.
"""

from archplan.analytic.flops import (
    DecodeFlops,
    FlopCount,
    decode_flops,
    decode_flops_per_token,
    forward_flops,
    per_token_rounded,
    training_flops_of_batch,
    training_flops_per_sequence,
    training_flops_per_token,
)
from archplan.analytic.kv import KVCache, kv_cache
from archplan.analytic.memory import (
    ActivationMemory,
    ModelStates,
    TrainingMemory,
    activation_memory,
    training_memory,
    built_weights_bytes,
    weights_bytes,
    zero_model_states,
)
from archplan.analytic.model import ParamCount, count_params
from archplan.analytic.scaling import LAWS, Law, compute_optimal, loss, twenty_tokens

__all__ = [
    "DecodeFlops",
    "FlopCount",
    "KVCache",
    "ParamCount",
    "count_params",
    "decode_flops",
    "decode_flops_per_token",
    "forward_flops",
    "kv_cache",
    "per_token_rounded",
    "training_flops_of_batch",
    "training_flops_per_sequence",
    "training_flops_per_token",
    "ActivationMemory",
    "ModelStates",
    "TrainingMemory",
    "activation_memory",
    "training_memory",
    "built_weights_bytes",
    "weights_bytes",
    "zero_model_states",
    "LAWS",
    "Law",
    "compute_optimal",
    "loss",
    "twenty_tokens",
]
