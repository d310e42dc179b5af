"""Server-sent events as the engines send them: a byte stream cut into whole events.

The SSE specification allows three line endings (LF, CRLF and CR alone), so an event ends at any blank
line: `\\n\\n`, `\\r\\n\\r\\n` or `\\r\\r`. vLLM and NVIDIA's cloud send LF; anything else is turned into LF
here, so the rest of the relay handles one form. An LF-only stream costs nothing more than finding
its blank lines.
"""

from __future__ import annotations

from typing import Any

import orjson

ERROR_KEY = b'"error"'  # inside a JSON string a quote is escaped, so this only matches a key or a value


class EventSplitter:
    """Feed pieces of the body as they arrive; get back the events they complete."""

    __slots__ = ("_cr", "_crlf", "_rest")

    def __init__(self) -> None:
        self._rest = b""
        self._crlf = False  # the engine ends lines with CR (or CRLF): normalise everything from now on
        self._cr = False  # the last piece ended in CR: its LF may be the next piece's first byte

    def feed(self, data: bytes) -> bytes:
        """The events now complete, LF-separated, each ending in a blank line; b"" if none is."""
        if not self._crlf:
            # The usual case: LF only, and a piece ends where an event does.
            buffer = self._rest + data if self._rest else data
            complete, separator, rest = buffer.rpartition(b"\n\n")
            if separator or b"\r" not in rest:
                self._rest = rest
                return buffer if not rest else complete + separator
            self._crlf, self._rest, data = True, b"", buffer  # nothing of it was returned yet
        buffer = self._rest + self._normalise(data)
        complete, separator, self._rest = buffer.rpartition(b"\n\n")
        return complete + separator

    def rest(self) -> bytes:
        """What is left when the body ends: an event without its blank line, if any (without its line
        endings: the caller ends it)."""
        rest = self._rest.rstrip(b"\n")
        self._rest, self._cr = b"", False
        return rest

    def _normalise(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def data_of(event: bytes) -> bytes | None:
    """The data of one event (its `data:` lines joined), or None if it has none."""
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)


def json_of(event: bytes) -> Any:
    """The event's data parsed as JSON, or None when it is not JSON (`[DONE]`, a comment)."""
    data = data_of(event)
    if data is None or not data.startswith(b"{"):
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def is_error(payload: Any) -> bool:
    """An engine's in-band error: OpenAI's `{"error": {...}}` or vLLM's older `{"object": "error"}`."""
    return isinstance(payload, dict) and ("error" in payload or payload.get("object") == "error")


def split_at_error(events: bytes) -> tuple[bytes, bytes] | None:
    """(the events before the first error event, that error event) if `events` holds one, else None."""
    if ERROR_KEY not in events:
        return None
    start = 0
    for event in events.split(b"\n\n"):
        if ERROR_KEY in event and is_error(json_of(event)):
            return events[:start], event + b"\n\n"
        start += len(event) + 2
    return None
