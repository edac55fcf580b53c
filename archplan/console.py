"""How the commands end when the reader of a pipe stops early (`archplan plan ... | head`).

rich's consoles (archplan's tables, typer's help, progress bars) and click's echo both exit with
code 1 on a closed pipe, which archplan's commands use for "a check disagrees" or "no layout
fits"; a `pipefail` CI job would read it as a failure. The reader took what it wanted: both raise
`ReaderGone` instead (`quiet_on_closed_pipe`, `echo`), and `cli.main` ends with 0.
"""

from __future__ import annotations

import typer
from rich.console import Console


class ReaderGone(Exception):
    """The reader of stdout closed it: nothing more to write, and not a failure. Not an OSError,
    so that click, which turns a broken pipe into exit 1, lets it through."""


def _reader_gone(console: Console) -> None:
    console.quiet = True
    raise ReaderGone


def quiet_on_closed_pipe() -> None:
    """Every rich console of this process raises `ReaderGone` on a closed pipe: rich's own
    handler (`Console.on_broken_pipe`, its documented hook) exits 1. Set once, by `cli.main`: the
    consoles typer makes for `--help` are not archplan's to construct."""
    Console.on_broken_pipe = _reader_gone  # type: ignore[method-assign]


def echo(text: str, nl: bool = True) -> None:
    """`typer.echo` to stdout."""
    try:
        typer.echo(text, nl=nl)
    except BrokenPipeError as exc:
        raise ReaderGone from exc
