"""What archplan's output does on the edges of a terminal: a reader of a pipe that stops early
(`archplan plan ... | head`), a stream whose encoding lacks archplan's glyphs, and a narrow
terminal under typer's --help.

rich's consoles (archplan's tables, typer's help, progress bars) and click's echo both exit with
code 1 on a closed pipe, which archplan's commands use for "a check disagrees" or "no layout
fits"; a `pipefail` CI job would read it as a failure. The reader took what it wanted: both raise
`ReaderGone` instead (`quiet_on_closed_pipe`, `echo`), and `cli.main` ends with the exit code the
command had settled on before it rendered (`settle`): 0, or its verdict, whatever the reader took.
"""

from __future__ import annotations

import codecs
import re
import sys

import typer
import typer.rich_utils
from rich.columns import Columns
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text


class ReaderGone(Exception):
    """The reader of stdout closed it: nothing more to write, and not a failure. Not an OSError,
    so that click, which turns a broken pipe into exit 1, lets it through."""


class _Verdict:
    code = 0  # what the running command ends with if its reader stops early


def settle(code: int) -> int:
    """Record the exit code the running command has decided on (1: a check disagrees, no layout
    fits, lint's gate fails), before it renders its report, and return it: a reader that stops
    early then ends the command with it, as one that reads everything sees it."""
    _Verdict.code = code
    return code


def settled() -> int:
    """The exit code `settle` recorded (0 before any); `reset_verdict` starts a command afresh."""
    return _Verdict.code


def reset_verdict() -> None:
    _Verdict.code = 0


def _reader_gone(console: Console) -> None:
    console.quiet = True
    raise ReaderGone


def quiet_on_closed_pipe() -> None:
    """Every rich console of this process raises `ReaderGone` on a closed pipe: rich's own
    handler (`Console.on_broken_pipe`, its documented hook) exits 1. Set once, by `cli.main`: the
    consoles typer makes for `--help` are not archplan's to construct."""
    Console.on_broken_pipe = _reader_gone  # type: ignore[method-assign]


# What the output's encoding lacks, written in ASCII: a memory bar of `?` meant nothing, `±5.1%`
# read `?5.1%` and `PP16×v4` `PP16?v4`. Anything else becomes `?`.
_ASCII_SPELLING: dict[str, str] = {
    "█": "#", "▓": "%", "▒": "=", "░": ":", **dict.fromkeys("▏▎▍▌▋▊▉", "+"),
    "×": "x", "·": "*", "±": "+/-", "≤": "<=", "≥": ">=",
    "≈": "~", "⌈": "ceil(", "⌉": ")", "Δ": "d", "✓": "ok", "✗": "x", "→": "->", "…": "...", "−": "-",
    "–": "-", "—": "--",
    "θ": "theta", "α": "alpha", "β": "beta", "§": "sec. ", "’": "'", "“": '"', "”": '"',
    "┃": "|", "¼": "1/4", "½": "1/2", "≠": "!=", "≪": "<<", "≫": ">>", "Σ": "sum", "λ": "lambda",
    "γ": "gamma", "ᵀ": "^T", "∝": "~", "√": "sqrt", "∘": "o",
}
# an exponent (`10⁶`, `mean²`): a run of them is one `^` and its digits
_SUPERSCRIPTS = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-"))
_EXPONENT = re.compile(f"[{''.join(_SUPERSCRIPTS)}]+")
_ASCII_ERRORS = "archplan-ascii"


def _spell_in_ascii(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = _EXPONENT.sub(lambda run: "^" + "".join(_SUPERSCRIPTS[char] for char in run.group()),
                         error.object[error.start:error.end])
    return "".join(char if char.isascii() else _ASCII_SPELLING.get(char, "?") for char in text), error.end


def replace_unencodable() -> None:
    """A character the output's encoding lacks (an ASCII locale, cp1252 where Windows redirects to
    a file) is written in ASCII (`_ASCII_SPELLING`), else as `?`. rich draws its table borders in
    ASCII there by itself, but the memory bars, `Δ`, `⌈ ⌉`, `✓` and `·` are archplan's own text, and
    Python's default for the standard streams is to raise UnicodeEncodeError on them. Set once, by
    `cli.main`."""
    codecs.register_error(_ASCII_ERRORS, _spell_in_ascii)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and not _takes_unicode(stream):
            reconfigure(errors=_ASCII_ERRORS)


def stdout_takes_unicode() -> bool:
    """Whether stdout writes any character as it is (UTF-8): where it does not, data that must
    round-trip (`import hf`'s YAML) escapes what `replace_unencodable` would turn to `?`."""
    return _takes_unicode(sys.stdout)


def _takes_unicode(stream: object) -> bool:
    encoding = getattr(stream, "encoding", None)
    return encoding is None or encoding.lower().replace("-", "").replace("_", "") == "utf8"


def echo(text: str, nl: bool = True) -> None:
    """`typer.echo` to stdout, named: click wraps an ASCII stdout it finds itself in UTF-8, past
    `replace_unencodable`'s spelling."""
    try:
        typer.echo(text, nl=nl, file=sys.stdout)
    except BrokenPipeError as exc:
        raise ReaderGone from exc


def figure_written(plot: str | None, *, json_out: bool) -> None:
    """Say where `--plot` wrote its figure: below the report, or on stderr beside `--json`, whose
    stdout is the JSON alone."""
    if plot is None:
        return
    from archplan.errors import printable

    if json_out:
        typer.echo(f"figure written to {printable(plot)}", file=sys.stderr)
    else:
        echo(f"figure written to {printable(plot)}")


class _OptionsTable(Table):
    """typer's --help option table, laid out for a narrow terminal. typer gives each option's long
    name, short name, negative name (`--no-json`) and negative short name a column of their own,
    and rich narrows every column alike once the terminal is too narrow for them: at 80 columns
    `plan --help` printed `--optimizer-mome…` and `--no-recompute-…`. Here an option's names share
    one column, one name a line, that never wraps nor cuts; the type and help columns take what is
    left and fold a long word (`fp8_dot_product_attention`) instead of cutting it."""

    def add_row(self, *renderables: RenderableType | None, **kwargs: object) -> None:
        if len(renderables) in (6, 7) and all(isinstance(cell, (str, Text)) for cell in renderables[-6:-2]):
            *required, long, short, negative, negative_short, kind, help_text = renderables
            # two long names (`--attention-kernel,--attention`) come as one comma-joined cell
            names = Text("\n").join(name for cell in (long, short, negative, negative_short)
                                     for name in (Text(cell) if isinstance(cell, str) else cell).split(",")
                                     if name.plain)
            if (kind.plain if isinstance(kind, Text) else kind) == "<bool>":
                # typer's own flags (--help, --install-completion, --show-completion) typed as a
                # value; archplan's hide it (metavar=""): a flag takes no value
                kind = ""
            if not self.columns:
                for _ in required:
                    self.add_column(no_wrap=True)
                self.add_column(no_wrap=True, highlight=self.highlight)
                self.add_column(overflow="fold", highlight=self.highlight)
                self.add_column(overflow="fold", highlight=self.highlight, ratio=1)
            if isinstance(help_text, Columns):  # typer's help cell: the text, then [default: ...]
                for item in help_text.renderables:
                    if isinstance(item, Text):
                        item.overflow = "fold"
            renderables = (*required, names, kind, help_text)
        super().add_row(*renderables, **kwargs)  # type: ignore[arg-type]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if len(self.columns) >= 3 and self.columns[-1].ratio:
            # a choice list is one word (`<megatron|zero|fsdp2|deepspeed>`), which rich would keep
            # whole at the help's expense: past a quarter of the width (and the cell's two columns
            # of padding) it folds, and the help keeps a third of the width (at most 30), where at
            # 80 columns it had 12 and `plan --help` ran to 771 lines of `FlashAttenti / on`
            self.columns[-2].max_width = options.max_width // 4 + 2
            self.columns[-1].min_width = min(30, options.max_width // 3)
        yield from super().__rich_console__(console, options)


def keep_option_names_whole() -> None:
    """typer's help builds its option tables through `typer.rich_utils.Table`: ours instead. Its
    command table adds its own columns first, which `_OptionsTable` leaves as they are."""
    typer.rich_utils.Table = _OptionsTable  # type: ignore[misc]
