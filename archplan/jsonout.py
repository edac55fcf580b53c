"""`--json` output: RFC 8259 JSON, which has no Infinity or NaN.

A figure that overflows (training days at a bandwidth of 1e-300 GB/s) prints as null rather than as
Python's `Infinity`, which strict JSON parsers (jq, Go, JavaScript's JSON.parse) refuse.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps with every non-finite float as null (and refusing any left, e.g. in a custom type)."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)
