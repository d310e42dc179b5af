"""Audio made in the tests with PyAV: a tone over light noise, in each container clients send."""

from __future__ import annotations

import io
import struct
import wave

import av
import numpy as np

# name: (container format, codec, sample rate, file name clients would send)
CONTAINERS = {
    "wav": ("wav", "pcm_s16le", 16000, "clip.wav"),
    "mp3": ("mp3", "libmp3lame", 44100, "clip.mp3"),
    "m4a": ("ipod", "aac", 44100, "clip.m4a"),
    "ogg": ("ogg", "libopus", 48000, "clip.ogg"),
    "flac": ("flac", "flac", 22050, "clip.flac"),
    "webm": ("webm", "libopus", 48000, "clip.webm"),
}


def tone(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """float32 samples, shape (channels, n): 440 Hz with a little noise, so codecs have work to do."""
    n = round(seconds * rate)
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.02 * rng.standard_normal(n)
    return np.tile(wave.astype(np.float32), (channels, 1))


def make_audio(kind: str = "wav", seconds: float = 5.0, channels: int = 1) -> tuple[str, bytes]:
    """(file name, bytes) of `seconds` of audio in container `kind` (a CONTAINERS key)."""
    fmt, codec, rate, name = CONTAINERS[kind]
    layout = "mono" if channels == 1 else "stereo"
    samples = tone(seconds, rate, channels)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        step = rate // 10
        for start in range(0, samples.shape[1], step):
            chunk = np.ascontiguousarray(samples[:, start : start + step])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return name, buf.getvalue()


# Audio bombs: small files that declare far more audio than a recording of their size could hold.


def silent_flac(seconds: float, rate: int = 16000, layout: str = "mono") -> bytes:
    """FLAC of digital silence: half an hour of it packs into a few hundred KB."""
    channels = av.AudioLayout(layout).nb_channels
    step = rate * 10
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout=layout)
        zeros = np.zeros((1, step * channels), np.int16)  # packed: channels interleaved
        for start in range(0, round(seconds * rate), step):
            frame = av.AudioFrame.from_ndarray(zeros, format="s16", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def declare_flac_samples(data: bytes, total: int) -> bytes:
    """`data` (a FLAC file) with its STREAMINFO header claiming `total` samples."""
    offset = 18  # "fLaC", the block header (4), block sizes (4) and frame sizes (6)
    (packed,) = struct.unpack_from(">Q", data, offset)  # rate 20 bits, channels 3, depth 5, samples 36
    packed = (packed & ~((1 << 36) - 1)) | total
    return data[:offset] + struct.pack(">Q", packed) + data[offset + 8 :]


def pad_flac(data: bytes, size: int) -> bytes:
    """`data` (a FLAC file) with a PADDING metadata block of `size` bytes after its STREAMINFO."""
    streaminfo_end = 4 + 4 + 34
    last = data[4] & 0x80  # STREAMINFO was the last metadata block: the padding is now
    header = bytes([0x01 | last]) + size.to_bytes(3, "big")
    return (
        data[:4]
        + bytes([data[4] & 0x7F])
        + data[5:streaminfo_end]
        + header
        + bytes(size)
        + data[streaminfo_end:]
    )


def wav_with_channels(channels: int, seconds: float = 1.0, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(2 * channels * round(seconds * rate)))
    return buf.getvalue()
