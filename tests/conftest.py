"""Test-session settings.

Under CI (the `CI` environment variable, set by `.ci/run`'s runner) hypothesis is derandomized:
every CI run draws the same examples, so a submission's result does not depend on the draw. Local
runs keep hypothesis's random exploration (and its example database) to find new failures.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
