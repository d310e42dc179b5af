"""A lean HTTP/1.1 client for the LLM targets (local vLLM, NVIDIA's cloud): the relay's hot path.

Why not aiohttp here: its client costs about 300 µs of CPU per relayed request on the appliance's
cores, most of the gateway's budget. This one is an asyncio protocol around httptools' response
parser (the parser uvicorn serves with) and a pool of keep-alive connections per target, and costs a
fraction of that (`python -m tests.bench.benchmark --only llm`). It speaks only what these upstreams
need: one origin per pool, requests with the whole body in hand, responses with Content-Length,
chunked or read-until-close bodies, TLS through the ssl module. No proxies, redirects, cookies or
compression (none is asked for: no Accept-Encoding is sent).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

# A stream the client reads slower than the engine writes is paused past this many buffered bytes.
PAUSE_ABOVE = 1 << 20
# Idle connections are dropped before the engines' own keep-alive (uvicorn: 5 s) ends them, so a
# request rarely meets a connection the other side has just closed.
IDLE_SECONDS = 4.0
# A connection lost this soon after the request was written was closed before the engine could have
# read it (a keep-alive connection it had just ended): resending cannot start a generation twice. A
# connection lost later may have carried a request the engine began to work on; it is never resent.
EARLY_LOSS_SECONDS = 0.5


class UpstreamError(Exception):
    """The request failed before a whole response was read; `reason` is safe to log and show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectFailed(UpstreamError):
    """No connection could be made: nothing of the request was sent."""


class ConnectionLost(UpstreamError):
    """The connection ended before the whole response was read."""

    def __init__(self, reason: str, after: float = 0.0) -> None:
        super().__init__(reason)
        self.after = after  # seconds between writing the request and losing the connection

    @property
    def early(self) -> bool:
        """Lost so soon that the engine cannot have started on the request."""
        return self.after < EARLY_LOSS_SECONDS


class ReadTimeout(UpstreamError):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.sent_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = self.complete = self.keep_alive = False
        self.until_close = False  # body delimited by the end of the connection
        self.pieces: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(ConnectionLost("malformed HTTP response", self._since_sent()))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and self.until_close and not self.complete:
            self.complete = True
            self._wake()
        elif not self.complete:
            reason = "connection reset" if self.head_done or exc else "connection closed"
            self._fail(ConnectionLost(reason, self._since_sent()))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # only meaningful before the body is parsed
        self.head_done = True
        self.until_close = (
            "content-length" not in self.headers
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
            and self.status not in (204, 304)
        )
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_ABOVE and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # For the pool and the response.

    def send(self, request: bytes) -> None:
        self._reset()
        assert self.transport is not None
        self.sent_at = time.monotonic()
        self.transport.write(request)

    def _since_sent(self) -> float:
        return time.monotonic() - self.sent_at if self.sent_at else 0.0

    async def wait(self, timeout: float) -> None:
        """Until the parser has news (head, body, end) or `timeout` seconds pass without any."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_later(timeout, self._time_out)
        try:
            await self.waiter
        finally:
            timer.cancel()
            self.waiter = None
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        data = b"".join(self.pieces) if len(self.pieces) != 1 else self.pieces[0]
        self.pieces.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        # A paused connection (a whole large body left unread) would stall the next response.
        return self.complete and self.keep_alive and not (self.closed or self.paused or self.error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _time_out(self) -> None:
        self._fail(ReadTimeout("timed out"))
        self.close()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class UpstreamResponse:
    """A response whose head is in; read the body whole or piece by piece, then `release()`."""

    __slots__ = ("_conn", "_pool", "_released", "headers", "status", "timeout")

    def __init__(self, pool: UpstreamPool, conn: _Connection, timeout: float) -> None:
        self._pool = pool
        self._conn = conn
        self.timeout = timeout  # seconds each wait for more of the body may take; the caller may change it
        self._released = False
        self.status = conn.status
        self.headers = conn.headers  # names in lower case

    async def read(self) -> bytes:
        conn = self._conn
        while not conn.complete:
            await conn.wait(self.timeout)
        return conn.take()

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked framing removed), each wait bounded by the read timeout."""
        conn = self._conn
        while True:
            if conn.pieces:
                yield conn.take()
            elif conn.complete:
                return
            else:
                await conn.wait(self.timeout)

    def release(self) -> None:
        """Back to the pool if the response was read to its end; otherwise the connection is closed
        (for a stream, that is how the engine learns the client has gone and stops generating)."""
        if not self._released:
            self._released = True
            self._pool._release(self._conn)


class UpstreamPool:
    """Keep-alive connections to one origin, with the headers every request to it carries."""

    def __init__(
        self, base_url: str, headers: dict[str, str], connect_timeout: float, ca_file: str | None = None
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.base_url = base_url
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = url.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self._ssl = ssl.create_default_context(cafile=ca_file) if url.scheme == "https" else None
        authority = url.netloc.rpartition("@")[2]
        fixed = {"host": authority, **headers}
        self._fixed_headers = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: deque[_Connection] = deque()
        self.in_flight = 0  # requests sent and not yet released: what a pool chooses its URL by

    async def request(
        self, method: str, path: str, body: bytes = b"", *, timeout: float, headers: bytes = b""
    ) -> UpstreamResponse:
        """Send a request; return once the response's head is in. `path` is relative to the base URL's
        path unless it starts with '/'; `headers` are extra header lines ("name: value\\r\\n" each).
        A pooled connection the other side closed as the request went out (before it can have read
        it) is replaced by a fresh one, once; one closed after a longer wait raises ConnectionLost,
        since the engine may have started on the request."""
        target = path if path.startswith("/") else f"{self.base_path}/{path}"
        length = b"content-length: %d\r\n" % len(body) if body or method != "GET" else b""
        request = b"%s %s HTTP/1.1\r\n%s%s%s\r\n%s" % (
            method.encode(),
            target.encode(),
            self._fixed_headers,
            headers,
            length,
            body,
        )
        self.in_flight += 1
        try:
            return await self._exchange(request, timeout)
        except BaseException:
            self.in_flight -= 1
            raise

    async def _exchange(self, request: bytes, timeout: float) -> UpstreamResponse:
        conn, reused = self._pooled(), True
        if conn is None:
            conn, reused = await self._connect(), False
        while True:
            conn.send(request)
            try:
                while not conn.head_done:
                    await conn.wait(timeout)
            except ConnectionLost as exc:
                conn.close()
                if not (reused and exc.early):
                    raise
                conn, reused = await self._connect(), False
                continue
            except BaseException:
                conn.close()
                raise
            return UpstreamResponse(self, conn, timeout)

    async def get(self, path: str, timeout: float) -> tuple[int, bytes]:
        """A small GET read whole within `timeout` seconds in all (for probes and discovery)."""
        async with asyncio.timeout(timeout):
            response = await self.request("GET", path, timeout=timeout)
            try:
                return response.status, await response.read()
            finally:
                response.release()

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _pooled(self) -> _Connection | None:
        deadline = time.monotonic() - IDLE_SECONDS
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.idle_since > deadline:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            raise ConnectFailed("connect timed out") from None
        except ConnectionRefusedError:
            raise ConnectFailed("connection refused") from None
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS handshake failed ({exc.reason or type(exc).__name__})") from None
        except OSError as exc:
            raise ConnectFailed(f"connection failed ({exc.strerror or type(exc).__name__})") from None
        return conn

    def _release(self, conn: _Connection) -> None:
        self.in_flight -= 1
        if not conn.reusable():
            conn.close()
            return
        now = time.monotonic()
        conn.idle_since = now
        self._idle.append(conn)
        # The oldest idle connections sit at the left; drop those past their time.
        while self._idle and (self._idle[0].closed or self._idle[0].idle_since < now - IDLE_SECONDS):
            self._idle.popleft().close()
