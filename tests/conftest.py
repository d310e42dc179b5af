from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import CLIENT_KEY, BackgroundLoop, Gateway, clean_env
from tests.real_speech import whisper_base
from tests.sims.magpie_nim import MagpieNIM
from tests.sims.openai_upstream import OpenAIUpstream


@pytest.fixture(scope="session")
def bg_loop() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def real_whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged real Whisper base model, joined into a folder of this test session's own."""
    # Named as faster-whisper's converter names it: the gateway serves it as `whisper-base`.
    return whisper_base(tmp_path_factory.mktemp("models") / "faster-whisper-base")


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


LOCAL_MODELS = ("nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8")
CLOUD_MODELS = ("nvidia/nemotron-mini-4b-instruct", "nvidia/nemotron-3-nano-30b-a3b")
CLOUD_KEY = "nvapi-test-cloud-key-do-not-log-7f3a9c"


@pytest.fixture
def local_llm(bg_loop: BackgroundLoop) -> Iterator[OpenAIUpstream]:
    """A simulated vLLM serving both local Nemotron models."""
    sim = bg_loop.run(OpenAIUpstream("vllm", LOCAL_MODELS).start())
    yield sim
    bg_loop.run(sim.stop())


@pytest.fixture
def cloud_llm(bg_loop: BackgroundLoop) -> Iterator[OpenAIUpstream]:
    """A simulated NVIDIA cloud NIM endpoint that accepts CLOUD_KEY."""
    sim = bg_loop.run(OpenAIUpstream("cloud", CLOUD_MODELS, api_key=CLOUD_KEY).start())
    yield sim
    bg_loop.run(sim.stop())


@pytest.fixture
def magpie(bg_loop: BackgroundLoop) -> Iterator[MagpieNIM]:
    """A simulated MagpieTTS NIM with its default voices and timing."""
    sim = MagpieNIM()
    bg_loop.run(sim.start())
    yield sim
    bg_loop.run(sim.stop())


@pytest.fixture
def gateway(
    start_gateway: Callable[..., Gateway], local_llm: OpenAIUpstream, cloud_llm: OpenAIUpstream
) -> Callable[..., Gateway]:
    """For chat: local vLLM and cloud both up, default policy (on_failure), fast failure detection."""

    def start(**settings: str) -> Gateway:
        env = {
            "APPLIANCE_LLM_URL": local_llm.base_url,
            "NVIDIA_NIM_BASE_URL": cloud_llm.base_url,
            "NVIDIA_NIM_API_KEY": CLOUD_KEY,
            "APPLIANCE_FIRST_BYTE_TIMEOUT": "1",
            "APPLIANCE_FIRST_TOKEN_TIMEOUT": "1",
            "APPLIANCE_STREAM_IDLE_TIMEOUT": "1",
            "APPLIANCE_BREAKER_PROBE_INTERVAL": "0.2",
            **settings,
        }
        return start_gateway(**env)

    return start
