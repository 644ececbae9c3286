"""JSON that strict parsers read: Python's json writes float('nan') and inf as bare NaN / Infinity, which are not
JSON (jq, JavaScript and `json.loads(..., parse_constant=...)` reject them). A non-finite number becomes null."""
from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """json.dumps of `value` with non-finite numbers as null (other objects as their str, as before)."""
    return json.dumps(finite(value), allow_nan=False, default=kwargs.pop("default", str), **kwargs)
