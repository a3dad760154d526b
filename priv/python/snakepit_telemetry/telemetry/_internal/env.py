"""Settings read from ``SNAKEPIT_TELEMETRY_*`` environment variables.

Bad values fall back to the default (logged at debug level); reading a setting
never raises.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def positive_int(name: str, default: int) -> int:
    """An integer of at least 1; unset, empty or bad values give ``default``."""
    raw = os.environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        if raw.strip():
            log.debug("ignoring %s=%r: expected a positive integer", name, raw)
        return default
    return value


def seconds_from_ms(name: str, default_ms: int) -> float:
    """A non-negative millisecond setting, as seconds (0 stays 0: "off")."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default_ms / 1000
    try:
        ms = int(raw)
    except ValueError:
        ms = -1
    if ms < 0:
        log.debug("ignoring %s=%r: expected a non-negative integer", name, raw)
        ms = default_ms
    return ms / 1000
