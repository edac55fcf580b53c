"""Files archplan writes (-o specs and schemas, --plot figures): one set of refusals for all of them.
A file that exists is the user's and is replaced only with --force (principle 6)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from archplan.errors import ArchplanError

SPEC_SUFFIXES = (".yaml", ".yml")
SCHEMA_SUFFIXES = (".json",)


def check_target(path: str | Path, *, force: bool, field: str, suffixes: tuple[str, ...] = ()) -> Path:
    """`path` as a place to write, or a one-line refusal naming `field`: a wrong suffix (when
    `suffixes` are given), a folder, an existing file without --force, a missing parent folder or
    one that takes no file.
    Checked before any work, so that a refused write costs nothing."""
    if not str(path).strip():
        # Path("") is the current folder: an unset shell variable would name it
        raise ArchplanError(f"{field}: an empty path; give a file name")
    target = Path(path)
    if target.is_dir():
        raise ArchplanError("is a directory; expected a file", file=str(path), field=field)
    if suffixes and target.suffix.lower() not in suffixes:
        raise ArchplanError(f"must end in {', '.join(suffixes)}", file=str(path), field=field)
    if target.exists() and not force:
        raise ArchplanError("file exists; pass --force to overwrite", file=str(path), field=field)
    if not target.parent.is_dir():
        # the nearest folder on the path that exists: a file there is why, not a missing folder
        found = next(p for p in target.parents if p.exists())
        problem = f"{found} is a file, not a directory" if not found.is_dir() else "directory does not exist"
        raise ArchplanError(problem, file=str(path), field=field)
    if target.exists():  # replaced in place: the file itself must take writes (a read-only mount refuses even root)
        if not os.access(target, os.W_OK):
            raise ArchplanError("cannot write this file (read-only)", file=str(path), field=field)
        return target
    try:  # a read-only file system or folder refuses a scratch file, which leaves nothing behind
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as exc:
        raise ArchplanError(f"cannot create a file in its directory ({exc.strerror})",
                            file=str(path), field=field) from None
    return target


def write_text(target: Path, text: str) -> None:
    """Write `text`, an OS refusal (permissions, a full disk) as one line."""
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ArchplanError(f"cannot write: {exc.strerror}", file=str(target)) from None
