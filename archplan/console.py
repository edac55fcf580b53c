"""Where every command writes its output: rich's console and `echo`, both ending quietly when the
reader of a pipe stops early (`archplan plan ... | head`).

rich's console and click both exit with code 1 on a closed pipe, which archplan's commands use for
"a check disagrees" or "no layout fits"; a `pipefail` CI job would read it as a failure. The reader
took what it wanted: they raise `ReaderGone` instead, and `cli.main` ends with 0.
"""

from __future__ import annotations

import typer
from rich.console import Console as RichConsole


class ReaderGone(Exception):
    """The reader of stdout closed it: nothing more to write, and not a failure. Not an OSError,
    so that click, which turns a broken pipe into exit 1, lets it through."""


class Console(RichConsole):
    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise ReaderGone


def echo(text: str, nl: bool = True) -> None:
    """`typer.echo` to stdout."""
    try:
        typer.echo(text, nl=nl)
    except BrokenPipeError as exc:
        raise ReaderGone from exc
