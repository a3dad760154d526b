"""Private helpers for :mod:`snakepit_bridge.telemetry`; not a stable API."""
