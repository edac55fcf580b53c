"""Parameter parity: `archplan import hf` + the analytic sizer vs the model transformers builds.

For every reference config in tests/fixtures/hf-configs/ and every inline config of
tests/test_import_hf.py (tiny configs of the families without a real fixture, and typical full
configs with the key sets of public checkpoints), builds the transformers model on the
meta device (AutoModelForCausalLM.from_config, as tests/fixtures/expected.json was recorded) and
compares total and active parameters with count_params(resolve(imported spec)).

Active for transformers = total - sum over routed-expert tensors (leading dim E) of
(E - top_k) * numel / E, the moe_active_formula of expected.json.

    python benchmarks/hf_parity.py            # table
    python benchmarks/hf_parity.py --json     # numbers

transformers is optional for archplan; without it this script says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# a checkout runs this without installing archplan: its root first on the path
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"
# keys removed before building, as expected.json's config_keys_dropped_before_build: remote code
# pointers (built natively instead) and FP8 storage metadata (would build quantized layers)
DROPPED = ("auto_map", "quantization_config")


def inline_configs() -> dict[str, dict[str, Any]]:
    """The inline tiny and typical configs of tests/test_import_hf.py (one source for both)."""
    spec = importlib.util.spec_from_file_location("test_import_hf", ROOT / "tests" / "test_import_hf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return {**{f"tiny/{k}": c.config for k, c in module.TINY.items()},
            **{f"typical/{k}": c.config for k, c in module.TYPICAL.items()}}


def transformers_counts(config: dict[str, Any]) -> tuple[int, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # deep copy: transformers fills defaults into nested dicts (rope_scaling) in place
    kwargs = {k: copy.deepcopy(v) for k, v in config.items() if k not in DROPPED and k != "model_type"}
    hf_config = AutoConfig.for_model(config["model_type"], **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    total = sum(p.numel() for p in model.parameters())
    top_k = getattr(hf_config, "num_experts_per_tok", None)
    inactive = 0
    for name, p in model.named_parameters():
        if ".experts." in name and top_k:
            n_experts = p.shape[0]
            inactive += (n_experts - top_k) * (p.numel() // n_experts)
    return total, total - inactive


def archplan_counts(config: dict[str, Any], name: str) -> tuple[int, int]:
    from archplan.analytic import count_params
    from archplan.importers.hf import spec_from_config
    from archplan.resolve import resolve

    counts = count_params(resolve(spec_from_config(config, file=name, name=name)))
    return counts.total, counts.active


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if importlib.util.find_spec("transformers") is None:
        skipped = "transformers is not installed; `pip install transformers` to run the parity benchmark"
        print(skipped, file=sys.stderr)
        if args.json:
            print(json.dumps({"skipped": skipped}))
        return 0
    import transformers
    from transformers import CONFIG_MAPPING

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    cases: dict[str, dict[str, Any]] = {
        p.stem: json.loads(p.read_text()) for p in sorted((FIXTURES / "hf-configs").glob("*.json"))
    }
    cases.update(inline_configs())
    rows = []
    # model types transformers does not ship (StripedHyena / Evo run as remote code): nothing to
    # build here; tests/test_import_stripedhyena.py checks their counts
    remote = sorted(name for name, config in cases.items() if config["model_type"] not in CONFIG_MAPPING)
    for name, config in cases.items():
        if name in remote:
            continue
        start = time.perf_counter()
        ours = archplan_counts(config, name)
        theirs = transformers_counts(config)
        rows.append({
            "name": name, "model_type": config["model_type"],
            "archplan_total": ours[0], "transformers_total": theirs[0],
            "archplan_active": ours[1], "transformers_active": theirs[1],
            "match": ours == theirs, "seconds": round(time.perf_counter() - start, 2),
        })
    matched = sum(r["match"] for r in rows)
    if args.json:
        print(json.dumps({"transformers": transformers.__version__, "rows": rows,
                          "matched": matched, "cases": len(rows), "remote_code_skipped": remote}, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"archplan vs transformers {transformers.__version__} (meta device), parameters")
        for col in ("config", "model_type", "archplan total", "transformers total", "archplan active",
                    "transformers active", "match"):
            table.add_column(col, justify="right" if "total" in col or "active" in col else "left")
        for r in rows:
            table.add_row(r["name"], r["model_type"], f"{r['archplan_total']:,}", f"{r['transformers_total']:,}",
                          f"{r['archplan_active']:,}", f"{r['transformers_active']:,}",
                          "yes" if r["match"] else "[red]NO[/red]")
        # wide enough for full integers when piped to a file
        Console(width=None if sys.stdout.isatty() else 150).print(table)
        print(f"{matched}/{len(rows)} exact")
        if remote:
            print(f"not in transformers (remote code), skipped: {', '.join(remote)}")
    return 0 if matched == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
