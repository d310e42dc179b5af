"""What abusive clients cost the real gateway: memory, CPU and how long `/healthz` waits meanwhile.

Four cases, each against a fresh gateway: 20,000 unauthenticated requests to distinct paths (then one
/metrics render), a 100 MB header poured as fast as the gateway takes it, 1,100 idle sockets against a
gateway started at a soft open-files limit of 1,024, and Python's urllib posting a 32 MiB body to chat.
A thread polls /healthz throughout and the worst wait is reported. Run: python -m tests.bench.hostile
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx

from tests.harness import CLIENT_KEY, Gateway, clean_env


def start(tmp: Path, name: str) -> Gateway:
    env = clean_env(
        APPLIANCE_API_KEYS=CLIENT_KEY,
        APPLIANCE_DATA_DIR=str(tmp / name),
        APPLIANCE_LLM_URL="http://127.0.0.1:9/v1",
        APPLIANCE_TTS_URL="http://127.0.0.1:9",
        APPLIANCE_GPU_REFRESH_INTERVAL="0",
    )
    return Gateway(env, tmp / f"{name}.log").start()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HealthProbe(threading.Thread):
    """Polls /healthz until stopped; `worst` is the longest wait in seconds."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.worst, self.done = url, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            started = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(self.url + "/healthz", timeout=120)
            self.worst = max(self.worst, time.perf_counter() - started)
            time.sleep(0.05)

    def __enter__(self) -> HealthProbe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def probes(tmp: Path) -> str:
    gw = start(tmp, "probes")
    try:
        with httpx.Client(base_url=gw.url, timeout=120) as client:
            for i in range(300):
                client.get(f"/warm-{i}")
            before = rss_mib(gw.proc.pid)
            with HealthProbe(gw.url) as during_probes:
                for i in range(20_000):
                    client.get(f"/probe-{i}")
            after = rss_mib(gw.proc.pid)
            with HealthProbe(gw.url) as during_metrics:
                started = time.perf_counter()
                size = len(client.get("/metrics").content)
                render = time.perf_counter() - started
    finally:
        gw.stop()
    return (
        f"20,000 unauthenticated probes: RSS {before:.1f} -> {after:.1f} MiB; /metrics {size / 1e6:.3f} MB "
        f"in {render * 1000:.0f} ms; worst /healthz {during_probes.worst * 1000:.0f} ms during the probes, "
        f"{during_metrics.worst * 1000:.0f} ms during /metrics"
    )


def huge_header(tmp: Path) -> str:
    gw = start(tmp, "header")
    try:
        rss, cpu = rss_mib(gw.proc.pid), cpu_seconds(gw.proc.pid)
        sent, started = 0, time.perf_counter()
        with HealthProbe(gw.url) as probe, socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nX-Pad: ")
            try:
                for _ in range(400):
                    sock.sendall(b"a" * 262_144)
                    sent += 262_144
                sock.sendall(b"\r\n\r\n")
                sock.settimeout(120)
                answer = sock.recv(64).split(b"\r\n")[0].decode()
            except OSError as exc:
                answer = type(exc).__name__
            elapsed = time.perf_counter() - started
            time.sleep(0.3)
        cpu, rss = cpu_seconds(gw.proc.pid) - cpu, rss_mib(gw.proc.pid) - rss
    finally:
        gw.stop()
    return (
        f"100 MB header: the gateway took {sent / 1e6:.1f} MB, answered {answer!r} after {elapsed:.2f} s; "
        f"CPU +{cpu:.2f} s, RSS +{rss:.1f} MiB; worst /healthz {probe.worst * 1000:.0f} ms"
    )


def idle_sockets(tmp: Path) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the gateway inherits it
    try:
        gw = start(tmp, "idle")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(1100)]
        started = time.perf_counter()
        try:
            answer: object = httpx.get(gw.url + "/healthz", timeout=10).status_code
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
        waited = time.perf_counter() - started
        with open(f"/proc/{gw.proc.pid}/limits") as f:
            limit = re.search(r"Max open files +(\d+)", f.read()).group(1)  # type: ignore[union-attr]
    finally:
        for sock in idle:
            sock.close()
        gw.stop()
    return f"1,100 idle sockets: /healthz -> {answer} in {waited * 1000:.0f} ms; open-files limit {limit}"


def urllib_upload(tmp: Path) -> str:
    gw = start(tmp, "urllib")
    request = urllib.request.Request(
        gw.base_url + "/chat/completions",
        data=b"x" * (32 << 20),
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(request, timeout=60)
        answer = "accepted"
    except urllib.error.HTTPError as exc:
        answer = f"HTTP {exc.code}"
    except OSError as exc:
        answer = f"{type(exc).__name__}: {exc}"
    finally:
        gw.stop()
    return f"urllib posting 32 MiB to chat: {answer}"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for case in (probes, huge_header, idle_sockets, urllib_upload):
            print(case(Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
