"""The CPU sweep keeps freed memory in the process (bench/sweep.py): a block over glibc's 32 MiB
mmap threshold, freed and allocated again, faults no page the second time."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from archplan.bench.sweep import _keep_freed_memory

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt")


def _faults_of_a_fresh_block() -> int:
    """Minor page faults of allocating and writing 64 MiB (a first block of that size is freed before)."""
    torch.ones(16 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_blocks_are_reused_inside_and_returned_outside() -> None:
    pages = (64 << 20) // resource.getpagesize()
    with _keep_freed_memory(torch.device("cpu")):
        assert _faults_of_a_fresh_block() < pages // 10
    # glibc's defaults again: the 64 MiB block is mmapped and unmapped, every page faults anew
    assert _faults_of_a_fresh_block() > pages // 2
