"""OpenAI's `POST /v1/audio/speech`, served by the local MagpieTTS NIM; `GET /v1/audio/voices`.

Text never leaves the box: there is no cloud fallback for speech.
As OpenAI's, the answer streams by default (chunked, encoded as the NIM speaks, `stream_format` absent
or "audio"), so read-aloud starts after the first words, not after the whole text. `?stream=false`
asks for the whole file instead (complete headers and Content-Length, a clean error if anything fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from appliance.audio.encode import FORMATS, SPEED_MAX, SPEED_MIN, AudioFormat, Encoder
from appliance.errors import APIError, bad_request, unavailable
from appliance.limits import read_body
from appliance.log import event
from appliance.middleware import request_context
from appliance.state import AppState, app_state
from appliance.tts import (
    FIRST_PIECE_CHARS,
    MagpieClient,
    VoiceChoice,
    choose_voice,
    split_text,
    voice_locale,
)


class VoiceRef(BaseModel):
    id: str


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str
    voice: str | VoiceRef
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=SPEED_MIN, le=SPEED_MAX)
    stream_format: Literal["audio", "sse"] | None = None
    language: str | None = None  # a NIM language code (en-US, de-DE, ...); else the voice's or the default
    instructions: str | None = None  # accepted for compatibility; MagpieTTS takes no instructions

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


class EngineHealth:
    """The NIM's readiness, polled in the background and shown on /readyz."""

    def __init__(self, nim: MagpieClient) -> None:
        self.nim = nim
        self.ready = False
        self.detail = "not checked yet"
        # (time.time(), error code) of the last failed synthesis; the NIM's own words stay out of /readyz
        # (it needs no key), since they might quote the text.
        self.last_failure: tuple[float, str | None] | None = None

    async def refresh(self) -> None:
        ready, detail = await self.nim.health()
        if ready != self.ready or (detail.startswith("not a NIM") and detail != self.detail):
            event("tts_engine", ready=ready, detail=detail)  # a misaddressed NIM is said once, at once
        self.ready, self.detail = ready, detail

    async def watch(self, interval: float) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # keep watching whatever one check ran into
                self.ready, self.detail = False, f"not checkable ({type(exc).__name__})"
                event("tts_engine", level=logging.WARNING, ready=False, error=type(exc).__name__)
            await asyncio.sleep(interval)

    async def require_ready(self) -> None:
        if not self.ready:
            await self.refresh()  # it may have come up since the last poll
        if not self.ready:
            raise unavailable(f"The text-to-speech engine is {self.detail}.", code="tts_not_ready")

    def note_failure(self, exc: APIError) -> None:
        if exc.status >= 500:
            self.last_failure = (time.time(), exc.code)

    def check(self) -> dict[str, Any]:
        check = {"ready": self.ready, "engine": "magpie-tts-nim", "url": self.nim.url, "detail": self.detail}
        if self.last_failure is not None:
            at, code = self.last_failure
            check["last_failure"] = {"at": round(at, 3), "code": code}
        return check


def install(app: FastAPI, state: AppState) -> None:
    settings = state.settings
    nim = MagpieClient(settings, lambda: state.http)
    health = EngineHealth(nim)
    state.readiness["tts"] = health.check
    state.availability["tts"] = lambda route: health.ready
    watcher: list[asyncio.Task[None]] = []

    async def start() -> None:
        watcher.append(asyncio.create_task(health.watch(settings.tts_health_interval)))

    async def stop() -> None:
        for task in watcher:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    state.startup.append(start)
    state.shutdown.append(stop)

    @app.post("/v1/audio/speech")
    async def create_speech(request: Request) -> Response:
        ctx = request_context(request.scope)
        # Read up to the cap chat uses: the text is at most a few KB, so a huge body is refused, not held.
        body = _parse(await read_body(request.scope, request.receive, settings.max_body_bytes))
        route = app_state(request).require_route(body.model, "tts")
        ctx.model = route.name
        _check_input(body, settings.tts_max_chars)
        streaming = _wants_stream(request, body)
        state.governance.admit(ctx, route, characters=len(body.input))
        ctx.characters = len(body.input)
        await health.require_ready()
        ctx.target = "local"
        try:
            return await speak(body, streaming, ctx.request_id)
        except APIError as exc:
            health.note_failure(exc)
            raise

    async def speak(body: SpeechRequest, streaming: bool, request_id: str) -> Response:
        choice = choose_voice(body.voice_name, body.language, await nim.voices(), settings)
        limit = settings.tts_piece_chars
        pieces = split_text(body.input, limit, min(limit, FIRST_PIECE_CHARS))
        fmt = FORMATS[body.response_format]
        event(
            "tts",
            request_id=request_id,
            voice=choice.voice,
            language=choice.language,
            format=fmt.name,
            characters=len(body.input),
            pieces=len(pieces),
            stream=streaming,
        )
        if streaming:
            return await _stream(nim, pieces, choice, fmt, body.speed, request_id, health)
        return Response(await _whole_file(nim, pieces, choice, fmt, body.speed), media_type=fmt.content_type)

    @app.get("/v1/audio/voices")
    async def list_voices() -> JSONResponse:
        await health.require_ready()
        catalog = await nim.voices()
        language = catalog.language(settings.tts_language) or settings.tts_language
        aliases = {name: catalog.voice_for(voice, language) for name, voice in settings.tts_voices.items()}
        data = [{"id": v, "object": "voice", "language": voice_locale(v) or language} for v in catalog.voices]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "languages": list(catalog.locales),
                "default_language": language,
                "aliases": aliases,
            }
        )


def _parse(raw: bytes) -> SpeechRequest:
    try:
        return SpeechRequest.model_validate_json(raw)
    except ValidationError as exc:  # answered as the framework answers any invalid body
        raise RequestValidationError(exc.errors()) from None


def _wants_stream(request: Request, body: SpeechRequest) -> bool:
    """Stream unless the query says `stream=false` (OpenAI's API has no way to ask for a whole file)."""
    flag = request.query_params.get("stream", "true").strip().lower()
    if flag not in ("true", "false"):
        raise bad_request(f"Invalid 'stream' query parameter '{flag}': use true or false.", param="stream")
    if flag == "false" and body.stream_format == "audio":
        raise bad_request(
            "stream=false asks for the whole file and stream_format 'audio' for a stream: send one.",
            param="stream_format",
        )
    return flag == "true"


def _check_input(body: SpeechRequest, max_chars: int) -> None:
    if not body.input.strip():
        raise bad_request("'input' is empty: send the text to speak.", param="input")
    if len(body.input) > max_chars:
        raise bad_request(
            f"'input' is {len(body.input)} characters long; the maximum is {max_chars}.",
            param="input",
            code="string_above_max_length",
        )
    if body.stream_format == "sse":
        raise bad_request(
            "stream_format 'sse' is not supported for this model; use 'audio' or leave it out.",
            param="stream_format",
        )


async def _whole_file(
    nim: MagpieClient, pieces: list[str], choice: VoiceChoice, fmt: AudioFormat, speed: float
) -> bytes:
    """Synthesise piece by piece, in order, encoding each piece while the NIM makes the next."""
    encoder = Encoder(fmt, nim.sample_rate, speed)
    encoding: asyncio.Future[bytes] | None = None
    for piece in pieces:
        pcm = await nim.synthesize(piece, choice)
        if encoding is not None:
            await encoding
        encoding = asyncio.ensure_future(asyncio.to_thread(encoder.write, pcm))
    if encoding is not None:
        await encoding
    return await asyncio.to_thread(encoder.close)


class _Pieces:
    """The PCM of every piece, in order, as one stream.

    A task asks the NIM for one piece after another and reads each answer as fast as the NIM speaks it,
    so the NIM's turn in line ends when the piece does, not when a slow client has taken it; it works
    at most one piece ahead of what the client has taken, so a stalled client holds little memory.
    """

    _PIECE_END = b""  # audio chunks are never empty
    _AHEAD = 2  # pieces buffered: the one being read and the next

    def __init__(self, nim: MagpieClient, pieces: list[str], choice: VoiceChoice) -> None:
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._room = asyncio.Semaphore(self._AHEAD)
        self._task = asyncio.create_task(self._synthesise(nim, pieces, choice))

    async def _synthesise(self, nim: MagpieClient, pieces: list[str], choice: VoiceChoice) -> None:
        try:
            for piece in pieces:
                await self._room.acquire()
                async for chunk in nim.stream(piece, choice):
                    if chunk:
                        self._queue.put_nowait(chunk)
                self._queue.put_nowait(self._PIECE_END)
            self._queue.put_nowait(None)
        except Exception as exc:  # handed to the reader, which raises it in the request
            self._queue.put_nowait(exc)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        produced = False
        while (item := await self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            if item == self._PIECE_END:
                self._room.release()
                continue
            produced = True
            yield item
        if not produced:
            raise unavailable("The text-to-speech engine answered no audio.", code="tts_failed")

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _stream(
    nim: MagpieClient,
    pieces: list[str],
    choice: VoiceChoice,
    fmt: AudioFormat,
    speed: float,
    request_id: str,
    health: EngineHealth,
) -> Response:
    synthesis = _Pieces(nim, pieces, choice)
    pcm = aiter(synthesis)
    # Wait for the first audio before answering, so a NIM that fails at once (or a full line) gets a
    # clean error status rather than a cut stream.
    try:
        first = await anext(pcm)
    except BaseException:
        await synthesis.aclose()
        raise
    encoder = Encoder(fmt, nim.sample_rate, speed, streaming=True)

    async def body() -> AsyncIterator[bytes]:
        try:
            chunk: bytes | None = first
            while chunk is not None:
                data = await asyncio.to_thread(encoder.write, chunk)
                if data:
                    yield data
                chunk = await anext(pcm, None)
            yield await asyncio.to_thread(encoder.close)
        except APIError as exc:
            # Headers are gone: cut the connection so the client sees an incomplete body, not a short file.
            event("tts_stream_aborted", request_id=request_id, status=exc.status, code=exc.code)
            health.note_failure(exc)
            raise
        finally:
            await synthesis.aclose()

    return StreamingResponse(body(), media_type=fmt.content_type)
