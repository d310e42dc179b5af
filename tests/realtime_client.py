"""Live dictation from the client's side: the openai SDK's realtime connection, a reader thread that
records every server event with its arrival time, and audio as the Realtime API takes it."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import openai
from websockets.exceptions import ConnectionClosed

PCM_RATE = 24000
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


def connect(client: openai.OpenAI) -> Any:
    """The SDK's realtime connection (GA client) to a transcription session."""
    return client.realtime.connect(extra_query={"intent": "transcription"})


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def ga_session(turn_detection: dict[str, Any] | None, language: str = "en", **input_: Any) -> dict[str, Any]:
    """A GA transcription session update's `session`."""
    audio_input = {
        "format": {"type": "audio/pcm", "rate": PCM_RATE},
        "transcription": {"model": "whisper-1", "language": language},
        "turn_detection": turn_detection,
        **input_,
    }
    return {"type": "transcription", "audio": {"input": audio_input}}


class Event(dict):
    """A server event as sent (a JSON object), with its fields as attributes."""

    parsed: Any = None

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Recorder:
    """Reads a connection's events on a thread of its own, as an app's UI loop would."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.events: list[tuple[float, Event]] = []
        self.closed: BaseException | None = None
        self.done = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                raw = self.connection.recv_bytes()
                event = Event(json.loads(raw))
                event.parsed = self.connection.parse_event(raw)  # the SDK's own reading of it
                with self._changed:
                    self.events.append((time.monotonic(), event))
                    self._changed.notify_all()
        except ConnectionClosed as exc:
            self.closed = exc
        except Exception as exc:  # the test reports it through `closed`
            self.closed = exc
        with self._changed:
            self.done = True
            self._changed.notify_all()

    def of(self, kind: str) -> list[Any]:
        with self._changed:
            return [e for _, e in self.events if e.type == kind]

    def wait(self, test: Callable[[list[Any]], bool], timeout: float) -> list[Any]:
        """All events so far, once `test(events)` holds (AssertionError after `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                events = [e for _, e in self.events]
                if test(events):
                    return events
                left = deadline - time.monotonic()
                if left <= 0 or self.done:
                    got = [e.type for e in events]
                    raise AssertionError(f"gave up waiting; got {got}, closed: {self.closed}")
                self._changed.wait(left)

    def wait_for(self, kind: str, count: int = 1, timeout: float = 60) -> list[Any]:
        self.wait(lambda events: sum(e.type == kind for e in events) >= count, timeout)
        return self.of(kind)

    def wait_closed(self, timeout: float = 30) -> BaseException | None:
        self._thread.join(timeout)
        assert self.done, "the server did not close the session"
        return self.closed
