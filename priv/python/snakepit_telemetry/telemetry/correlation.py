"""The current correlation ID, carried in a :class:`contextvars.ContextVar`.

``emit`` and ``span`` fall back to it when no ``correlation_id`` is passed, so a
request's ID set once (e.g. by :class:`TelemetryInterceptor` from the
``x-snakepit-correlation-id`` header) reaches every event its code emits.

Propagation follows contextvars semantics:

* asyncio tasks copy the context when created, so they see the ID automatically;
* a plain ``threading.Thread`` starts with an empty context and does *not* see it;
  run the target with ``contextvars.copy_context().run(fn, ...)`` or wrap it with
  :func:`wrap` (also right for ``executor.submit(wrap(fn), ...)``).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

__all__ = [
    "CORRELATION_HEADER",
    "correlation",
    "get_correlation_id",
    "reset_correlation_id",
    "set_correlation_id",
    "wrap",
]

CORRELATION_HEADER = "x-snakepit-correlation-id"

_P = ParamSpec("_P")
_R = TypeVar("_R")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "snakepit_correlation_id", default=None
)


def get_correlation_id() -> str | None:
    """The ID in force in the current context, or ``None``."""
    return _current.get()


def set_correlation_id(correlation_id: str | None) -> contextvars.Token[str | None]:
    """Set the ID for the current context; pass the token to :func:`reset_correlation_id`."""
    return _current.set(correlation_id)


def reset_correlation_id(token: contextvars.Token[str | None]) -> None:
    """Restore the ID that was in force before the matching ``set_correlation_id``."""
    _current.reset(token)


@contextmanager
def correlation(correlation_id: str | None) -> Iterator[str | None]:
    """``with correlation("abc"): ...`` sets the ID for the block and restores it after."""
    token = _current.set(correlation_id)
    try:
        yield correlation_id
    finally:
        _current.reset(token)


def wrap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Bind ``fn`` to a snapshot of the current context, for another thread or executor.

    Each call runs in its own copy of the snapshot: one ``Context`` cannot be
    entered by two threads at once, and a call's own changes should not leak
    into the next call.
    """
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return captured.copy().run(fn, *args, **kwargs)

    return run
