"""Files archplan writes (-o specs and schemas, --plot figures): one set of refusals for all of them.
A file that exists is the user's and is replaced only with --force (principle 6)."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from archplan.errors import ArchplanError

SPEC_SUFFIXES = (".yaml", ".yml")
SCHEMA_SUFFIXES = (".json",)


def _special(path: Path) -> bool:
    """Whether `path` (through any link) is an existing file that is no regular file: /dev/stdout,
    a FIFO, a terminal. Judged by stat, which follows the link, not by the link's resolved name
    (/dev/stdout feeding a pipe resolves to /proc/PID/fd/pipe:[N], which names nothing)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def check_target(path: str | Path, *, force: bool, field: str, suffixes: tuple[str, ...] = ()) -> Path:
    """`path` as a place to write, or a one-line refusal naming `field`: a wrong suffix (when
    `suffixes` are given), a folder, an existing file without --force, a missing parent folder or
    one that takes no file. A symbolic link is judged by the file it points to, which is the one
    written; a link to nothing is the user's all the same and wants --force.
    Checked before any work, so that a refused write costs nothing."""
    if not str(path).strip():
        # Path("") is the current folder: an unset shell variable would name it
        raise ArchplanError(f"{field}: an empty path; give a file name")
    target = Path(path)
    try:
        os.stat(target)
    except OSError as exc:  # a loop of links names no file: realpath would pick one link to replace
        if exc.errno == errno.ELOOP:
            raise ArchplanError(f"cannot write: {exc.strerror}", file=str(path), field=field) from None
    real = Path(os.path.realpath(target))
    if real.is_dir():
        raise ArchplanError("is a directory; expected a file", file=str(path), field=field)
    if suffixes and target.suffix.lower() not in suffixes:
        raise ArchplanError(f"must end in {', '.join(suffixes)}", file=str(path), field=field)
    special = _special(target)
    if (real.exists() or os.path.lexists(target) or special) and not force:
        raise ArchplanError("file exists; pass --force to overwrite", file=str(path), field=field)
    if special:  # written into, in place (`write_whole`)
        if not os.access(target, os.W_OK):
            raise ArchplanError("cannot write this file (read-only)", file=str(path), field=field)
        return target
    if not real.parent.is_dir():
        # the nearest folder on the path that exists: a file there is why, not a missing folder
        found = next(p for p in real.parents if p.exists())
        problem = f"{found} is a file, not a directory" if not found.is_dir() else "directory does not exist"
        if target.is_symlink():  # the folder missing is the (last) link target's, not the link's
            problem = f"links to {real}, whose {problem}"
        raise ArchplanError(problem, file=str(path), field=field)
    if real.exists():  # replaced in place: the file itself must take writes (a read-only mount refuses even root)
        if not os.access(real, os.W_OK):
            raise ArchplanError("cannot write this file (read-only)", file=str(path), field=field)
        return target
    try:  # a read-only file system or folder refuses a scratch file, which leaves nothing behind
        with tempfile.TemporaryFile(dir=real.parent):
            pass
    except OSError as exc:
        raise ArchplanError(f"cannot create a file in its directory ({exc.strerror})",
                            file=str(path), field=field) from None
    return target


def write_whole(target: Path, write: Callable[[Path], None]) -> None:
    """Run `write` on a scratch file beside the file `target` names (through a link, its target),
    then rename it over that file: a full disk or a failing writer leaves the old file, or none,
    never half of one. The new file keeps the old one's permissions, ACLs and owner; a file new to
    the folder gets what open() would give it.
    Written in place instead, where a rename would not replace the same file: what is no regular
    file (/dev/stdout, a FIFO), a file with other hard links (they would keep the old text), a
    file whose folder takes no new entry or no rename over it (a sticky folder, `check_target`
    let --force replace the file itself)."""
    if _special(target):
        write(target)
        return
    real = Path(os.path.realpath(target))
    old = real.stat() if real.exists() else None
    if old is not None and old.st_nlink > 1:
        write(real)
        return
    try:
        # a short name (the target's own may already be near the file system's 255 bytes), created
        # as open() creates a file, so that the umask or the folder's default ACL applies
        scratch = _scratch_in(real.parent)
    except OSError:
        if old is None:
            raise
        write(real)
        return
    try:
        write(scratch)
        if old is not None:
            # the old file's permissions and ACLs (extended attributes), its owner where that
            # differs (root replacing a user's file; a setgid folder's group), the time of now
            try:
                shutil.copystat(real, scratch)
                os.utime(scratch)
                made = scratch.stat()
                if (made.st_uid, made.st_gid) != (old.st_uid, old.st_gid):
                    os.chown(scratch, old.st_uid, old.st_gid)
            except PermissionError:  # another's file, or attributes only its owner sets: written into
                scratch.unlink(missing_ok=True)
                write(real)
                return
        try:
            os.replace(scratch, real)
        except PermissionError:
            if old is None:
                raise
            scratch.unlink(missing_ok=True)
            write(real)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


def _scratch_in(folder: Path) -> Path:
    """A new empty file in `folder` under a name no other file has, made with mode 0666 as open()
    makes one (the umask, or the folder's default ACL, then applies)."""
    for _ in range(100):
        path = folder / f".archplan-{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no free scratch name", str(folder))


def os_reason(exc: BaseException) -> str:
    """The operating system's words for a failed write: an OSError's own, or the one a writer
    turned into another error while it cleaned up (matplotlib's PDF backend raises AttributeError
    from a full disk)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def write_text(target: Path, text: str) -> None:
    """Write `text` whole (`write_whole`), an OS refusal (permissions, a full disk) as one line."""
    try:
        write_whole(target, lambda scratch: scratch.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise ArchplanError(f"cannot write: {os_reason(exc)}", file=str(target)) from None
