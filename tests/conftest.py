"""Test-session settings.

Under CI (the `CI` environment variable, set by `.ci/run`'s runner) hypothesis is derandomized:
every CI run draws the same examples, so a submission's result does not depend on the draw. Local
runs keep hypothesis's random exploration (and its example database) to find new failures.

Under pytest-xdist (`-n auto`, the README's and CI's test command) each worker is a process of its
own on a core of its own: torch's intra-op pool is held to one thread per worker, before any test
imports torch, so two workers on two cores do not fight over four threads. Tests sharing an
expensive module-scoped fixture (a wheel build, the published-runs table) carry
`pytest.mark.xdist_group`, so `--dist loadgroup` runs them on one worker and the fixture once. The
gloo equivalence cases read the results of one pair of processes started in the background when the
session begins (`gloo_pair`), and run last.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CLI honours a COLUMNS the user sets (`render.report_console`); a shell that exports its own
# would change every captured table. Tests that mean a width set it themselves.
os.environ.pop("COLUMNS", None)

# no per-example deadline anywhere: tests check behaviour, and a loaded host must not fail a
# property by its speed (hypothesis's default is 200 ms an example)
settings.register_profile("local", deadline=None)
settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "local")


GLOO = "gloo"  # the xdist group of tests/test_distributed.py's equivalence cases


def _in_gloo_group(item: pytest.Item) -> bool:
    marker = item.get_closest_marker("xdist_group")
    return marker is not None and (marker.args or (marker.kwargs.get("name"),))[0] == GLOO


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A worker collects its garbage once and freezes the rest before it reports finished. execnet
    sends a worker that is still busy 5 s after the controller's shutdown a SIGINT
    (`gateway_base._terminate_execution`), and a worker that has imported torch (and, through meta
    kernels, torch._dynamo and sympy) could spend that long in the collector's final passes: the
    KeyboardInterrupt then surfaced as a PytestUnraisableExceptionWarning inside hypothesis's gc
    callback at the end of the run. xdist reports a worker finished from a hook wrapper around this
    hook, so the collection happens before the controller starts waiting; archplan's own CLI
    freezes its heap at exit for the same reason (`cli.main`)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        gc.collect()
        gc.freeze()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The gloo cases last: they wait for the pair of processes started when the session began,
    which by then has had the whole suite's time to finish."""
    items.sort(key=_in_gloo_group)


@pytest.fixture(scope="session", autouse=True)
def gloo_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """The directory the one pair of gloo processes writes its results into, started in the
    background by the first xdist worker to get here (every worker collects the same cases), or
    None when no gloo case is selected. Run alongside the suite, the pair shares the cores with
    the workers instead of holding one of them blocked in a fixture until it is done."""
    cases = [item.callspec.params["case"] for item in request.session.items if _in_gloo_group(item)]
    if not cases:
        yield None
        return
    from gloo_pair import start

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    out = tmp_path_factory.getbasetemp().parent / f"gloo-{run}" if run else tmp_path_factory.getbasetemp() / GLOO
    try:
        out.mkdir()
    except FileExistsError:  # another worker started it
        yield out
        return
    pair = start(out, cases)
    yield out
    pair.wait()  # another worker may still read its files
