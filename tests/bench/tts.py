"""Text-to-speech benchmark: the time the gateway adds (translation, splitting, encoding) to the NIM's.

The real gateway runs against the MagpieTTS NIM simulator on loopback. "Direct" sends the simulator the
same pieces the gateway sends, one after another, and reads the WAV (or, streaming, the first PCM
bytes); the difference is the gateway's work. Direct and gateway runs alternate, so a busy machine
slows both alike. The simulator synthesises instantly in the first rows, so nothing hides the gateway's
cost; the last rows give synthesis a real duration. Run: python -m tests.bench.tts
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from appliance.tts import split_text
from tests.harness import CLIENT_KEY, BackgroundLoop, Gateway, clean_env
from tests.sims.magpie_nim import MagpieNIM

PIECE_CHARS = 250  # the gateway's default APPLIANCE_TTS_PIECE_CHARS
SAMPLE_RATE = 22050
VOICE = "Magpie-Multilingual.EN-US.Aria"  # what "alloy" maps to
SHORT_TEXT = "Read this sentence aloud, slowly and clearly."
LONG_TEXT = " ".join(f"This is sentence {i} of a long reading passage for the class." for i in range(80))
LONG_TEXT = LONG_TEXT[:4096]


def _fields(text: str) -> dict[str, tuple[None, str]]:
    """The NIM's multipart fields, as the gateway sends them."""
    fields = {"text": text, "language": "en-US", "voice": VOICE, "sample_rate_hz": str(SAMPLE_RATE)}
    return {name: (None, value) for name, value in fields.items()}


def _direct(nim: httpx.Client, text: str) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        for piece in split_text(text, PIECE_CHARS):
            nim.post("/v1/audio/synthesize", files=_fields(piece)).raise_for_status()
        return time.perf_counter() - started

    return run


def _gateway(gateway: httpx.Client, text: str, fmt: str) -> Callable[[], float]:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": fmt}

    def run() -> float:
        started = time.perf_counter()
        gateway.post("/v1/audio/speech", json=body).raise_for_status()
        return time.perf_counter() - started

    return run


def _first_byte(open_stream: Callable[[], httpx.Response]) -> Callable[[], float]:
    """Seconds to the first body byte; the stream is then dropped."""

    def run() -> float:
        started = time.perf_counter()
        with open_stream() as response:
            response.raise_for_status()
            next(response.iter_raw())
            return time.perf_counter() - started

    return run


def _compare(label: str, direct: Callable[[], float], gateway: Callable[[], float], repeats: int) -> str:
    """A table row: medians of alternating runs, after one warm-up run of each."""
    direct(), gateway()
    direct_s, gateway_s = [], []
    for _ in range(repeats):
        direct_s.append(direct())
        gateway_s.append(gateway())
    d, g = statistics.median(direct_s) * 1000, statistics.median(gateway_s) * 1000
    return f"| {label} | {d:.1f} ms | {g:.1f} ms | {g - d:.1f} ms |"


def run_tts_benchmark(short_repeats: int = 20, long_repeats: int = 5) -> str:
    loop = BackgroundLoop()
    sim = MagpieNIM(real_time_factor=0.0)
    loop.run(sim.start())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = clean_env(
            APPLIANCE_API_KEYS=CLIENT_KEY,
            APPLIANCE_DATA_DIR=tmp,
            APPLIANCE_TTS_URL=sim.url,
            APPLIANCE_TTS_SAMPLE_RATE=str(SAMPLE_RATE),
            APPLIANCE_TTS_PIECE_CHARS=str(PIECE_CHARS),
            APPLIANCE_LOG_LEVEL="warning",
        )
        gateway = Gateway(env, Path(tmp) / "gateway.log").start()
        try:
            with httpx.Client(base_url=sim.url, timeout=120) as nim, gateway.http(timeout=120) as via:
                for label, text, repeats in (
                    ("short", SHORT_TEXT, short_repeats),
                    ("long", LONG_TEXT, long_repeats),
                ):
                    pieces = split_text(text, PIECE_CHARS)
                    audio = sum(sim.audio_seconds(p) for p in pieces)
                    requests = f"{len(pieces)} NIM request{'s' if len(pieces) > 1 else ''}"
                    what = f"{label} text ({len(text):,} chars, {requests}, {audio:.0f} s audio)"
                    for fmt in ("mp3", "wav"):
                        rows.append(
                            _compare(f"{what}, {fmt}", _direct(nim, text), _gateway(via, text, fmt), repeats)
                        )

                # With synthesis taking time, the gateway encodes one piece while the NIM makes the next.
                sim.real_time_factor = 0.02  # 50x real time
                rows.append(
                    _compare(
                        "long text, mp3, NIM synthesising at 50x real time",
                        _direct(nim, LONG_TEXT),
                        _gateway(via, LONG_TEXT, "mp3"),
                        1,
                    )
                )

                sim.real_time_factor = 0.1  # 10x real time: a busy GPU
                first_piece = split_text(LONG_TEXT, PIECE_CHARS)[0]
                for fmt in ("pcm", "mp3"):
                    stream = {"model": "tts-1", "input": LONG_TEXT, "voice": "alloy", "response_format": fmt}
                    stream["stream_format"] = "audio"
                    rows.append(
                        _compare(
                            f"streaming long text, time to first byte (NIM: PCM; gateway: {fmt})",
                            _first_byte(
                                lambda: nim.stream(
                                    "POST", "/v1/audio/synthesize_online", files=_fields(first_piece)
                                )
                            ),
                            _first_byte(lambda s=stream: via.stream("POST", "/v1/audio/speech", json=s)),
                            short_repeats,
                        )
                    )
        finally:
            gateway.stop()
            loop.run(sim.stop())
            loop.close()
    header = [
        f"TTS through the gateway vs. straight to the NIM simulator, medians, {os.cpu_count()} CPU cores,",
        f"{SAMPLE_RATE} Hz mono, about 16 characters of text per second of audio.",
        "",
        "| request | direct to NIM | through gateway | gateway adds |",
        "| --- | --- | --- | --- |",
    ]
    return "\n".join(header + rows)


if __name__ == "__main__":
    print(run_tts_benchmark())
