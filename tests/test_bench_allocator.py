"""The CPU sweep keeps freed memory in the process (bench/peak.py `keep_freed_memory`): a block over glibc's 32 MiB
mmap threshold, freed and allocated again, faults no page the second time."""

from __future__ import annotations

import importlib
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archplan.bench.peak import keep_freed_memory


def _huge_pages_always() -> bool:
    """Transparent huge pages on for every mapping: a fresh 64 MiB block then faults 2 MiB at a
    time (about 32 faults), and the 4 KiB page count the check reads says nothing."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"),
    pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages set to always: faults are not per page"),
]


def _faults_of_a_fresh_block() -> int:
    """Minor page faults of allocating and writing 64 MiB (a first block of that size is freed before)."""
    torch.ones(16 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _check_in_a_fresh_process() -> None:
    # the process a sweep runs in, bench's modules loaded: with torch and this module alone, glibc
    # 2.36 here served the 64 MiB blocks outside the heap the setting keeps (both faulted in full)
    importlib.import_module("archplan.bench.sweep")
    pages = (64 << 20) // resource.getpagesize()
    # glibc's defaults first: a 64 MiB block is mmapped and unmapped, every page faults anew (it
    # leaves the heap as it found it, so the setting's check below starts from a fresh heap too)
    assert _faults_of_a_fresh_block() > pages // 2
    with keep_freed_memory(torch.device("cpu")):
        _faults_of_a_fresh_block()  # the heap grows once
        assert _faults_of_a_fresh_block() < pages // 10


def test_freed_blocks_are_reused_only_under_the_setting() -> None:
    # a process of its own: an earlier test's heap decides where a block lands, not the setting
    code = "import tests.test_bench_allocator as t; t._check_in_a_fresh_process()"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
