"""MoE dispatch on CPU: archplan's grouped dispatch vs the per-expert loop vs a dense FFN.

All three do the same counted work per token (router 2·D·E + K experts, or a dense GLU of width
K·F plus the same router matmul), so achieved FLOP/s compares dispatch overheads directly:

- grouped: `MoEFFN` (argsort by expert, one grouped_mm per matrix, index_add back);
- loop:    `moe.experts_loop`, the HF `MixtralSparseMoeBlock` pattern (mask + where per expert);
- dense:   a GLU of width K·F on all tokens (what the experts would cost with perfect dispatch).
- experts only: the three grouped_mm calls on pre-sorted rows (no routing, no gather/scatter).

    python benchmarks/moe_dispatch.py [--d-model 1024 --d-ff 1024 --experts 8 --top-k 2
                                       --tokens 2048 --dtype fp32 --threads 0 --json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

# a checkout runs these without installing archplan: its root first on the path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from archplan.modules.ffn import GLU
from archplan.modules.moe import MoEFFN, experts_loop
from archplan.resolve import FFNPlan, MoEPlan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(runs: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """Median seconds per run, the runs interleaved round-robin after two warm-up rounds, so a
    change in machine load (shared CPUs) hits every path alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(iters + 2):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if round_ >= 2:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def parse_run_options(parser: argparse.ArgumentParser, iters: int) -> argparse.Namespace:
    """The options every CPU benchmark here takes (--iters, --threads, --json) added and parsed,
    torch's threads set and its seed fixed."""
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def counted_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=1024, help="per-expert GLU width")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="B·T rows per forward")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parse_run_options(parser, iters=7)
    dtype = DTYPES[args.dtype]
    d, f, e, k = args.d_model, args.d_ff, args.experts, args.top_k
    plan = MoEPlan(
        n_experts=e, top_k=k, expert=FFNPlan("glu", f, "silu", False), shared=None, shared_gate=False,
        scoring="softmax", normalize_top_k=True, router_bias=False, score_correction_bias=False,
        bias_update_speed=0.0, routed_scale=1.0, aux_loss_coef=0.01,
    )
    moe = MoEFFN(plan, d).to(dtype)
    dense = GLU(FFNPlan("glu", k * f, "silu", False), d).to(dtype)
    x = torch.randn(1, args.tokens, d, dtype=dtype)

    # experts only: rows already sorted, balanced across experts
    rows = args.tokens * k
    x_sorted = torch.randn(rows, d, dtype=dtype)
    offs = torch.linspace(rows / e, rows, e).round().to(torch.int32)
    rows_per_expert = torch.diff(offs, prepend=torch.zeros(1, dtype=torch.int32))
    expert_of_row = torch.repeat_interleave(torch.arange(e), rows_per_expert)

    runs: dict[str, Callable[[], object]] = {
        "grouped (archplan MoEFFN)": lambda: moe(x),
        "per-expert loop (HF Mixtral pattern)": lambda: experts_loop(moe, x),
        "experts only (3 grouped_mm)": lambda: moe.experts(x_sorted, offs, expert_of_row),
        "dense GLU of width K·F (+ router)": lambda: (dense(x), moe.router(x)),
    }
    with torch.inference_mode():
        seconds = timed(runs, args.iters)
        flops = {name: counted_flops(fn) for name, fn in runs.items()}
    results = [
        {"name": n, "median_s": seconds[n], "flops": flops[n], "flops_per_s": flops[n] / seconds[n]}
        for n in runs
    ]
    dense_rate = results[-1]["flops_per_s"]
    for r in results:
        r["vs_dense"] = r["flops_per_s"] / dense_rate

    meta = {
        "d_model": d, "d_ff": f, "experts": e, "top_k": k, "tokens": args.tokens, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps({"config": meta, "results": results}, indent=2))
        return
    table = Table(title=f"MoE dispatch on CPU ({', '.join(f'{k}={v}' for k, v in meta.items())})")
    for col in ("path", "median ms", "GFLOP", "GFLOP/s", "vs dense"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in results:
        table.add_row(
            r["name"], f"{r['median_s'] * 1e3:.2f}", f"{r['flops'] / 1e9:.2f}",
            f"{r['flops_per_s'] / 1e9:.1f}", f"{r['vs_dense']:.2f}×",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
