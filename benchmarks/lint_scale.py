"""How long `archplan lint DIR` takes for 500 generated specs, next to `python -c "import torch"`.

The goal (issue: lint for CI): the whole folder in one process in less time than that one import.
Both are timed here, in the same run, as fresh subprocesses (interpreter start-up included), best
and median of --repeat runs. The specs vary attention (MHA/GQA/MQA/MLA), hybrids with Mamba, MoE,
position schemes and training blocks, so every rule family runs; some carry deliberate findings.

    python benchmarks/lint_scale.py            # table
    python benchmarks/lint_scale.py --json     # numbers
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _spec(i: int, rng: random.Random) -> str:
    """One spec; many carry findings (alignment, budgets, post-norm depth, a few invalid GQA groups)."""
    n_heads = rng.choice([8, 12, 16, 32, 64])
    head_dim = rng.choice([64, 64, 128, 128, 80])
    d_model = n_heads * head_dim
    n_layers = rng.choice([4, 12, 24, 32, 48, 80])
    vocab = rng.choice([32000, 50257, 128256, 151936, 65536])
    d_ff = rng.choice([4 * d_model, (8 * d_model) // 3, 256 * ((8 * d_model // 3 + 255) // 256)])
    lines = [
        f"name: generated-{i}",
        f"vocab_size: {vocab}",
        f"d_model: {d_model}",
        f"n_layers: {n_layers}",
        f"max_seq_len: {rng.choice([2048, 4096, 8192, 32768])}",
    ]
    kind = rng.choice(["mha", "gqa", "gqa", "mqa", "mla", "hybrid"])
    if kind == "mla":
        lines.append(
            f"attention: {{kind: mla, n_heads: {n_heads}, q_lora_rank: 1536, kv_lora_rank: 512, "
            "qk_nope_head_dim: 128, qk_rope_head_dim: 64, v_head_dim: 128}"
        )
    elif kind == "hybrid":
        lines.append(f"attention: {{kind: gqa, n_heads: {n_heads}, n_kv_heads: {n_heads // 4}}}")
        lines.append(f"ssm: {{kind: {rng.choice(['mamba1', 'mamba2'])}}}")
        lines.append("layout: {mixers: MMMAMMMM}" if n_layers >= 8 else "layout: {mixers: MA}")
    elif kind == "gqa":
        # 1 in 20 has a KV-head count that does not divide the heads: a validator error (AP003)
        n_kv = 5 if rng.random() < 0.05 else n_heads // 8 or 1
        lines.append(f"attention: {{kind: gqa, n_heads: {n_heads}, n_kv_heads: {n_kv}}}")
    else:
        lines.append(f"attention: {{kind: {kind}, n_heads: {n_heads}}}")
    lines.append(f"position: {rng.choice(['{kind: rope, theta: 500000.0}', '{kind: alibi}', '{kind: rope}'])}")
    if rng.random() < 0.1:
        lines.append("residual: {kind: post}")
    if rng.random() < 0.3:
        experts = rng.choice([8, 16, 64, 128])
        lines.append(
            f"moe: {{n_experts: {experts}, top_k: {rng.choice([1, 2, 8])}, "
            f"expert: {{kind: glu, d_ff: {max(64, d_ff // 8)}}}}}"
        )
    else:
        lines.append(f"ffn: {{kind: glu, d_ff: {d_ff}}}")
    if rng.random() < 0.5:
        lines.append(
            f"training: {{tokens: {rng.choice(['1.0e+9', '2.0e+11', '1.5e+13'])}, "
            f"batch: {rng.choice([1, 8, 64])}, target_device_memory_gib: {rng.choice([16, 80])}}}"
        )
    return "\n".join(lines) + "\n"


def _time(cmd: list[str], repeat: int) -> tuple[list[float], subprocess.CompletedProcess[str]]:
    times = []
    proc = None
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # this checkout's archplan
        times.append(time.perf_counter() - start)
    assert proc is not None
    return times, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="specs to generate")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(args.n):
            (folder / f"spec-{i:04d}.yaml").write_text(_spec(i, rng), encoding="utf-8")
        lint_cmd = [sys.executable, "-m", "archplan.cli", "lint", str(folder), "--format", "json"]
        lint_times, lint_proc = _time(lint_cmd, args.repeat)
        if lint_proc.returncode not in (0, 1):
            raise SystemExit(f"lint failed (exit {lint_proc.returncode}): {lint_proc.stderr.strip()}")
        report = json.loads(lint_proc.stdout)
        torch_times, torch_proc = _time([sys.executable, "-c", "import torch"], args.repeat)
        if torch_proc.returncode:
            raise SystemExit(f"import torch failed: {torch_proc.stderr.strip()}")

    by_code = Counter(f["code"] for f in report["findings"])
    result = {
        "specs": len(report["files"]),
        "findings": len(report["findings"]),
        "findings_by_code": dict(sorted(by_code.items())),
        "lint_s": {"best": min(lint_times), "median": statistics.median(lint_times), "runs": lint_times},
        "import_torch_s": {"best": min(torch_times), "median": statistics.median(torch_times),
                           "runs": torch_times},
    }
    result["ratio_best"] = result["lint_s"]["best"] / result["import_torch_s"]["best"]
    result["goal_met"] = result["lint_s"]["median"] < result["import_torch_s"]["median"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    rows = [
        (f"archplan lint <{result['specs']} specs> (one process)", result["lint_s"]),
        ('python -c "import torch"', result["import_torch_s"]),
    ]
    print(f"{'command':<44}{'best s':>9}{'median s':>10}")
    for label, times in rows:
        print(f"{label:<44}{times['best']:>9.3f}{times['median']:>10.3f}")
    print(f"lint / import (best): {result['ratio_best']:.2f}; goal (median lint < median import) "
          f"{'met' if result['goal_met'] else 'NOT met'}")
    print(f"{result['findings']} findings: " + ", ".join(f"{c} {n}" for c, n in by_code.items()))


if __name__ == "__main__":
    main()
