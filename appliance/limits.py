"""Request limits: bodies are read up to a cap, so an oversized upload is refused, not buffered."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from starlette.types import Receive, Scope

from appliance.errors import APIError
from appliance.middleware import request_header


def too_large(
    cap: int, subject: str = "The request body", param: str | None = None, code: str = "request_too_large"
) -> APIError:
    return APIError(
        413,
        f"{subject} is larger than this appliance accepts ({cap / 1024 / 1024:g} MB).",
        param=param,
        code=code,
    )


async def read_body(scope: Scope, receive: Receive, cap: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed `cap` (by Content-Length or while read)."""
    declared = request_header(scope, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "Invalid Content-Length header.")
        if int(declared) > cap:
            raise too_large(cap)
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(400, "The client went away before sending the whole request body.")
        part = message.get("body", b"")
        size += len(part)
        if size > cap:
            raise too_large(cap)
        parts.append(part)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def busy(message: str, retry_after: int = 2) -> APIError:
    """429 `busy`: the client should come back after `retry_after` seconds."""
    return APIError(429, message, code="busy", headers={"retry-after": str(retry_after)})


class Admission:
    """Caps the requests a route works on at once, so that queued uploads cannot exhaust memory;
    past the cap the client gets a 429 with Retry-After instead of a long wait."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.active = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise busy(f"The appliance is busy with {self.active} {self.what} requests; try again shortly.")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class WaitingLine:
    """At most `limit` holders at once; the rest wait their turn in arrival order, at most `max_waiting`
    of them and each for at most `timeout` seconds. Past either bound the client gets 429 `busy` with
    Retry-After: a queue that can grow without bound, or a wait without end, would turn an overload
    into timeouts for everyone."""

    def __init__(self, limit: int, max_waiting: int, timeout: float, what: str) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.what = what
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise self._busy()
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            async with asyncio.timeout(self.timeout):
                await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self._release()  # the slot was handed over just as this wait ended: pass it on
            elif turn in self._waiters:  # still in line (a release may already have skipped it)
                self._waiters.remove(turn)
            if isinstance(exc, TimeoutError):
                raise self._busy() from None
            raise

    def _release(self) -> None:
        """Hand the slot straight to the next in line, so nobody can overtake the queue."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.active -= 1

    def _busy(self) -> APIError:
        return busy(
            f"The {self.what} is busy ({self.active} requests running, {self.waiting} waiting); "
            "try again shortly."
        )
