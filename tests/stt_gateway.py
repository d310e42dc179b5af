"""A real gateway for speech-to-text tests: started, and waited on until its model has loaded."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.harness import CLIENT_KEY, Gateway, clean_env


def start_stt_gateway(tmp: Path, name: str, **settings: str) -> Gateway:
    """`appliance serve` whose speech-to-text engine has finished loading (or failed to).

    TMPDIR points at an empty folder of its own, so tests can check that nothing was written there."""
    tmpdir = tmp / f"{name}-tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    defaults = {
        "APPLIANCE_API_KEYS": CLIENT_KEY,
        "APPLIANCE_DATA_DIR": str(tmp / f"{name}-data"),
        "APPLIANCE_LLM_URL": "http://127.0.0.1:9/v1",
        "APPLIANCE_TTS_URL": "http://127.0.0.1:9",
        "TMPDIR": str(tmpdir),
    }
    gateway = Gateway(clean_env(**{**defaults, **settings}), tmp / f"{name}.log").start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # What the compose file's health check reads: the key-less view says `loading` until it is done.
        if httpx.get(gateway.url + "/readyz").json()["services"]["stt"] != "loading":
            return gateway
        time.sleep(0.05)
    gateway.stop()
    raise RuntimeError(f"speech-to-text did not finish loading:\n{gateway.logs()}")
