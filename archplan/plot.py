"""Figures for `size --plot`, `compare --plot` and `bench --seq a,b,c --plot` (matplotlib, optional).

size: (left) inference memory vs context length — bf16 weights + KV cache (+ SSM state) at the
chosen batch and KV dtype; (right) training memory per replica vs sequence length — model states
(16 B/param) + activations for each recompute mode at the chosen micro-batch.
compare: grouped bars of the headline figures, one panel per unit.
bench --seq a,b,c: prefill time and peak memory against sequence length, measured and analytic.
Every number plotted comes from the same analytic functions as the tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archplan.errors import ArchplanError, first_line
from archplan.outfile import check_target, os_reason, write_whole
from archplan.render import training_dtypes

if TYPE_CHECKING:
    from archplan.report import SizeOptions
    from archplan.resolve import ModelPlan

GiB = 1 << 30
FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
SEQ_SWEEP_CAP = 32768


def pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "matplotlib":
            raise ArchplanError(
                "--plot needs matplotlib, which is not installed; pip install 'archplan[plot]'"
            ) from None
        # installed but broken, e.g. matplotlib 3.7 (built for NumPy 1) beside NumPy 2
        raise ArchplanError(f"--plot: matplotlib failed to import ({first_line(exc)}); "
                            "pip install -U 'archplan[plot]'") from None

    return plt


def figure_target(path: str, *, force: bool = False) -> Path:
    """Where a --plot figure goes; an existing file is the user's and is replaced only with --force."""
    return check_target(path, force=force, field="--plot", suffixes=FIGURE_SUFFIXES)


def sweep_lengths(limit: int) -> list[int]:
    """Powers of two from 256 up to `limit`, plus `limit` itself."""
    lengths = [1 << k for k in range(8, 27) if (1 << k) < limit]
    return lengths + [limit]


def save(fig: Any, target: Path) -> None:
    try:
        write_whole(target, lambda scratch: fig.savefig(scratch, format=target.suffix[1:].lower(), bbox_inches="tight", dpi=120))
    except Exception as exc:  # matplotlib's backends turn a full disk into errors of their own
        raise ArchplanError(f"cannot write figure: {os_reason(exc)}", file=str(target)) from None


def plot_size(plan: ModelPlan, report: dict[str, Any], opts: SizeOptions, path: str, *,
              force: bool = False) -> None:
    from archplan.analytic import count_params, kv_cache
    from archplan.analytic.memory import RECOMPUTE_MODES, training_memory
    from archplan.dtypes import BYTES

    target = figure_target(path, force=force)
    plt = pyplot()
    params = count_params(plan)
    kv = report["kv_cache"]
    contexts = sweep_lengths(max(kv["context"], plan.max_seq_len, 256))
    caches = [kv_cache(plan, context=t, batch=kv["batch"], dtype_bytes=BYTES[opts.kv_dtype])
              for t in contexts]
    weights = report["memory"]["weights_by_dtype"]["bf16"]

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    attention_kv = [(c.bytes - c.ssm_state_bytes) / GiB for c in caches]
    ssm = [c.ssm_state_bytes / GiB for c in caches]
    stack = [[weights / GiB] * len(contexts), attention_kv]
    labels = ["weights (bf16)", f"KV cache ({kv['dtype']}, batch {kv['batch']})"]
    if any(ssm):
        stack.append(ssm)
        labels.append("SSM state")
    left.stackplot(contexts, *stack, labels=labels, alpha=0.85)
    left.set_xscale("log", base=2)
    left.set_xlabel("context length (tokens)")
    left.set_ylabel("GiB")
    left.set_title(f"{report['name']}: inference memory vs context")
    # the stacked areas fill the panel up to its top edge: the legend goes below the axes
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)

    # up to the spec's context (at most 32K: eager attention's s² activations dwarf the rest beyond)
    seq_limit = max(report["flops"]["seq_len"], min(plan.max_seq_len, SEQ_SWEEP_CAP), 256)
    seqs = sweep_lengths(seq_limit)
    states = report["memory"]["training"]
    model_states = (states["weights"] + states["grads"] + states["optimizer"]) / GiB
    right.axhline(model_states, color="black", linestyle="--", label="model states (16 B/param)")
    for mode in RECOMPUTE_MODES:
        totals = [training_memory(plan, params, opts.micro_batch, s, mode, activation_dtype=opts.activation_dtype,
                                  attention_kernel=opts.attention_kernel, residual_dtype=opts.residual,
                                  autocast=opts.autocast).total / GiB
                  for s in seqs]
        right.plot(seqs, totals, marker="o", label=f"step peak, recompute {mode}")
    right.set_xscale("log", base=2)
    right.set_ylim(bottom=0)
    right.set_xlabel("sequence length (tokens)")
    right.set_ylabel("GiB per replica")
    right.set_title(f"training memory, micro-batch {opts.micro_batch}\n{training_dtypes(report['memory']['training'])}")
    # the curves can run anywhere in the panel (gpt2's rise through its upper left): below the axes too
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    save(fig, target)
    plt.close(fig)


def plot_compare(reports: Sequence[dict[str, Any]], path: str, *, force: bool = False) -> None:
    target = figure_target(path, force=force)
    plt = pyplot()
    attention = reports[0]["flops"]["attention"]
    panels: list[tuple[str, list[tuple[str, Any]]]] = [
        ("parameters (billions)", [
            ("total", lambda r: r["params"]["total"] / 1e9),
            ("active", lambda r: r["params"]["active"] / 1e9)]),
        ("FLOPs per token (GFLOP)", [
            (f"forward ({attention})", lambda r: r["flops"]["forward_per_token"] / 1e9),
            (f"training ({attention})", lambda r: r["flops"]["training_per_token"] / 1e9)]),
        (f"memory (GiB); training: {training_dtypes(reports[0]['memory']['training'])}", [
            ("weights bf16", lambda r: r["memory"]["weights_by_dtype"]["bf16"] / GiB),
            ("KV cache", lambda r: r["kv_cache"]["bytes"] / GiB),
            ("training / replica", lambda r: r["memory"]["training_bytes"] / GiB)]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    width = 0.8 / len(reports)
    for ax, (title, series) in zip(axes, panels):
        for i, r in enumerate(reports):
            xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(series))]
            ax.bar(xs, [get(r) for _, get in series], width, label=r["name"])
        ax.set_xticks(range(len(series)), [name for name, _ in series])
        ax.set_title(title)
    # one legend for the panels, below them: inside a panel it covered the tallest bars
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=min(len(reports), 6))
    save(fig, target)
    plt.close(fig)


def plot_sweep(sweeps: Sequence[dict[str, Any]], path: str, *, force: bool = False) -> None:
    """`bench --seq a,b,c --plot`: prefill time and peak memory against sequence length, log-log,
    one colour per spec; solid = measured, dashed = analytic prediction; k = fitted exponent."""
    target = figure_target(path, force=force)
    plt = pyplot()
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, sweep in enumerate(sweeps):
        colour = f"C{i % 10}"
        points = sweep["points"]
        seqs = [p["seq"] for p in points]
        k = sweep["exponent"]
        time_ax.plot(seqs, [p["seconds"] for p in points], marker="o", color=colour,
                     label=f"{sweep['name']} (k={k['time']:.2f}; analytic {k['time_analytic']:.2f})")
        time_ax.plot(seqs, [p["predicted_s"] for p in points], linestyle="--", color=colour)
        mem_ax.plot(seqs, [p["peak_memory_bytes"] / GiB for p in points], marker="o", color=colour,
                    label=f"{sweep['name']} (k={k['memory']:.2f}; analytic {k['memory_analytic']:.2f})")
        mem_ax.plot(seqs, [p["predicted_memory_bytes"] / GiB for p in points], linestyle="--", color=colour)
    first = sweeps[0]
    # what both panels share goes above them: two long titles side by side ran into each other
    fig.suptitle(f"{first['device']}, {first['dtype']}; solid = measured, dashed = analytic")
    for ax, ylabel, title in (
        (time_ax, "seconds", "prefill time"),
        (mem_ax, "GiB", "peak memory (weights included)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize="small")
    save(fig, target)
    plt.close(fig)
