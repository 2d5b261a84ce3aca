"""Noticing at once that a client went away, so that its engine requests are aborted and their KV blocks
freed, rather than when the next token fails to send (or, for a non-streaming request, never).

Both helpers listen on the ASGI receive channel, so they must start after the request body has been read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

CLIENT_CLOSED_REQUEST = 499  # nginx's status for it: nobody reads it, but the access log shows it


async def until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, Response]) -> Response:
    """Run a handler's work, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()  # a no-op if it is done
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return task.result()


class EventStream(StreamingResponse):
    """Server-sent events. When the client disconnects, or the events end, the event generator is closed and
    on_close is called (even if the generator never started)."""

    def __init__(self, events: AsyncGenerator[str, None], on_close: Callable[[], None]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(until_disconnected(receive))
        try:
            await asyncio.wait({sending, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sending.cancel()
            watch.cancel()
            await asyncio.gather(sending, watch, return_exceptions=True)  # a send to a gone client raises
            await self.body_iterator.aclose()
            self.on_close()
