"""Who may open this worker's telemetry call: only the holder of its secret.

Elixir makes a random secret for each worker and starts the worker with it in
``SNAKEPIT_TELEMETRY_SECRET`` (``Snakepit.Telemetry.Config.worker_env/2`` with
``secret:``); the NIF sends it as the gRPC metadata entry
``x-snakepit-telemetry-secret`` on every telemetry call. A stream that knows a
secret refuses a ``StreamTelemetry`` or ``StreamTelemetryBatches`` call without
it, or with another one, with ``UNAUTHENTICATED``, *before* the call can touch
the active stream (a new call replaces the active one, so an unchecked call
from any local process could blind the owner, steer the worker or read its
events). Refusals are counted (``refused_calls`` in the stream's stats, sent to
Elixir with the other counters). The comparison takes constant time
(:func:`hmac.compare_digest`).

The secret is read from the environment once per process, by the first stream
created, and removed from ``os.environ`` then, so child processes started
later do not inherit it. (``/proc/<pid>/environ`` keeps the environment the
process was started with: a process of the same user, or root, can still read
it there; see the README's Security section.)

A stream without a secret (a worker started without
``SNAKEPIT_TELEMETRY_SECRET``) accepts every call, as before, and logs a
warning once per process.

The stderr backend needs no secret: its lines go to the worker's own stderr,
a pipe only the parent process that spawned the worker holds.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from typing import Any

import grpc

__all__ = [
    "FROM_ENV",
    "SECRET_ENV",
    "SECRET_HEADER",
    "CallAuth",
    "process_secret",
    "refuse",
    "warn_open_once",
]

log = logging.getLogger(__name__)

SECRET_ENV = "SNAKEPIT_TELEMETRY_SECRET"
SECRET_HEADER = "x-snakepit-telemetry-secret"


class _FromEnv:
    def __repr__(self) -> str:
        return "FROM_ENV"


# Default for ``TelemetryStream(secret=...)``: the process's secret (the environment).
FROM_ENV: Any = _FromEnv()

_lock = threading.Lock()
_loaded = False
_process_secret: bytes | None = None
_warned_open = False


def process_secret() -> bytes | None:
    """This process's secret (``None`` without one), read and removed from the
    environment on the first call."""
    global _loaded, _process_secret
    with _lock:
        if not _loaded:
            raw = os.environ.pop(SECRET_ENV, None)
            _process_secret = raw.strip().encode() if raw and raw.strip() else None
            _loaded = True
        return _process_secret


def _reset_for_tests(environ_secret: str | None = None) -> None:
    """Forget the process secret; the next :func:`process_secret` reads the
    environment again (tests only)."""
    global _loaded, _process_secret, _warned_open
    with _lock:
        _loaded = False
        _process_secret = None
        _warned_open = False
        if environ_secret is not None:
            os.environ[SECRET_ENV] = environ_secret


class CallAuth:
    """Checks the secret of incoming telemetry calls. ``repr`` never shows it."""

    __slots__ = ("_expected",)

    def __init__(self, secret: str | bytes | None | Any = FROM_ENV) -> None:
        if secret is FROM_ENV:
            expected = process_secret()
        elif secret is None or secret in ("", b""):
            expected = None
        elif isinstance(secret, str):
            expected = secret.encode()
        elif isinstance(secret, bytes):
            expected = secret
        else:
            raise TypeError("secret must be a str, bytes or None")
        self._expected = expected

    @property
    def required(self) -> bool:
        """Whether calls must carry the secret."""
        return self._expected is not None

    def __repr__(self) -> str:
        return f"CallAuth(required={self.required})"

    def secret(self) -> bytes | None:
        """The secret calls must carry (``None``: calls are not checked); the native
        stream hands it to its own server, which checks it the same way."""
        return self._expected

    def admits(self, context: grpc.ServicerContext) -> bool:
        """Whether the call may proceed: it carries the secret, or none is set."""
        expected = self._expected
        if expected is None:
            warn_open_once()
            return True
        try:
            given = _header(context)
        except Exception:
            return False
        # compare_digest takes time independent of where the values differ.
        return given is not None and hmac.compare_digest(given, expected)


def _header(context: grpc.ServicerContext) -> bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == SECRET_HEADER:
            return value.encode() if isinstance(value, str) else bytes(value)
    return None


def warn_open_once() -> None:
    """Warn (once per process) that telemetry calls are served without a secret."""
    global _warned_open
    if _warned_open:
        return
    _warned_open = True
    log.warning(
        "telemetry: serving a telemetry call without a secret (%s is not set): any local "
        "process that reaches this worker's address can read or steer its telemetry. "
        "Start the worker with Snakepit.Telemetry.Config.worker_env(pool, secret: secret). "
        "This warning is logged once.",
        SECRET_ENV,
    )


def refuse(context: grpc.ServicerContext) -> None:
    """End the call with ``UNAUTHENTICATED`` (raises, as ``context.abort`` does)."""
    context.abort(
        grpc.StatusCode.UNAUTHENTICATED, "telemetry call refused: missing or wrong secret"
    )
