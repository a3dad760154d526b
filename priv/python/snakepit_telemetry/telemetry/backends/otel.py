"""The ``otel`` backend: spans become OpenTelemetry spans, events become span events.

Needs the ``otel`` extra (``opentelemetry-api``; an SDK to export anything). It is
imported only when selected; if missing, selection falls back to ``none``.

* ``span(name, metadata)`` -> an OTel span ``name`` with the metadata as attributes
  and ``snakepit.correlation_id``; it is the current span inside the block. An
  exception is recorded on it (``record_exception``) and sets status ERROR.
* ``emit`` -> an event on the current recording span (attributes: metadata, then
  measurements, then ``snakepit.correlation_id``). With no recording span there is
  nothing to attach it to, so it is counted in ``dropped``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from .._internal.convert import Scalar
from .base import Backend, SpanFailure, error_fields

__all__ = ["CORRELATION_ATTRIBUTE", "OtelBackend"]

CORRELATION_ATTRIBUTE = "snakepit.correlation_id"
INSTRUMENTATION_NAME = "snakepit_bridge.telemetry"


class _OtelSpan(NamedTuple):
    span: Any
    context_token: object


class OtelBackend(Backend):
    """Maps spans/events onto an OTel tracer (the global provider unless one is given)."""

    name = "otel"

    def __init__(self, tracer_provider: Any = None) -> None:
        super().__init__()
        # ImportError propagates: selection turns it into the ``none`` fallback.
        from opentelemetry import context, trace
        from opentelemetry.trace import Status, StatusCode

        self._trace = trace
        self._context = context
        self._error_status = lambda text: Status(StatusCode.ERROR, text)
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)

    def emit(
        self,
        parts: tuple[str, ...],
        measurements: dict[str, Scalar],
        metadata: dict[str, str],
        timestamp_ns: int,
        correlation_id: str,
    ) -> None:
        span = self._trace.get_current_span()
        if not span.is_recording():
            self.count("dropped")
            return
        attributes: dict[str, Any] = {**metadata, **measurements}
        if correlation_id:
            attributes[CORRELATION_ATTRIBUTE] = correlation_id
        span.add_event(".".join(parts), attributes, timestamp_ns)

    def span_start(self, name: str, metadata: dict[str, str], correlation_id: str) -> object:
        attributes: dict[str, Any] = dict(metadata)
        if correlation_id:
            attributes[CORRELATION_ATTRIBUTE] = correlation_id
        span = self._tracer.start_span(name, attributes=attributes)
        token = self._context.attach(self._trace.set_span_in_context(span))
        return _OtelSpan(span, token)

    def span_end(
        self,
        token: object,
        duration_ns: int,
        error: BaseException | None,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(token, _OtelSpan):
            return
        span = token.span
        try:
            if extra:
                span.set_attributes(dict(extra))
            if error is not None:
                fields = error_fields(error)
                if isinstance(error, SpanFailure):
                    span.add_event(
                        "exception",
                        {
                            "exception.type": fields["error_type"],
                            "exception.message": fields["error_message"],
                        },
                    )
                else:
                    span.record_exception(error)
                span.set_status(
                    self._error_status(f"{fields['error_type']}: {fields['error_message']}")
                )
        finally:
            span.end()
            # Only detach where the span is still current: a span ended from another
            # context (the interceptor may) has no token here, and a mismatched detach
            # would log an error; that other context simply ends with it.
            if self._trace.get_current_span() is span:
                self._context.detach(token.context_token)  # type: ignore[arg-type]
