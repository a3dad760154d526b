"""gRPC server interceptor that turns every BridgeService call into a telemetry span.

Install it on the worker's own server::

    server = grpc.server(executor, interceptors=[TelemetryInterceptor()])

For each RPC (except ``StreamTelemetry``, which would otherwise report on itself
forever) it emits ``python.call.start`` / ``python.call.stop`` or
``python.call.exception`` with ``rpc_method`` metadata, and runs the handler with
the correlation ID from the ``x-snakepit-correlation-id`` header set, so events the
handler emits carry it too. For streaming responses the span and the ID cover
the whole iteration. ``context.abort(code, ...)`` (and a handler that sets a non-OK
code and returns) is reported as an exception whose ``error_type`` is the code's
name; a response stream the client abandons ends as ``CANCELLED``. Telemetry
failures never reach the RPC.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from ._internal import errors
from ._internal.core import safe_str, span
from .correlation import CORRELATION_HEADER, set_correlation_id

__all__ = [
    "CALL_SPAN",
    "STREAM_TELEMETRY_BATCHES_METHOD",
    "STREAM_TELEMETRY_METHOD",
    "TelemetryInterceptor",
]

CALL_SPAN = "python.call"
STREAM_TELEMETRY_METHOD = "/snakepit.bridge.BridgeService/StreamTelemetry"
STREAM_TELEMETRY_BATCHES_METHOD = "/snakepit.bridge.BridgeService/StreamTelemetryBatches"

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _header(metadata: Iterable[Any] | None) -> str | None:
    """The correlation ID from the invocation metadata, if the client sent one."""
    for key, value in metadata or ():
        if key == CORRELATION_HEADER:
            return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
    return None


def _status(context: grpc.ServicerContext) -> tuple[grpc.StatusCode | None, str]:
    """The status code and details the handler set (via abort or set_code), if any."""
    try:
        code = context.code()
        details = context.details()
    except Exception:
        errors.count()
        return None, ""
    if isinstance(details, bytes):
        details = details.decode("utf-8", "replace")
    return (code if isinstance(code, grpc.StatusCode) else None), (details or "")


class _Call:
    """One intercepted RPC: its span plus the context the handler runs in.

    The handler (and, for streaming responses, every step of its iterator) runs
    inside one private ``Context`` holding the correlation ID, so the ID is in force
    whichever thread resumes it and never leaks into gRPC's own threads.
    """

    __slots__ = ("_ctx", "_done", "_span")

    def __init__(self, span_name: str, method: str, correlation_id: str | None) -> None:
        self._done = False
        self._ctx = contextvars.copy_context()
        self._span: span | None = None
        try:
            if correlation_id is not None:
                self._ctx.run(set_correlation_id, correlation_id)
            self._span = span(span_name, {"rpc_method": method})
            self._ctx.run(self._span.__enter__)  # inside ctx so the span picks up the ID
        except Exception:
            self._span = None  # no telemetry for this call, but the handler still runs
            errors.count()

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._ctx.run(fn, *args)

    def returned(self, context: grpc.ServicerContext) -> None:
        """The handler completed; a non-OK code it set still makes the call a failure."""
        if self._done or self._span is None:
            return
        self._done = True
        try:
            code, details = _status(context)
            if code is not None and code is not grpc.StatusCode.OK:
                self._span.fail(code.name, details)
            else:
                self._span.stop({"result": "success"})
        except Exception:
            errors.count()

    def failed(self, exc: BaseException, context: grpc.ServicerContext) -> None:
        """The handler raised; ``context.abort`` raises a bare ``Exception()``."""
        if self._done or self._span is None:
            return
        self._done = True
        try:
            code, details = _status(context)
            aborted = type(exc) is Exception and not exc.args
            if aborted and code is not None and code is not grpc.StatusCode.OK:
                self._span.fail(code.name, details)
            elif isinstance(exc, GeneratorExit):
                # The response iterator was closed before it finished: the client went away.
                self._span.fail(grpc.StatusCode.CANCELLED.name, "response stream closed early")
            else:
                self._span.fail(type(exc).__name__, safe_str(exc), traceback=exc.__traceback__)
        except Exception:
            errors.count()


class TelemetryInterceptor(grpc.ServerInterceptor):
    """Spans and correlation IDs for every RPC of a (sync) gRPC server.

    ``skip`` lists full method names to leave alone; by default only
    the two telemetry streams, whose events would describe the transport itself.
    """

    def __init__(
        self,
        span_name: str = CALL_SPAN,
        skip: Iterable[str] = (STREAM_TELEMETRY_METHOD, STREAM_TELEMETRY_BATCHES_METHOD),
    ) -> None:
        self._span_name = span_name
        self._skip = frozenset(skip)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        try:
            method = handler_call_details.method
            if method in self._skip:
                return handler
            correlation_id = _header(handler_call_details.invocation_metadata)
            if isinstance(method, bytes):
                method = method.decode("utf-8", "replace")
            return self._wrap(handler, str(method), correlation_id)
        except Exception:
            errors.count()
            return handler  # an unusual handler we cannot wrap still gets served

    def _wrap(
        self, handler: grpc.RpcMethodHandler, method: str, correlation_id: str | None
    ) -> grpc.RpcMethodHandler:
        span_name = self._span_name
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        def unary(behavior: Behavior) -> Behavior:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                rpc = _Call(span_name, method, correlation_id)
                try:
                    response = rpc.run(behavior, request, context)
                except BaseException as exc:
                    rpc.failed(exc, context)
                    raise
                rpc.returned(context)
                return response

            return call

        def streaming(behavior: Behavior) -> Behavior:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                rpc = _Call(span_name, method, correlation_id)
                responses: Iterator[Any] | None = None
                try:
                    responses = iter(rpc.run(behavior, request, context))
                    while True:
                        try:
                            item = rpc.run(next, responses)
                        except StopIteration:
                            break
                        yield item
                except BaseException as exc:
                    rpc.failed(exc, context)
                    if isinstance(exc, GeneratorExit) and responses is not None:
                        close = getattr(responses, "close", None)
                        if close is not None:
                            with contextlib.suppress(Exception):
                                rpc.run(close)
                    raise
                rpc.returned(context)

            return call

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
