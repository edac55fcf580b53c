"""Test-session settings.

Under CI (the `CI` environment variable, set by `.ci/run`'s runner) hypothesis is derandomized:
every CI run draws the same examples, so a submission's result does not depend on the draw. Local
runs keep hypothesis's random exploration (and its example database) to find new failures.

Under pytest-xdist (`-n auto`, the README's and CI's test command) each worker is a process of its
own on a core of its own: torch's intra-op pool is held to one thread per worker, before any test
imports torch, so two workers on two cores do not fight over four threads. Tests sharing an
expensive module-scoped fixture (the one pair of gloo processes, a wheel build, the published-runs
table) carry `pytest.mark.xdist_group`, so `--dist loadgroup` runs them on one worker and the
fixture once.
"""

from __future__ import annotations

import os

from hypothesis import settings

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
