"""What the pieces of one decode step cost: real steps (split into blocks and the rest by block
hooks) beside bench's own calibration of the same step (`archplan/bench/decode.py`): each weight
matmul's streamed time and bandwidth, the replayed attention and other ops by op kind, the
prediction for the built model, and `torch.profiler`'s table of two real steps.

    python benchmarks/decode_pieces.py gemma-2b --layers 2 --dtype bf16

Prints; times nothing into tests. docs/benchmarks.md, "`bench` decode model", quotes its output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# a checkout runs these without installing archplan: its root first on the path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from archplan.bench.decode import Replay, WeightStreams, _weight_bytes, decode_rates
from archplan.bench.roofline import predict_decode_step
from archplan.bench.fit import truncate
from archplan.bench.runner import decode_context, start_decode
from archplan.errors import ArchplanError
from archplan.loader import load_spec
from archplan.modules.model import build_model
from archplan.resolve import resolve

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CPU = torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--layers", type=int, default=None, help="build K layers (default: all)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed decode steps (at least 1)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1: the decode model is calibrated between timed steps")
    try:
        plan = resolve(load_spec(args.spec))
    except ArchplanError as exc:
        sys.exit(f"decode_pieces.py: {exc}")
    built = plan if args.layers is None else truncate(plan, args.layers)
    torch.manual_seed(0)
    model = build_model(built, device="cpu", dtype=DTYPES[args.dtype]).eval()
    with torch.inference_mode():
        # bench's sequence: the median step recorded, one untimed step
        step, recorded = start_decode(model, built, torch.randint(0, built.vocab_size, (1, args.seq)), args.steps,
                                      spare=2)
        context = decode_context(args.seq, args.steps)
        replay, streams = Replay(recorded, CPU), WeightStreams(recorded, CPU)
        marks: list[float] = []
        hooks = [b.register_forward_pre_hook(lambda _m, _a: marks.append(time.perf_counter())) for b in model.layers]
        hooks += [b.register_forward_hook(lambda _m, _a, _o: marks.append(time.perf_counter())) for b in model.layers]
        totals, blocks = [], []
        for _ in range(args.steps):  # calibration sampled between the steps, as bench does
            marks.clear()
            start = time.perf_counter()
            step()
            totals.append(time.perf_counter() - start)
            blocks.append(sum(marks[i + 1] - marks[i] for i in range(0, len(marks), 2)))
            replay.sample()
            streams.sample()
        for h in hooks:
            h.remove()
        print("step ms", [round(1e3 * t) for t in totals], "blocks ms", [round(1e3 * b) for b in blocks],
              "rest ms", [round(1e3 * (t - b)) for t, b in zip(totals, blocks)])
        rates = decode_rates(recorded, replay, streams)
        print("GEMV GB/s", {k: round(v / 1e9, 2) for k, v in rates.gemv_bandwidth.items()})
        print("replayed ms per layer: others", {k: round(1e3 * v, 2) for k, v in rates.op_seconds.items()},
              "attention", {k: round(1e3 * v, 2) for k, v in rates.attention_seconds.items()})
        seen = set()
        for kind, groups in recorded.calls.items():
            for call in groups["matmuls"]:
                shapes = tuple(tuple(a.shape) for a in call.args if isinstance(a, torch.Tensor))
                if (kind, shapes) in seen:
                    continue
                seen.add((kind, shapes))
                seconds, _ = streams.per_call(call)
                print(f"  {kind} weight matmul {shapes}: {1e3 * seconds:.2f} ms, "
                      f"{_weight_bytes(call) / seconds / 1e9:.2f} GB/s")
        predicted = predict_decode_step(built, 1, context, torch.finfo(DTYPES[args.dtype]).bits // 8, rates,
                                        recorded.ops())
        print(f"built model: measured median {1e3 * statistics.median(totals):.1f} ms, "
              f"predicted {1e3 * predicted.seconds:.1f} ms;",
              [(r.kind, f"weights {1e3 * r.work:.1f} ms", f"other {1e3 * r.overhead:.1f} ms") for r in predicted.rows])
        per_op: dict[tuple[str, str], float] = defaultdict(float)
        for kind, groups in recorded.calls.items():
            for group in ("attention", "others"):
                for call in groups[group]:
                    start = time.perf_counter()
                    call.run()
                    per_op[kind, call.func.overloadpacket.__name__] += time.perf_counter() - start
        for (kind, op), seconds in sorted(per_op.items(), key=lambda x: -x[1])[:12]:
            print(f"  replayed {kind} {op}: {1e3 * seconds:.2f} ms (all built layers)")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
