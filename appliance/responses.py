"""Responses for the relay's hot path as plain ASGI callables, without the framework's per-response
work (header objects, a task group per stream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from starlette.types import Receive, Scope, Send


class JSONBytesResponse:
    """A whole JSON body, already encoded, in two ASGI messages. `headers` are (lower-case name, value)
    pairs."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: bytes, status: int = 200, headers: Any = ()) -> None:
        self.body = body
        self.status = status
        length = b"%d" % len(body)
        self.headers = [(b"content-type", b"application/json"), (b"content-length", length), *headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


class EventStreamResponse:
    """Server-sent events, sent as the generator yields them. If the client goes away, the generator
    is closed at once (its `finally` runs), so the engine behind it stops generating."""

    __slots__ = ("events", "headers")

    def __init__(self, events: AsyncGenerator[bytes, None], headers: Any = ()) -> None:
        self.events = events
        self.headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None
        client_gone = asyncio.Event()

        async def watch() -> None:
            # The request body is read already: what receive() returns next is the disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass
            client_gone.set()
            streaming.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                watcher.cancel()
                await self.events.aclose()
        except asyncio.CancelledError:
            if not client_gone.is_set():
                raise
            streaming.uncancel()  # the cancellation was ours, and it is handled
