"""The relay's HTTP client against raw loopback servers that behave as engines do, well and badly:
keep-alive, connections closed under it, chunked and read-until-close bodies, stalls, garbage,
TLS, and a client that reads slower than the engine writes."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from appliance.upstream_http import (
    EARLY_LOSS_SECONDS,
    ConnectFailed,
    ConnectionLost,
    ReadTimeout,
    UpstreamPool,
)
from tests.harness import free_port, self_signed_certificate, unanswered_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
ANSWER = b'{"ok":true}'


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def answer(body: bytes = ANSWER, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


async def answer_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
    while True:
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(answer())


@asynccontextmanager
async def raw_server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[dict]:
    """A server on a free loopback port; yields {"port", "connections", "requests"} it keeps counting."""
    seen: dict = {"connections": 0, "heads": []}

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        try:
            await handler(reader, writer, seen["connections"])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await on_connect(_Recording(reader, seen["heads"]), writer)  # type: ignore[arg-type]

    server = await asyncio.start_server(recording, "127.0.0.1", 0, ssl=tls)
    seen["port"] = server.sockets[0].getsockname()[1]
    try:
        yield seen
    finally:
        server.close()


class _Recording:
    """A StreamReader that keeps every request head it reads, for assertions on what was sent."""

    def __init__(self, reader: asyncio.StreamReader, heads: list[bytes]) -> None:
        self._reader = reader
        self._heads = heads

    async def readuntil(self, separator: bytes) -> bytes:
        data = await self._reader.readuntil(separator)
        self._heads.append(data)
        return data

    def __getattr__(self, name: str) -> object:  # the rest as the real reader has it
        return getattr(self._reader, name)


def pool_for(port: int, scheme: str = "http", connect_timeout: float = 2) -> UpstreamPool:
    return UpstreamPool(
        f"{scheme}://127.0.0.1:{port}/v1", {"Content-Type": "application/json"}, connect_timeout
    )


async def post(pool: UpstreamPool, timeout: float = 5) -> tuple[int, bytes]:
    response = await pool.request("POST", "chat/completions", b'{"q":1}', timeout=timeout)
    try:
        return response.status, await response.read()
    finally:
        response.release()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_keeps_one_connection_alive_and_sends_a_well_formed_request():
    async def scenario() -> None:
        async with raw_server(answer_all) as seen:
            pool = pool_for(seen["port"])
            for _ in range(5):
                assert await post(pool) == (200, ANSWER)
            status, body = await pool.get("/health", 5)
            assert (status, body) == (200, ANSWER)
            await pool.close()
        assert seen["connections"] == 1
        head = seen["heads"][0].decode()
        assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{seen['port']}\r\n" in head
        assert "Content-Type: application/json\r\n" in head and "content-length: 7\r\n" in head
        assert seen["heads"][-1].startswith(b"GET /health HTTP/1.1\r\n")
        assert b"content-length" not in seen["heads"][-1]

    run(scenario)


def test_a_pooled_connection_the_engine_closed_is_replaced_without_failing_the_request():
    async def closes_after_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            await read_request(reader)
            writer.write(answer())
            await read_request(reader)  # the second request meets a connection being closed
            return
        await answer_all(reader, writer, n)

    async def scenario() -> None:
        async with raw_server(closes_after_first) as seen:
            pool = pool_for(seen["port"])
            assert await post(pool) == (200, ANSWER)
            assert await post(pool) == (200, ANSWER)
            await pool.close()
        assert seen["connections"] == 2 and len(seen["heads"]) == 3

    run(scenario)


def test_a_pooled_connection_closed_after_a_long_wait_is_not_sent_again():
    """The engine took the request and may have started generating: sending it again could run the
    same generation twice."""

    async def closes_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(answer())
        await read_request(reader)
        await asyncio.sleep(EARLY_LOSS_SECONDS + 0.5)

    async def scenario() -> None:
        async with raw_server(closes_late) as seen:
            pool = pool_for(seen["port"])
            assert await post(pool) == (200, ANSWER)
            with pytest.raises(ConnectionLost) as lost:
                await post(pool)
            assert not lost.value.early
            await pool.close()
        assert seen["connections"] == 1 and len(seen["heads"]) == 2

    run(scenario)


def test_a_fresh_connection_closed_before_the_answer_fails_without_a_retry():
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)

    async def scenario() -> None:
        async with raw_server(hangs_up) as seen:
            with pytest.raises(ConnectionLost, match="connection closed"):
                await post(pool_for(seen["port"]))
        assert seen["connections"] == 1

    run(scenario)


def test_chunked_bodies_arrive_piece_by_piece_and_read_until_close_bodies_whole():
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]

    async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            for piece in pieces:
                await asyncio.sleep(0.05)
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            writer.write(b"0\r\n\r\n")
            await answer_all(reader, writer, n)
        else:  # no length, no chunking: the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + ANSWER)

    async def scenario() -> None:
        async with raw_server(streams) as seen:
            pool = pool_for(seen["port"])
            response = await pool.request("POST", "chat/completions", b"{}", timeout=5)
            got = []
            async for piece in response.pieces():
                got.append((piece, time.monotonic()))
            response.release()
            assert b"".join(p for p, _ in got) == b"".join(pieces)
            assert len(got) == 3 and got[-1][1] - got[0][1] > 0.08  # relayed as they came, not at the end
            assert await post(pool) == (200, ANSWER)  # the chunked response left the connection reusable
            await pool.close()
            pool = pool_for(seen["port"])
            await post(pool)  # connection 2: answers, then closes
            assert await post(pool) == (200, ANSWER)
        assert seen["connections"] == 2 + 1  # a read-until-close connection is never reused

    run(scenario)


def test_an_engine_that_stalls_times_out_and_its_connection_is_dropped():
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:
            await asyncio.sleep(10)
        writer.write(answer())

    async def scenario() -> None:
        async with raw_server(stalls) as seen:
            pool = pool_for(seen["port"])
            started = time.monotonic()
            with pytest.raises(ReadTimeout, match="timed out"):
                await post(pool, timeout=0.3)
            assert 0.25 < time.monotonic() - started < 2
            assert await post(pool) == (200, ANSWER)
            await pool.close()
        assert seen["connections"] == 2

    run(scenario)


def test_refused_connections_and_garbage_answers_are_clear_errors():
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await asyncio.sleep(1)

    async def scenario() -> None:
        with pytest.raises(ConnectFailed, match="connection refused"):
            await post(pool_for(free_port()))
        async with raw_server(garbage) as seen:
            with pytest.raises(ConnectionLost, match="malformed HTTP response"):
                await post(pool_for(seen["port"]))

    run(scenario)


def test_a_connection_that_cannot_be_made_times_out_at_the_connect_timeout():
    async def scenario() -> None:
        with unanswered_port() as port:
            started = time.monotonic()
            with pytest.raises(ConnectFailed, match="connect timed out"):
                await post(pool_for(port, connect_timeout=0.4), timeout=10)
            assert 0.35 < time.monotonic() - started < 2

    run(scenario)


def test_a_slow_reader_pauses_the_engine_instead_of_buffering_everything():
    size = 32 << 20
    done: dict[str, float] = {}

    async def floods(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        block = b"x" * (1 << 20)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        done["at"] = time.monotonic()
        await asyncio.sleep(1)

    async def scenario() -> None:
        async with raw_server(floods) as seen:
            response = await pool_for(seen["port"]).request("POST", "x", b"{}", timeout=5)
            received = 0
            pieces = response.pieces()
            received += len(await anext(pieces))
            await asyncio.sleep(0.5)  # a client that does not read
            assert "at" not in done  # the engine is held back, not drained into the gateway's memory
            async for piece in pieces:
                received += len(piece)
            response.release()
            assert received == size

    run(scenario)


def test_abandoning_a_stream_closes_its_connection_so_the_engine_stops():
    async def scenario() -> None:
        engine_saw_end = asyncio.Event()

        async def streams_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            try:
                while True:
                    writer.write(b"5\r\nhello\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.01)
            except ConnectionError:
                engine_saw_end.set()

        async with raw_server(streams_forever) as seen:
            response = await pool_for(seen["port"]).request("POST", "chat/completions", b"{}", timeout=5)
            assert await anext(response.pieces()) == b"hello"
            response.release()
            await asyncio.wait_for(engine_saw_end.wait(), 5)

    run(scenario)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def test_tls_verifies_the_engine_certificate(certificate, monkeypatch):
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def scenario() -> None:
        async with raw_server(answer_all, tls=server_tls) as seen:
            with pytest.raises(ConnectFailed, match=r"TLS handshake failed \(CERTIFICATE_VERIFY_FAILED\)"):
                await post(pool_for(seen["port"], "https"))
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now the system trusts it
            pool = pool_for(seen["port"], "https")
            assert await post(pool) == (200, ANSWER)
            assert await post(pool) == (200, ANSWER)
            await pool.close()

    run(scenario)
