"""The telemetry methods on a ``grpc.aio`` server, as Snakepit v0.13's worker is.

:class:`~..stream.TelemetryStream` serves a call from a blocking generator that
uses ``grpc.ServicerContext`` (``is_active``, ``add_callback``, ``cancel``,
``send_initial_metadata``). A ``grpc.aio`` server could run it as a synchronous
handler on its thread pool, but then never tells it that a streaming call ended
(that context's callbacks only run for unary responses), so the generator would
wait on a quiet stream forever and hold a thread. :func:`aio_handler` runs it on
a daemon thread of its own instead, behind an ``async`` handler, with
:class:`AioContext` giving it those methods over the aio context: the call's end
(``add_done_callback``) is what ``is_active`` and ``add_callback`` report.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

_END = object()


def is_aio_server(server: object) -> bool:
    """True for a ``grpc.aio.Server``."""
    aio = getattr(grpc, "aio", None)
    return aio is not None and isinstance(server, aio.Server)


class AioContext:
    """The ``grpc.ServicerContext`` methods the stream uses, callable from its thread."""

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop, task: Any) -> None:
        self._context = context
        self._loop = loop
        self._task = task
        self._lock = threading.Lock()
        self._done = False
        self._callbacks: list[Callable[[], None]] = []
        context.add_done_callback(self._on_done)

    def _on_done(self, _context: Any) -> None:
        with self._lock:
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            with contextlib.suppress(Exception):  # as grpc.server does with a failing one
                callback()

    def is_active(self) -> bool:
        with self._lock:
            return not self._done

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the call ends; False (not registered) if it has."""
        with self._lock:
            if self._done:
                return False
            self._callbacks.append(callback)
            return True

    def send_initial_metadata(self, metadata: Any) -> None:
        future = asyncio.run_coroutine_threadsafe(
            self._context.send_initial_metadata(metadata), self._loop
        )
        future.result()

    def cancel(self) -> None:
        """End the call (a superseded one stuck in a send): cancels its handler task."""
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _blocking_requests(
    requests: AsyncIterator[Any], loop: asyncio.AbstractEventLoop
) -> Iterator[Any]:
    """The aio request stream as a blocking iterator; ends when the call does."""

    async def next_request() -> Any:
        return await requests.__anext__()

    while True:
        try:
            request = asyncio.run_coroutine_threadsafe(next_request(), loop).result()
        except BaseException:
            return  # end of stream, cancelled call, closed loop: no more controls
        yield request


def aio_handler(
    serve: Callable[[Iterator[Any], Any], Iterator[Any]],
) -> Callable[[AsyncIterator[Any], Any], AsyncIterator[Any]]:
    """An ``async`` stream-stream handler running the blocking ``serve`` on a thread."""

    async def handler(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        ctx = AioContext(context, loop, asyncio.current_task())
        responses = serve(_blocking_requests(requests, loop), ctx)
        asks: queue.SimpleQueue[asyncio.Future[Any] | None] = queue.SimpleQueue()

        def resolve(future: asyncio.Future[Any], item: Any) -> None:
            if not future.done():
                if isinstance(item, BaseException):
                    future.set_exception(item)
                else:
                    future.set_result(item)

        def pump() -> None:
            try:
                while (future := asks.get()) is not None:
                    try:
                        item = next(responses, _END)
                    except BaseException as exc:
                        item = exc
                    try:
                        loop.call_soon_threadsafe(resolve, future, item)
                    except RuntimeError:
                        return  # the loop is closed
                    if item is _END or isinstance(item, BaseException):
                        return
            finally:
                responses.close()  # unsent events go back to the queue

        threading.Thread(target=pump, name="snakepit-telemetry-aio", daemon=True).start()
        try:
            while True:
                future = loop.create_future()
                asks.put(future)
                item = await future
                if item is _END:
                    return
                yield item
        finally:
            asks.put(None)

    return handler
