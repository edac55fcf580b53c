"""The optional extras a command needs, checked up front so a missing one is one line, exit 2."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re

from archplan.errors import ArchplanError, first_line

# The oldest torch the whole suite passes on (2026-12-01: the suite run on 2.8, 2.10, 2.11, 2.12
# and 2.14, 2.9's APIs probed): 2.8-2.9 lack `F.grouped_mm` (the MoE experts), 2.8 also
# `aten.sym_is_contiguous`; 2.10-2.11's `torch.utils.flop_counter.sdpa_flop_count`, which verify's
# fvcore column calls, refuses grouped-query attention's K/V shapes; 2.12 lacks the DeviceMesh
# layout types and the FSDP memory-tracker internals that `verify --layout` follows.
# pyproject.toml declares the same range.
MIN_TORCH = (2, 13)
# by the distribution's name, as plot.py's hint: `-e '.[torch]'` meant the current directory,
# which is archplan's checkout only for a developer (from a wheel install it failed, or installed
# whatever project the user stood in)
INSTALL = "pip install 'torch>=2.13,<3' && pip install 'archplan[torch]'"


def require_torch(command: str) -> None:
    """`verify` and `bench` build real models; everything else runs without torch (a 2 GB wheel).

    The version is read from the installed distribution's metadata, so an old torch is refused
    before anything imports it (an import would fail on the missing ops with a traceback); a
    recent one is then imported, so one that fails to is a line too. A torch without metadata (a
    source tree on PYTHONPATH) is imported first; the imported module's `__version__` decides.
    """
    if importlib.util.find_spec("torch") is None:
        raise ArchplanError(f"`archplan {command}` needs PyTorch, which is not installed: {INSTALL}")
    try:
        version: str | None = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a source tree or a copy on PYTHONPATH: no metadata
        version = None
    if version is not None:
        check_release(command, version)
    try:
        # a wheel installed but broken (a CUDA build missing libcudnn, an extension that will not
        # load) passes both checks above; its failure is the install's, not the report's (cli.py
        # reads OSError as a write that failed)
        torch = importlib.import_module("torch")
    except Exception as exc:  # noqa: BLE001  whatever a broken build raises (ImportError, OSError, RuntimeError)
        installed = f"PyTorch {version}" if version else "PyTorch"
        raise ArchplanError(f"`archplan {command}`: {installed} is installed but fails to import "
                            f"({first_line(exc)}); reinstall it: {INSTALL}") from None
    # the module imported is the judge: a copy on PYTHONPATH shadows the installed distribution
    imported = getattr(torch, "__version__", None)
    if not isinstance(imported, str):
        raise ArchplanError(f"`archplan {command}`: the torch module at {getattr(torch, '__file__', '?')} states no "
                            f"version, so it is no PyTorch build: {INSTALL}")
    check_release(command, imported)


def check_release(command: str, version: str) -> None:
    """An old torch refused in one line."""
    if torch_release(version) < MIN_TORCH:
        raise ArchplanError(
            f"`archplan {command}` needs PyTorch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer "
            f"(the oldest the test suite passes on); found {version}: {INSTALL}"
        )


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string: '2.13.0+cpu' -> (2, 13), '2.8.0a0+git' -> (2, 8)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ArchplanError(f"cannot read the installed PyTorch version {version!r}")
    return int(match.group(1)), int(match.group(2))
