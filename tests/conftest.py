from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import CLIENT_KEY, BackgroundLoop, Gateway, clean_env


@pytest.fixture(scope="session")
def bg_loop() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start `appliance serve` with the given settings; every gateway started is stopped afterwards."""
    started: list[Gateway] = []

    def start(args: tuple[str, ...] = (), **settings: str) -> Gateway:
        defaults = {
            "APPLIANCE_API_KEYS": CLIENT_KEY,
            "APPLIANCE_DATA_DIR": str(tmp_path / f"data{len(started)}"),
            # Nothing listens here unless a test starts a simulator.
            "APPLIANCE_LLM_URL": "http://127.0.0.1:9/v1",
            "APPLIANCE_TTS_URL": "http://127.0.0.1:9",
        }
        env = clean_env(**{**defaults, **settings})
        gateway = Gateway(env, tmp_path / f"gateway{len(started)}.log", args)
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in started:
        gateway.stop()
