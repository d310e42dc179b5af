"""Decode uploaded audio in memory with PyAV: any container FFmpeg reads, to 16 kHz mono float32.

Nothing is written to disk. Errors are classes whose messages are safe to show the client: they say what
is wrong with the file, never what it contains.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

SAMPLE_RATE = 16000
# A decode that falls this far short of the duration the container declares is a cut-off file.
_SHORTFALL_SECONDS = 0.5
_SHORTFALL_FRACTION = 0.05
SUPPORTED = "flac, m4a, mp3, mp4, mpeg, mpga, oga, ogg, opus, wav or webm"


class AudioError(Exception):
    """Audio the appliance cannot use; the message says why, in words a client can act on."""


class EmptyAudioError(AudioError):
    pass


class NotAudioError(AudioError):
    pass


class TruncatedAudioError(AudioError):
    pass


class AudioTooLongError(AudioError):
    pass


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE
    duration: float  # seconds

    @classmethod
    def from_samples(cls, samples: np.ndarray) -> DecodedAudio:
        return cls(samples, len(samples) / SAMPLE_RATE)


def decode_audio(data: bytes, max_seconds: float | None = None) -> DecodedAudio:
    """Decode `data` to 16 kHz mono float32; stop early (AudioTooLongError) past `max_seconds`."""
    if not data:
        raise EmptyAudioError("The audio file is empty (0 bytes).")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except EOFError:
        raise TruncatedAudioError("The audio file is truncated: it ends inside its header.") from None
    except av.FFmpegError:
        raise NotAudioError(
            f"The file is not audio in a supported format ({SUPPORTED}), or it is damaged."
        ) from None
    with container:
        if not container.streams.audio:
            raise NotAudioError("The file holds no audio stream.")
        samples = _decode_stream(container, max_seconds)
        declared = container.duration / av.time_base if container.duration else None
    audio = DecodedAudio.from_samples(samples)
    if audio.duration == 0:
        raise EmptyAudioError("The audio file holds no audio samples.")
    if declared is not None and declared - audio.duration > max(
        _SHORTFALL_SECONDS, _SHORTFALL_FRACTION * declared
    ):
        raise TruncatedAudioError(
            f"The audio file is truncated: it declares {declared:.1f} s but holds {audio.duration:.1f} s."
        )
    return audio


def _decode_stream(container: av.container.InputContainer, max_seconds: float | None) -> np.ndarray:
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    limit = int(max_seconds * SAMPLE_RATE) if max_seconds is not None else None
    chunks: list[np.ndarray] = []
    count = 0

    def take(frames: list[av.AudioFrame]) -> None:
        nonlocal count
        for frame in frames:
            chunk = frame.to_ndarray().reshape(-1)
            chunks.append(chunk)
            count += len(chunk)
        if limit is not None and count > limit:
            raise AudioTooLongError(
                f"The audio is longer than this appliance accepts ({max_seconds:g} s); "
                "send it in shorter parts."
            )

    try:
        for frame in container.decode(stream):
            take(resampler.resample(frame))
        take(resampler.resample(None))
    except (av.FFmpegError, EOFError, ValueError):
        if count == 0:
            raise NotAudioError(f"The file is not audio in a supported format ({SUPPORTED}).") from None
        raise TruncatedAudioError(
            f"The audio file is damaged or truncated after {count / SAMPLE_RATE:.1f} s."
        ) from None
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)
