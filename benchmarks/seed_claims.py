"""The architecture guide's claims, checked with archplan's own numbers (docs/seed-claims.md).

One command, deterministic inputs (seeded weights and tokens, generated specs), CPU fp32:

    python benchmarks/seed_claims.py --doc docs/seed-claims.md --plot docs/seed-claims-sweep.png

prints the claims table (or `--json`), and with `--doc` writes the page. `--quick` runs the same
code on tiny models and short lengths (the test suite runs it). `--write-specs DIR` writes the
generated specs as YAML (benchmarks/specs/ holds them, so `archplan bench` and `archplan compare`
can rerun any figure by hand).

Claims:
1. SSM / long-convolution mixers are O(n) in sequence length, attention O(n²): an equal-parameter
   family (same width, depth and vocabulary; only the mixer changes, the FFN width evens out the
   parameter count) swept over 2k-16k with `bench --seq`: measured growth exponents of time and
   memory beside the analytic ones, and the time at 16k against attention's.
2. GQA's KV cache is 4-8x smaller than MHA's: analytic `kv_cache` and the real modules' cache
   tensors (built on meta) for the 7b, 70b and frontier recipes and their MHA twins.
3. FlashAttention is 2-4x faster and uses 5-20x less memory: the same prefill under SDPA's math
   and flash backends (`bench --compare-backends`, and the sweep for memory by tensor tracking).
4. MoE gives 3-8x the parameters at the same compute: total / active parameters of the MoE presets.
5. ~20 training tokens per parameter: the compute-optimal D/N of both Chinchilla fits.
6. The recipes at the guide's contexts (7b 32K, 70b 128K, frontier 1M), and which change makes
   1M practical for the frontier recipe, from `archplan compare`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

# a checkout runs these without installing archplan: its root first on the path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from archplan.analytic import count_params, kv_cache
from archplan.analytic.scaling import compute_optimal, law
from archplan.bench.runner import BenchConfig, available_backends
from archplan.bench.sweep import compare_backends
from archplan.bench.device import DevicePeak, device_peak
from archplan.bench.sweep import SweepConfig, SweepResult, length, run_sweeps
from archplan.dtypes import DType
from archplan.loader import load_spec
from archplan.modules.model import build_model
from archplan.resolve import ModelPlan, resolve
from archplan.spec import Spec

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
# Within this of the analytic exponent counts as agreement (the goal for each mixer).
EXPONENT_TOLERANCE = 0.15
# "Practical" 1M context: one sequence's cache fits in a quarter of one H200 (141 GB), so a GPU
# holds several 1M-token sequences beside its share of the weights.
PRACTICAL_CACHE_BYTES = 141e9 / 4
MILLION = 1 << 20


@dataclass(frozen=True)
class Scale:
    """Sizes of the equal-parameter family and of the runs."""

    d_model: int
    n_layers: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    attention_d_ff: int
    lengths: tuple[int, ...]  # the growth sweep
    backend_lengths: tuple[int, ...]  # math vs flash (math holds B·H·T² scores)
    iters: int

    @property
    def quick(self) -> bool:
        return self is QUICK

    def sweep(self, lengths: tuple[int, ...], backend: str = "auto") -> SweepConfig:
        return SweepConfig(lengths, device="cpu", dtype=DType.fp32, warmup=0 if self.quick else 1,
                           iters=self.iters, attn_backend=backend)


FULL = Scale(d_model=256, n_layers=4, vocab=512, n_heads=4, n_kv_heads=2, attention_d_ff=704,
             lengths=(2048, 4096, 8192, 16384), backend_lengths=(1024, 2048, 4096), iters=3)
QUICK = Scale(d_model=32, n_layers=2, vocab=128, n_heads=2, n_kv_heads=1, attention_d_ff=128,
              lengths=(128, 256), backend_lengths=(64, 128), iters=1)


# ---------------------------------------------------------------------------- the family
def _mixer_parts(scale: Scale) -> dict[str, dict[str, Any]]:
    """Each member's mixer fields; everything else is shared. The hybrid puts one attention layer
    last in every group of n_layers (Jamba's 1-in-8, at this depth 1-in-4)."""
    attention = {"kind": "gqa", "n_heads": scale.n_heads, "n_kv_heads": scale.n_kv_heads}
    mamba = {"kind": "mamba1", "d_state": 16, "d_conv": 4, "expand": 2}
    return {
        "attention": {"position": {"kind": "rope", "theta": 10000.0}, "attention": attention,
                      "layout": {"mixers": "A"}},
        "mamba": {"position": {"kind": "none"}, "ssm": mamba, "layout": {"mixers": "M"}},
        # the s4d-lm preset's layer: N = 64, one shared (A, B)
        "s4d": {"position": {"kind": "none"}, "long_conv": {"kind": "s4d", "d_state": 64, "n_ssm": 1},
                "layout": {"mixers": "H"}},
        # the hyena-153m preset's operator (safari Pile config; filter MLP width 64, narrower in --quick
        # so the tiny family can still match parameters), its filter as long as the sweep; the
        # positional features a buffer (HyenaDNA), not l_max·emb_dim trainable values per layer
        "hyena": {"position": {"kind": "none"},
                  "long_conv": {"kind": "hyena", "order": 2, "filter_order": min(64, scale.d_model // 4),
                                "filter_depth": 2, "emb_dim": 33,
                                "short_filter": 3, "l_max": max(scale.lengths), "sin_freq": 14.0,
                                "trainable_positions": False},
                  "layout": {"mixers": "H"}},
        "hybrid": {"position": {"kind": "rope", "theta": 10000.0}, "attention": attention, "ssm": mamba,
                   "layout": {"mixers": "M" * (scale.n_layers - 1) + "A"}},
    }


def _spec(scale: Scale, member: str, mixer: dict[str, Any], d_ff: int) -> dict[str, Any]:
    return {
        "name": f"seed-{member}",
        "description": (f"Equal-parameter family of benchmarks/seed_claims.py: {scale.n_layers} layers x "
                        f"{scale.d_model}, {member} mixer, SwiGLU width chosen so every member has the "
                        f"attention member's parameter count (to within one FFN column per layer)."),
        "vocab_size": scale.vocab, "d_model": scale.d_model, "n_layers": scale.n_layers,
        "max_seq_len": max(scale.lengths),
        "norm": {"kind": "rmsnorm", "eps": 1e-5},
        **mixer,
        "ffn": {"kind": "glu", "activation": "silu", "d_ff": d_ff},
    }


def _params(raw: dict[str, Any]) -> int:
    return count_params(resolve(Spec.model_validate(raw))).total


def family(scale: Scale) -> dict[str, dict[str, Any]]:
    """Spec dicts of the equal-parameter family: the FFN width is solved for (params are affine in
    d_ff) so each member matches the attention member's total as closely as an integer width allows."""
    parts = _mixer_parts(scale)
    target = _params(_spec(scale, "attention", parts["attention"], scale.attention_d_ff))
    specs = {}
    for member, mixer in parts.items():
        at1, at2 = _params(_spec(scale, member, mixer, 1)), _params(_spec(scale, member, mixer, 2))
        d_ff = max(1, round(1 + (target - at1) / (at2 - at1)))
        specs[member] = _spec(scale, member, mixer, d_ff)
    return specs


def frontier_variants() -> dict[str, dict[str, Any]]:
    """The frontier recipe and the changes that shrink its 1M-token cache (same everything else)."""
    base = yaml.safe_load((ROOT / "archplan" / "presets" / "frontier-1t-moe.yaml").read_text())
    base.pop("reference")
    mla = {"kind": "mla", "n_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
           "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}  # DeepSeek-V3's dims
    window = 4096
    mamba2 = {"kind": "mamba2", "d_state": 128, "d_conv": 4, "expand": 2, "head_dim": 128, "n_groups": 8,
              "chunk_size": 256}

    def variant(suffix: str, what: str, **changes: Any) -> dict[str, Any]:
        layout = {**base["layout"], **changes.pop("layout", {})}
        return {**base, "name": f"frontier-1m-{suffix}", "description": f"frontier-1t-moe with {what}.",
                **changes, "layout": layout}

    return {
        "mla": variant("mla", "MLA (DeepSeek-V3's dimensions) instead of GQA-8", attention=mla),
        "swa": variant("swa", f"5 of every 6 layers sliding-window ({window} tokens), Gemma-3's 5:1",
                       attention={**base["attention"], "sliding_window": window},
                       layout={"mixers": "SSSSSA"}),
        "mamba": variant("mamba", "5 of every 6 layers Mamba-2 (expand 2, 64 heads of 128, d_state 128)",
                         ssm=mamba2, layout={"mixers": "MMMMMA"}),
        "mla-swa": variant("mla-swa", f"MLA, and 5 of every 6 layers sliding-window ({window} tokens)",
                           attention={**mla, "sliding_window": window}, layout={"mixers": "SSSSSA"}),
    }


def write_specs(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for raw in [*family(FULL).values(), *frontier_variants().values()]:
        path = directory / f"{raw['name']}.yaml"
        path.write_text("# Generated by benchmarks/seed_claims.py --write-specs; do not edit by hand.\n"
                        + yaml.safe_dump(raw, sort_keys=False, width=100))
        written.append(path)
    return written


# ---------------------------------------------------------------------------- the claims
@dataclass
class Claim:
    claim: str
    figure: str
    verdict: str  # "holds", "holds partly", "does not hold"
    details: dict[str, Any]


def _verdict(all_ok: bool, some_ok: bool) -> str:
    return "holds" if all_ok else "holds partly" if some_ok else "does not hold"


def growth_claim(sweeps: list[SweepResult]) -> Claim:
    by_name = {s.name.removeprefix("seed-"): s for s in sweeps}
    attention = by_name["attention"]
    rows = {}
    for name, s in by_name.items():
        rows[name] = {
            "params": s.params,
            "time_exponent": s.time_exponent, "time_exponent_analytic": s.analytic_time_exponent,
            "memory_exponent": s.memory_exponent, "memory_exponent_analytic": s.analytic_memory_exponent,
            "seconds_at_longest": s.points[-1].seconds,
            "speedup_vs_attention_at_longest": attention.points[-1].seconds / s.points[-1].seconds,
        }
    linear = [n for n in rows if n != "attention"]
    agree = {n: abs(r["time_exponent"] - r["time_exponent_analytic"]) <= EXPONENT_TOLERANCE
             for n, r in rows.items()}
    faster = {n: rows[n]["speedup_vs_attention_at_longest"] > 1 for n in linear}
    below = {n: rows[n]["time_exponent"] < rows["attention"]["time_exponent"] for n in linear}
    longest = length(attention.points[-1].seq)
    figure = "; ".join(
        f"{n} k={r['time_exponent']:.2f} (analytic {r['time_exponent_analytic']:.2f})"
        + ("" if n == "attention" else f", {r['speedup_vs_attention_at_longest']:.2f}x attention's speed at {longest}")
        for n, r in rows.items())
    return Claim("SSM / long-convolution mixers are O(n), attention O(n²)", figure,
                 _verdict(all(agree.values()) and all(faster.values()) and all(below.values()),
                          any(below.values())),
                 {"members": rows, "exponent_within_tolerance": agree, "faster_than_attention": faster,
                  "tolerance": EXPONENT_TOLERANCE})


def _meta_cache_bytes(raw: dict[str, Any], context: int) -> int:
    """Bytes of the real modules' cache tensors (bf16), built on meta: nothing is allocated."""
    model = build_model(resolve(Spec.model_validate(raw)), device="meta", dtype=torch.bfloat16)
    cache = model.new_cache(1, context)
    return sum(state.nbytes() for state in cache.layers)


def gqa_claim() -> Claim:
    rows = {}
    for name in ("7b", "70b", "frontier-1t-moe"):
        raw = yaml.safe_load((ROOT / "archplan" / "presets" / f"{name}.yaml").read_text())
        raw.pop("reference")
        context = raw["max_seq_len"]
        mha = {**raw, "attention": {"kind": "mha", "n_heads": raw["attention"]["n_heads"]}}
        gqa_bytes = kv_cache(resolve(Spec.model_validate(raw)), context).bytes
        mha_bytes = kv_cache(resolve(Spec.model_validate(mha)), context).bytes
        rows[name] = {"context": context, "gqa_bytes": gqa_bytes, "mha_bytes": mha_bytes,
                      "ratio": mha_bytes / gqa_bytes,
                      "gqa_bytes_modules": _meta_cache_bytes(raw, context),
                      "mha_bytes_modules": _meta_cache_bytes(mha, context)}
    exact = all(r["gqa_bytes"] == r["gqa_bytes_modules"] and r["mha_bytes"] == r["mha_bytes_modules"]
                for r in rows.values())
    in_range = {n: 4 <= r["ratio"] <= 8 for n, r in rows.items()}
    figure = "; ".join(f"{n} {r['ratio']:.0f}x ({r['gqa_bytes'] / GiB:.1f} vs {r['mha_bytes'] / GiB:.1f} GiB "
                       f"at {length(r['context'])}, bf16)" for n, r in rows.items())
    figure += "; module caches equal the analytic bytes" if exact else "; MODULE CACHES DIFFER"
    return Claim("GQA's KV cache is 4-8x smaller than MHA's", figure,
                 _verdict(all(in_range.values()) and exact, any(in_range.values())),
                 {"recipes": rows, "modules_equal_analytic": exact})


def flash_claim(plan: ModelPlan, scale: Scale, peak: DevicePeak) -> Claim:
    backends = available_backends(torch.device("cpu"), torch.float32)
    if not {"math", "flash"} <= set(backends):
        return Claim("FlashAttention: 2-4x faster, 5-20x less memory", f"backends here: {backends}",
                     "not measured", {})
    math_run, flash_run = (run_sweeps([plan], scale.sweep(scale.backend_lengths, b), peak=peak)[0]
                           for b in ("math", "flash"))
    rows = {}
    for m, f in zip(math_run.points, flash_run.points):
        rows[m.seq] = {"speedup": m.seconds / f.seconds, "memory_ratio": m.peak_bytes / f.peak_bytes,
                       "math_s": m.seconds, "flash_s": f.seconds,
                       "math_bytes": m.peak_bytes, "flash_bytes": f.peak_bytes}
    # `bench --compare-backends` itself (its peak memory is the profiler's, as the sweep's); not in --quick
    middle = scale.backend_lengths[len(scale.backend_lengths) // 2]
    command = [] if scale.quick else compare_backends(
        plan, BenchConfig(device="cpu", dtype=DType.fp32, seq=middle, decode_tokens=0, warmup=1, iters=scale.iters))
    fast = {t: 2 <= r["speedup"] for t, r in rows.items()}
    lean = {t: 5 <= r["memory_ratio"] for t, r in rows.items()}
    figure = "; ".join(f"{length(t)}: {r['speedup']:.2f}x faster, {r['memory_ratio']:.1f}x less memory"
                       for t, r in rows.items())
    return Claim("FlashAttention: 2-4x faster, 5-20x less memory", figure + " (CPU, whole-model prefill)",
                 _verdict(all(fast.values()) and all(lean.values()), any(fast.values()) or any(lean.values())),
                 {"by_length": rows, "memory_exponent_math": math_run.memory_exponent,
                  "memory_exponent_flash": flash_run.memory_exponent,
                  "compare_backends": {"seq": middle, "rows": command}})


def moe_claim() -> Claim:
    rows = {}
    for name in ("mixtral-8x7b", "jamba-v0.1", "hybrid-ssm-moe", "deepseek-v3", "frontier-1t-moe"):
        params = count_params(resolve(load_spec(name)))
        rows[name] = {"total": params.total, "active": params.active, "ratio": params.total / params.active}
    ok = {n: 3 <= r["ratio"] <= 8 for n, r in rows.items()}
    figure = "; ".join(f"{n} {r['ratio']:.1f}x" for n, r in rows.items())
    return Claim("MoE: 3-8x the parameters at the same compute (total / active parameters)", figure,
                 _verdict(all(ok.values()), any(ok.values())), {"models": rows})


def tokens_claim() -> Claim:
    rows: dict[str, dict[str, float]] = {}
    for key in ("hoffmann2022", "besiroglu2024"):
        for compute in (1e21, 1e23, 1e25):
            n, d = compute_optimal(law(key), compute)
            rows.setdefault(key, {})[f"{compute:.0e}"] = d / n
    near = {k: all(15 <= v <= 25 for v in r.values()) for k, r in rows.items()}
    figure = "; ".join(f"{k}: " + ", ".join(f"{v:.0f} at {c} FLOP" for c, v in r.items()) for k, r in rows.items())
    return Claim("~20 training tokens per parameter is compute-optimal (Chinchilla)", figure,
                 _verdict(all(near.values()), any(near.values())), {"tokens_per_param": rows})


def _compare(specs: list[str], *options: str) -> list[dict[str, Any]]:
    """`archplan compare SPECS... --json` in a fresh process: the figures exactly as the CLI gives them."""
    out = subprocess.run([sys.executable, "-m", "archplan.cli", "compare", *specs, *options, "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    return {"total_params": report["params"]["total"], "active_params": report["params"]["active"],
            "context": report["kv_cache"]["context"], "kv_bytes": report["kv_cache"]["bytes"],
            "weights_bf16_bytes": report["memory"]["weights_by_dtype"]["bf16"],
            "prefill_flops_per_token": report["flops"]["forward_per_token_causal"],
            "decode_flops_per_token": report["flops"]["decode_per_token"], "seq": report["flops"]["seq_len"]}


def recipes_claim(spec_dir: Path) -> Claim:
    recipes = {r["name"]: _summary(r) for r in _compare(["7b", "70b", "frontier-1t-moe"])}
    variants = frontier_variants()
    files = ["frontier-1t-moe"] + [str(spec_dir / f"{raw['name']}.yaml") for raw in variants.values()]
    million = {r["name"]: _summary(r) for r in
               _compare(files, "--context", str(MILLION), "--seq", str(MILLION), "--attention", "causal")}
    base = million["frontier-1t-moe"]
    for row in million.values():
        row["kv_vs_base"] = row["kv_bytes"] / base["kv_bytes"]
        row["params_vs_base"] = row["total_params"] / base["total_params"]
        row["active_vs_base"] = row["active_params"] / base["active_params"]
        row["prefill_flops_vs_base"] = row["prefill_flops_per_token"] / base["prefill_flops_per_token"]
        row["practical"] = row["kv_bytes"] <= PRACTICAL_CACHE_BYTES
    practical = [n for n, r in million.items() if r["practical"]]
    figure = (f"frontier GQA-8 at 1M: {base['kv_bytes'] / GiB:.0f} GiB of KV per sequence; "
              + "; ".join(f"{n.removeprefix('frontier-1m-')} {r['kv_bytes'] / GiB:.0f} GiB"
                          for n, r in million.items() if n != "frontier-1t-moe")
              + f"; under {PRACTICAL_CACHE_BYTES / 1e9:.0f} GB: {', '.join(practical) or 'none'}")
    return Claim("The recipes at the guide's contexts (7B 32K, 70B 128K, 1T MoE 1M)", figure,
                 "holds" if practical else "does not hold",
                 {"recipes": recipes, "frontier_1m": million, "practical_cache_bytes": PRACTICAL_CACHE_BYTES})


# ---------------------------------------------------------------------------- running and output
def machine(peak: DevicePeak) -> dict[str, Any]:
    return {"cpu": peak.name, "matmul_peak_flops_per_s": peak.peak_flops, "copy_bytes_per_s": peak.bandwidth,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m_at_start": os.getloadavg()[0], "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run(quick: bool, spec_dir: Path) -> dict[str, Any]:
    threads = torch.get_num_threads()
    if quick:
        # Tiny ops are dominated by thread synchronisation, worst on a loaded machine: one thread.
        torch.set_num_threads(1)
    try:
        return _run(QUICK if quick else FULL, spec_dir)
    finally:
        torch.set_num_threads(threads)


def _run(scale: Scale, spec_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    peak = device_peak(torch.device("cpu"), DType.fp32)
    info = machine(peak)
    plans = [resolve(Spec.model_validate(raw)) for raw in family(scale).values()]
    sweeps = run_sweeps(plans, scale.sweep(scale.lengths), peak=peak)
    claims = [growth_claim(sweeps), gqa_claim(), flash_claim(plans[0], scale, peak), moe_claim(), tokens_claim(),
              recipes_claim(spec_dir)]
    return {"machine": info, "quick": scale.quick, "scale": scale.__dict__, "runtime_s": time.perf_counter() - started,
            "sweeps": [s.to_json() for s in sweeps], "claims": [c.__dict__ for c in claims]}


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"seed claims on {result['machine']['cpu']} ({result['runtime_s']:.0f} s)",
                  show_lines=True)
    for col in ("claim", "figure", "verdict"):
        table.add_column(col)
    for c in result["claims"]:
        table.add_row(c["claim"], c["figure"], c["verdict"])
    Console().print(table)


def _gib(n: float) -> str:
    return f"{n / GiB:,.1f} GiB"


def _e(n: float) -> str:
    return f"{n:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def render_doc(result: dict[str, Any], plot: Path | None, doc: Path) -> str:
    """docs/seed-claims.md from one run's result."""
    m = result["machine"]
    claims = {c["claim"]: c for c in result["claims"]}
    growth, gqa, flash, moe, tokens, recipes = result["claims"]
    out = [
        "# The guide's claims, checked with archplan's own numbers",
        "",
        "The guide is the architecture brief archplan was started from: three design recipes (a dense 7B "
        "at 32K context, a dense 70B at 128K and a 1T-parameter MoE at 1M tokens; the presets `7b`, `70b` "
        "and `frontier-1t-moe`, docs/plan.md section 2) and the six claims below, which archplan checks "
        "here instead of repeating them.",
        "",
        "Generated by `python benchmarks/seed_claims.py --doc docs/seed-claims.md --plot "
        "docs/seed-claims-sweep.png` (one command; seeded weights and tokens, generated specs, so a rerun "
        f"differs only by the machine's timing noise). This run took **{result['runtime_s']:.0f} s**.",
        "",
        f"**Machine:** {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), load average "
        f"{m['load_average_1m_at_start']:.1f} at the start (a shared machine: timings are noisy, which is "
        f"why each length keeps its fastest pass and lengths are timed in turn); Python {m['python']}, "
        f"torch {m['torch']}, {m['platform']}; {m['date']}. Calibrated here: fp32 1024³ matmul "
        f"{m['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s, copy {m['copy_bytes_per_s'] / 1e9:.1f} GB/s.",
        "",
        *([f"**Warning:** other jobs shared the CPU during this run (load average "
           f"{m['load_average_1m_at_start']:.1f} on {m['cores']} cores at the start; the fp32 matmul calibrated at "
           f"{m['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s), so every time, speed ratio and time exponent below "
           "is noise-dominated. Memory, parameter and cache figures do not depend on load. Rerun on a quiet "
           "machine before trusting a timing.", ""] if m["load_average_1m_at_start"] > m["cores"] * 0.5 else []),
        *_table(["claim", "archplan's figure", "verdict"],
                [[c, v["figure"], f"**{v['verdict']}**"] for c, v in claims.items()]),
    ]
    # 1. growth
    scale = result["scale"]
    sweeps = {s["name"]: s for s in result["sweeps"]}
    lengths = [p["seq"] for p in next(iter(sweeps.values()))["points"]]
    out += [
        "## 1. O(n) vs O(n²): prefill time and memory against sequence length",
        "",
        f"An equal-parameter family: {scale['n_layers']} layers × {scale['d_model']}, vocabulary "
        f"{scale['vocab']}, only the mixer differs and the SwiGLU width evens out the parameter count "
        "(specs in `benchmarks/specs/seed-*.yaml`). CPU, fp32, batch 1, the whole model's prefill through "
        "archplan's real modules (`archplan bench benchmarks/specs/seed-*.yaml --dtype fp32 --seq "
        + ",".join(length(t) for t in lengths) + "`). Time is the fastest of the timed passes; memory is "
        "the weights plus the peak of the CPU allocator's allocations during the forward (`torch.profiler` "
        "with profile_memory, which also sees a fused kernel's scratch). The exponent k is "
        "the least-squares slope of log y on log n over the sweep; the analytic k is the same fit of the "
        "roofline time (analytic FLOPs, attention causal, and bytes against the calibrated peak) and of "
        "the analytic peak memory. Attention runs SDPA's default CPU kernel (fused, O(n) memory). The sweep "
        "keeps freed memory in the process (glibc `mallopt`, as torch's CUDA caching allocator does): with "
        "glibc's defaults every block over 32 MiB is unmapped on free, so from 8k tokens each pass faults and "
        "zeroes its activations afresh, system time that grows with the size class, not with FLOPs or bytes "
        "(at 16k a third of seed-s4d's pass; `archplan/bench/sweep.py`).",
        "",
    ]
    rows = []
    for name, s in sweeps.items():
        k = s["exponent"]
        member = growth["details"]["members"][name.removeprefix("seed-")]
        rows.append([name, f"{s['params']:,}", *(f"{1e3 * p['seconds']:,.0f}" for p in s["points"]),
                     f"**{k['time']:.2f}** / {k['time_analytic']:.2f}", f"{k['memory']:.2f} / {k['memory_analytic']:.2f}",
                     f"{member['speedup_vs_attention_at_longest']:.2f}×"])
    out += _table(["spec", "params", *(f"ms at {length(t)}" for t in lengths), "time k (measured / analytic)",
                   "memory k (measured / analytic)", f"speed vs attention at {length(lengths[-1])}"], rows)
    members = growth["details"]["members"]
    for name in ("s4d", "hyena"):
        if name in members:
            r = members[name]
            gap = abs(r["time_exponent"] - r["time_exponent_analytic"])
            out += [f"Goal for **{name}** (faster than attention at the longest length, and O(n)): at "
                    f"{length(lengths[-1])} its forward is "
                    f"{r['speedup_vs_attention_at_longest']:.2f}× attention's speed "
                    f"({'met' if r['speedup_vs_attention_at_longest'] > 1 else 'NOT met'}); its time exponent "
                    f"{r['time_exponent']:.2f} is {gap:.2f} from the analytic {r['time_exponent_analytic']:.2f} "
                    f"({'within' if gap <= EXPONENT_TOLERANCE else 'NOT within'} {EXPONENT_TOLERANCE}).", ""]
    mem_rows = [[name, *(f"{p['peak_memory_bytes'] / 2**20:,.0f} / {p['predicted_memory_bytes'] / 2**20:,.0f}"
                         for p in s["points"])] for name, s in sweeps.items()]
    out += ["Peak memory, measured / analytic (MiB):", "",
            *_table(["spec", *(length(t) for t in lengths)], mem_rows)]
    if plot is not None:
        out += [f"![time and memory against length]({os.path.relpath(plot, doc.parent)})", ""]
    # 2. GQA
    out += ["## 2. GQA's KV cache against MHA's", "",
            "The same recipe with `attention.kind: mha` (one K/V head per query head). Analytic `kv_cache` "
            "(bf16, batch 1, at the recipe's own context) and the bytes of the real modules' cache tensors, "
            "built on meta, agree exactly " + ("(checked in this run)." if gqa["details"]["modules_equal_analytic"]
                                               else "— NOT in this run: a bug."), ""]
    out += _table(["recipe", "context", "GQA KV", "MHA KV", "MHA / GQA"],
                  [[n, length(r["context"]), _gib(r["gqa_bytes"]), _gib(r["mha_bytes"]), f"{r['ratio']:.0f}×"]
                   for n, r in gqa["details"]["recipes"].items()])
    out += ["The ratio is n_heads / n_kv_heads: 4 and 8 for the 7B and 70B recipes, 16 for the frontier "
            "recipe's 128 query heads over 8 KV heads (more than the guide's range).", ""]
    # 3. FlashAttention
    out += ["## 3. FlashAttention against SDPA's math backend", ""]
    if flash["details"]:
        out += ["The attention member of the family, whole-model prefill, SDPA forced to `math` (scores "
                "materialised) and to `flash` (torch's fused CPU kernel). Memory by the profiler as above.", ""]
        out += _table(["length", "math ms", "flash ms", "speed-up", "math peak", "flash peak", "memory ratio"],
                      [[length(int(t)), f"{1e3 * r['math_s']:,.0f}", f"{1e3 * r['flash_s']:,.0f}",
                        f"{r['speedup']:.2f}×", f"{r['math_bytes'] / 2**20:,.0f} MiB",
                        f"{r['flash_bytes'] / 2**20:,.0f} MiB", f"{r['memory_ratio']:.1f}×"]
                       for t, r in flash["details"]["by_length"].items()])
        out += [f"Memory growth exponent: math {flash['details']['memory_exponent_math']:.2f}, flash "
                f"{flash['details']['memory_exponent_flash']:.2f}.", ""]
        command = flash["details"]["compare_backends"]
        if command["rows"]:
            out += [f"`archplan bench benchmarks/specs/seed-attention.yaml --dtype fp32 --seq {command['seq']} "
                    "--compare-backends` in the same run (its memory is the allocator's peak of one forward, "
                    "weights included, as the sweep above measures it):", ""]
            out += _table(["backend", "median ms", "tokens/s", "peak memory"],
                          [[r["backend"], f"{1e3 * r['median_s']:,.1f}", f"{r['tokens_per_s']:,.0f}",
                            f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB"] for r in command["rows"]])
    out += ["The guide's figures are GPU figures (Dao et al. 2022 measured A100s). On a CUDA machine run "
            "`archplan bench benchmarks/specs/seed-attention.yaml --device cuda --dtype bf16 --seq 8192 "
            "--compare-backends` and `archplan bench benchmarks/specs/seed-attention.yaml --device cuda "
            "--dtype bf16 --seq 2k,4k,8k,16k --attn-backend math --json` (then `flash`).", ""]
    # 4. MoE
    out += ["## 4. MoE: parameters at the same compute", "",
            "Compute per token follows the active parameters (2 FLOPs per active weight, plus attention), so "
            "the parameter multiple at the same compute is total / active:", ""]
    out += _table(["preset", "total", "active", "total / active"],
                  [[n, f"{r['total'] / 1e9:,.1f} B", f"{r['active'] / 1e9:,.1f} B", f"{r['ratio']:.1f}×"]
                   for n, r in moe["details"]["models"].items()])
    # 5. tokens per parameter
    out += ["## 5. Tokens per parameter", "",
            "Compute-optimal D/N = argmin of L(N, D) = E + A/N^α + B/D^β under C = 6ND, for the two "
            "Approach-3 fits archplan carries (Hoffmann et al. 2022 as printed; Besiroglu et al. 2024's "
            "replication). `size` defaults to 20 tokens per parameter; `plan` to the optimum of "
            "`--law epoch`, Besiroglu et al. 2024's fit (the besiroglu2024 row).", ""]
    budgets = list(next(iter(tokens["details"]["tokens_per_param"].values())))
    out += _table(["fit", *(f"C = {c} FLOP" for c in budgets)],
                  [[k, *(f"{v:.0f}" for v in r.values())] for k, r in tokens["details"]["tokens_per_param"].items()])
    # 6. recipes
    details = recipes["details"]
    out += ["## 6. The recipes at the guide's contexts", "",
            "`archplan compare 7b 70b frontier-1t-moe --json` (each at its own max_seq_len; bf16 KV, batch 1). "
            "FLOPs per token: prefill at min(4096, context) with attention causal; decode of one token "
            "against the full context.", ""]
    out += _table(["recipe", "context", "params (total / active)", "weights bf16", "KV per sequence",
                   "prefill FLOPs/token", "decode FLOPs/token at context"],
                  [[n, length(r["context"]), f"{r['total_params'] / 1e9:,.0f} B / {r['active_params'] / 1e9:,.0f} B",
                    _gib(r["weights_bf16_bytes"]), _gib(r["kv_bytes"]), _e(r["prefill_flops_per_token"]),
                    _e(r["decode_flops_per_token"])] for n, r in details["recipes"].items()])
    million = details["frontier_1m"]
    base = million["frontier-1t-moe"]
    out += ["### What makes 1M practical for the frontier recipe", "",
            "`archplan compare frontier-1t-moe benchmarks/specs/frontier-1m-*.yaml --context 1048576 --seq "
            "1048576 --attention causal --json`: each variant changes one thing in the recipe. FLOPs per "
            "token of a 1M-token prefill (attention causal) and of one decode step at 1M context.", ""]
    out += _table(["variant", "total params", "active params", "KV per 1M sequence", "prefill FLOPs/token",
                   "decode FLOPs/token", "practical"],
                  [[n, f"{r['total_params'] / 1e9:,.0f} B ({r['params_vs_base']:.2f}×)",
                    f"{r['active_params'] / 1e9:,.0f} B ({r['active_vs_base']:.2f}×)",
                    f"{_gib(r['kv_bytes'])} ({r['kv_vs_base']:.3f}×)",
                    f"{_e(r['prefill_flops_per_token'])} ({r['prefill_flops_vs_base']:.2f}×)",
                    _e(r["decode_flops_per_token"]), "yes" if r["practical"] else "no"]
                   for n, r in million.items()])
    out += [f"\"Practical\" here: one 1M-token sequence's cache fits in a quarter of one H200 "
            f"({details['practical_cache_bytes'] / 1e9:.0f} GB), so a GPU holds several such sequences beside "
            f"its share of the weights. The GQA-8 recipe needs {_gib(base['kv_bytes'])} per sequence, and at 1M "
            f"its prefill costs {base['prefill_flops_per_token'] / (2 * base['active_params']):.1f}× the 2·N_active "
            "FLOPs per token: attention dominates both.", ""]
    out += conclusions(million)
    return "\n".join(out)


def conclusions(million: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per variant, from the figures."""
    lines = []
    for name, r in million.items():
        if name == "frontier-1t-moe":
            continue
        lines.append(
            f"- **{name}**: KV {r['kv_vs_base']:.3f}× the recipe's ({_gib(r['kv_bytes'])}), parameters "
            f"{r['params_vs_base']:.2f}× total / {r['active_vs_base']:.2f}× active, prefill FLOPs per token at 1M "
            f"{r['prefill_flops_vs_base']:.2f}×; {'practical' if r['practical'] else 'not practical alone'}.")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, short lengths (seconds)")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    parser.add_argument("--doc", type=Path, help="write the markdown page here")
    parser.add_argument("--plot", type=Path, help="write the sweep figure here (PNG/SVG/PDF)")
    parser.add_argument("--write-specs", type=Path, help="write the generated specs as YAML into this folder")
    parser.add_argument("--specs", type=Path, default=ROOT / "benchmarks" / "specs",
                        help="folder of the frontier variants given to `archplan compare`")
    parser.add_argument("--from-json", type=Path, help="render --doc/--plot from an earlier --json output, no run")
    args = parser.parse_args(argv)
    if args.write_specs is not None:
        for path in write_specs(args.write_specs):
            print(f"wrote {path}")
        return 0
    result = json.loads(args.from_json.read_text()) if args.from_json else run(args.quick, args.specs)
    if args.plot is not None:
        from archplan.plot import plot_sweep

        plot_sweep(result["sweeps"], str(args.plot), force=True)  # regenerates the committed figure
    if args.doc is not None:
        args.doc.write_text(render_doc(result, args.plot, args.doc))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
