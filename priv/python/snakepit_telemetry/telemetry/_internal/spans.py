"""Span ids and bounded tracebacks for span events.

Every span gets a 64-bit id, sent on its start, stop and exception events
(``TelemetryEvent.span_id``); Elixir hands it to handlers as
``telemetry_span_context``. Ids are a per-process random base plus a counter, so
they never repeat within a process and two processes (other workers, restarted
workers) collide only by a 2**-62-scale chance. A forked child draws a new base:
it never reuses its parent's ids. Never 0, which means "no span" on the wire.

An exception event also carries the traceback: at most :data:`MAX_FRAMES` frames,
innermost first, each ``(file, line, function)`` with the file cut to its last
:data:`MAX_FRAME_CHARS` characters and the function to its first ones. Built only
when a span fails, by walking the traceback's frames (no source lines are read).
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["MAX_FRAMES", "MAX_FRAME_CHARS", "Frame", "frames", "new_span_id"]

MAX_FRAMES = 32
MAX_FRAME_CHARS = 256

Frame = tuple[str, int, str]

# ``new_span_id()`` returns a fresh span id: the next value of a counter that
# starts at a random 62-bit base (never 0), so ids are unique within the process,
# stay below 2**63 for any feasible number of spans, and collide across processes
# only by chance of order 2**-62 per pair. It is a bound ``__next__`` (about 30 ns,
# atomic under the GIL); a forked child gets a counter of its own (see _reseed).
new_span_id: Callable[[], int]


# The extension module whose counter gives the ids (see use_native), or None.
_native_ids: Any = None


def _reseed() -> None:
    global new_span_id
    base = (int.from_bytes(os.urandom(8), "little") >> 2) | 1
    if _native_ids is not None:
        _native_ids.seed_span_ids(base)
        new_span_id = _native_ids.new_span_id
    else:
        new_span_id = itertools.count(base).__next__


def use_native(module: Any) -> None:
    """Draw span ids from the extension's counter (``module.new_span_id``), which its
    spans use too, so ids stay unique across both; same base rule, reseeded at fork."""
    global _native_ids
    _native_ids = module
    _reseed()


_reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def _text(text: str) -> str:
    """``text`` as valid UTF-8 (a lone surrogate, e.g. from an undecodable file name, becomes ?)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("utf-8")


def frames(error: BaseException | None, tb: TracebackType | None = None) -> tuple[Frame, ...]:
    """The innermost frames of ``tb`` (default: ``error.__traceback__``), innermost first.

    Never raises: a traceback that cannot be read gives what was read so far.
    """
    if tb is None and error is not None:
        tb = error.__traceback__
    kept: deque[Frame] = deque(maxlen=MAX_FRAMES)
    try:
        while tb is not None:
            code = tb.tb_frame.f_code
            name = getattr(code, "co_qualname", code.co_name)
            file = code.co_filename
            if len(file) > MAX_FRAME_CHARS:
                file = file[-MAX_FRAME_CHARS:]
            kept.append((_text(file), tb.tb_lineno or 0, _text(name[:MAX_FRAME_CHARS])))
            tb = tb.tb_next
    except Exception:
        pass
    kept.reverse()
    return tuple(kept)
