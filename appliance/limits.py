"""Request limits: bodies are read up to a cap, so an oversized upload is refused, not buffered."""

from __future__ import annotations

from starlette.requests import Request

from appliance.errors import APIError


def too_large(
    cap: int, subject: str = "The request body", param: str | None = None, code: str = "request_too_large"
) -> APIError:
    return APIError(
        413,
        f"{subject} is larger than this appliance accepts ({cap / 1024 / 1024:g} MB).",
        param=param,
        code=code,
    )


async def read_body(request: Request, cap: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed `cap` (by Content-Length or while read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "Invalid Content-Length header.")
        if int(declared) > cap:
            raise too_large(cap)
        return await request.body()
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > cap:
            raise too_large(cap)
        parts.append(part)
    return b"".join(parts)
