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

# The spread of MemTracker's step peak against size's over the 14 small fixtures of every mixer
# (tests/fixtures/distributed), every recompute mode, bf16 and fp32 at 2 x 128 tokens
# (docs/benchmarks.md, 2026-12-07): 0.98 to 1.07 of size's figure, with the step keeping its
# gradients between steps as size's convention does; above it in bf16 by autocast's 16-bit weight
# copies (2 B per matmul weight, shown beside the states). With the gradients freed between steps,
# 0.85 of it at full recompute (4 B/param fewer at the loss backward). Outside the band: Mamba
# without recompute on larger models (the reference scan keeps far more than the fused kernel size
# counts), which the exit code flags.
PEAK_TOLERANCE = 0.15
