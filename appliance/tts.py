"""The MagpieTTS NIM client: text splitting, voice choice, and the NIM's own HTTP API.

The NIM (port 9000) speaks multipart/form-data, not OpenAI:
- `POST /v1/audio/synthesize` (`text`, `language`, `voice`, `sample_rate_hz`) answers a WAV file;
- `POST /v1/audio/synthesize_online` (same fields) streams headerless 16-bit mono PCM as it is made;
- `GET /v1/audio/list_voices` answers `{"en-US,es-US,...": {"voices": ["Magpie-Multilingual.EN-US.Aria"]}}`;
- `GET /v1/health/ready` answers 200 once the model is loaded, 503 while it starts.
It takes at most 2,000 characters per request, so long text goes in sentence-sized pieces, in order.
Every synthesis request waits its turn in one line (`APPLIANCE_TTS_MAX_STREAMS` at once): past what its
profile batches, the NIM only gets slower for everyone, and a class of readers would time out together.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp
import av
import orjson

from appliance.config import Settings
from appliance.errors import APIError, bad_request, unavailable
from appliance.limits import WaitingLine

# OpenAI's built-in voice names; those the voice table leaves out speak with its "default" voice.
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse"}
) | {"marin", "cedar"}

# Where text may be cut, best first: between sentences (or lines), between clauses, between words.
# \u2026 is an ellipsis, \u201d \u2019 closing quotes, \u2013 \u2014 dashes; \u3002 \uff01 \uff1f end
# CJK sentences and \uff0c \uff1b \uff1a \u3001 CJK clauses, with no space after them.
_CUTS = (
    re.compile(
        r"(?<=[.!?\u2026])\s+|(?<=[.!?\u2026][\"'\u201d\u2019)\]])\s+|(?<=[\u3002\uff01\uff1f])\s*|\s*\n\s*"
    ),
    re.compile(r"(?<=[,;:\u2013\u2014])\s+|(?<=[\uff0c\uff1b\uff1a\u3001])\s*"),
    re.compile(r"\s+"),
)
_LOCALE = re.compile(r"^[A-Za-z]{2,3}-[A-Za-z]{2}$")


# The first piece is the first sentence (or as much of it as fits here): the NIM holds a turn in line
# for a whole piece, so a short first piece lets each of a class of readers hear their first words sooner.
FIRST_PIECE_CHARS = 150


def split_text(text: str, limit: int, first_limit: int | None = None) -> list[str]:
    """Pieces of at most `limit` characters, cut at the best boundary available, in reading order;
    with `first_limit`, the first piece is the first sentence, cut to at most that many characters."""
    text = text.strip()
    if first_limit is not None and len(text) > first_limit:
        head, rest = _first_piece(text, first_limit)
        return [head, *split_text(rest, limit)]
    return [p for p in _split(text, limit, 0) if p]


def _first_piece(text: str, limit: int) -> tuple[str, str]:
    """The first sentence and the rest; a sentence over `limit` gives as many clauses (or words) as fit."""
    sentence_end = next((m for m in _CUTS[0].finditer(text) if m.start() > 0), None)
    if sentence_end is not None and sentence_end.start() <= limit:
        return text[: sentence_end.start()], text[sentence_end.end() :]
    for cut in _CUTS[1:]:
        fits = [m for m in cut.finditer(text, 0, limit + 1) if m.start() > 0]
        if fits:
            return text[: fits[-1].start()], text[fits[-1].end() :]
    return text[:limit], text[limit:]


def _split(text: str, limit: int, level: int) -> list[str]:
    if len(text) <= limit:
        return [text]
    if level == len(_CUTS):  # one "word" longer than a piece: cut it where it must be cut
        return [text[i : i + limit] for i in range(0, len(text), limit)]
    pieces: list[str] = []
    current = ""
    for part in _CUTS[level].split(text):
        for sub in _split(part.strip(), limit, level + 1):
            if not sub:
                continue
            joined = f"{current} {sub}" if current else sub
            if len(joined) <= limit:
                current = joined
            else:
                pieces.append(current)
                current = sub
    return [*pieces, current]


def voice_locale(voice: str) -> str | None:
    """'Magpie-Multilingual.EN-US.Aria.Calm' -> 'en-US'."""
    for part in voice.split("."):
        if _LOCALE.match(part):
            language, region = part.split("-")
            return f"{language.lower()}-{region.upper()}"
    return None


def _in_locale(voice: str, locale: str) -> str:
    """The same speaker (and style) in another locale: EN-US.Aria -> DE-DE.Aria."""
    return ".".join(locale.upper() if _LOCALE.match(p) else p for p in voice.split("."))


@dataclass(frozen=True)
class VoiceCatalog:
    """What the NIM offers, from its list_voices."""

    locales: tuple[str, ...]
    voices: tuple[str, ...]

    @classmethod
    def from_nim(cls, body: Any) -> VoiceCatalog:
        if not isinstance(body, dict):
            raise ValueError("not an object")
        locales: list[str] = []
        voices: list[str] = []
        for key, group in body.items():
            if not isinstance(group, dict) or not isinstance(group.get("voices"), list):
                raise ValueError("no voices list")
            locales += [loc.strip() for loc in key.split(",") if loc.strip()]
            voices += [v for v in group["voices"] if isinstance(v, str)]
        locales += [loc for v in voices if (loc := voice_locale(v)) and loc not in locales]
        return cls(tuple(dict.fromkeys(locales)), tuple(dict.fromkeys(voices)))

    def language(self, name: str) -> str | None:
        """The NIM's spelling of a language code, matched case-insensitively."""
        return next((loc for loc in self.locales if loc.lower() == name.strip().lower()), None)

    def voice_for(self, voice: str, language: str) -> str | None:
        """`voice` if the NIM has it in `language`, else the same speaker there, else its first one there."""
        candidates = (voice, _in_locale(voice, language))
        for candidate in candidates:
            if candidate in self.voices and voice_locale(candidate) == language:
                return candidate
        return next((v for v in self.voices if voice_locale(v) == language and v.count(".") == 2), None)


class VoiceChoice(NamedTuple):
    voice: str  # a MagpieTTS voice name
    language: str  # the NIM's language code


def choose_voice(
    requested: str, language: str | None, catalog: VoiceCatalog, settings: Settings
) -> VoiceChoice:
    """Resolve the request's `voice` and optional `language`, or raise a 400 that lists what is valid."""
    lang = None
    if language is not None:
        lang = catalog.language(language)
        if lang is None:
            raise bad_request(
                f"Unknown language '{language}'. The speech engine speaks: {', '.join(catalog.locales)}.",
                param="language",
            )
    if requested in catalog.voices:  # a MagpieTTS voice name passes through
        return VoiceChoice(requested, lang or voice_locale(requested) or settings.tts_language)
    table = settings.tts_voices
    name = requested.strip().lower()
    configured = table.get(name) or (table.get("default") if name in OPENAI_VOICES else None)
    if configured is None:
        raise bad_request(
            f"Unknown voice '{requested}'. Valid voices: {', '.join(sorted({*table, *OPENAI_VOICES}))}, "
            f"or one of the speech engine's voices (GET /v1/audio/voices): {', '.join(catalog.voices)}.",
            param="voice",
            code="unknown_voice",
        )
    lang = lang or catalog.language(settings.tts_language) or settings.tts_language
    voice = catalog.voice_for(configured, lang)
    if voice is None:
        raise bad_request(f"The speech engine has no voice for language '{lang}'.", param="language")
    return VoiceChoice(voice, lang)


class MagpieClient:
    """Calls to one MagpieTTS NIM over the gateway's shared aiohttp session."""

    engine = "the text-to-speech engine"

    def __init__(self, settings: Settings, http: Callable[[], aiohttp.ClientSession | None]) -> None:
        self.url = settings.tts_url
        self.sample_rate = settings.tts_sample_rate
        self.voices_ttl = settings.tts_voices_ttl
        self._http = http
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.tts_timeout
        )
        self._health_timeout = aiohttp.ClientTimeout(total=settings.connect_timeout)
        self._read_timeout = settings.tts_timeout
        self._catalog: VoiceCatalog | None = None
        self._catalog_at = 0.0
        self._catalog_lock = asyncio.Lock()
        self.line = WaitingLine(
            settings.tts_max_streams,
            settings.tts_max_waiting,
            settings.tts_queue_timeout,
            "text-to-speech engine",
        )

    @property
    def http(self) -> aiohttp.ClientSession:
        session = self._http()
        if session is None:
            raise RuntimeError("the HTTP client is not started")
        return session

    async def health(self) -> tuple[bool, str]:
        """(ready, why) from the NIM's readiness endpoint."""
        try:
            async with self.http.get(self.url + "/v1/health/ready", timeout=self._health_timeout) as resp:
                if resp.status == 200:
                    return True, "ready"
                if resp.status == 404:  # answers, but has no NIM readiness route: another service
                    return False, (
                        f"not a NIM: GET {self.url}/v1/health/ready returned 404; APPLIANCE_TTS_URL "
                        "should be the MagpieTTS NIM's base URL, without /v1"
                    )
                return False, f"not ready (HTTP {resp.status}{_detail(await _error_message(resp))})"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return False, f"unreachable at {self.url} ({type(exc).__name__})"

    async def voices(self) -> VoiceCatalog:
        """The NIM's voices, cached for `voices_ttl` seconds; a stale list serves while the NIM is away."""
        if self._catalog is not None and time.monotonic() - self._catalog_at < self.voices_ttl:
            return self._catalog
        async with self._catalog_lock:
            if self._catalog is not None and time.monotonic() - self._catalog_at < self.voices_ttl:
                return self._catalog
            try:
                self._catalog = await self._fetch_voices()
                self._catalog_at = time.monotonic()
            except APIError:
                if self._catalog is None:
                    raise
            return self._catalog

    async def _fetch_voices(self) -> VoiceCatalog:
        with self._engine_errors():
            async with self.http.get(self.url + "/v1/audio/list_voices", timeout=self._timeout) as resp:
                await _raise_for_status(resp)
                body = await resp.read()
        try:
            return VoiceCatalog.from_nim(orjson.loads(body))
        except ValueError:
            raise unavailable(
                f"{self.engine} answered an unreadable voice list.", code="tts_failed"
            ) from None

    async def synthesize(self, text: str, choice: VoiceChoice) -> bytes:
        """PCM (s16le mono at sample_rate) for one piece of text, from the NIM's WAV answer."""
        async with self.line.slot():
            with self._engine_errors():
                async with self._post("/v1/audio/synthesize", text, choice) as resp:
                    wav = await resp.read()
        try:
            return pcm_from_wav(wav, self.sample_rate)
        except (av.FFmpegError, ValueError):
            raise unavailable(f"{self.engine} answered audio that is not WAV.", code="tts_failed") from None

    async def stream(self, text: str, choice: VoiceChoice) -> AsyncIterator[bytes]:
        """PCM chunks for one piece of text as the NIM makes them (read them promptly: the turn in
        line is held until the piece ends)."""
        async with self.line.slot():
            with self._engine_errors():
                async with self._post("/v1/audio/synthesize_online", text, choice) as resp:
                    async for chunk in resp.content.iter_any():
                        yield chunk

    @asynccontextmanager
    async def _post(self, path: str, text: str, choice: VoiceChoice) -> AsyncIterator[aiohttp.ClientResponse]:
        form = aiohttp.FormData(
            {
                "text": text,
                "language": choice.language,
                "voice": choice.voice,
                "sample_rate_hz": str(self.sample_rate),
            },
            default_to_multipart=True,
        )
        async with self.http.post(self.url + path, data=form, timeout=self._timeout) as resp:
            await _raise_for_status(resp)
            yield resp

    @contextmanager
    def _engine_errors(self) -> Iterator[None]:
        """Network failures and timeouts as a clear 503 (the NIM's own refusals are raised as they come)."""
        try:
            yield
        except aiohttp.ConnectionTimeoutError:
            raise unavailable(
                f"Cannot reach {self.engine} at {self.url} (connection timed out).", code="tts_unreachable"
            ) from None
        except TimeoutError:
            raise unavailable(
                f"{self.engine} did not answer within {self._read_timeout:g} s.", code="tts_timeout"
            ) from None
        except aiohttp.ClientError as exc:
            raise unavailable(
                f"Cannot reach {self.engine} at {self.url} ({type(exc).__name__}).", code="tts_unreachable"
            ) from None


def pcm_from_wav(wav: bytes, rate: int) -> bytes:
    """The samples of a WAV file as s16le mono at `rate` (converted if the NIM chose another format)."""
    try:  # the usual answer, read directly: PyAV's decode and resample cost 100x more
        with wave.open(io.BytesIO(wav)) as plain:
            if (plain.getnchannels(), plain.getsampwidth(), plain.getframerate()) == (1, 2, rate):
                return plain.readframes(plain.getnframes())
    except (wave.Error, EOFError):
        pass
    with av.open(io.BytesIO(wav), format="wav") as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        out = bytearray()
        for frame in container.decode(audio=0):
            for converted in resampler.resample(frame):
                out += converted.to_ndarray().tobytes()
        for converted in resampler.resample(None):
            out += converted.to_ndarray().tobytes()
    return bytes(out)


async def _error_message(resp: aiohttp.ClientResponse) -> str:
    """The NIM's error text: JSON `error`/`detail`/`message`, or the body's start."""
    raw = await resp.content.read(2048)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()[:300]
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message")
            if isinstance(value, str):
                return value[:300]
    return ""


def _detail(message: str) -> str:
    return f": {message}" if message else ""


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    message = await _error_message(resp)
    if resp.status in (400, 413, 422):  # the NIM refused this text or these fields
        raise APIError(400, f"The speech engine rejected the request{_detail(message)}", code="tts_rejected")
    if resp.status == 503:
        raise unavailable(f"The text-to-speech engine is not ready{_detail(message)}", code="tts_not_ready")
    raise unavailable(
        f"The text-to-speech engine failed (HTTP {resp.status}){_detail(message)}", code="tts_failed"
    )
