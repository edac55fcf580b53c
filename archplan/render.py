"""Rich tables for `size` and `compare`, read from the report object of `archplan.report`.

Counts use SI prefixes (7.24 B), bytes binary units (GiB = 2^30), FLOPs SI (archplan.units).
Each table carries its convention in its caption.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from archplan import units

BAR_WIDTH = 28
_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `fraction` x width cells, in eighths of a cell."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[part] if part else "")


PIPED_WIDTH = 200
# Narrower than this no table of archplan's reads (`COLUMNS=0` had rich print nothing at all)
MIN_WIDTH = 40


def report_console(table: Table | None = None) -> Console:
    """A console at the terminal's width, or at COLUMNS' where that is set, never narrower than
    `MIN_WIDTH`; piped or captured with neither (no width to honour), at `PIPED_WIDTH` columns or
    `table`'s full width if wider, so that long component names and table rows stay on one line
    and no figure is cut."""
    console = Console()
    if console.is_terminal or "COLUMNS" in os.environ:
        return console if console.width >= MIN_WIDTH else Console(width=MIN_WIDTH)
    return Console(width=PIPED_WIDTH if table is None else max(PIPED_WIDTH, table_width(table)))


@contextmanager
def busy(message: str, *, enabled: bool = True) -> Iterator[None]:
    """A transient spinner with the elapsed time on stderr, for one long step that has no parts
    to count (a fake-process-group run, torchrun workers); only on a terminal, never with --json."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        progress.add_task(message, total=None)
        yield


def table_width(table: Table) -> int:
    """The columns `table` takes with no cell wrapped or cut: its widest rendering."""
    from rich.measure import Measurement

    console = Console(width=10_000)
    return Measurement.get(console, console.options, table).maximum


class _Section(Table):
    """A table whose convention note prints below it at full console width (not wrapped to the
    table's width as a rich caption would be)."""

    note: str | None = None


def _table(title: str, note: str | None = None, *columns: tuple[str, str]) -> _Section:
    table = _Section(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.note = note
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    return table


def _with_note(table: _Section) -> Group:
    parts: list[Any] = [table]
    if table.note:
        parts.append(Text(table.note, style="dim"))
    return Group(*parts)


def _params_tables(r: dict[str, Any]) -> list[_Section]:
    p = r["params"]
    total, active = p["total"], p["active"]
    summary = _table("Parameters", p["convention"], ("", "left"), ("count", "right"), ("exact", "right"))
    rows = [("total", total), ("active per token", active)]
    if active < total:
        rows.append(("  active without the input embedding", p["active_without_input_embedding"]))
    rows.append(("embedding (V·D)", p["embedding"]))
    if p["position_embedding"]:
        rows.append(("position table", p["position_embedding"]))
    rows.append(("non-embedding", p["non_embedding"]))
    rows.append(("LM head" + (" (tied: bias only)" if p["tied_embeddings"] else ""), p["lm_head"]))
    rows.append(("matmul weights (P_matmul)", p["matmul"]))
    for name, value in rows:
        summary.add_row(name, units.count(value), f"{value:,}")

    # The bar draws % total, so it sits beside that column, narrow enough for an 80-column terminal
    kinds = _table("Parameters by component", None, ("component", "left"), ("total", "right"),
                   ("% total", "right"), ("of total", "left"), ("active", "right"), ("% active", "right"))
    for kind, entry in p["by_kind"].items():
        if entry["total"] == 0:  # e.g. a tied LM head without bias
            continue
        # by_kind's embedding holds the position table too, which the summary lists apart
        label = "embedding + position table" if kind == "embedding" and p["position_embedding"] else kind
        kinds.add_row(label, units.count(entry["total"]), units.percent(entry["total"] / total),
                      bar(entry["total"] / total, 12), units.count(entry["active"]),
                      units.percent(entry["active"] / active))
    return [summary, kinds]


def _flops_table(r: dict[str, Any]) -> _Section:
    f = r["flops"]
    table = _table(f"FLOPs per token (training/prefill at seq {f['seq_len']:,})", f["convention"],
                   ("", "left"), ("attention full", "right"), ("attention causal", "right"))
    table.add_row("forward", units.flops(f["forward_per_token_full"]),
                  units.flops(f["forward_per_token_causal"]))
    table.add_row("training (fwd + bwd)", units.flops(f["training_per_token_full"]),
                  units.flops(f["training_per_token_causal"]))
    if f["recompute"] != "none":
        col = 1 if f["attention"] == "full" else 2
        cells = ["", ""]
        cells[col - 1] = units.flops(f["training_per_token_with_recompute"])
        table.add_row(f"training with {f['recompute']} recompute", *cells)
    table.add_row("6·N_active (approximation, embedding included)", units.flops(f["six_n_active"]), "")
    table.add_row(f"decode, one token at context {f['decode_context']:,}", "",
                  units.flops(f["decode_per_token"]))
    table.add_row(Text("decode elementwise (analytic only, not in the above)", style="dim"), "",
                  units.flops(f["decode_elementwise_per_token"]))
    table.add_row(Text("elementwise (analytic only, not in the above)", style="dim"),
                  units.flops(f["elementwise_per_token"]), "")
    notes = [note for note in (f["past_max_seq_len"], f["short_for_mtp"]) if note]
    if notes:
        table.note = "\n".join([f["convention"], *notes])
    return table


def _bytes_or_none(n: float) -> str:
    """Bytes, or "none": "0 B" beside counts in B (billions) reads as a count (a model with no
    per-token cache, a part a model does not have)."""
    return units.nbytes(n) if n else "none"


def _kv_table(r: dict[str, Any]) -> _Section:
    kv = r["kv_cache"]
    table = _table(f"KV cache ({kv['dtype']})", kv["convention"], ("", "left"), ("bytes", "right"))
    grown = kv["bytes"] - kv["ssm_state_bytes"] - kv.get("filter_cache_bytes", 0)
    # a window caps the cache once it fills: the per-token figure times the context overstates it
    capped = grown < kv["bytes_per_token"] * kv["context"] * kv["batch"]
    table.add_row("per token (one sequence)" + (", until windows fill" if capped else ""),
                  _bytes_or_none(kv["bytes_per_token"]))
    if kv["naive_mla_bytes_per_token"] is not None:
        table.add_row("per token, MLA without absorption", units.nbytes(kv["naive_mla_bytes_per_token"]))
    if kv.get("conv_bytes_per_token"):
        table.add_row("  of which Hyena long-conv inputs", units.nbytes(kv["conv_bytes_per_token"]))
    if kv.get("filter_bytes_per_position"):
        table.add_row("+ Hyena filters per position (fp32, once for the batch)",
                      units.nbytes(kv["filter_bytes_per_position"]))
    table.add_row(f"context {kv['context']:,} x batch {kv['batch']:,}", units.nbytes(kv["bytes"]))
    if kv.get("filter_cache_bytes"):
        table.add_row("  of which Hyena filters (fp32, once for the batch)", units.nbytes(kv["filter_cache_bytes"]))
    if kv["ssm_state_bytes"]:
        table.add_row("  of which SSM / S4 / FIR + modal state (constant)", units.nbytes(kv["ssm_state_bytes"]))
    if kv["past_max_seq_len"]:
        table.note = f"{kv['convention']}\n{kv['past_max_seq_len']}"
    return table


def _has_mtp(r: dict[str, Any]) -> bool:
    return "multi-token prediction" in r["params"]["by_kind"]


_QUANTIZED = {
    "all": "fp8, int8, int4: every parameter at that width, no scales (--quantize linear keeps the embedding, LM "
           "head and norms in bf16)",
    "linear": "fp8, int8, int4: the layers' matmul weights at that width, no scales; the embedding, LM head, MoE "
              "routers, norms, biases and convolutions in bf16 (--quantize linear)",
}


def _inference_table(r: dict[str, Any]) -> _Section:
    m, kv = r["memory"], r["kv_cache"]
    table = _table(
        "Inference memory",
        f"+ KV cache at context {kv['context']:,} x batch {kv['batch']:,} in {kv['dtype']}; "
        + _QUANTIZED[m["weights_quantized"]] + "; "
        "int4-g128: matmul weights but the LM head and MoE routers at 4 bits + an fp16 scale per 128, no zero points (4.125 bits a weight: "
        "a row whose width 128 does not divide pays its last scale pro rata), the rest bf16; no activations, workspace or runtime overhead" + ("; the multi-token-prediction modules left out (training only)"
                      if _has_mtp(r) else ""),
        ("weights dtype", "left"), ("weights", "right"), ("+ KV cache", "right"), ("", "left"))
    peak = max(m["inference_bytes_by_dtype"].values())
    for dtype, weights in m["weights_by_dtype"].items():
        total = m["inference_bytes_by_dtype"][dtype]
        table.add_row(dtype, units.nbytes(weights), units.nbytes(total), bar(total / peak))
    return table


def _training_table(r: dict[str, Any]) -> _Section:
    t = r["memory"]["training"]
    total = r["memory"]["training_bytes"]
    table = _table(
        f"Training memory per replica (micro-batch {t['micro_batch']}, seq {t['seq_len']:,}, "
        f"recompute {t['recompute']})",
        t["convention"] + f"; activations per Korthikanti et al. 2022, per saved tensor, {t['activation_dtype']}"
        + (f" (residual stream {t['residual_dtype']})" if t["residual_dtype"] != t["activation_dtype"] else "")
        + (", torch autocast (each projection keeps its own 16-bit cast of its input)" if t["autocast"] else "")
        + f", {t['attention_kernel']} attention, no dropout (Korthikanti's 34sbh + 5as²b counts its masks); "
        "total = the states + the step's largest transient phase (docs/figures.md §5)",
        ("", "left"), ("bytes", "right"), ("share", "right"), ("", "left"))
    rows = [("weights (bf16, 2 B/param)", t["weights"]), ("gradients (bf16, 2 B/param)", t["grads"]),
            ("fp32 master weights (4 B/param)", t["master_weights"]),
            ("Adam m (fp32, 4 B/param)", t["adam_m"]),
            ("Adam v (fp32, 4 B/param)", t["adam_v"]),
            (f"step peak: {t['peak_phase']}", t["phases"][t["peak_phase"]])]
    for name, value in rows:
        table.add_row(name, units.nbytes(value), units.percent(value / total), bar(value / total))
    table.add_row(Text("total (peak of the step)", style="bold"), Text(units.nbytes(total), style="bold"), "", "")
    for name, value in _peak_parts(t):
        table.add_row(f"  {name}", units.nbytes(value), "", "")
    return table


# The peak phases that are what is alive at one moment plus a transient: the transient's key in
# the JSON, then how the table names what is alive then and the transient.
_TRANSIENT_PHASES: dict[str, tuple[str, str, str]] = {
    "layer re-run": ("activations_working_set", "of which alive at the re-run", "one layer re-run"),
    "attention backward": ("attention_backward", "of which alive at the core's backward",
                           "attention's s×s gradients (dP, dS)"),
    "scan backward": ("scan_backward", "of which alive at the scan unit's backward",
                      "the scan unit's recomputed operands and gradients"),
    "long-conv backward": ("long_conv_backward", "of which alive at the mixer's backward",
                           "its FFT convolution's or filter's gradients"),
    "kernel generation": ("kernel_generation", "of which alive at S4's kernel generation",
                          "its doubling's last step (forward)"),
}


def _peak_parts(t: dict[str, Any]) -> list[tuple[str, int]]:
    """What the forward kept, then the peak phase's own parts: what is alive then, and the
    transient that makes it the peak (the step peak row above is their sum)."""
    phase = t["peak_phase"]
    kept = ("activations kept", t["activations"])
    if phase in _TRANSIENT_PHASES:
        key, alive_then, transient_name = _TRANSIENT_PHASES[phase]
        transient = t[key]
        return [kept, (alive_then, t["phases"][phase] - transient), (transient_name, transient)]
    match phase:
        case "loss backward":
            return [kept, ("loss backward (2 fp32 n×V)", t["loss_backward"])]
        case "tied gradient sum" | "optimizer step":
            return [("activations kept (freed by then)", t["activations"])]
    raise ValueError(f"unknown phase {phase!r}")


def _chinchilla_table(r: dict[str, Any]) -> _Section:
    c = r["chinchilla"]
    other = "total" if c["n_params_kind"] == "active" else "active"
    caption = (f"N = {c['n_params_kind']} parameters ({units.count(c['n_params'])}; {other} "
               f"{units.count(c[f'{other}_params'])}); C = 6·N·D (Hoffmann et al. 2022 eq. 4); "
               f"{c['tokens_per_param']} tokens/param = {units.count(c['optimal_tokens'])} tokens")
    # only where size's D is its own default: given tokens, plan prices the same ones
    if c["plan_tokens"] is not None and c["tokens_source"] not in ("--tokens", "spec training.tokens"):
        from archplan.planning.optimal import LawChoice  # not at the CLI's start-up: it loads the analytic package

        caption += (f"; `plan SPEC --gpus N` without --tokens or training.tokens prices "
                    f"{units.count(c['plan_tokens'])} tokens instead: the Epoch fit's compute-optimal D "
                    f"for N = {c['plan_tokens_params']} params (plan's --law {'|'.join(LawChoice)} sets the fit)")
    if c["extrapolated"]:
        from archplan.analytic.scaling import FIT_DATA_PARAMS, FIT_DATA_TOKENS  # not at the CLI's start-up

        caption += (f"; N or D lies outside the runs the fits were fitted on ({units.count(FIT_DATA_PARAMS[0])}–"
                    f"{units.count(FIT_DATA_PARAMS[1])} parameters, {units.count(FIT_DATA_TOKENS[0])}–"
                    f"{units.count(FIT_DATA_TOKENS[1])} tokens, Hoffmann et al. 2022 §3): its losses are extrapolated")
    table = _table(f"Chinchilla budget: D = {units.count(c['tokens'])} token{'' if c['tokens'] == 1 else 's'} "
                   f"({c['tokens_source']}), "
                   f"C = {units.sci(c['training_flops'])} FLOPs", caption,
                   ("Approach-3 fit", "left"), ("loss at N, D", "right"), ("N_opt for C", "right"),
                   ("D_opt for C", "right"), ("D_opt/N_opt", "right"))
    for entry in c["laws"].values():
        table.add_row(entry["title"], f"{entry['loss']:.4f}", units.count(entry["optimal_params"]),
                      units.count(entry["optimal_tokens"]),
                      f"{entry['optimal_tokens'] / entry['optimal_params']:.1f}")
    return table


def _gpu_table(r: dict[str, Any]) -> _Section | None:
    g = r["chinchilla"]["gpu"]
    if g is None:
        return None
    table = _table(f"GPU time on {g['name']}", g["convention"], ("", "left"), ("", "right"))
    table.add_row("dense bf16 peak used", units.flops(g["peak_flops_per_s"], "FLOP/s"))
    table.add_row("MFU", units.percent(g["mfu"]))
    table.add_row("model FLOPs (training FLOPs/token x D)", units.sci(g["training_flops"]))
    table.add_row("GPU-hours", units.amount(g["gpu_hours"]))
    table.add_row("GPU-days", units.amount(g["gpu_hours"] / 24))
    if g["gpu_hours_6nd_active"] == g["gpu_hours_6nd"]:
        table.add_row("GPU-hours for the 6·N·D budget", units.amount(g["gpu_hours_6nd"]))
    else:
        table.add_row("GPU-hours for 6·N_active·D (the budget)", units.amount(g["gpu_hours_6nd_active"]))
        table.add_row("GPU-hours for 6·N_total·D", units.amount(g["gpu_hours_6nd"]))
    return table


def size_renderable(r: dict[str, Any]) -> Group:
    header = Text(r["name"], style="bold")
    if r["description"]:
        header.append(f" — {r['description']}", style="")
    parts: list[Any] = [header, *_params_tables(r), _flops_table(r), _kv_table(r), _inference_table(r),
                        _training_table(r), _chinchilla_table(r)]
    gpu = _gpu_table(r)
    if gpu is not None:
        parts.append(gpu)
    spaced: list[Any] = []
    for part in parts:
        spaced.extend([_with_note(part) if isinstance(part, _Section) else part, Text("")])
    return Group(*spaced)


def print_size(r: dict[str, Any], console: Console | None = None) -> None:
    (console or report_console()).print(size_renderable(r))


# ----------------------------------------------------------------------------------- compare
def _ratio(value: float, base: float) -> str:
    return units.ratio(value / base)


def _difference(value: float, base: float) -> str:
    """A loss against the first column's: a difference in nats, which a ratio of two losses near 2
    (1.00×) hides."""
    return f"Δ {value - base:+.4f}"


class Figure(NamedTuple):
    """One row of `compare`: its label, its value in a report, how the value prints, and how it
    stands against the first column's (a ratio, or a loss's difference)."""

    name: str
    get: Callable[[dict[str, Any]], float | None]
    fmt: Callable[[float], str]
    versus: Callable[[float, float], str] = _ratio


def _law_value(key: str, field: str) -> Callable[[dict[str, Any]], float | None]:
    def get(r: dict[str, Any]) -> float | None:
        entry = r["chinchilla"]["laws"].get(key)
        return None if entry is None else entry[field]
    return get


def compare_figures(reports: Sequence[dict[str, Any]]) -> list[Figure]:
    first = reports[0]
    f, kv = first["flops"], first["kv_cache"]
    other = "training_per_token_causal" if f["attention"] == "full" else "training_per_token_full"
    figures: list[tuple[Any, ...]] = [
        ("train seq", lambda r: r["flops"]["seq_len"], lambda x: f"{x:,.0f}"),
        ("KV context", lambda r: r["kv_cache"]["context"], lambda x: f"{x:,.0f}"),
        ("params total", lambda r: r["params"]["total"], units.count),
        ("params active", lambda r: r["params"]["active"], units.count),
        ("params embedding", lambda r: r["params"]["embedding"], units.count),
        ("params non-emb.", lambda r: r["params"]["non_embedding"], units.count),
        (f"forward/token ({f['attention']})", lambda r: r["flops"]["forward_per_token"], units.flops),
        (f"train/token ({f['attention']})", lambda r: r["flops"]["training_per_token"], units.flops),
        ("train/token (causal)" if f["attention"] == "full" else "train/token (full)",
         lambda r: r["flops"][other],
         units.flops),
        ("decode/token at context", lambda r: r["flops"]["decode_per_token"], units.flops),
        (f"KV cache/token ({kv['dtype']})", lambda r: r["kv_cache"]["bytes_per_token"], _bytes_or_none),
        # once for the batch, beside the per-sequence row above: one more token grows the cache by both
        *([("  + Hyena filters/position", lambda r: r["kv_cache"]["filter_bytes_per_position"], _bytes_or_none)]
          if any(r["kv_cache"]["filter_bytes_per_position"] for r in reports) else []),
        ("KV cache at context", lambda r: r["kv_cache"]["bytes"], units.nbytes),
        *[(f"  of which {what}", lambda r, key=key: r["kv_cache"][key], _bytes_or_none)
          # the parts not per token, so that per token × context need not match the row above
          # unexplained (hyena-153m: 30.4 KiB × 2,048 = 60.8 MiB of 182 MiB, the rest its filters)
          # short labels: the figure column does not wrap, and 51 characters left an 80-column
          # terminal 7 a value (the caption names what they hold)
          for what, key in (("Hyena filters (fp32)", "filter_cache_bytes"), ("constant state", "ssm_state_bytes"))
          if any(r["kv_cache"][key] for r in reports)],
        ("weights bf16", lambda r: r["memory"]["weights_by_dtype"]["bf16"], units.nbytes),
        ("weights int4 (all)" if first["memory"]["weights_quantized"] == "all" else "weights int4 (linear)",
         lambda r: r["memory"]["weights_by_dtype"]["int4"], units.nbytes),
        ("inference bf16 + KV", lambda r: r["memory"]["inference_bytes_by_dtype"]["bf16"], units.nbytes),
        ("train model states",
         lambda r: r["memory"]["training"]["weights"] + r["memory"]["training"]["grads"]
         + r["memory"]["training"]["optimizer"], units.nbytes),
        ("train activations", lambda r: r["memory"]["training"]["activations"], units.nbytes),
        ("train memory / replica", lambda r: r["memory"]["training_bytes"], units.nbytes),
        ("tokens 20/N (MoE: N act.)" if any(r["chinchilla"]["n_params_kind"] == "active" for r in reports)
         else "tokens 20/param", lambda r: r["chinchilla"]["optimal_tokens"], units.count),
    ]
    sources = {r["chinchilla"]["tokens_source"] for r in reports}
    if sources & {"--tokens", "spec training.tokens"}:
        # the D the budget and the losses below are priced at, where --tokens or a spec sets it
        label = f"tokens D ({sources.pop()})" if len(sources) == 1 else "tokens D (each spec's)"
        figures.append((label, lambda r: r["chinchilla"]["tokens"], units.count))
    figures.append(("budget 6ND (FLOP)", lambda r: r["chinchilla"]["training_flops"], units.sci_column))
    for key in first["chinchilla"]["laws"]:
        figures.append((f"loss ({key})", _law_value(key, "loss"), lambda x: f"{x:.4f}", _difference))
        figures.append((f"N_opt ({key})", _law_value(key, "optimal_params"), units.count))
    if first["chinchilla"]["gpu"] is not None:
        figures.append(("GPU-hours", lambda r: r["chinchilla"]["gpu"]["gpu_hours"], units.amount))
    return [Figure(*figure) for figure in figures]


def training_dtypes(training: dict[str, Any]) -> str:
    """The dtypes a report's training activations were counted in (`memory.training`), for the
    compare caption and the --plot titles: the residual stream is named where it differs."""
    residual = training["residual_dtype"]
    return f"activations {training['activation_dtype']}" + (
        f", residual stream {residual}" if residual != training["activation_dtype"] else "") + (
        ", torch autocast" if training["autocast"] else "")


def compare_table(reports: Sequence[dict[str, Any]], stacked: bool = False) -> _Section:
    """`stacked`: each ratio on its own line below its figure, and the figure names wrapped, for a
    terminal too narrow for the one-line rows (the break falls between a figure and its ratio,
    never inside a number)."""
    # not at import: the CLI loads render before any report
    from archplan.report import FLOPS_CONVENTION, MLA_DECODE_NOTE, MOE_FLOPS_NOTE

    first = reports[0]
    headings = column_names(reports)
    t = first["memory"]["training"]
    settings = (f"ratios (×) against {headings[0]}; KV cache in {first['kv_cache']['dtype']} at batch "
                f"{first['kv_cache']['batch']:,}; training {training_dtypes(t)}, "
                f"{t['attention_kernel']} attention, recompute {t['recompute']}, micro-batch {t['micro_batch']}; "
                f"{_QUANTIZED[first['memory']['weights_quantized']].replace('fp8, int8, int4', 'int4')}. "
                f"{FLOPS_CONVENTION}.")
    with_mtp = [r["name"] for r in reports if _has_mtp(r)]
    if with_mtp:
        # each column's own caveat, whatever the column order: `size` prints both beside the figures
        settings += (f" {', '.join(with_mtp)}: training also runs the multi-token-prediction modules, which "
                     "inference does not, so training is more than 3 x forward; the weights and inference rows "
                     "leave those modules out.")
    for note in (MOE_FLOPS_NOTE, MLA_DECODE_NOTE):
        # each column's own convention, as `size` prints it
        named = [r["name"] for r in reports if note in r["flops"]["convention"]]
        if named:
            settings += f" {', '.join(named)}: {note.removeprefix('; ')}."
    gpu = first["chinchilla"]["gpu"]
    if gpu is not None:
        settings += (f" GPU-hours: model FLOPs (training FLOPs/token × D, not 6ND) at the dense bf16 peak of the "
                     f"{gpu['name']}, {units.flops(gpu['peak_flops_per_s'], 'FLOP/s')}, × MFU {units.percent(gpu['mfu'])}.")
    if any(r["kv_cache"]["ssm_state_bytes"] for r in reports):
        settings += " Constant state: SSM, S4/S4D, StripedHyena FIR + modal, per sequence."
    settings += " Model states: 16 bytes/param (bf16 weights and gradients, fp32 Adam). Losses: their difference " \
                "to the first column, not a ratio."
    past = [note for r in reports for note in (r["flops"]["past_max_seq_len"], r["flops"]["short_for_mtp"],
                                               r["kv_cache"]["past_max_seq_len"]) if note]
    settings = "\n".join([settings, *past])
    table = _table("Comparison", settings, ("figure", "left"),
                   *[(escape(heading), "right") for heading in headings])
    table.columns[0].no_wrap = not stacked
    for column in table.columns:
        column.overflow = "fold"  # past the stacked layout, a figure's digits wrap rather than be cut
    for name, get, fmt, versus in compare_figures(reports):
        base = get(first)
        cells = []
        for i, r in enumerate(reports):
            value = get(r)
            if value is None:
                cells.append("—")
            elif i == 0 or not base or not value:  # a ratio of nothing says nothing: "none", not "none (0.00×)"
                cells.append(fmt(value))
            else:
                cells.append(f"{fmt(value)}{chr(10) if stacked else ' '}({versus(value, base)})")
        table.add_row(name, *cells)
    return table


def column_names(reports: Sequence[dict[str, Any]]) -> list[str]:
    """Each report's column heading: its spec's name, and where two specs share a name (a copy with
    one field changed, the usual ablation) the argument it came from too, then its position."""
    names = [r["name"] for r in reports]
    shown = [f"{name} ({r['source']})" if names.count(name) > 1 and r["source"] != name else name
             for name, r in zip(names, reports)]
    return [f"{name} #{i + 1}" if shown.count(name) > 1 else name for i, name in enumerate(shown)]


MIN_NAME_WIDTH = 8  # the figure names' column, folded, where a narrow terminal keeps the values whole


def _hold_lines(table: Table, width: int) -> None:
    """Fix each value column of a stacked compare table at the width of its longest line (a
    figure, or its ratio) and the names' column at what is left, up to its longest name, where
    `width` leaves the names `MIN_NAME_WIDTH`: Rich then never splits a figure or a ratio, folds
    a spec's name in its header and wraps the figure names at their spaces. Fixed, not minimum,
    widths: a header wider than its figures (claude-3-opus-rumored) would otherwise hold its
    column wider and Rich crop the last one. Narrower, every column folds as Rich folds it."""
    first, *values = table.columns
    lines = [max(len(line) for cell in column.cells for line in str(cell).splitlines()) for column in values]
    room = width - sum(lines) - 3 * len(values)
    if room < MIN_NAME_WIDTH:
        return
    for column, line in zip(values, lines):
        column.width = line
    first.width = min(room, max(len(str(cell)) for cell in first.cells))


def print_compare(reports: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    table = compare_table(reports)
    console = console or report_console(table)
    if table_width(table) > console.width:  # a row wrapped in place splits "(Δ -0.18)" at its space
        table = compare_table(reports, stacked=True)
        _hold_lines(table, console.width)
    console.print(_with_note(table))


