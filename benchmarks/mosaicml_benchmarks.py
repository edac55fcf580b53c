"""Predicted vs published tokens/s per GPU for every row of MosaicML's MPT benchmark tables
(tests/fixtures/mosaicml_benchmarks.yaml: 216 runs of Composer + PyTorch FSDP on 8 to 512 H100 and
A100 GPUs), each at its published layout, plus the exact parameter count of every row's model.

A blind held-out set: the rows were evaluated once, at the model as it stood, and moved nothing.
The evaluation is published_runs.py's (`evaluate_run`, without the search column).

    python benchmarks/mosaicml_benchmarks.py            # every row, then the summary per table
    python benchmarks/mosaicml_benchmarks.py --json
    python benchmarks/mosaicml_benchmarks.py --markdown # the summary and the misses in Markdown (the figures of docs/validation.md; its own labels)

Each output ends with the accuracy over every held-out run (these rows and published_runs.py's
held-out rows) per GPU family, the figures `plan` prints (archplan/planning/accuracy.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import published_runs  # noqa: E402  (benchmarks/ is not a package)
from archplan.analytic import count_params  # noqa: E402
from archplan.hardware import accelerator  # noqa: E402
from archplan.planning.accuracy import (  # noqa: E402
    ENGINE_RUNS,
    MIN_ENGINE_RUNS,
    HeldOutAccuracy,
    family,
    label,
    summarize,
)
from archplan.planning.cluster import STATES, Engine  # noqa: E402
from archplan.resolve import resolve  # noqa: E402
from archplan.spec import Spec  # noqa: E402

FIXTURE = HERE.parent / "tests" / "fixtures" / "mosaicml_benchmarks.yaml"
# the README's column values -> archplan's settings
SHARDING_ZERO = {"FULL_SHARD": 3, "SHARD_GRAD_OP": 2}
PRECISION = {"amp_bf16": "bf16", "bf16": "bf16", "amp_fp8": "fp8"}
PURE_REDUCE_BYTES = 2  # "PURE" mixed precision reduce-scatters in bf16; "DEFAULT" in fp32
# The "bf16 PURE" rows are the README's first sweep (2023-05, sweep.sh's image
# mosaicml/pytorch:1.13.1_cu117): PyTorch 1.13's checkpoint re-runs the whole block. The "amp_*"
# rows came with sweep.sh's image mosaicml/pytorch:2.1.0_cu121 (2023-10 and 2024-01), whose
# non-reentrant checkpoint (the yamls' `activation_checkpointing_reentrant: false`) stops early.
PURE_EARLY_STOP = False
# published_runs.yaml's held-out MPT rows are rows of these tables too: counted once, here
DUPLICATE_PREFIX = "MPT-"


@dataclass(frozen=True)
class Row:
    table: str
    size: str
    seq: int
    gpus: int
    gpu: str  # the README's GPU, as archplan names it
    micro_batch: int
    checkpointing: bool
    published: float
    predicted: float
    fits: bool
    memory_gib: float
    mfu: float
    num_params: int  # the table's NumParams
    counted_params: int  # archplan's analytic count of the row's model

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1

    @property
    def name(self) -> str:
        return f"{self.table} {self.size} seq {self.seq:,} ×{self.gpus} mb{self.micro_batch}"


def load() -> dict[str, Any]:
    return yaml.safe_load(FIXTURE.read_text(encoding="utf-8"))


def model_data(data: dict[str, Any], size: str, seq: int) -> dict[str, Any]:
    """The spec of MPT-`size` with learned positions for `seq` tokens (the README counts them)."""
    d_model, n_layers, n_heads = data["sizes"][size]
    template = data["model"]
    return template | {
        "name": f"mpt-{size}-{seq}", "d_model": d_model, "n_layers": n_layers, "max_seq_len": seq,
        "attention": template["attention"] | {"n_heads": n_heads},
        "ffn": template["ffn"] | {"d_ff": 4 * d_model},
    }


def run_data(data: dict[str, Any], values: list[Any]) -> dict[str, Any]:
    """One README row as a published_runs.yaml run."""
    row = dict(zip(data["columns"], values, strict=True))
    layout = (f"tp=1,pp=1,dp={row['gpus']},cp=1,ep=1,zero={SHARDING_ZERO[row['sharding']]},"
              f"recompute={'full' if row['checkpointing'] else 'none'},mb={row['micro_batch']},"
              "vpp=1,sp=off")
    run = data["settings"] | {
        "name": f"mpt-{row['size']}-{row['seq']}", "model": f"mpt-{row['size']}-{row['seq']}",
        "gpu": row["gpu"], "seq": row["seq"], "batch": row["global_batch"], "layout": layout,
        "published_tokens_per_s_per_gpu": row["tokens_per_s_per_gpu"],
        "precision": PRECISION[row["precision"]], "holdout": True,
    }
    if row["mp_mode"] == "PURE":
        run["grad_reduce"] = PURE_REDUCE_BYTES
        run["early_stop"] = PURE_EARLY_STOP
    return run


def rows() -> list[Row]:
    data = load()
    found = []
    for values in data["rows"]:
        row = dict(zip(data["columns"], values, strict=True))
        spec = model_data(data, row["size"], row["seq"])
        models = {spec["name"]: spec}
        result = published_runs.evaluate_run(run_data(data, values), models, {}, with_search=False)
        counted = count_params(resolve(Spec.model_validate(spec))).total
        found.append(Row(row["table"], row["size"], row["seq"], row["gpus"], row["gpu"], row["micro_batch"],
                         row["checkpointing"], float(row["tokens_per_s_per_gpu"]), result.predicted,
                         result.fits, result.memory_gib, result.mfu, row["num_params"], counted))
    return found


def summary(found: list[Row]) -> dict[str, float]:
    errors = [abs(r.error) for r in found]
    return {"n": len(errors), "median_abs_error": statistics.median(errors),
            "worst_abs_error": max(errors),
            "within_20pct": sum(e <= published_runs.WORST_GOAL for e in errors)}


def tables(found: list[Row]) -> dict[str, dict[str, float]]:
    """The summary per README table, then of all rows."""
    names = list(dict.fromkeys(r.table for r in found))
    return {name: summary([r for r in found if r.table == name]) for name in names} | {
        "all": summary(found)}


def held_out_errors(found: list[Row], published: list[published_runs.Row]
                    ) -> dict[tuple[str, Engine, bool], tuple[list[float], set[str]]]:
    """Per kernel-efficiency family, engine of the run's states (`StatesConvention.engine`) and
    whether its model routes tokens to experts, the signed error of every held-out run, each once
    (these rows, then published_runs.yaml's held-out rows, `published`, but its MPT ones), and the
    GPUs they ran on."""
    data = published_runs.load()
    runs = {run["name"]: run for run in data["runs"]}
    errors: dict[tuple[str, Engine, bool], tuple[list[float], set[str]]] = {}

    def add(gpu_name: str, states: str, moe: bool, error: float) -> None:
        gpu = accelerator(gpu_name)
        found_errors, gpus = errors.setdefault((family(gpu), STATES[states].engine, moe), ([], set()))
        found_errors.append(error)
        gpus.add(label(gpu))

    states = load()["settings"]["states"]
    for r in found:
        add(r.gpu, states, False, r.error)
    for row in published:
        if row.holdout and row.error is not None and not row.name.startswith(DUPLICATE_PREFIX):
            run = runs[row.name]
            moe = published_runs.plan_for(run["model"], data["models"], data["gpt_sizes"]).routed
            add(run["gpu"], run.get("states", "megatron"), moe, row.error)
    return errors


def _pooled(groups: Iterable[tuple[list[float], set[str]]]) -> tuple[list[float], str]:
    pooled = list(groups)
    return ([e for errors, _ in pooled for e in errors],
            "/".join(sorted({name for _, gpus in pooled for name in gpus})))


def accuracy(found: list[Row], published: list[published_runs.Row]) -> dict[str, HeldOutAccuracy]:
    """Per family over the dense models' runs, then of the MoE models' runs (key "moe") and of
    every held-out run (key "every family")."""
    groups = held_out_errors(found, published)
    families = sorted({key for key, _, _ in groups})
    dense = {key: _pooled(v for (f, _, moe), v in groups.items() if f == key and not moe) for key in families}
    return {key: summarize(*dense[key]) for key in families if dense[key][0]} | {
        "moe": summarize(*_pooled(v for (_, _, moe), v in groups.items() if moe), moe=True),
        "every family": summarize(*_pooled(groups.values()))}


def engine_accuracy(found: list[Row], published: list[published_runs.Row]
                    ) -> dict[tuple[str, Engine], HeldOutAccuracy]:
    """Per family and engine over the dense models' runs, where a family has at least
    MIN_ENGINE_RUNS of that engine."""
    return {(key, engine): summarize(errors, "/".join(sorted(gpus)), engine)
            for (key, engine, moe), (errors, gpus) in held_out_errors(found, published).items()
            if not moe and len(errors) >= MIN_ENGINE_RUNS}


def _line(key: str, a: HeldOutAccuracy) -> str:
    return (f"held out, {key} ({a.gpus}): {a.runs} runs, median |error| {a.median:.1%}, nine in ten "
            f"within ±{a.p90:.1%} (between {a.low:+.1%} and {a.high:+.1%}), median error {a.bias:+.1%}")


def held_out_lines(found: list[Row]) -> list[str]:
    published = published_runs.rows(with_search=False)
    return ([_line(key, a) for key, a in accuracy(found, published).items()]
            + [_line(f"{key}, {ENGINE_RUNS[engine]}", a)
               for (key, engine), a in engine_accuracy(found, published).items()])


def markdown(found: list[Row]) -> None:
    print("| table | rows | median \\|error\\| | worst | within ±20% |")
    print("|---|---|---|---|---|")
    for name, s in tables(found).items():
        print(f"| {name} | {s['n']} | {s['median_abs_error']:.1%} | {s['worst_abs_error']:.1%} | "
              f"{s['within_20pct']} |")
    print("\nRows outside ±20%:\n")
    print("| row | checkpointing | published | predicted | error |")
    print("|---|---|---|---|---|")
    for r in found:
        if abs(r.error) > published_runs.WORST_GOAL:
            print(f"| {r.name} | {'yes' if r.checkpointing else 'no'} | {r.published:,.0f} | "
                  f"{r.predicted:,.0f} | {r.error:+.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="the summary and misses of docs/validation.md")
    args = parser.parse_args()
    found = rows()
    if args.markdown:
        markdown(found)
        print("\n" + "\n".join(held_out_lines(found)))
        return
    if args.json:
        published = published_runs.rows(with_search=False)
        print(json.dumps({"rows": [asdict(r) | {"error": r.error} for r in found],
                          "tables": tables(found),
                          "held_out": {key: a.as_dict() for key, a in accuracy(found, published).items()},
                          "held_out_by_engine": [a.as_dict() | {"family": key}
                                                 for (key, _), a in engine_accuracy(found, published).items()]},
                         indent=2))
        return
    print(" | ".join(("row", "ckpt", "published", "predicted", "error", "fits", "GiB", "MFU", "params")))
    for r in found:
        params = "exact" if r.counted_params == r.num_params else f"{r.counted_params - r.num_params:+,}"
        print(" | ".join((r.name, "yes" if r.checkpointing else "no", f"{r.published:,.0f}",
                          f"{r.predicted:,.0f}", f"{r.error:+.1%}", "yes" if r.fits else "no",
                          f"{r.memory_gib:.1f}", f"{r.mfu:.1%}", params)))
    for name, s in tables(found).items():
        print(f"{name}: {s['n']} rows, median |error| {s['median_abs_error']:.1%}, worst "
              f"{s['worst_abs_error']:.1%}, {s['within_20pct']} within ±20%")
    print("\n".join(held_out_lines(found)))


if __name__ == "__main__":
    main()
