"""OpenAI's audio routes, served by the in-process speech-to-text engine:
`POST /v1/audio/transcriptions` and `POST /v1/audio/translations`.

The multipart body is parsed as it arrives, into memory only, and the upload cap is enforced while
reading, so an oversized file is refused without being buffered whole. Audio never goes to the cloud.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from appliance.audio.decode import AudioError, AudioTooLongError, EmptyAudioError, TruncatedAudioError
from appliance.errors import APIError, bad_request
from appliance.limits import Admission, too_large
from appliance.middleware import FastHandler, request_context
from appliance.state import AppState
from appliance.stt import (
    LANGUAGES,
    SpeechEngine,
    Task,
    TranscribeOptions,
    Transcript,
    as_json,
    as_srt,
    as_verbose_json,
    as_vtt,
    sse_transcript,
)

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("segment", "word")
FORM_OVERHEAD = 64 * 1024  # room for the form's other fields and part headers
MAX_FIELD_BYTES = 16 * 1024
MAX_PARTS = 32
# Past the cap, the rest of an upload is read and dropped (up to this much more) so that the client is
# still reading when the 413 arrives, instead of seeing its upload cut off.
DRAIN_BYTES = 256 * 1024 * 1024


def install(app: FastAPI, state: AppState) -> None:
    engine = SpeechEngine(state.settings, state.catalog)
    # The public name says which model is loaded; `whisper-1` stays the alias apps use.
    for route in state.catalog.routes_of_kind("stt"):
        state.catalog.rename(route.name, engine.name)
    admission = Admission(state.settings.stt_max_pending, "speech-to-text")
    state.services["stt"] = engine  # live dictation (appliance.realtime) shares the engine
    state.readiness["stt"] = engine.status
    state.availability["stt"] = lambda route: engine.ready
    state.startup.append(engine.start)
    state.shutdown.append(engine.close)

    def handler(task: Task) -> FastHandler:
        async def handle(scope: Scope, receive: Receive) -> Response:
            slot = ExitStack()
            slot.enter_context(admission.slot())
            try:
                response = await serve(Request(scope, receive), state, engine, task)
            except BaseException:
                slot.close()
                raise
            if isinstance(response, TranscriptStream):  # the slot is held until the stream ends
                response.release = slot.close
            else:
                slot.close()
            return response

        return handle

    # Served ahead of the framework's stack, like the chat relay: it shortens every request's path.
    state.add_fast_route(app, "/v1/audio/transcriptions", handler("transcribe"))
    state.add_fast_route(app, "/v1/audio/translations", handler("translate"))


async def serve(request: Request, state: AppState, engine: SpeechEngine, task: Task) -> Response:
    form = await read_form(request, state.settings.stt_max_bytes)
    route = state.require_route(form.get("model"), "stt")
    ctx = request_context(request.scope)
    ctx.model, ctx.target = route.name, "local"
    state.governance.admit(ctx, route, audio=True)
    params = Params.parse(form, task)
    if form.file is None:
        raise bad_request("'file' is required: the audio to transcribe, as a multipart file.", "file")
    engine.require_ready()
    engine.check(params.options)
    try:
        if params.stream:  # decode first: bad audio is a 400, not an event in a 200 stream
            audio = await engine.decode(form.file)
            ctx.audio_seconds = audio.duration
            return TranscriptStream(
                sse_transcript(engine.stream(audio.samples, params.options), audio.duration),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        transcript = await engine.transcribe(form.file, params.options)
        ctx.audio_seconds = transcript.duration
    except AudioError as exc:
        raise audio_error(exc) from None
    return render(transcript, params)


class TranscriptStream(StreamingResponse):
    """A streamed transcript that holds its admission slot until the last event is sent (or the client
    has gone): a stream works as long as any other request, so the cap counts it until it ends."""

    release: Callable[[], None] = staticmethod(lambda: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.body_iterator = self._releasing(self.body_iterator)
        try:
            await super().__call__(scope, receive, send)
        finally:  # the client went away, or the stream never started
            self.release()

    async def _releasing(self, events: AsyncIterable[str | bytes]) -> AsyncIterator[str | bytes]:
        # Free the slot with the last event, before the body's end reaches the client: a client that
        # sends its next request at once must find the slot free.
        try:
            async for event in events:
                yield event
        finally:
            self.release()


def render(transcript: Transcript, params: Params) -> Response:
    if params.response_format == "json":
        return JSONResponse(as_json(transcript))
    if params.response_format == "verbose_json":
        return JSONResponse(as_verbose_json(transcript, params.granularities))
    if params.response_format == "srt":
        return PlainTextResponse(as_srt(transcript))
    if params.response_format == "vtt":
        return PlainTextResponse(as_vtt(transcript), media_type="text/vtt")
    return PlainTextResponse(transcript.text + "\n")


def audio_error(exc: AudioError) -> APIError:
    code = {
        EmptyAudioError: "empty_file",
        TruncatedAudioError: "truncated_audio",
        AudioTooLongError: "audio_too_long",
    }.get(type(exc), "invalid_audio")
    return APIError(400, str(exc), param="file", code=code)


# Request parameters.


@dataclass(frozen=True)
class Params:
    options: TranscribeOptions
    response_format: str = "json"
    granularities: frozenset[str] = frozenset({"segment"})
    stream: bool = False

    @classmethod
    def parse(cls, form: Form, task: Task) -> Params:
        response_format = form.get("response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            raise bad_request(
                f"Unsupported response_format '{response_format}'; use one of {', '.join(RESPONSE_FORMATS)}.",
                "response_format",
            )
        language = None
        if task == "transcribe" and form.get("language"):
            language = form.get("language", "").strip().lower()
            if language not in LANGUAGES:
                raise bad_request(
                    f"Unsupported language '{language}'; give an ISO-639-1 code such as 'en' or 'de'.",
                    "language",
                )
        granularities = _granularities(form, response_format)
        stream = _boolean(form.get("stream"), "stream")
        if stream and response_format not in ("json", "text"):
            raise bad_request(
                "stream=true streams the transcript's text: use response_format json or text.", "stream"
            )
        options = TranscribeOptions(
            task=task,
            language=language,
            prompt=form.get("prompt") or None,
            temperature=_temperature(form.get("temperature")),
            word_timestamps="word" in granularities,
            # Streams send segment by segment; srt, vtt and verbose_json's segments carry their times.
            segment_timestamps=stream
            or response_format in ("srt", "vtt")
            or (response_format == "verbose_json" and "segment" in granularities),
        )
        return cls(options, response_format, granularities, stream)


def _temperature(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        temperature = float(value)
    except ValueError:
        temperature = -1.0
    if not 0.0 <= temperature <= 1.0:
        raise bad_request("'temperature' must be a number between 0 and 1.", "temperature")
    return temperature


def _granularities(form: Form, response_format: str) -> frozenset[str]:
    given = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    unknown = [g for g in given if g not in GRANULARITIES]
    if unknown:
        raise bad_request(
            f"Unsupported timestamp granularity '{unknown[0]}'; use 'segment' and/or 'word'.",
            "timestamp_granularities",
        )
    if given and response_format != "verbose_json":
        raise bad_request(
            "timestamp_granularities needs response_format 'verbose_json'.", "timestamp_granularities"
        )
    return frozenset(given or ("segment",))


def _boolean(value: str | None, name: str) -> bool:
    if value is None or value.lower() in ("", "false", "0"):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise bad_request(f"'{name}' must be true or false.", name)


# Multipart, in memory and bounded.


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)
    file: bytes | None = None

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else default

    def getlist(self, name: str) -> list[str]:
        return self.fields.get(name, [])


class _FormBuilder:
    """Callbacks for python-multipart's streaming parser: fields as text, the file part as bytes."""

    def __init__(self, max_file_bytes: int) -> None:
        self.form = Form()
        self.max_file_bytes = max_file_bytes
        self.parts = 0
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.name = ""
        self.is_file = False
        self.data = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value_data,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise bad_request(f"Too many form fields (at most {MAX_PARTS}).")
        self.header_name = self.header_value = self.disposition = b""
        self.data = bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def header_value_data(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        self.name = options.get(b"name", b"").decode("utf-8", "replace")
        self.is_file = self.name == "file"

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.data += data[start:end]
        if self.is_file and len(self.data) > self.max_file_bytes:
            raise file_too_large(self.max_file_bytes)
        if not self.is_file and len(self.data) > MAX_FIELD_BYTES:
            raise bad_request(f"Form field '{self.name}' is too long.", self.name or None)

    def part_end(self) -> None:
        if self.is_file:
            self.form.file = bytes(self.data)
        elif self.name:
            try:
                value = self.data.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_request(f"Form field '{self.name}' is not UTF-8 text.", self.name) from None
            self.form.fields.setdefault(self.name, []).append(value)
        self.data = bytearray()


def file_too_large(limit: int) -> APIError:
    return too_large(limit, "The audio file", param="file", code="file_too_large")


async def read_form(request: Request, max_file_bytes: int) -> Form:
    """Parse a multipart/form-data body into memory, refusing more than `max_file_bytes` of file."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise bad_request("The request body must be multipart/form-data, as OpenAI's audio API takes.")
    max_body = max_file_bytes + FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        if int(declared) <= max_body + DRAIN_BYTES:
            await _drain(request.stream())
        raise file_too_large(max_file_bytes)
    builder = _FormBuilder(max_file_bytes)
    parser = MultipartParser(boundary, builder.callbacks())
    chunks = request.stream()
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_body:
                raise file_too_large(max_file_bytes)
            parser.write(chunk)
        parser.finalize()
    except APIError as exc:
        if exc.status == 413:
            await _drain(chunks)
        raise
    except MultipartParseError:
        raise bad_request("The multipart/form-data body is malformed.") from None
    except ClientDisconnect:
        raise bad_request("The client disconnected before the upload finished.") from None
    return builder.form


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    dropped = 0
    try:
        async for chunk in chunks:
            dropped += len(chunk)
            if dropped > DRAIN_BYTES:
                return
    except ClientDisconnect:
        return
