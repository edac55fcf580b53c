"""RMSNorm's backward on a bf16 input, CPU: archplan's unit vs plain autograd, back to back.

- archplan: `modules.norms.RMSNorm` (`_RMSNormKeepingInput`: keeps the bf16 input and the per-row
  rstd; its backward re-forms x·rstd in place, three fp32 tensors of x's size at a time);
- autograd: `F.rms_norm` on the fp32 copy with the fp32 weight, cast back (Hugging Face
  `LlamaRMSNorm`'s computation), its backward op by op.

Both give the same values and gradients (tests/test_modules_norms.py). Per path: the median time
of a forward and its backward (the paths interleaved round-robin, so load on this shared machine
hits both alike),
the peak bytes alive during the backward (torch's `MemTracker`, the incoming gradient's cast
included) and the bytes saved for it, each as fp32 copies of x.

    python benchmarks/norm_backward.py [--tokens 8192 --width 4096 --iters 5 --threads 0 --json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.distributed._tools.mem_tracker import MemTracker

# a checkout runs these without installing archplan: its root first on the path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from archplan.modules.norms import RMSNorm
from moe_dispatch import parse_run_options, timed


def _saved_bytes(forward: Callable[[], Tensor]) -> int:
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def _backward_peak(forward: Callable[[], Tensor], probe: Tensor) -> int:
    out = forward()
    tracker = MemTracker()
    with tracker:
        out.backward(probe)
    return tracker.get_tracker_snapshot("peak")[probe.device]["Total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--width", type=int, default=4096)
    args = parse_run_options(parser, iters=5)
    norm = RMSNorm(args.width, 1e-5).bfloat16()
    x = torch.randn(args.tokens, args.width, dtype=torch.bfloat16, requires_grad=True)
    probe = torch.randn_like(x)
    forwards: dict[str, Callable[[], Tensor]] = {
        "archplan": lambda: norm(x),
        "autograd": lambda: F.rms_norm(x.float(), (args.width,), norm.weight.float(), norm.eps).type_as(x),
    }

    def step(forward: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            out = forward()
            out.backward(probe)
            x.grad = None
            norm.weight.grad = None
        return run

    seconds = timed({name: step(f) for name, f in forwards.items()}, args.iters)
    copy = x.numel() * 4
    rows = {name: {"step_s": seconds[name], "backward_peak_copies": _backward_peak(f, probe) / copy,
                   "saved_copies": _saved_bytes(f) / copy} for name, f in forwards.items()}
    for name in rows:
        rows[name]["time_vs_autograd"] = seconds[name] / seconds["autograd"]
    result = {"tokens": args.tokens, "width": args.width, "threads": torch.get_num_threads(), "paths": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"RMSNorm backward, bf16 {args.tokens:,} × {args.width:,}, CPU, "
                        f"{torch.get_num_threads()} threads (x's fp32 copy = {copy / 2**20:.0f} MiB)")
    for column in ("path", "forward + backward (median)", "× autograd", "peak in backward", "saved for it"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, row in rows.items():
        table.add_row(name, f"{row['step_s'] * 1e3:,.1f} ms", f"{row['time_vs_autograd']:.2f}",
                      f"{row['backward_peak_copies']:.2f} copies", f"{row['saved_copies']:.2f} copies")
    Console().print(table)


if __name__ == "__main__":
    main()
