"""Speech-to-text engine: faster-whisper (CTranslate2) in this process, and OpenAI's output formats.

The model loads once, in a background thread started with the gateway, from the model store on disk
only. Every decode and transcription runs on a bounded thread pool so the event loop keeps serving.
Nothing here logs or stores what was said.

Long audio (over one 30 s window) takes one of two paths, chosen by measurement (`tests/bench/stt_long.py`,
README): faster-whisper's batched pipeline loses whole phrases at window edges when it predicts segment
timestamps or cuts fixed windows (VAD off), and loses nothing on VAD's speech without timestamps, so it
runs only with VAD on where the caller needs the text (and word times) but not segment timestamps;
everything else, and every stream, goes window after window through `WhisperModel.transcribe`, which
yields each segment as soon as its window is decoded.

For other features (live dictation), the engine's public calls are:
- `SpeechEngine.segments(samples, options)`: in the calling (worker) thread, the language and a lazy
  iterator of `Segment`s for 16 kHz mono float32 samples;
- `SpeechEngine.stream(samples, options)`: the same on the engine's pool, as an async iterator;
- `SpeechEngine.require_ready()`, then `SpeechEngine.check(options)`: the 503 while no model can serve,
  and the 400 for options the loaded model cannot serve (an English-only model asked for German).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson

from appliance.audio.decode import SAMPLE_RATE, AudioError, DecodedAudio, decode_audio
from appliance.catalog import Catalog
from appliance.config import Settings
from appliance.errors import APIError, bad_request, unavailable
from appliance.log import elapsed_ms, event
from appliance.model_store import ModelStoreError, configured_stt_model, resolve

# CTranslate2's OpenMP threads spin between calls by default; in a server process that shares its cores
# with the event loop, the spinning takes them away (it doubled request latency on a 2-core box). The
# OpenMP runtime reads this when ctranslate2 loads, which happens after this module is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

Task = Literal["transcribe", "translate"]
WINDOW_SECONDS = 30.0  # Whisper's context
AUDIO_TOKENS_PER_SECOND = 50  # Whisper's encoder: 1,500 positions per 30 s window
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # OpenAI: temperature 0 means "raise as needed"
BEAM_SIZE = 5

# Whisper's language codes and the names OpenAI's verbose_json reports for them.
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish",
    "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian",
    "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese", "he": "hebrew",
    "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech", "ro": "romanian", "da": "danish",
    "hu": "hungarian", "ta": "tamil", "no": "norwegian", "th": "thai", "ur": "urdu", "hr": "croatian",
    "bg": "bulgarian", "lt": "lithuanian", "la": "latin", "mi": "maori", "ml": "malayalam",
    "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali",
    "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian",
    "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian",
    "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala",
    "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan",
    "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip


@dataclass(frozen=True)
class TranscribeOptions:
    task: Task = "transcribe"
    language: str | None = None  # None: detect
    prompt: str | None = None
    temperature: float = 0.0  # 0: start greedy, raise on failure
    word_timestamps: bool = False
    # False when the caller needs the text (and word times) only: long audio may then be batched.
    segment_timestamps: bool = True


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] = field(default_factory=list)


@dataclass
class Transcript:
    task: Task
    language: str  # code
    duration: float
    segments: list[Segment]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]


def public_name(spec: str) -> str:
    """The public model name for a configured model: `whisper-` and the catalog name, or the model
    directory's name without a `faster-whisper-` or `whisper-` prefix (`/srv/faster-whisper-base` is
    `whisper-base`)."""
    name = spec.rstrip("/").rsplit("/", 1)[-1]
    for prefix in ("faster-whisper-", "whisper-"):
        name = name.removeprefix(prefix)
    return f"whisper-{name}"


class SpeechEngine:
    """One WhisperModel, loaded in the background, and the pool its work runs on."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        # faster-whisper's INFO lines describe each request's audio (detected language and such).
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)
        self.settings = settings
        self.catalog = catalog
        # The model runs `stt_workers` transcriptions at once; as many more jobs may decode audio and
        # compute features meanwhile, so the model never waits on them.
        self.pool = ThreadPoolExecutor(max_workers=2 * settings.stt_workers, thread_name_prefix="stt")
        self.state = "loading"  # loading | ready | missing | failed
        self.problem: str | None = None  # for the admin
        self.public_problem: str | None = None  # for the apps: no server paths
        self.model_name = configured_stt_model(settings, catalog)  # `auto` resolved: the model to load
        self.name = public_name(self.model_name)  # what apps call it
        self.model: Any = None  # faster_whisper.WhisperModel once ready
        # Read once at load: CTranslate2 answers model properties only when a replica is free, which
        # would stall the event loop behind a running transcription.
        self.multilingual = True
        self.device: str | None = None
        self.compute_type: str | None = None

    # Lifecycle.

    async def start(self) -> None:
        threading.Thread(target=self.load, name="stt-load", daemon=True).start()

    async def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def load(self) -> None:
        started = time.perf_counter()
        try:
            stored = resolve(self.model_name, self.settings, self.catalog)
        except ModelStoreError as exc:
            self._fail("missing", f"speech-to-text is unavailable: {exc}", exc.public)
            return
        try:
            self.model = self._open(str(stored.path))
            self.multilingual = self.model.model.is_multilingual
        except Exception as exc:  # a broken model or runtime must not take the gateway down
            message = "speech-to-text model failed to load"
            self._fail("failed", f"{message}: {type(exc).__name__}: {exc}", f"{message}; see /readyz")
            return
        self.state = "ready"
        event(
            "stt_ready",
            model=stored.name,
            device=self.device,
            compute_type=self.compute_type,
            load_ms=elapsed_ms(started),
        )

    def _open(self, path: str) -> Any:
        import ctranslate2
        from faster_whisper import WhisperModel

        device = self.settings.stt_device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        compute_type = self.settings.stt_compute_type
        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        supported = ctranslate2.get_supported_compute_types(device)
        if compute_type not in supported:
            raise ValueError(f"compute type {compute_type} is not supported on {device}: {sorted(supported)}")
        # Split the CPU cores between the workers instead of letting each claim them all.
        threads = max(1, (os.cpu_count() or 1) // self.settings.stt_workers) if device == "cpu" else 0
        model = WhisperModel(
            path,
            device=device,
            compute_type=compute_type,
            cpu_threads=threads,
            num_workers=self.settings.stt_workers,
            local_files_only=True,
        )
        self.device, self.compute_type = device, compute_type
        return model

    def _fail(self, state: str, message: str, public: str) -> None:
        # The admin's message (log, /readyz) may name server paths; the apps get `public`, which does not.
        self.state, self.problem = state, message
        self.public_problem = f"Speech-to-text is unavailable: {public}"
        event("stt_unavailable", level=logging.ERROR, state=state, reason=message)

    # Status.

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ready": self.ready,
            "state": self.state,
            "model": self.model_name,
            "name": self.name,
        }
        if self.ready:
            body.update(device=self.device, compute_type=self.compute_type)
        if self.problem:
            body["error"] = self.problem
        return body

    def require_ready(self) -> None:
        if self.state == "loading":
            error = unavailable("The speech-to-text model is still loading; try again shortly.", "loading")
            error.headers["retry-after"] = "5"
            raise error
        if not self.ready:  # retrying will not install or repair the model
            message = self.public_problem or "Speech-to-text is unavailable."
            raise unavailable(message, code="model_unavailable", retry=False)

    # Work.

    def check(self, options: TranscribeOptions) -> None:
        """The 400 for what the loaded model cannot do: an English-only (`*.en`) model neither
        translates nor hears other languages, and would answer in English under the asked label."""
        if self.multilingual:
            return
        if options.task == "translate":
            raise bad_request(
                f"The loaded model ({self.name}) is English-only: it cannot translate. "
                "Configure a multilingual Whisper model for translations.",
                "model",
            )
        if options.language not in (None, "en"):
            raise bad_request(
                f"The loaded model ({self.name}) is English-only: it cannot transcribe "
                f"'{options.language}'. Leave 'language' out or send 'en'.",
                "language",
            )

    async def decode(self, data: bytes) -> DecodedAudio:
        return await self._in_pool(decode_audio, data, self.settings.stt_max_seconds)

    async def transcribe(self, data: bytes, options: TranscribeOptions) -> Transcript:
        """Decode and transcribe `data` in one worker job (AudioError for audio it cannot use)."""

        def run() -> Transcript:
            return self._transcript(decode_audio(data, self.settings.stt_max_seconds), options)

        return await self._in_pool(run)

    async def transcribe_audio(self, audio: DecodedAudio, options: TranscribeOptions) -> Transcript:
        """Transcribe samples already decoded (live dictation) exactly as an upload of them would be."""
        return await self._in_pool(self._transcript, audio, options)

    def _transcript(self, audio: DecodedAudio, options: TranscribeOptions) -> Transcript:
        language, segments = self.segments(audio.samples, options)
        return Transcript(options.task, language, audio.duration, list(segments))

    async def stream(self, samples: np.ndarray, options: TranscribeOptions) -> AsyncIterator[Segment]:
        """Segments as the worker decodes them; closing the iterator stops the worker early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Segment | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def run() -> None:
            try:
                for segment in self.segments(samples, options)[1]:
                    if stop.is_set():
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, segment)
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        self.pool.submit(run)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise engine_error(item)
                yield item
        finally:
            stop.set()

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except (APIError, AudioError):
            raise
        except Exception as exc:
            raise engine_error(exc) from None

    def segments(self, samples: np.ndarray, options: TranscribeOptions) -> tuple[str, Iterator[Segment]]:
        """Start transcribing 16 kHz mono float32 `samples` in this (worker) thread: the language, and a
        lazy iterator that decodes segment by segment as it is read."""
        duration = len(samples) / SAMPLE_RATE
        common: dict[str, Any] = {
            "language": options.language,
            "task": options.task,
            "initial_prompt": options.prompt or None,
            "word_timestamps": options.word_timestamps,
            "beam_size": BEAM_SIZE,
        }
        if duration > WINDOW_SECONDS and self.settings.stt_vad and not options.segment_timestamps:
            raw, info = self._batched(samples, options.temperature, common)
        else:
            temperature = FALLBACK_TEMPERATURES if options.temperature == 0 else options.temperature
            vad = self.settings.stt_vad and duration > WINDOW_SECONDS
            raw, info = self.model.transcribe(samples, temperature=temperature, vad_filter=vad, **common)
        return info.language, (_segment(i, s, duration) for i, s in enumerate(raw))

    def _batched(
        self, samples: np.ndarray, temperature: float, common: dict[str, Any]
    ) -> tuple[Iterator[Any], Any]:
        """faster-whisper's batched pipeline over the speech VAD finds, text only. Measured: with segment
        timestamps on it drops the end of a window whose last segment has no closing timestamp (whole
        phrases), and on fixed 30 s windows (VAD off) it loses the words a window edge cuts through."""
        from faster_whisper import BatchedInferencePipeline

        return BatchedInferencePipeline(self.model).transcribe(
            samples,
            temperature=temperature,
            batch_size=self.settings.stt_batch_size,
            vad_filter=True,
            without_timestamps=True,
            **common,
        )


def _clamp(t: float, duration: float) -> float:
    # Timestamps are predicted over a padded 30 s window; keep them inside the audio.
    return round(min(max(float(t), 0.0), duration), 3)


def _segment(index: int, raw: Any, duration: float) -> Segment:
    words = [Word(w.word, _clamp(w.start, duration), _clamp(w.end, duration)) for w in (raw.words or ())]
    return Segment(
        id=index,
        seek=int(raw.seek),
        start=_clamp(raw.start, duration),
        end=_clamp(raw.end, duration),
        text=raw.text,
        tokens=list(raw.tokens),
        temperature=float(raw.temperature or 0.0),
        avg_logprob=float(raw.avg_logprob),
        compression_ratio=float(raw.compression_ratio),
        no_speech_prob=float(raw.no_speech_prob),
        words=words,
    )


def engine_error(exc: BaseException) -> APIError:
    """A failure inside the engine, as the client should see it (never with the audio's content)."""
    event("stt_error", level=logging.ERROR, error=type(exc).__name__)
    if "out of memory" in str(exc).lower():
        return unavailable("The speech-to-text engine ran out of memory; try again shortly.", "overloaded")
    return APIError(
        500,
        f"The speech-to-text engine failed ({type(exc).__name__}).",
        type="server_error",
        code="engine_error",
        headers={"x-should-retry": "false"},
    )


# Output formats.


def usage(duration: float) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(duration)}


def as_json(t: Transcript) -> dict[str, Any]:
    return {"text": t.text, "usage": usage(t.duration)}


def as_verbose_json(t: Transcript, granularities: frozenset[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": t.task,
        "language": "english" if t.task == "translate" else LANGUAGES.get(t.language, t.language),
        "duration": round(t.duration, 3),
        "text": t.text,
    }
    if "segment" in granularities:
        body["segments"] = [
            {
                "id": s.id,
                "seek": s.seek,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": s.tokens,
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in t.segments
        ]
    if "word" in granularities:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in t.words]
    body["usage"] = usage(t.duration)
    return body


def _timestamp(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def as_srt(t: Transcript) -> str:
    cues = (
        f"{n}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for n, s in enumerate(t.segments, start=1)
    )
    return "\n".join(cues)


def as_vtt(t: Transcript) -> str:
    cues = (
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments
    )
    return "WEBVTT\n\n" + "\n".join(cues)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def sse_transcript(segments: AsyncIterator[Segment], duration: float) -> AsyncIterator[bytes]:
    """OpenAI's transcription stream: `transcript.text.delta` per segment as it is decoded, then
    `transcript.text.done` with the whole text and usage.

    A failure after the first event ends the stream with an error event, as every stream here does.
    """
    parts: list[str] = []
    output_tokens = 0
    try:
        async for segment in segments:
            delta = segment.text if parts else segment.text.lstrip()
            parts.append(delta)
            output_tokens += len(segment.tokens)
            yield sse({"type": "transcript.text.delta", "delta": delta})
    except APIError as exc:
        yield sse({"error": orjson.loads(exc.body())["error"]})
        return
    yield sse(
        {
            "type": "transcript.text.done",
            "text": "".join(parts).strip(),
            "usage": stream_usage(duration, output_tokens),
        }
    )


def stream_usage(duration: float, output_tokens: int) -> dict[str, Any]:
    """Usage in the shape OpenAI's stream events carry (tokens): the audio as the encoder's positions,
    the text as the tokens decoded."""
    audio_tokens = math.ceil(duration * AUDIO_TOKENS_PER_SECOND)
    return {
        "type": "tokens",
        "input_tokens": audio_tokens,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
        "output_tokens": output_tokens,
        "total_tokens": audio_tokens + output_tokens,
    }
