"""Encode 16-bit mono PCM to the formats OpenAI's speech endpoint answers in, with PyAV.

`Encoder` takes PCM as it arrives and hands back encoded bytes as soon as the muxer writes them, so a
stream can start before synthesis ends. `speed` changes tempo without changing pitch (ffmpeg `atempo`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from fractions import Fraction

import av
import av.filter
import numpy as np

SPEED_MIN, SPEED_MAX = 0.25, 4.0
_ATEMPO_MIN, _ATEMPO_MAX = 0.5, 2.0  # one atempo stage stays in this range; wider factors chain stages


@dataclass(frozen=True)
class AudioFormat:
    name: str  # OpenAI's response_format
    container: str  # ffmpeg muxer
    codec: str  # ffmpeg encoder
    content_type: str
    rate: int | None = None  # fixed output rate; None keeps the source rate
    bit_rate: int | None = None
    options: dict[str, str] = field(default_factory=dict)  # muxer options
    stream_options: dict[str, str] = field(default_factory=dict)  # muxer options when streaming


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        AudioFormat("mp3", "mp3", "libmp3lame", "audio/mpeg", bit_rate=64_000),
        # Opus runs at 48 kHz (its decoders always output 48 kHz), in an Ogg container.
        # A streamed Ogg page holds 100 ms (the muxer's default is 1 s), so audio leaves as it is made.
        AudioFormat(
            "opus",
            "ogg",
            "libopus",
            "audio/opus",
            rate=48_000,
            bit_rate=48_000,
            stream_options={"page_duration": "100000"},
        ),
        AudioFormat("aac", "adts", "aac", "audio/aac", bit_rate=64_000),
        AudioFormat("flac", "flac", "flac", "audio/flac"),
        # The canonical 44-byte header (no LIST chunk naming the muxer). Streamed, both sizes are
        # 0xFFFFFFFF ("until the end"), as in OpenAI's streaming WAV; whole, they are the real ones.
        AudioFormat("wav", "wav", "pcm_s16le", "audio/wav", options={"fflags": "+bitexact"}),
        # OpenAI's `pcm` is headerless 24 kHz signed 16-bit little-endian mono; apps assume that rate.
        AudioFormat("pcm", "s16le", "pcm_s16le", "audio/pcm", rate=24_000),
    )
}


def output_rate(fmt: AudioFormat, source_rate: int) -> int:
    return fmt.rate or source_rate


def atempo_stages(speed: float) -> list[float]:
    """Factors within atempo's range whose product is `speed` (0.25 -> [0.5, 0.5])."""
    if not SPEED_MIN <= speed <= SPEED_MAX:
        raise ValueError(f"speed must be between {SPEED_MIN} and {SPEED_MAX}")
    stages: list[float] = []
    while speed > _ATEMPO_MAX:
        stages.append(_ATEMPO_MAX)
        speed /= _ATEMPO_MAX
    while speed < _ATEMPO_MIN:
        stages.append(_ATEMPO_MIN)
        speed /= _ATEMPO_MIN
    if not math.isclose(speed, 1.0):
        stages.append(speed)
    return stages


class _Chunks:
    """A write-only, non-seekable file: muxers write streamable output and we take it as it comes."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class Encoder:
    """PCM (s16le mono at `source_rate`) in, one encoded file out.

    streaming=True: `write` and `close` return the bytes produced so far (the file's headers cannot be
    rewritten later, so sizes are marked unknown where the format has them). streaming=False: the file is
    built in memory with complete headers and `close` returns all of it.
    Not thread-safe; use one encoder from one thread at a time.
    """

    def __init__(
        self, fmt: AudioFormat, source_rate: int, speed: float = 1.0, streaming: bool = False
    ) -> None:
        self.format = fmt
        self.source_rate = source_rate
        self._sink: _Chunks | io.BytesIO = _Chunks() if streaming else io.BytesIO()
        options = {**fmt.options, **(fmt.stream_options if streaming else {})}
        self._container = av.open(self._sink, mode="w", format=fmt.container, options=options)
        rate = output_rate(fmt, source_rate)
        self._stream = self._container.add_stream(fmt.codec, rate=rate, layout="mono")
        if fmt.bit_rate:
            self._stream.bit_rate = fmt.bit_rate
        self._tempo = self._tempo_graph(atempo_stages(speed))
        self._pts = 0
        self._odd_byte = b""  # a sample split across two PCM chunks
        self._closed = False

    def _tempo_graph(self, stages: list[float]) -> av.filter.Graph | None:
        if not stages:
            return None
        graph = av.filter.Graph()
        node = graph.add_abuffer(
            format="s16", sample_rate=self.source_rate, layout="mono", time_base=Fraction(1, self.source_rate)
        )
        for factor in stages:
            stage = graph.add("atempo", f"{factor:.6f}")
            node.link_to(stage)
            node = stage
        node.link_to(graph.add("abuffersink"))
        graph.configure()
        return graph

    def write(self, pcm: bytes) -> bytes:
        """Encode more PCM; return the encoded bytes now available (always b"" unless streaming)."""
        pcm = self._odd_byte + pcm
        usable = len(pcm) - len(pcm) % 2
        self._odd_byte = pcm[usable:]
        if usable:
            self._feed(self._frame(pcm[:usable]))
        return self._take()

    def close(self) -> bytes:
        """Flush the encoder and finish the file; return the remaining bytes (the whole file if buffered)."""
        if self._closed:
            return b""
        self._closed = True
        self._feed(None)
        self._container.close()
        if isinstance(self._sink, io.BytesIO):
            return self._sink.getvalue()
        return self._sink.take()

    def _frame(self, pcm: bytes) -> av.AudioFrame:
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.source_rate
        frame.time_base = Fraction(1, self.source_rate)
        frame.pts = self._pts
        self._pts += samples.shape[1]
        return frame

    def _feed(self, frame: av.AudioFrame | None) -> None:
        """Through the tempo filter (if any) into the encoder; None flushes both."""
        if self._tempo is None:
            self._encode(frame)
            return
        self._tempo.push(frame)
        while True:
            try:
                self._encode(self._tempo.pull())
            except (av.BlockingIOError, av.EOFError):
                break
        if frame is None:
            self._encode(None)

    def _encode(self, frame: av.AudioFrame | None) -> None:
        # PyAV converts sample format, rate and frame size to what the codec needs.
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def _take(self) -> bytes:
        return self._sink.take() if isinstance(self._sink, _Chunks) else b""


def encode(pcm: bytes, fmt: AudioFormat, source_rate: int, speed: float = 1.0) -> bytes:
    """One whole file from PCM in memory."""
    encoder = Encoder(fmt, source_rate, speed)
    encoder.write(pcm)
    return encoder.close()
