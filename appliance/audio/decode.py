"""Decode uploaded audio in memory with PyAV: any container FFmpeg reads, to 16 kHz mono float32.

Nothing is written to disk. Errors are classes whose messages are safe to show the client: they say what
is wrong with the file, never what it contains.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

from appliance.audio.framing import ogg_is_cut_off, wav_missing_seconds

SAMPLE_RATE = 16000
# A decode that falls this far short of the duration the container declares is a cut-off file.
_SHORTFALL_SECONDS = 0.5
_SHORTFALL_FRACTION = 0.05
_WAV_SHORTFALL_SECONDS = 0.1  # a WAV header states its data size exactly
# What one upload may make the decoder do. Speech needs 16 kHz mono: these leave room for any recorder
# (surround, 96 kHz studio audio) and refuse the rest before a frame is decoded.
MAX_CHANNELS = 8
MAX_SAMPLE_RATE = 96000
# No codec a recorder uses packs a second of audio into fewer bytes than this (2 kbit/s; the leanest
# speech codecs take 4.75 and more), nor more samples into a byte than this (Opus at 6 kbit/s: 64 a
# byte at 48 kHz). Decoding costs by the source's samples: 8 channels at 96 kHz must bring their bytes.
MIN_BYTES_PER_SECOND = 250
MAX_SAMPLES_PER_BYTE = 400
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
    """Decode `data` to 16 kHz mono float32, refusing what costs more than the upload can justify: a
    header that declares more than `max_seconds`, too many channels or too high a rate is refused before
    decoding, and decoding stops as soon as it passes `max_seconds` or what the file's size allows."""
    if not data:
        raise EmptyAudioError("The audio file is empty (0 bytes).")
    missing = wav_missing_seconds(data)
    if (missing is not None and missing > _WAV_SHORTFALL_SECONDS) or ogg_is_cut_off(data):
        raise TruncatedAudioError("The audio file is truncated: it ends before its last audio.")
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
        stream = container.streams.audio[0]
        declared = container.duration / av.time_base if container.duration else None
        budget = _budget(len(data), stream, declared, max_seconds)
        samples = _decode_stream(container, stream, budget, declared)
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


@dataclass(frozen=True)
class _Budget:
    """How much audio a decode may produce, and the error for going past it."""

    seconds: float
    error: AudioError


def _budget(
    size: int, stream: av.audio.stream.AudioStream, declared: float | None, cap: float | None
) -> _Budget:
    """Check what the header declares, and return the most audio decoding may produce."""
    channels, rate = stream.codec_context.channels, stream.sample_rate or 0
    if channels > MAX_CHANNELS:
        raise NotAudioError(f"The audio has {channels} channels; at most {MAX_CHANNELS} are accepted.")
    if rate > MAX_SAMPLE_RATE:
        raise NotAudioError(
            f"The audio is sampled at {rate} Hz; this appliance takes {MAX_SAMPLE_RATE} Hz at most "
            "(speech needs 16 kHz)."
        )
    if cap is not None and declared is not None and declared > cap + _SHORTFALL_SECONDS:
        raise _too_long(cap)
    # A file that claims more audio than its bytes could carry is a decompression bomb (an 11 KB FLAC
    # can declare half an hour of silence).
    justified = size / max(MIN_BYTES_PER_SECOND, rate * channels / MAX_SAMPLES_PER_BYTE)
    if declared is not None and declared > justified:
        raise _implausible(size, declared)
    if cap is not None and cap <= justified:
        return _Budget(cap, _too_long(cap))
    return _Budget(justified, _implausible(size, justified))


def _too_long(cap: float) -> AudioTooLongError:
    return AudioTooLongError(
        f"The audio is longer than this appliance accepts ({cap:g} s); send it in shorter parts."
    )


def _implausible(size: int, seconds: float) -> NotAudioError:
    return NotAudioError(
        f"The file holds more audio than its size allows ({size} bytes cannot carry {seconds:.0f} s "
        "of a recording); it is damaged or not a recording."
    )


def _decode_stream(
    container: av.container.InputContainer,
    stream: av.audio.stream.AudioStream,
    budget: _Budget,
    declared: float | None,
) -> np.ndarray:
    """Decode and resample frame by frame into one buffer: the source rate and channels never pile up,
    and the few large allocations go back to the system when the request is done."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    limit = int(budget.seconds * SAMPLE_RATE)
    buffer = np.empty(int(min(declared or 30.0, budget.seconds) * SAMPLE_RATE) + SAMPLE_RATE, np.float32)
    count = 0

    def take(frames: list[av.AudioFrame]) -> None:
        nonlocal buffer, count
        for frame in frames:
            chunk = frame.to_ndarray().reshape(-1)
            if count + len(chunk) > limit:
                raise budget.error
            if count + len(chunk) > len(buffer):
                grown = np.empty(min(2 * len(buffer), limit + SAMPLE_RATE), np.float32)
                grown[:count] = buffer[:count]
                buffer = grown
            buffer[count : count + len(chunk)] = chunk
            count += len(chunk)

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
    return buffer[:count]
