"""Wall time of `archplan size presets/70b.yaml` against `python -c "import torch"`, in the same run.

Each command runs in a fresh interpreter, interleaved, `--repeat` times after one warm-up each
(so both see a warm page cache); the table shows min / median / max and the ratio of medians.
Goal (issue 2): the ratio stays below 0.3.

    python benchmarks/size_startup.py [--repeat 7] [--spec presets/70b.yaml] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.3


def default_spec() -> str:
    # presets/70b.yaml from the repository root; the bundled copy if that path is absent
    path = ROOT / "presets" / "70b.yaml"
    return str(path if path.exists() else ROOT / "archplan" / "presets" / "70b.yaml")


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--spec", default=default_spec())
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args()

    commands = {
        "archplan size": [sys.executable, "-m", "archplan.cli", "size", args.spec],
        "import torch": [sys.executable, "-c", "import torch"],
    }
    # the warm-up, checked: a spec `size` refuses would time its error, not its report
    checked = subprocess.run(commands["archplan size"], capture_output=True, text=True, cwd=ROOT)
    if checked.returncode != 0:
        sys.exit(f"archplan size {args.spec} failed: {checked.stderr.strip()}")
    wall(commands["import torch"])
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, argv in commands.items():
            times[name].append(wall(argv))

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = medians["archplan size"] / medians["import torch"]
    result = {
        "spec": args.spec,
        "repeat": args.repeat,
        "python": sys.version.split()[0],
        "seconds": {name: {"min": min(ts), "median": medians[name], "max": max(ts)} for name, ts in times.items()},
        "ratio": ratio,
        "goal": GOAL,
        "meets_goal": ratio < GOAL,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'command':<16} {'min s':>8} {'median s':>9} {'max s':>8}")
    for name, ts in times.items():
        print(f"{name:<16} {min(ts):8.3f} {medians[name]:9.3f} {max(ts):8.3f}")
    verdict = "meets" if ratio < GOAL else "MISSES"
    print(f"ratio size / import torch (medians) = {ratio:.3f}  ({verdict} the goal < {GOAL})")


if __name__ == "__main__":
    main()
