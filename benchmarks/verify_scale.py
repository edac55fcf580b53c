"""Time and peak RSS of `archplan verify` on a big preset against transformers building the same model.

Each measurement runs in its own child process; its peak RSS comes from `os.wait4` on that child
(the kernel's ru_maxrss, KiB on Linux), its time is the child's wall clock including imports. Rows:

- `archplan verify SPEC`: the whole check (meta build, parameter map, forward + backward under
  FlopCounterMode) at the given --seq;
- `archplan build_model (meta)`: the build alone, the like-for-like row against transformers;
- `transformers <Class> (meta)`: `XForCausalLM(config)` under `torch.device("meta")` from the HF
  config (optional dependency: skipped with a message when transformers is absent).

Goal (issue 3): archplan faster than transformers, under 1 GiB peak RSS.

    python benchmarks/verify_scale.py                     # deepseek-v3, table
    python benchmarks/verify_scale.py --seq 64 --json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30

ARCHPLAN_BUILD = """
import sys, torch
from archplan.loader import load_spec
from archplan.modules.model import build_model
model = build_model(load_spec(sys.argv[1]), device="meta", dtype=torch.bfloat16)
print(sum(p.numel() for p in model.parameters()))
"""

HF_BUILD = """
import json, sys, torch, transformers
config_dict = json.load(open(sys.argv[1]))
config_dict.pop("auto_map", None)  # build the class shipped in transformers, not remote code
config = transformers.AutoConfig.for_model(**config_dict)
model_class = getattr(transformers, config_dict["architectures"][0])
with torch.device("meta"):
    model = model_class(config)
print(sum(p.numel() for p in model.parameters()))
"""


@dataclass(frozen=True)
class Measurement:
    what: str
    seconds: float
    peak_rss_bytes: int
    exit_code: int
    output: str  # the parameter count for the build rows, the checks' verdict for verify


def _last_line(out: str) -> str:
    return (out.strip().splitlines() or [""])[-1]


def _verdict(out: str) -> str:
    """verify --json's verdict: its last line is only the closing brace."""
    try:
        return "all checks match" if json.loads(out)["ok"] else "a check disagrees"
    except (ValueError, KeyError):
        return _last_line(out)


def measure(what: str, argv: list[str], summarize: Callable[[str], str] = _last_line) -> Measurement:
    """Wall time and this child's own peak RSS (os.wait4 returns the rusage of that pid alone)."""
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=devnull, text=True)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux (getrusage(2))
    return Measurement(what, seconds, usage.ru_maxrss * 1024, proc.returncode, summarize(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="presets/deepseek-v3.yaml")
    parser.add_argument("--hf-config", default="tests/fixtures/hf-configs/deepseek-v3.json")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    py = sys.executable
    rows = [
        measure(f"archplan verify {args.spec} --seq {args.seq}",
                    [py, "-m", "archplan.cli", "verify", args.spec, "--seq", str(args.seq), "--json"], _verdict),
        measure("archplan build_model (meta)", [py, "-c", ARCHPLAN_BUILD, args.spec]),
    ]
    skipped = None
    if importlib.util.find_spec("transformers") is None:
        skipped = "transformers is not installed (pip install transformers): comparison skipped"
    else:
        rows.append(measure("transformers build (meta)", [py, "-c", HF_BUILD, args.hf_config]))

    verify_row = rows[0]
    verify_ok = None
    if verify_row.exit_code in (0, 1):
        verify_ok = verify_row.exit_code == 0
    # a ratio means something only where every run ran, and both builds are the same model
    failed = [f"{r.what} failed (exit {r.exit_code})" for r in rows
              if r.exit_code != 0 and not (r is verify_row and verify_ok is not None)]
    if not failed and len(rows) > 2 and rows[1].output.strip() != rows[2].output.strip():
        failed.append(f"the two builds count different models ({rows[1].output.strip()} vs {rows[2].output.strip()})")
    hf = rows[2] if len(rows) > 2 and not failed else None
    summary = {
        "rows": [asdict(r) for r in rows],
        "verify_ok": verify_ok,
        "skipped": skipped,
        "time_ratio_transformers_over_verify": (hf.seconds / verify_row.seconds) if hf else None,
        "time_ratio_transformers_over_build": (hf.seconds / rows[1].seconds) if hf else None,
        "verify_under_1_gib": verify_row.peak_rss_bytes < GIB,
        "failed": failed,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        sys.exit(1 if failed else 0)
    print(f"{'what':<52} {'seconds':>8} {'peak RSS':>10} {'exit':>4}  output")
    for r in rows:
        print(f"{r.what:<52} {r.seconds:>8.2f} {r.peak_rss_bytes / GIB:>6.3f} GiB {r.exit_code:>4}  {r.output[:40]}")
    if failed:
        print(f"no ratio: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    if skipped:
        print(skipped)
    else:
        print(f"transformers / archplan verify time: {summary['time_ratio_transformers_over_verify']:.2f}×; "
              f"transformers / archplan build: {summary['time_ratio_transformers_over_build']:.2f}×")
    print(f"archplan verify peak RSS under 1 GiB: {summary['verify_under_1_gib']}")


if __name__ == "__main__":
    main()
