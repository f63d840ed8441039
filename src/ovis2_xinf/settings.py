"""Integer settings read from the environment (``OVIS2_XINF_*``): one parser, so that every
bad value fails the same way, naming the variable, when a model loads."""

from __future__ import annotations

import os
from typing import Mapping, Optional


def env_int(name: str, default: int, high: Optional[int] = None, environ: Mapping[str, str] = os.environ) -> int:
    """``name``'s value, at least 1 and at most ``high``, or ``default`` when it is unset or blank."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be at least 1")
    if high is not None and value > high:
        raise ValueError(f"{name}={raw!r} must be from 1 to {high}")
    return value
