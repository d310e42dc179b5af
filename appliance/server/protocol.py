"""The HTTP/1.1 connection the gateway serves: uvicorn's httptools protocol with the bounds that keep what an
unauthenticated client can cost constant.

- A request head (request line and headers) over `max_head_bytes` is answered 431 as soon as the cap is
  passed: httptools has no limit of its own and buffers a header of any size (a 100 MB header cost 11 s of
  CPU while every other request waited).
- A head must be complete within `head_timeout` seconds of the connection opening (or of the next request's
  first byte on a kept-alive connection), so idle or trickling connections cannot pile up. uvicorn's
  keep-alive timeout between requests stays as it is.
- Requests the parser rejects (a bad or doubled Content-Length, both Content-Length and Transfer-Encoding)
  are answered in OpenAI's error shape, not uvicorn's plain text.
- Past `max_connections` a new connection is closed at once, keeping file descriptors for the engines.
- Closing while the client is still sending (a 413 before the body was read, Python's urllib sending its
  whole body before it reads) happens in stages, as RFC 9112 section 9.6 describes: the answer is sent,
  the write side is shut, and what the client still sends is read and dropped, up to LINGER_MAX_BYTES or
  LINGER_SECONDS, before the socket is closed. Closing at once would reset the connection, and the
  client would see the reset instead of the answer.
"""

from __future__ import annotations

import asyncio
import http
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from appliance.errors import APIError

LINGER_MAX_BYTES = 64 * 1024 * 1024
LINGER_SECONDS = 10.0


class _ClosingInStages:
    """The socket's transport as uvicorn sees it: uvicorn closes a connection after its response when the
    client asked for `Connection: close`; if the request body is still arriving, that close lingers."""

    __slots__ = ("_protocol", "_transport", "is_closing", "write")

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.write = transport.write  # the hot path: no indirection per write
        self.is_closing = transport.is_closing

    def close(self) -> None:
        self._protocol.close_in_stages()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size cap, a head timeout, a connection cap, OpenAI-shaped
    protocol errors and closing in stages. `guarded_protocol()` makes one with the configured bounds."""

    max_head_bytes = 64 * 1024
    head_timeout = 10.0
    max_connections = 100_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._socket: asyncio.Transport | None = None
        self._head_open = True  # between requests, or inside a request line and headers
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_pending = False  # the head is in, the body is not complete yet
        self._lingering = False
        self._linger_parses = False  # while lingering, still parse (to see where the request ends)
        self._linger_bytes = 0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._keep_alive_after_body = True  # the request's keep-alive, once its body is all in

    # Connection.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._socket = transport
        super().connection_made(_ClosingInStages(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            self._close_now()
            return
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def shutdown(self) -> None:
        self._keep_alive_after_body = False  # a request still arriving gets the last answer here
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._linger_received(data)
        elif not self._head_open:
            self._feed(data)
        elif len(data) <= self.max_head_bytes - self._head_bytes:
            self._head_bytes += len(data)
            self._feed(data)
            if self._head_open and self._head_bytes and self._head_timer is None and not self._lingering:
                # Part of a head on a kept-alive connection: the rest gets the same time as a first head.
                # (A whole head in one read, the usual case, never needs a timer.)
                self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)
        else:
            # More than the head may still take: the head must end within what it may take.
            room = self.max_head_bytes - self._head_bytes
            self._head_bytes = self.max_head_bytes
            self._feed(data[:room])
            if self._lingering or self._socket.is_closing():  # type: ignore[union-attr]
                return
            if self._head_open:
                message = (
                    "The request line and headers are larger than this appliance accepts "
                    f"({self.max_head_bytes} bytes)."
                )
                self.reject(431, message, "request_header_too_large")
                return
            self.data_received(data[room:])

    def _feed(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # llhttp's reasons are fixed phrases ("Duplicate Content-Length"), never the client's bytes.
            reason = str(exc).rstrip(".") or "malformed request"
            self.reject(400, f"Invalid HTTP request: {reason}.", "invalid_http_request")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes the connection over: it gets the socket's own transport, and this
        # protocol's timers stop.
        self._cancel_timers()
        self.transport = self._socket  # type: ignore[assignment]
        super().handle_websocket_upgrade()

    # Parser callbacks.

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._body_pending = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        # An answer that starts before the whole body is in (a 413, a 429 busy) is followed by closing:
        # it must say `connection: close`, or the client reuses the connection and meets the close.
        if self._cycle_of_this_request():  # not for a WebSocket upgrade, which has no cycle
            self._keep_alive_after_body, self.cycle.keep_alive = self.cycle.keep_alive, False

    def on_message_complete(self) -> None:
        if self._cycle_of_this_request() and not self.cycle.response_started:
            self.cycle.keep_alive = self._keep_alive_after_body
        super().on_message_complete()
        self._body_pending = False
        self._head_open, self._head_bytes = True, 0
        if self._lingering:  # the request is all in: nothing unread is left to cause a reset
            self._close_now()

    def on_response_complete(self) -> None:
        if self._lingering or self._body_pending:
            # Answered before the body was read (a 413): keeping the connection would mean reading an
            # unbounded body; read it only up to the linger bounds, then close.
            self.server_state.total_requests += 1
            self.close_in_stages()
            return
        super().on_response_complete()

    def _cycle_of_this_request(self) -> bool:
        return self.cycle is not None and self.cycle.scope is self.scope

    # Rejecting and closing.

    def reject(self, status: int, message: str, code: str) -> None:
        """Answer in OpenAI's error shape, then close in stages without parsing anything more."""
        body = APIError(status, message, code=code).body()
        phrase = http.HTTPStatus(status).phrase.encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
        head += [b"%s: %s\r\n" % (name, value) for name, value in self.server_state.default_headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        head.append(b"connection: close\r\n\r\n")
        self._socket.write(b"".join(head) + body)  # type: ignore[union-attr]
        self._linger(parse=False)

    def close_in_stages(self) -> None:
        """Close; if the request is still arriving, linger first so the client reads the answer."""
        if self._lingering or self._socket.is_closing():  # type: ignore[union-attr]
            return
        if self._body_pending:
            self._linger(parse=True)
        else:
            self._close_now()

    def _linger(self, parse: bool) -> None:
        self._lingering, self._linger_parses = True, parse
        self._cancel_timers()
        self._unset_keepalive_if_required()
        socket = self._socket
        assert socket is not None
        if socket.can_write_eof():  # half-close: the answer is all there is (TLS cannot half-close)
            socket.write_eof()
        socket.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self._close_now)

    def _linger_received(self, data: bytes) -> None:
        self._linger_bytes += len(data)
        if self._linger_bytes > LINGER_MAX_BYTES:
            self._close_now()
        elif self._linger_parses:
            try:
                self.parser.feed_data(data)  # the response is complete: uvicorn drops the body
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                self._close_now()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes:
            message = f"The request line and headers did not arrive within {self.head_timeout:g} s."
            self.reject(408, message, "request_timeout")
        else:
            self._close_now()  # an idle connection: nobody is there to read an answer

    def _close_now(self) -> None:
        self._cancel_timers()
        self._lingering = True  # nothing more is parsed or answered
        if self._socket is not None and not self._socket.is_closing():
            self._socket.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None


def guarded_protocol(
    max_head_bytes: int, head_timeout: float, max_connections: int
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn (`http=`), with these bounds."""
    bounds = {
        "max_head_bytes": max_head_bytes,
        "head_timeout": head_timeout,
        "max_connections": max_connections,
    }
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), bounds)
