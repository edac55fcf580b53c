"""Whether a bench run fits its device, decided before any tensor exists (past the host's memory
the system kills the process), and the options that would make it fit. One refusal for every
bench mode: prefill and decode, the --seq sweep and --train each hand it their own byte count."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

from archplan.bench.roofline import layer_kind
from archplan.errors import ArchplanError
from archplan.resolve import LayerPlan, ModelPlan
from archplan.units import nbytes

# Headroom for the allocator, workspaces and the framework itself when deciding what fits.
FIT_FRACTION = 0.85
# The `--layers K` a refusal tries, most layers first, where the spec does not fit as built.
FEWER_LAYERS = (8, 4, 2, 1)

# bytes a run of `plan` (as built) needs at a batch and a length
RunBytes = Callable[[ModelPlan, int, int], int]


def truncate(plan: ModelPlan, k: int) -> ModelPlan:
    """The first k layers of each kind, in their original order, re-indexed from 0."""
    taken: dict[str, int] = defaultdict(int)
    kept: list[LayerPlan] = []
    for layer in plan.layers:
        kind = layer_kind(layer)
        if taken[kind] < k:
            taken[kind] += 1
            kept.append(replace(layer, index=len(kept)))
    return replace(plan, layers=tuple(kept))


def _largest(fits: Callable[[int], bool], upper: int) -> int:
    """The largest n in 1..upper with fits(n), for a fits that holds up to some n and not beyond
    (memory grows with batch and length); 0 where none does."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _what_fits(plan: ModelPlan, run_bytes: RunBytes, batch: int, seq: int, room: float) -> str | None:
    """Options that make the run fit, changing as little as possible: the most layers of each
    kind first (as built, then `--layers` 8, 4, 2, 1), with the largest batch up to the one asked
    at this length, else batch 1 and the longest length up to the one asked; None if nothing fits."""
    for k in (None, *FEWER_LAYERS):
        built = plan if k is None else truncate(plan, k)
        if k is not None and len(built.layers) == len(plan.layers):
            continue
        layers = [] if k is None else [f"--layers {k}"]
        b = _largest(lambda b: run_bytes(built, b, seq) <= room, batch)
        if b:
            return " ".join(layers + ([f"--batch {b}"] if b != batch else []))
        s = _largest(lambda s: run_bytes(built, 1, s) <= room, seq)
        if s:
            return " ".join(layers + (["--batch 1"] if batch != 1 else []) + [f"--seq {s}"])
    return None


def refuse_unless_fits(plan: ModelPlan, run_bytes: RunBytes, batch: int, seq: int, *, device: str, free: int,
                       run: str, priced: str) -> None:
    """Return if `run` of `plan` as built fits `FIT_FRACTION` of `free` bytes; else one line with
    what it needs (`priced` says by which figure), what the device has, and the options that fit,
    or the reason none would."""
    room = FIT_FRACTION * free
    need = run_bytes(plan, batch, seq)
    if need <= room:
        return
    where = f"{device} has {nbytes(free)} free, {FIT_FRACTION:.0%} of it usable"
    fix = _what_fits(plan, run_bytes, batch, seq, room)
    if fix is None:
        least = run_bytes(truncate(plan, 1), 1, 1)
        raise ArchplanError(f"{run} will not fit: even at one layer of each kind, batch 1 × seq 1, it needs about "
                            f"{nbytes(least)} ({priced}) but {where}; use a device with more memory, or a smaller "
                            "spec")
    raise ArchplanError(f"{run} will not fit: it needs about {nbytes(need)} ({priced} at batch {batch} × seq "
                        f"{seq}) but {where}; try {fix}")
