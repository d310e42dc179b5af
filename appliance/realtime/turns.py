"""Turns: the session's 16 kHz audio cut into utterances, by server VAD or by the client's commits.

Server VAD is Silero VAD (the ONNX model faster-whisper ships, so no download): one speech probability
per 32 ms frame, OpenAI's `threshold` on it, `prefix_padding_ms` of audio kept from before the speech,
and a turn ends after `silence_duration_ms` below the threshold (less Silero's customary 0.15 of
hysteresis). A turn that reaches Whisper's 30 s window is committed there and the next one starts at once.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.audio.decode import SAMPLE_RATE
from appliance.realtime.protocol import TurnDetection

# ONNX Runtime's telemetry writes a session file (`.ses`) into TMPDIR when a model loads; nothing of a
# session may reach the disk. It reads this when it loads, after this module is imported; it covers the
# upload path's VAD (faster-whisper's, also ONNX Runtime) in this process too.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

FRAME = 512  # Silero VAD's frame at 16 kHz: 32 ms
CONTEXT = 64  # samples of the previous frame Silero looks at
HYSTERESIS = 0.15


class SpeechProbability:
    """Silero VAD, loaded once and shared by every session (ONNX Runtime sessions are thread-safe)."""

    def __init__(self) -> None:
        self._session: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._session is None:
                from faster_whisper.vad import get_vad_model

                self._session = get_vad_model().session

    def __call__(self, frames: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Speech probability of each row of `frames` (n x FRAME); `context` is the audio before the first."""
        self.load()
        before = (
            np.concatenate([context[None, :], frames[:-1, -CONTEXT:]])
            if len(frames) > 1
            else context[None, :]
        )
        batch = np.concatenate([before, frames], axis=1).astype(np.float32, copy=False)
        state = np.zeros((1, 1, 128), dtype=np.float32)
        out, _, _ = self._session.run(None, {"input": batch, "h": state, "c": state})
        return np.asarray(out).reshape(-1)


@dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int
    audio: np.ndarray  # the whole turn, from its prefix padding to the end of the silence


Signal = SpeechStarted | SpeechStopped


def ms(samples: int) -> int:
    return samples * 1000 // SAMPLE_RATE


class Turns:
    """The open turn's audio and, with server VAD, where turns start and stop."""

    def __init__(
        self, vad: TurnDetection | None, probability: SpeechProbability, max_turn_seconds: float
    ) -> None:
        self.vad = vad
        self.probability = probability
        self.max_turn = int(max_turn_seconds * SAMPLE_RATE)
        self.received = 0  # samples in the session so far: the timeline of audio_start_ms / audio_end_ms
        self.turn: list[np.ndarray] = []
        self.turn_samples = 0
        self.speaking = False
        self._pending = np.zeros(0, dtype=np.float32)  # not yet a whole VAD frame
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._preroll: deque[np.ndarray] = deque()
        self._silence = 0

    @property
    def buffered_bytes(self) -> int:
        held = sum(a.nbytes for a in self.turn) + sum(a.nbytes for a in self._preroll)
        return held + self._pending.nbytes

    def audio(self) -> np.ndarray:
        return np.concatenate(self.turn) if self.turn else np.zeros(0, dtype=np.float32)

    def take(self) -> np.ndarray:
        """The open turn's audio; the turn is closed (a commit)."""
        audio = self.audio()
        self.turn, self.turn_samples, self.speaking, self._silence = [], 0, False, 0
        return audio

    def clear(self) -> None:
        self.take()
        self._preroll.clear()
        self._pending = np.zeros(0, dtype=np.float32)

    def feed(self, samples: np.ndarray) -> list[Signal]:
        if self.vad is None:
            self._add(samples)
            self.received += len(samples)
            return []
        signals: list[Signal] = []
        pending = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        whole = len(pending) // FRAME * FRAME
        self._pending = pending[whole:].copy()
        if whole:
            frames = pending[:whole].reshape(-1, FRAME)
            probabilities = self.probability(frames, self._context)
            self._context = frames[-1, -CONTEXT:].copy()
            for frame, p in zip(frames, probabilities, strict=True):
                signals.extend(self._frame(frame, float(p), self.vad))
        return signals

    def _add(self, samples: np.ndarray) -> None:
        if len(samples):
            self.turn.append(samples)
            self.turn_samples += len(samples)

    def _frame(self, frame: np.ndarray, p: float, vad: TurnDetection) -> list[Signal]:
        self.received += FRAME
        if not self.speaking:
            self._preroll.append(frame)
            padding = vad.prefix_padding_ms * SAMPLE_RATE // 1000
            while len(self._preroll) > 1 and (len(self._preroll) - 2) * FRAME >= padding:
                self._preroll.popleft()
            if p < vad.threshold:
                return []
            # The preroll ends with this frame: keep `padding` samples before it, and it.
            audio = np.concatenate(self._preroll)[-(padding + FRAME) :]
            self._preroll.clear()
            self.speaking, self._silence = True, 0
            self._add(audio)
            return [SpeechStarted(ms(self.received - len(audio)))]
        self._add(frame)
        if p >= vad.threshold:
            self._silence = 0
        elif p < max(vad.threshold - HYSTERESIS, 0.01):
            self._silence += FRAME
        if self._silence * 1000 >= vad.silence_duration_ms * SAMPLE_RATE:
            return [SpeechStopped(ms(self.received), self.take())]
        if self.turn_samples >= self.max_turn:  # Whisper's window is full: commit here, go on at once
            stopped = SpeechStopped(ms(self.received), self.take())
            self.speaking = True
            return [stopped, SpeechStarted(ms(self.received))]
        return []
