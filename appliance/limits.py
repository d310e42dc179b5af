"""Request limits: bodies are read up to a cap, so an oversized upload is refused, not buffered."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
            raise APIError(
                429,
                f"The appliance is busy with {self.active} {self.what} requests; try again shortly.",
                code="busy",
                headers={"retry-after": "2"},
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
