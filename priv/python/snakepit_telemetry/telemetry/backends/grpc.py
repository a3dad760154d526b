"""The ``grpc`` backend: the stream path (:class:`TelemetryStream` or
:class:`NativeTelemetryStream`), unchanged.

It bypasses the generic convert step on purpose: the stream validates, samples,
filters and counts itself, and spans keep its whole-span sampling decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .._internal import spans
from .._internal.convert import suffixed
from .._internal.defaults import get_stream
from ..native_stream import AnyTelemetryStream
from .base import Backend, error_fields

__all__ = ["GrpcBackend"]


class _GrpcSpan(NamedTuple):
    stream: AnyTelemetryStream
    name: object
    metadata: Any
    correlation_id: object
    sampled: bool
    span_id: int


class GrpcBackend(Backend):
    """Writes to a fixed stream, or to the process default one (``set_stream``) at each call."""

    name = "grpc"

    def __init__(self, stream: AnyTelemetryStream | None = None) -> None:
        super().__init__()
        self._fixed = stream
        self._get_default: Callable[[], AnyTelemetryStream] | None = None
        if stream is None:
            self._get_default = get_stream

    @property
    def fixed_stream(self) -> AnyTelemetryStream | None:
        """The stream given at construction; ``None`` means the process default."""
        return self._fixed

    @property
    def stream(self) -> AnyTelemetryStream:
        """The stream events go to right now."""
        if self._fixed is not None:
            return self._fixed
        assert self._get_default is not None
        return self._get_default()

    def handle_emit(
        self, event: object, measurements: object, metadata: object, correlation_id: object
    ) -> None:
        try:
            self.stream.emit_event(event, measurements, metadata, correlation_id)  # type: ignore[arg-type]
        except Exception:
            self.count("errors")

    def handle_span_start(self, name: object, metadata: object, correlation_id: object) -> object:
        """Sample once for the whole span (with the rate of ``<name>.start``)."""
        stream = self.stream
        token = _GrpcSpan(stream, name, metadata, correlation_id, True, spans.new_span_id())
        try:
            start = suffixed(name, "start")
            token = token._replace(sampled=stream.sample(start))
            stream.emit_event(
                start,
                {"system_time": time.time_ns()},
                metadata,  # type: ignore[arg-type]
                correlation_id,  # type: ignore[arg-type]
                token.sampled,
                token.span_id,
            )
        except Exception:
            self.count("errors")
        return token

    def handle_span_end(
        self,
        token: object,
        duration_ns: int,
        error: BaseException | None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(token, _GrpcSpan):
            return
        try:
            meta = token.metadata
            stack: tuple[spans.Frame, ...] = ()
            if error is not None:
                suffix = "exception"
                extra = error_fields(error)
                stack = spans.frames(error)
            else:
                suffix = "stop"
            if extra:
                meta = {**meta, **extra}
            token.stream.emit_event(
                suffixed(token.name, suffix),
                {"duration": duration_ns},
                meta,
                token.correlation_id,  # type: ignore[arg-type]
                token.sampled,
                token.span_id,
                stack,
            )
        except Exception:
            self.count("errors")

    def stats(self) -> dict[str, Any]:
        """The stream's counters plus ``dropped`` (all ``dropped_*``) and ``errors``."""
        stats: dict[str, Any] = dict(self.stream.stats())
        own = super().stats()
        stats["dropped"] = sum(v for k, v in stats.items() if k.startswith("dropped_"))
        stats["errors"] = int(stats.get("internal_errors", 0)) + own["errors"]
        return stats
