"""The one error type the CLI turns into a single line and exit code 2."""

from __future__ import annotations

import os


class ArchplanError(Exception):
    """Bad input or an impossible request: shown as one line, exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None, field: str | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.field = field
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file:
            where = printable(self.file)
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"


def dotted(path: tuple[object, ...]) -> str:
    """A field path as `attention.n_kv_heads`; a YAML key holding a line break or another control
    character is quoted as Python writes it, so the one-line error stays one line."""
    # a key of half a megabyte (YAML's `? ...`) would be the whole "one line"
    return ".".join(clipped(printable(str(part)), 60) for part in path)


def clipped(text: str, most: int) -> str:
    """A value's text in a one-line message: its first `most` characters, "…" where it goes on."""
    return text[:most] + "…" if len(text) > most else text


def printable(text: str) -> str:
    """`text` as is, or quoted as Python writes it where it holds a line break or another control
    character (a YAML key, a file's name), so a one-line message stays one line. A file name's
    bytes an ASCII locale could not decode (surrogate escapes, `\udce6`) are read as UTF-8 first."""
    text = as_text(text)
    return text if text.isprintable() else repr(text)


def as_text(name: str) -> str:
    """A file system name as text: under an ASCII locale (PYTHONUTF8=0, LC_ALL=C) Python decodes a
    UTF-8 name's bytes to surrogate escapes, which a spec's name refuses and a message shows raw.
    Only those escapes are touched: text a locale decoded (Latin-1's "Modèle") stays as it is."""
    if not any("\udc80" <= char <= "\udcff" for char in name):
        return name
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # escapes that never came from the file system
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
