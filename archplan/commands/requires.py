"""The optional extras a command needs, checked up front so a missing one is one line, exit 2."""

from __future__ import annotations

import importlib.util

from archplan.errors import ArchplanError


def require_torch(command: str) -> None:
    """`verify` and `bench` build real models; everything else runs without torch (a 2 GB wheel)."""
    if importlib.util.find_spec("torch") is None:
        raise ArchplanError(
            f"`archplan {command}` needs PyTorch, which is not installed: "
            "pip install torch==2.13.0 && pip install -e '.[torch]' (any torch 2.6+ works)"
        )
