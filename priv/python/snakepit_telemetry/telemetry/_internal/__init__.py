"""Private helpers for :mod:`snakepit_telemetry.telemetry`; not a stable API."""
