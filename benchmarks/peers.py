"""archplan's forward vs transformers' implementation of the same architecture, back to back.

Same config, CPU fp32, batch 1, seq 512, d_model >= 1024 (issue 5). Prints tokens/s of both and the
ratio; achieved FLOP/s from archplan's analytic forward FLOPs (attention causal) and the share of
the matmul peak calibrated in this run. transformers is optional: without it the peers are skipped
with a message and only archplan's numbers print.

    python benchmarks/peers.py [--seq 512] [--iters 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# a checkout runs these without installing archplan: its root first on the path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from archplan.analytic import forward_flops
from archplan.bench.device import calibrate_matmul
from archplan.modules.model import build_model
from archplan.resolve import resolve
from archplan.spec import Spec

D, LAYERS, HEADS, KV, FF, VOCAB = 1024, 4, 16, 4, 2816, 32000

DENSE = dict(
    name="peer-dense", vocab_size=VOCAB, d_model=D, n_layers=LAYERS, max_seq_len=2048,
    attention={"kind": "gqa", "n_heads": HEADS, "n_kv_heads": KV},
    ffn={"kind": "glu", "activation": "silu", "d_ff": FF},
)
MOE = dict(DENSE, name="peer-moe", ffn=None,
           moe={"n_experts": 8, "top_k": 2, "expert": {"kind": "glu", "activation": "silu", "d_ff": FF},
                "router": {"scoring": "softmax", "normalize_top_k": True}})
MAMBA1 = dict(name="peer-mamba1", vocab_size=VOCAB, d_model=D, n_layers=LAYERS, max_seq_len=2048,
              position={"kind": "none"}, layout={"mixers": "M"},
              ssm={"kind": "mamba1", "d_state": 16, "d_conv": 4, "expand": 2})
MAMBA2 = dict(MAMBA1, name="peer-mamba2",
              ssm={"kind": "mamba2", "d_state": 128, "d_conv": 4, "expand": 2, "head_dim": 64,
                   "n_groups": 1, "chunk_size": 256})


def hf_model(kind: str, experts: str | None = None) -> torch.nn.Module:
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, tie_word_embeddings=False)
    if kind == "dense":
        cfg = tf.LlamaConfig(intermediate_size=FF, num_attention_heads=HEADS, num_key_value_heads=KV,
                             attn_implementation="sdpa", **common)
        return tf.LlamaForCausalLM(cfg)
    if kind == "moe":
        cfg = tf.MixtralConfig(intermediate_size=FF, num_attention_heads=HEADS, num_key_value_heads=KV,
                               num_local_experts=8, num_experts_per_tok=2, attn_implementation="sdpa",
                               experts_implementation=experts, **common)
        return tf.MixtralForCausalLM(cfg)
    if kind == "mamba1":
        cfg = tf.MambaConfig(state_size=16, conv_kernel=4, expand=2, use_mambapy=False, **common)
        return tf.MambaForCausalLM(cfg)
    cfg = tf.Mamba2Config(state_size=128, conv_kernel=4, expand=2, head_dim=64, num_heads=2 * D // 64,
                          n_groups=1, chunk_size=256, **common)
    return tf.Mamba2ForCausalLM(cfg)


def tokens_per_s(fns: dict[str, Callable[[], Any]], tokens: int, warmup: int, iters: int) -> dict[str, float]:
    """Median tokens/s of each function, the runs interleaved (a, b, c, a, b, c, ...) so that a
    noisy neighbour on a shared machine slows every contender alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(iters):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: tokens / statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import transformers  # noqa: F401

        have_peer = True
    except ImportError:
        have_peer = False
        # on stderr: `--json`'s stdout stays one JSON document, archplan's rows alone
        print("transformers is not installed: peers skipped (pip install transformers)", file=sys.stderr)

    torch.manual_seed(0)
    peak = calibrate_matmul(torch.device("cpu"), torch.float32, size=1024, seconds=1.0)
    tokens = torch.randint(0, VOCAB, (1, args.seq))
    rows = []
    dense_flops_per_s = None
    for kind, raw in (("dense", DENSE), ("moe", MOE), ("mamba1", MAMBA1), ("mamba2", MAMBA2)):
        plan = resolve(Spec.model_validate(raw))
        ours = build_model(plan, device="cpu", dtype=torch.float32).eval()
        fns: dict[str, Callable[[], Any]] = {"archplan": lambda: ours(tokens)}
        if have_peer:
            peer = hf_model(kind).eval()
            fns["transformers"] = lambda: peer(tokens)
            if kind == "moe":
                # transformers >= 5 runs experts through torch's grouped_mm by default (as we do);
                # "eager" is its classic per-expert loop, the peer the 1.1x goal had in mind.
                eager = hf_model(kind, experts="eager").eval()
                fns["transformers_eager"] = lambda: eager(tokens)
        tps = tokens_per_s(fns, args.seq, args.warmup, args.iters)
        ours_tps = tps["archplan"]
        flops = forward_flops(plan, args.seq, 1).forward("causal")
        achieved = ours_tps / args.seq * flops
        if kind == "dense":
            dense_flops_per_s = achieved
        row: dict[str, Any] = {"model": kind, "archplan_tokens_per_s": ours_tps,
                               "achieved_flops_per_s": achieved, "share_of_matmul_peak": achieved / peak}
        if kind == "moe" and dense_flops_per_s:
            row["moe_vs_dense_flops_per_s"] = achieved / dense_flops_per_s
        if "transformers" in tps:
            row["transformers_tokens_per_s"] = tps["transformers"]
            row["ratio"] = ours_tps / tps["transformers"]
        if "transformers_eager" in tps:
            row["transformers_eager_tokens_per_s"] = tps["transformers_eager"]
            row["ratio_vs_eager_experts"] = ours_tps / tps["transformers_eager"]
        fns.clear()
        rows.append(row)
    result = {"device": "cpu", "threads": torch.get_num_threads(), "dtype": "fp32", "seq": args.seq,
              "matmul_peak_flops_per_s": peak, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"CPU fp32, {torch.get_num_threads()} threads, seq {args.seq}, batch 1; calibrated matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':8} {'archplan tok/s':>15} {'transformers tok/s':>19} {'ratio':>7} {'GFLOP/s':>9} {'of peak':>8}")
    for r in rows:
        peer = f"{r['transformers_tokens_per_s']:.0f}" if "ratio" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        print(f"{r['model']:8} {r['archplan_tokens_per_s']:15.0f} {peer:>19} {ratio:>7} "
              f"{r['achieved_flops_per_s'] / 1e9:9.1f} {100 * r['share_of_matmul_peak']:7.1f}%")
    moe = next(r for r in rows if r["model"] == "moe")
    print(f"MoE achieved FLOP/s vs dense: {100 * moe['moe_vs_dense_flops_per_s']:.1f}%")
    if "ratio_vs_eager_experts" in moe:
        print(f"MoE vs transformers with experts_implementation='eager' (per-expert loop): "
              f"{moe['transformers_eager_tokens_per_s']:.0f} tok/s, ratio {moe['ratio_vs_eager_experts']:.2f}x")


if __name__ == "__main__":
    main()
