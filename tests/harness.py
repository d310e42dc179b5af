"""Test harness: the real gateway in its own process on a loopback port, and a background event loop
in which the upstream simulators run, so a test can command them while the gateway talks to them."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "reference"  # public specs the tests validate against
CLIENT_KEY = "sk-test-client-key-0123456789"
ADMIN_KEY = "sk-test-admin-key-9876543210"  # every test gateway has it: /readyz's detail needs it
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port where connecting hangs, as toward a host that drops packets: a listener whose
    accept queue is full, so the kernel drops further connection requests."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)  # let the fillers' handshakes fill the queue
    try:
        yield port
    finally:
        for sock in (*fillers, listener):
            sock.close()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A one-day self-signed certificate for 127.0.0.1 and its key, as PEM files in `folder`."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class BackgroundLoop:
    """An asyncio loop on a daemon thread; simulators live here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any appliance or NVIDIA settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "NVIDIA_"))}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env["APPLIANCE_ADMIN_KEY"] = ADMIN_KEY
    env.update(extra)
    return env


def run_appliance(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`appliance ARGS` in a subprocess, as an admin would run it (a clean environment unless given)."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


class Gateway:
    """`appliance serve` in a subprocess, as an admin would run it."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        args: tuple[str, ...] = (),
        file_size_limit: int | None = None,
    ) -> None:
        self.file_size_limit = file_size_limit  # bytes any file may grow to: a full disk, for this process
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.log_path = log_path
        self.env = env
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Gateway:
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps writing to it
        cmd = [sys.executable, "-m", "appliance", "serve", "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=self._limits
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gateway did not become healthy:\n{self.logs()}")

    def _limits(self) -> None:
        if self.file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size_limit, self.file_size_limit))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", CLIENT_KEY)
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 30)
        return openai.OpenAI(base_url=self.base_url, **kwargs)

    def readyz(self, **kwargs: Any) -> httpx.Response:
        """/readyz with its detail, as an admin reads it."""
        return httpx.get(self.url + "/readyz", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 30), **kwargs)
