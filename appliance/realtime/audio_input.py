"""Appended audio to Whisper's input: base64 PCM16 at 24 kHz (or G.711 at 8 kHz) to 16 kHz float32.

The resampling is FFmpeg's (PyAV's `AudioResampler`), the same one that decodes an upload, and it keeps
its state across appends, so a turn committed by hand holds exactly the samples an upload of the same
audio gives: the completed transcript can then equal the upload's.
"""

from __future__ import annotations

import base64
import binascii

import av
import numpy as np

from appliance.audio.decode import SAMPLE_RATE
from appliance.realtime.protocol import PCM_RATE, AudioFormat, ProtocolError

G711_RATE = 8000


def _ulaw_table() -> np.ndarray:
    # ITU-T G.711 mu-law expansion, as FFmpeg's pcm_mulaw decoder does it.
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = ((mantissa << 3) + 0x84) << exponent
    return np.where(codes & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (codes & 0x70) >> 4
    mantissa = codes & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(codes & 0x80, magnitude, -magnitude).astype(np.int16)


G711_TABLES = {"g711_ulaw": _ulaw_table(), "g711_alaw": _alaw_table()}


def decode_append(audio: object, fmt: AudioFormat, max_bytes: int) -> np.ndarray:
    """The int16 samples of one `input_audio_buffer.append` (ProtocolError when they are not usable)."""
    if not isinstance(audio, str):
        raise ProtocolError(
            "'audio' must be base64-encoded audio.", param="audio", code="invalid_audio", fatal=True
        )
    if len(audio) > (max_bytes + 2) // 3 * 4:  # refused before decoding: the base64 alone is too long
        raise too_large(max_bytes)
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(
            "'audio' is not valid base64.", param="audio", code="invalid_audio", fatal=True
        ) from None
    if len(data) > max_bytes:
        raise too_large(max_bytes)
    if fmt == "pcm16":
        if len(data) % 2:
            raise ProtocolError(
                "PCM16 audio must be whole 16-bit samples (an even number of bytes).",
                param="audio",
                code="invalid_audio",
                fatal=True,
            )
        return np.frombuffer(data, dtype="<i2")
    return G711_TABLES[fmt][np.frombuffer(data, dtype=np.uint8)]


def too_large(max_bytes: int) -> ProtocolError:
    return ProtocolError(
        f"The append is larger than this appliance accepts ({max_bytes} bytes of audio a message); "
        "send smaller chunks.",
        param="audio",
        code="append_too_large",
        fatal=True,
    )


class Resampler:
    """int16 samples at the session's input rate in, 16 kHz float32 out, in order, without gaps."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.rate = PCM_RATE if fmt == "pcm16" else G711_RATE
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        if not len(pcm):
            return np.zeros(0, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self.rate
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """The samples still held in the filter; the resampler starts afresh afterwards."""
        tail = self._collect(self._resampler.resample(None))
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        return tail

    @staticmethod
    def _collect(frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32, copy=False)
