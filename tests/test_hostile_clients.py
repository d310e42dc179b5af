"""What an unauthenticated or misbehaving client can cost is constant: bounded metric labels, head size
and time limits, OpenAI-shaped protocol errors, answers that reach clients which send before they read,
enough file descriptors, and a /readyz that tells strangers only ready or not.

The protocol items talk raw HTTP/1.1 over sockets, as such clients do."""

from __future__ import annotations

import re
import resource
import socket
import threading
import time
import urllib.error
import urllib.request

import httpx
import pytest

from tests.harness import ADMIN_KEY, CLIENT_KEY

TIER1 = "nvidia/nemotron-mini-4b-instruct"


def assert_openai_error(body: dict, code: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"]


def read_response(sock: socket.socket, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (with Content-Length) from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def exchange(port: int, request: bytes, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        return read_response(sock, timeout)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def healthz_seconds(url: str) -> float:
    started = time.perf_counter()
    assert httpx.get(url + "/healthz", timeout=30).status_code == 200
    return time.perf_counter() - started


# Metrics.


def test_unauthenticated_and_unknown_paths_never_become_metric_labels(start_gateway):
    gw = start_gateway()
    with httpx.Client(base_url=gw.url) as stranger, gw.http() as app:
        for i in range(400):
            assert stranger.get(f"/probe-{i}").status_code == 401
        for i in range(150):
            assert app.get(f"/v1/nothing-{i}").status_code == 404
            assert app.get(f"/v1/models/no-model-{i}").status_code == 404
    text = httpx.get(gw.url + "/metrics").text
    assert "probe-" not in text and "nothing-" not in text and "no-model-" not in text
    assert 'appliance_requests_total{path="unauthenticated",status="401",target="none"} 400.0' in text
    assert 'appliance_requests_total{path="unmatched",status="404",target="none"} 150.0' in text
    assert 'path="/v1/models/{model_id:path}",status="404"' in text  # the route's template
    assert len(re.findall(r"^appliance_requests_total\{", text, re.M)) < 10


def test_a_flood_of_unauthenticated_probes_keeps_memory_and_healthz_flat(start_gateway):
    gw = start_gateway()
    pid = gw.proc.pid
    with httpx.Client(base_url=gw.url) as stranger:
        for i in range(300):  # warm up: first-use allocations are not growth
            stranger.get(f"/warm-{i}")
        before = rss_mib(pid)
        for i in range(3000):
            stranger.get(f"/probe-{i}")
    grown = rss_mib(pid) - before
    assert grown < 6, f"RSS grew {grown:.1f} MiB over 3,000 probes"  # before the fix: 16 MiB
    assert healthz_seconds(gw.url) < 2


# The request head: size and time.


def test_a_head_over_the_cap_is_431_at_once_and_the_gateway_stays_responsive(start_gateway):
    gw = start_gateway()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        # An endless header: without a cap the parser buffers it all and never answers.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200_000)
        status, headers, body = read_response(sock)
    assert status == 431 and headers["connection"] == "close"
    assert_openai_error(httpx.Response(status, content=body).json(), "request_header_too_large")
    assert time.perf_counter() - started < 10
    assert healthz_seconds(gw.url) < 2


def test_a_client_pouring_a_huge_header_does_not_stall_others(start_gateway):
    gw = start_gateway()
    pid = gw.proc.pid
    before = rss_mib(pid)

    def pour() -> None:
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nX-Pad: ")
            try:
                for _ in range(400):  # up to 100 MB, as fast as the gateway takes it
                    sock.sendall(b"a" * 262_144)
            except OSError:
                pass  # refused and closed: what should happen

    pourer = threading.Thread(target=pour)
    pourer.start()
    slowest = max(healthz_seconds(gw.url) for _ in range(20))
    pourer.join(60)
    assert not pourer.is_alive()
    assert slowest < 2, f"/healthz took {slowest:.2f} s while a client poured a header"
    assert rss_mib(pid) - before < 30


def test_the_head_cap_is_a_setting(start_gateway):
    gw = start_gateway(APPLIANCE_MAX_HEADER_BYTES="4096")
    fits = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 3000 + b"\r\n\r\n"
    assert exchange(gw.port, fits)[0] == 200
    over = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 5000 + b"\r\n\r\n"
    assert exchange(gw.port, over)[0] == 431


def test_idle_and_trickling_connections_are_closed_after_the_head_timeout(start_gateway):
    gw = start_gateway(APPLIANCE_HEADER_TIMEOUT="1")
    with socket.create_connection(("127.0.0.1", gw.port)) as idle:
        assert closed_by_peer(idle, timeout=10)
    with socket.create_connection(("127.0.0.1", gw.port)) as trickle:
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        trickle.settimeout(0.2)
        with pytest.raises(TimeoutError):
            while time.monotonic() - started < 4:  # one header line every 0.2 s, never the end
                trickle.sendall(b"X-Slow: 1\r\n")
                trickle.recv(1)
        status, _, body = read_response(trickle)
    assert status == 408
    assert_openai_error(httpx.Response(status, content=body).json(), "request_timeout")
    # A slow but complete head within the timeout is served.
    with socket.create_connection(("127.0.0.1", gw.port)) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.4)
        slow.sendall(b"\r\n")
        assert read_response(slow)[0] == 200


# Protocol errors and closing.


@pytest.mark.parametrize(
    ("framing", "reason"),
    [
        (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "Transfer-Encoding"),
        (b"Content-Length: 5x\r\n", "Content-Length"),
        (b"Content-Length: 5\r\nContent-Length: 6\r\n", "Content-Length"),
    ],
)
def test_protocol_errors_are_openai_shaped(start_gateway, framing, reason):
    gw = start_gateway()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\nhello"
    status, headers, body = exchange(gw.port, request)
    assert status == 400 and headers["content-type"] == "application/json"
    error = httpx.Response(status, content=body).json()
    assert_openai_error(error, "invalid_http_request")
    assert reason in error["error"]["message"]


def test_a_client_that_sends_its_whole_oversized_body_before_reading_gets_the_413(start_gateway):
    gw = start_gateway()
    # urllib sends `Connection: close` and the whole body before it reads: closing at once after the
    # 413 would reset the connection under its feet.
    request = urllib.request.Request(
        gw.base_url + "/chat/completions",
        data=b"x" * (32 * 1024 * 1024),
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=30)
    assert exc.value.code == 413
    assert_openai_error(httpx.Response(413, content=exc.value.read()).json(), "request_too_large")
    assert healthz_seconds(gw.url) < 2


def test_an_answer_before_the_body_is_in_closes_the_connection_so_a_keep_alive_client_does_not_reuse_it(
    start_gateway,
):
    gw = start_gateway()
    with gw.http() as http:  # one pooled keep-alive connection, as SDKs use
        early = http.post("/v1/chat/completions", content=b"x" * (8 * 1024 * 1024))
        assert early.status_code == 413
        assert early.headers["connection"] == "close"  # so the client opens a fresh connection next
        after = http.get("/v1/models")  # on the dropped connection this met "Server disconnected"
        assert after.status_code == 200
        # A request whose body was read whole keeps its connection.
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]}
        kept = http.post("/v1/chat/completions", json=body)
        assert kept.status_code == 404 and "connection" not in kept.headers


# File descriptors.


def test_open_files_are_raised_so_1100_idle_sockets_leave_healthz_and_the_engine_working(
    start_gateway, local_llm
):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard open-files limit here is {hard}")
    # Start the gateway as many systems do: at a soft limit of 1,024.
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        gw = start_gateway(APPLIANCE_LLM_URL=local_llm.base_url)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    with open(f"/proc/{gw.proc.pid}/limits") as f:
        limits = f.read()
    gateway_soft = int(re.search(r"Max open files\s+(\d+)", limits).group(1))
    assert gateway_soft > 1100 + 256
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", gw.port)))
        assert healthz_seconds(gw.url) < 5
        reply = gw.client().chat.completions.with_raw_response.create(
            model=TIER1, messages=[{"role": "user", "content": "Hello"}]
        )
        assert reply.headers["x-appliance-target"] == "box"
    finally:
        for sock in idle:
            sock.close()


# /readyz.


def test_readyz_tells_strangers_only_ready_or_not_and_admins_the_detail(start_gateway, local_llm):
    gw = start_gateway(APPLIANCE_LLM_URL=local_llm.base_url)
    plain = httpx.get(gw.url + "/readyz")
    assert plain.status_code == 200
    body = plain.json()
    assert set(body) == {"status", "services"} and body["status"] == "ready"
    assert body["services"]["llm"] == "ready" and body["services"]["tts"] == "not ready"
    assert set(body["services"].values()) == {"ready", "not ready"}
    assert "127.0.0.1" not in plain.text
    detail = gw.readyz().json()
    assert detail["checks"]["llm"]["targets"]["box"]["urls"][0]["url"] == local_llm.base_url
    for wrong in (CLIENT_KEY, "sk-nope"):
        refused = httpx.get(gw.url + "/readyz", headers={"Authorization": f"Bearer {wrong}"})
        assert refused.status_code == 401
        assert_openai_error(refused.json(), "invalid_admin_key")
    assert ADMIN_KEY not in gw.logs()
