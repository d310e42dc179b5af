"""OpenAI's Realtime transcription protocol: the session settings, parsed from either dialect of the
session update, and the server events, rendered as the dialect the client speaks.

Two dialects are accepted, both on `GET /v1/realtime?intent=transcription`:

- GA (the openai SDK's `client.realtime`): `session.update` with `session.type: "transcription"` and
  settings under `session.audio.input` (`format: {"type": "audio/pcm", "rate": 24000}`, `audio/pcmu`,
  `audio/pcma`); answered with `session.created` / `session.updated`, and the item events
  `conversation.item.added` / `conversation.item.done`.
- Beta (`client.beta.realtime`, header `OpenAI-Beta: realtime=v1`): `transcription_session.update`
  with `input_audio_format` (`pcm16`, `g711_ulaw`, `g711_alaw`), `input_audio_transcription` and
  `turn_detection` at the top; answered with `transcription_session.created` / `.updated` and
  `conversation.item.created`.

Everything else (the input audio buffer, speech started/stopped, the transcription delta and completed
events, errors) is named the same in both. A setting this gateway does not serve is an error event,
never silently ignored.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from appliance.stt import LANGUAGES

Dialect = Literal["ga", "beta"]
AudioFormat = Literal["pcm16", "g711_ulaw", "g711_alaw"]

PCM_RATE = 24000  # the only PCM rate OpenAI's Realtime API takes
GA_FORMATS: dict[str, AudioFormat] = {
    "audio/pcm": "pcm16",
    "audio/pcmu": "g711_ulaw",
    "audio/pcma": "g711_alaw",
}
BETA_FORMATS: tuple[AudioFormat, ...] = ("pcm16", "g711_ulaw", "g711_alaw")
DEFAULT_MODEL = "whisper-1"
VAD_FIELDS = (
    "type",
    "threshold",
    "prefix_padding_ms",
    "silence_duration_ms",
    "create_response",
    "interrupt_response",
    "idle_timeout_ms",
)


class ProtocolError(Exception):
    """A client event the session cannot act on; sent back as an `error` event. `fatal` ends the session."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_request",
        param: str | None = None,
        type: str = "invalid_request_error",
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.fatal = fatal
        self.event_id: str | None = None


@dataclass(frozen=True)
class TurnDetection:
    """OpenAI's `server_vad`: speech probability threshold, audio kept before speech, silence that ends it."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class SessionConfig:
    format: AudioFormat = "pcm16"
    model: str = DEFAULT_MODEL
    language: str | None = None
    prompt: str | None = None
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)


# Parsing the two dialects of the session update.


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"'{param}' must be an object.", param=param)
    return value


def _only(obj: dict[str, Any], allowed: tuple[str, ...], param: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ProtocolError(
            f"'{param}.{unknown[0]}' is not supported by this appliance's transcription sessions.",
            param=f"{param}.{unknown[0]}",
            code="unsupported_setting",
        )


def apply_update(config: SessionConfig, event: dict[str, Any], dialect: Dialect) -> SessionConfig:
    """The session settings after a `session.update` (GA) or `transcription_session.update` (beta)."""
    session = _object(event.get("session"), "session")
    if dialect == "ga":
        return _apply_ga(config, session)
    return _apply_beta(config, session)


def _apply_ga(config: SessionConfig, session: dict[str, Any]) -> SessionConfig:
    _only(session, ("type", "audio", "include", "object", "id"), "session")
    if session.get("type") != "transcription":
        raise ProtocolError(
            "This appliance serves transcription sessions only: set session.type to 'transcription'.",
            param="session.type",
        )
    _no_include(session)
    audio = _object(session.get("audio", {}), "session.audio")
    _only(audio, ("input",), "session.audio")
    given = _object(audio.get("input", {}), "session.audio.input")
    param = "session.audio.input"
    _only(given, ("format", "transcription", "turn_detection", "noise_reduction"), param)
    if "format" in given:
        config = replace(config, format=_ga_format(given["format"]))
    return _apply_common(config, given, param, "transcription", "noise_reduction")


def _apply_beta(config: SessionConfig, session: dict[str, Any]) -> SessionConfig:
    allowed = (
        "input_audio_format",
        "input_audio_transcription",
        "turn_detection",
        "input_audio_noise_reduction",
        "include",
        "modalities",
    )
    _only(session, allowed, "session")
    _no_include(session)
    if "modalities" in session and session["modalities"] not in (["text"], ("text",)):
        raise ProtocolError(
            "A transcription session's modalities can only be ['text'].", param="session.modalities"
        )
    if "input_audio_format" in session:
        if session["input_audio_format"] not in BETA_FORMATS:
            raise ProtocolError(
                f"Unsupported input_audio_format; use one of {', '.join(BETA_FORMATS)}.",
                param="session.input_audio_format",
                code="invalid_audio_format",
                fatal=True,
            )
        config = replace(config, format=session["input_audio_format"])
    return _apply_common(
        config, session, "session", "input_audio_transcription", "input_audio_noise_reduction"
    )


def _no_include(session: dict[str, Any]) -> None:
    if session.get("include"):
        raise ProtocolError(
            "'include' (log probabilities) is not supported by this appliance.",
            param="session.include",
            code="unsupported_setting",
        )


def _apply_common(
    config: SessionConfig, given: dict[str, Any], param: str, transcription_key: str, noise_key: str
) -> SessionConfig:
    if given.get(noise_key) is not None:
        raise ProtocolError(
            f"Noise reduction is not available on this appliance; set '{noise_key}' to null.",
            param=f"{param}.{noise_key}",
            code="unsupported_setting",
        )
    if transcription_key in given:
        config = _transcription(config, given[transcription_key], f"{param}.{transcription_key}")
    if "turn_detection" in given:
        config = replace(
            config, turn_detection=_turn_detection(given["turn_detection"], f"{param}.turn_detection")
        )
    return config


def _ga_format(value: Any) -> AudioFormat:
    fmt = _object(value, "session.audio.input.format")
    _only(fmt, ("type", "rate"), "session.audio.input.format")
    kind = GA_FORMATS.get(fmt.get("type", "audio/pcm"))
    if kind is None:
        raise ProtocolError(
            f"Unsupported audio format; use one of {', '.join(GA_FORMATS)}.",
            param="session.audio.input.format.type",
            code="invalid_audio_format",
            fatal=True,
        )
    if kind == "pcm16" and fmt.get("rate", PCM_RATE) != PCM_RATE:
        raise ProtocolError(
            f"audio/pcm is taken at {PCM_RATE} Hz only; resample the audio to {PCM_RATE} Hz.",
            param="session.audio.input.format.rate",
            code="invalid_audio_format",
            fatal=True,
        )
    return kind


def _transcription(config: SessionConfig, value: Any, param: str) -> SessionConfig:
    if value is None:
        raise ProtocolError(
            "A transcription session needs its transcription settings; they cannot be turned off.",
            param=param,
        )
    given = _object(value, param)
    _only(given, ("model", "language", "prompt"), param)
    model = given.get("model", config.model)
    if not isinstance(model, str) or not model:
        raise ProtocolError("'model' must be a model name such as 'whisper-1'.", param=f"{param}.model")
    language = given.get("language", config.language) or None
    if language is not None and (not isinstance(language, str) or language.strip().lower() not in LANGUAGES):
        raise ProtocolError(
            "Unsupported language; give an ISO-639-1 code such as 'en' or 'de'.",
            param=f"{param}.language",
        )
    prompt = given.get("prompt", config.prompt)
    if prompt is not None and not isinstance(prompt, str):
        raise ProtocolError("'prompt' must be a string.", param=f"{param}.prompt")
    return replace(
        config, model=model, language=language.strip().lower() if language else None, prompt=prompt or None
    )


def _turn_detection(value: Any, param: str) -> TurnDetection | None:
    if value is None:
        return None  # manual commits
    given = _object(value, param)
    _only(given, VAD_FIELDS, param)
    if given.get("type", "server_vad") != "server_vad":
        raise ProtocolError(
            "Only 'server_vad' turn detection is available (or null for manual commits).",
            param=f"{param}.type",
            code="unsupported_setting",
        )
    if given.get("idle_timeout_ms") is not None:
        raise ProtocolError(
            "'idle_timeout_ms' is not supported by this appliance.",
            param=f"{param}.idle_timeout_ms",
            code="unsupported_setting",
        )
    # create_response / interrupt_response concern model responses, which transcription sessions never have.
    defaults = TurnDetection()
    threshold = _number(given, "threshold", defaults.threshold, 0.0, 1.0, param)
    padding = _number(given, "prefix_padding_ms", defaults.prefix_padding_ms, 0, 5000, param)
    silence = _number(given, "silence_duration_ms", defaults.silence_duration_ms, 32, 10000, param)
    return TurnDetection(float(threshold), int(padding), int(silence))


def _number(given: dict[str, Any], name: str, default: float, low: float, high: float, param: str) -> float:
    value = given.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ProtocolError(f"'{name}' must be a number from {low:g} to {high:g}.", param=f"{param}.{name}")
    return value


# Rendering the session for the created/updated events.


def render_session(config: SessionConfig, session_id: str, dialect: Dialect) -> dict[str, Any]:
    transcription = {"model": config.model, "language": config.language or "", "prompt": config.prompt or ""}
    vad = config.turn_detection
    turn_detection = (
        None
        if vad is None
        else {
            "type": "server_vad",
            "threshold": vad.threshold,
            "prefix_padding_ms": vad.prefix_padding_ms,
            "silence_duration_ms": vad.silence_duration_ms,
        }
    )
    if dialect == "beta":
        return {
            "id": session_id,
            "object": "realtime.transcription_session",
            "input_audio_format": config.format,
            "input_audio_transcription": transcription,
            "turn_detection": turn_detection,
            "input_audio_noise_reduction": None,
            "include": None,
            "modalities": ["text"],
        }
    fmt = {"pcm16": {"type": "audio/pcm", "rate": PCM_RATE}, "g711_ulaw": {"type": "audio/pcmu"}}.get(
        config.format, {"type": "audio/pcma"}
    )
    return {
        "id": session_id,
        "object": "realtime.transcription_session",
        "type": "transcription",
        "audio": {
            "input": {
                "format": fmt,
                "transcription": transcription,
                "turn_detection": turn_detection,
                "noise_reduction": None,
            }
        },
        "include": [],
    }


# Server events.


class Events:
    """Builds server events with unique ids, in the session's dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._prefix = secrets.token_hex(6)
        self._count = itertools.count(1)

    def _id(self, kind: str) -> str:
        return f"{kind}_{self._prefix}{next(self._count):06x}"

    def new_item_id(self) -> str:
        return self._id("item")

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        return {"type": type, "event_id": self._id("event"), **fields}

    def session(self, config: SessionConfig, session_id: str, created: bool) -> dict[str, Any]:
        prefix = "transcription_session" if self.dialect == "beta" else "session"
        suffix = "created" if created else "updated"
        return self.event(f"{prefix}.{suffix}", session=render_session(config, session_id, self.dialect))

    def item_added(self, item_id: str, previous_item_id: str | None) -> dict[str, Any]:
        item = _user_item(item_id, "in_progress")
        name = "conversation.item.created" if self.dialect == "beta" else "conversation.item.added"
        return self.event(name, previous_item_id=previous_item_id, item=item)

    def item_done(self, item_id: str, transcript: str) -> dict[str, Any] | None:
        if self.dialect == "beta":
            return None  # the beta API had no item-done event
        item = _user_item(item_id, "completed", transcript)
        return self.event("conversation.item.done", item=item)

    def error(self, exc: ProtocolError) -> dict[str, Any]:
        body = {"type": exc.type, "code": exc.code, "message": exc.message, "param": exc.param}
        body["event_id"] = exc.event_id
        return self.event("error", error=body)


def _user_item(item_id: str, status: str, transcript: str | None = None) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": status,
        "role": "user",
        "content": [{"type": "input_audio", "transcript": transcript}],
    }
