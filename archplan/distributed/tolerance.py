"""The tolerances measured memory is judged by, beside the analytic figure (docs/distributed.md).

A module of its own so the single-device training step (`train`) reads them without importing the
fake-process-group engine that `verify --layout` measures with (`fake`, through `check`)."""

# Activations kept, measured by torch's trackers against the analytic per-tensor model of fused
# kernels: plain torch autograd keeps tensors that model does not (autocast's casts, routing
# indices, small statistics), so activations are judged within this share, everything else exactly.
ACTIVATION_TOLERANCE = 0.25
# ... or within this many bytes, whichever is wider: a step keeps a few hundred bytes no term
# prices (the norms' fp32 statistics, the int64 labels, the loss scalars: docs/distributed.md), which
# outweigh a quarter of a one- or two-token model's activations and nothing at any size that matters.
ACTIVATION_FLOOR_BYTES = 4096


def activations_within(analytic: int, measured: int) -> bool:
    """Whether measured activations are the analytic figure's, within the tolerance or the floor."""
    return abs(measured - analytic) <= max(ACTIVATION_TOLERANCE * analytic, ACTIVATION_FLOOR_BYTES)


ACTIVATION_JUDGED = f"±{ACTIVATION_TOLERANCE:.0%} or {ACTIVATION_FLOOR_BYTES // 1024} KiB"

# The spread of size's step peak against MemTracker over gpt2, Llama-, MoE- and Mamba-shaped models,
# every recompute mode, bf16 and fp32 (docs/benchmarks.md): +0.1 to +10.1 %, mostly the gradients
# size keeps allocated through the step (16 B/param) where torch holds 12 + 2 per matmul weight at
# the loss backward; outside it, Mamba without recompute (the reference scan keeps far more than
# the fused kernel size counts), which the exit code flags.
PEAK_TOLERANCE = 0.15
