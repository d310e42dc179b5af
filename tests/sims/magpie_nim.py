"""A stand-in for NVIDIA's MagpieTTS Multilingual NIM HTTP API (port 9000), for tests and benchmarks.

It follows the NIM's documented HTTP API (docs.nvidia.com/nim/speech/latest/reference/api-references/
tts/http-tts.html): multipart/form-data fields `text`, `language`, `voice`, `sample_rate_hz`
(and optional `encoding`); `/v1/audio/synthesize` answers a WAV file, `/v1/audio/synthesize_online` a
stream of headerless 16-bit mono PCM chunks; `/v1/audio/list_voices` maps a comma-separated locale list to
`{"voices": [...]}`; `/v1/health/ready` and `/v1/health/live`; at most 2,000 characters of text per request.
The audio is a tone whose length grows with the text, so tests can predict durations.

Load behaves as NVIDIA's published figures describe: the first audio comes `first_audio_seconds` after a
request starts (68 ms for one stream), plus `stream_load_seconds` for every other synthesis in progress
(81 ms at four streams); at most `max_streams` syntheses run at once (the profile's batch size, 8 by
default) and later requests wait inside the NIM in arrival order. `peak_streams` records the most
syntheses that ran at once.

Commands (set attributes from any thread): `fail` = "not_ready" | "error" | "refuse" | "stall" | None,
`error_status`, `stall_after_chunks` (online synthesis: stall after this many chunks), `slow` (multiplies
synthesis time). `calls` records every synthesis request with its text and timestamps (time.time()).
"""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web

from tests.sims.server import LoopbackServer

# Locales as the docs' list_voices example shows them; speakers and styles from the NIM's voice docs.
LOCALES = "en-US,es-US,fr-FR,de-DE,zh-CN,vi-VN,it-IT,hi-IN,ja-JP"
_SPEAKERS = {
    "EN-US": {
        "Aria": ["Neutral", "Calm", "Angry", "Happy", "Sad", "Fearful"],
        "Jason": ["Neutral", "Calm", "Angry", "Happy"],
        "Leo": ["Neutral", "Calm", "Angry", "Sad"],
        "Mia": ["Neutral", "Calm", "Angry", "Happy", "Sad"],
        "Ray": ["Neutral", "Calm", "Angry", "Happy", "Sad"],
        "Sofia": ["Neutral", "Calm", "Happy", "Sad"],
    },
    "ES-US": {"Diego": ["Neutral", "Calm", "Happy"], "Isabela": ["Neutral", "Calm"]},
    "FR-FR": {"Pascal": ["Neutral", "Calm"], "Louise": ["Neutral"]},
    "DE-DE": {"Aria": ["Neutral", "Calm"], "Jason": ["Neutral"], "Leo": ["Neutral"]},
    "ZH-CN": {"HouZhen": [], "Siwei": []},
    "VI-VN": {"Long": ["Neutral", "Sad"]},
    "IT-IT": {"Isabela": []},
    "HI-IN": {"Aria": []},
    "JA-JP": {"Aria": []},
}
VOICES = [
    f"Magpie-Multilingual.{locale}.{speaker}{suffix}"
    for locale, speakers in _SPEAKERS.items()
    for speaker, styles in speakers.items()
    for suffix in ["", *(f".{style}" for style in styles)]
]
DEFAULT_SAMPLE_RATE = 44100  # the rate NVIDIA's clients ask for unless told otherwise
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


@dataclass
class SynthesisCall:
    path: str
    text: str
    language: str
    voice: str
    sample_rate_hz: int
    received_at: float
    first_audio_at: float | None = None
    finished_at: float | None = None


@dataclass
class MagpieNIM(LoopbackServer):
    max_chars: int = 2000  # the NIM's per-request text limit
    seconds_per_char: float = 0.06  # audio length per character of text (about 16 characters a second)
    real_time_factor: float = 0.1  # synthesis time per second of audio
    chunk_seconds: float = 0.1  # audio per streamed chunk
    first_audio_seconds: float = 0.0  # before the first audio of a request (the NIM's own latency)
    stream_load_seconds: float = 0.0  # added to that for every other synthesis in progress
    max_streams: int = 8  # syntheses at once (the profile's batch size); the rest wait their turn
    voices: list[str] = field(default_factory=lambda: list(VOICES))
    # Commands.
    fail: str | None = None
    error_status: int = 500
    stall_after_chunks: int = 0
    slow: float = 1.0
    # Records.
    calls: list[SynthesisCall] = field(default_factory=list)
    health_checks: int = 0
    voice_lists: int = 0
    active_streams: int = 0
    peak_streams: int = 0

    # Lifecycle (run in the simulator's event loop).

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/health/ready", self._ready)
        app.router.add_get("/v1/health/live", self._live)
        app.router.add_get("/v1/audio/list_voices", self._list_voices)
        app.router.add_post("/v1/audio/synthesize", self._synthesize)
        app.router.add_post("/v1/audio/synthesize_online", self._synthesize_online)
        self._batch = asyncio.Semaphore(self.max_streams)
        await self._serve(app)
        return self.url

    def reset(self) -> None:
        self.fail, self.error_status, self.stall_after_chunks, self.slow = None, 500, 0, 1.0
        self.calls.clear()
        self.peak_streams = self.active_streams

    def audio_seconds(self, text: str) -> float:
        return max(0.2, len(text) * self.seconds_per_char)

    # Health and voices.

    async def _ready(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        if self.fail == "refuse":
            _drop(request)
        if self.fail == "not_ready":
            return web.json_response({"status": "not ready"}, status=503)
        return web.json_response({"status": "ready"})

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def _list_voices(self, request: web.Request) -> web.StreamResponse:
        if (refusal := await self._refusal(request)) is not None:
            return refusal
        self.voice_lists += 1
        return web.json_response({LOCALES: {"voices": self.voices}})

    # Synthesis.

    async def _synthesize(self, request: web.Request) -> web.StreamResponse:
        call, error = await self._accept(request)
        if error is not None:
            return error
        assert call is not None
        seconds = self.audio_seconds(call.text)
        async with self._synthesis() as latency:
            await asyncio.sleep(latency + seconds * self.real_time_factor * self.slow)
        call.first_audio_at = call.finished_at = time.time()
        return web.Response(
            body=_wav(_tone(seconds, call.sample_rate_hz), call.sample_rate_hz), content_type="audio/wav"
        )

    async def _synthesize_online(self, request: web.Request) -> web.StreamResponse:
        call, error = await self._accept(request)
        if error is not None:
            return error
        assert call is not None
        pcm = _tone(self.audio_seconds(call.text), call.sample_rate_hz)
        step = int(self.chunk_seconds * call.sample_rate_hz) * 2
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        async with self._synthesis() as latency:
            await asyncio.sleep(latency)
            for index, start in enumerate(range(0, len(pcm), step)):
                if self.fail == "stall" and index == self.stall_after_chunks:
                    await self._stall(request)
                if request.transport is None or request.transport.is_closing():
                    return response  # the client went away: stop synthesising for it
                await asyncio.sleep(self.chunk_seconds * self.real_time_factor * self.slow)
                if not response.prepared:
                    await response.prepare(request)
                try:
                    await response.write(pcm[start : start + step])
                except ConnectionResetError:  # the client stopped listening
                    return response
                call.first_audio_at = call.first_audio_at or time.time()
        await response.write_eof()
        call.finished_at = time.time()
        return response

    @asynccontextmanager
    async def _synthesis(self) -> AsyncIterator[float]:
        """A turn in the engine's batch; yields the latency before this synthesis's first audio."""
        async with self._batch:
            self.active_streams += 1
            self.peak_streams = max(self.peak_streams, self.active_streams)
            try:
                yield self.first_audio_seconds + self.stream_load_seconds * (self.active_streams - 1)
            finally:
                self.active_streams -= 1

    async def _accept(self, request: web.Request) -> tuple[SynthesisCall | None, web.StreamResponse | None]:
        """Parse and check a synthesis request the way the NIM does, or answer its refusal."""
        if (refusal := await self._refusal(request)) is not None:
            return None, refusal
        form = await request.post() if request.content_type == "multipart/form-data" else {}
        text = str(form.get("text", ""))
        language = str(form.get("language", ""))
        voice = str(form.get("voice", ""))
        rate = str(form.get("sample_rate_hz", DEFAULT_SAMPLE_RATE))
        if not text.strip():
            return None, _error(400, "Bad Request, empty text input")
        if len(text) > self.max_chars:
            return None, _error(400, f"Text exceeds the maximum of {self.max_chars} characters")
        if language not in LOCALES.split(","):
            return None, _error(400, f"Unsupported language code: {language!r}")
        if voice not in self.voices:
            return None, _error(400, f"Voice {voice!r} is not available")
        if not rate.isdigit() or int(rate) not in SAMPLE_RATES:
            return None, _error(400, f"Unsupported sample rate: {rate}")
        call = SynthesisCall(request.path, text, language, voice, int(rate), time.time())
        self.calls.append(call)
        if self.fail == "stall" and request.path.endswith("/synthesize"):
            await self._stall(request)
        return call, None

    async def _stall(self, request: web.Request) -> None:
        """Hang until the client gives up (then end quietly) or the command is lifted."""
        while self.fail == "stall":
            if request.transport is None or request.transport.is_closing():
                raise asyncio.CancelledError
            await asyncio.sleep(0.02)

    async def _refusal(self, request: web.Request) -> web.StreamResponse | None:
        if self.fail == "not_ready":
            return _error(503, "Service is not ready: model is still loading")
        if self.fail == "error":
            return _error(self.error_status, "Internal server error: inference failed")
        if self.fail == "refuse":
            _drop(request)
        return None


def _drop(request: web.Request) -> None:
    """Close the connection without an answer, as a crashing server does."""
    assert request.transport is not None
    request.transport.close()
    raise asyncio.CancelledError


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _tone(seconds: float, rate: int) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 220.0 * t) * 0.3 * 32767).astype("<i2").tobytes()


def _wav(pcm: bytes, rate: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()
