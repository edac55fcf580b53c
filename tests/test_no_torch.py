"""`size`, `compare`, `presets`, `lint`, `plan`, `schema` and `import` never import torch (nor does
loading the CLI): checked in a fresh interpreter, since this test process may already have torch
loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from archplan.cli import main
sys.argv = ["archplan", *json.loads(sys.argv[1])]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "fvcore") if m in sys.modules)
print("\\nMODULES=" + json.dumps(heavy), file=sys.stderr)
sys.exit(code or 0)
"""


def loaded_modules(argv: list[str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    marker = proc.stderr.rsplit("MODULES=", 1)[1]
    return json.loads(marker)


@pytest.mark.parametrize("argv", [
    ["size", "deepseek-v3", "--json"],
    ["size", "jamba-v0.1", "--recompute", "selective", "--gpu", "h100"],
    ["compare", "llama-3-8b", "mixtral-8x7b", "hybrid-ssm-moe"],
    ["presets"],
    ["lint", "presets/70b.yaml"],
    ["plan", "7b", "--gpus", "64"],
    ["plan", "7b", "--gpus", "64", "--layout", "tp=8,pp=1"],
    ["plan", "--compute", "1e22"],
    ["plan", "--solve", "gpt-4-partial", "--total", "1.8e12", "--active", "220e9",
     "--multiple", "128", "--tol", "0.07"],
    ["schema"],
    ["import", "hf", "tests/fixtures/hf-configs/llama-3-8b.json"],
    ["import", "hf", "tests/fixtures/hf-configs/evo-1-8k-base.json"],
])
def test_command_never_imports_torch(argv: list[str]) -> None:
    assert loaded_modules(argv) == []  # neither torch nor fvcore


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, archplan.cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_analytic_package_has_no_torch_import() -> None:
    code = ("import sys, archplan.analytic, archplan.analytic.memory, archplan.analytic.scaling, "
            "archplan.report, archplan.render; print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_loading_the_cli_imports_no_commands_machinery() -> None:
    """Every command registers at start-up; what one command computes with loads when it runs, so
    `archplan --help` or `archplan lint` do not pay for the sizer or the planner."""
    code = ("import sys, archplan.cli; print(sorted(m for m in ('archplan.report', 'archplan.analytic', "
            "'archplan.planning.parallel', 'archplan.planning.pricing') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
