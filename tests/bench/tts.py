"""Text-to-speech benchmark: the time the gateway adds to the NIM's, whole files and first audio.

The real gateway runs against the MagpieTTS NIM simulator on loopback. "Direct" sends the simulator the
same pieces the gateway sends and reads its answer; the difference is the gateway's work. Direct and
gateway runs alternate, so a busy machine slows both alike.

- Whole files (`?stream=false`): the simulator synthesises instantly in the first rows, so nothing hides
  the gateway's cost (splitting, encoding); the last row gives synthesis a real duration.
- First audio (the default, streamed answer): the simulator answers as NVIDIA publishes for the NIM
  (first audio 68 ms at one stream, 81 ms at four, a batch-8 profile), for 1, 4 and 16 readers starting
  together, then a class of 30 readers who each read a whole paragraph.

Run: python -m tests.bench.tts [whole-file|first-audio]   (both tables without an argument)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from appliance.tts import FIRST_PIECE_CHARS, split_text
from tests.harness import CLIENT_KEY, BackgroundLoop, Gateway, clean_env
from tests.sims.magpie_nim import MagpieNIM

PIECE_CHARS = 250  # the gateway's default APPLIANCE_TTS_PIECE_CHARS


def pieces_of(text: str) -> list[str]:
    """The NIM requests the gateway makes for `text`."""
    return split_text(text, PIECE_CHARS, FIRST_PIECE_CHARS)


SAMPLE_RATE = 22050
VOICE = "Magpie-Multilingual.EN-US.Aria"  # what "alloy" maps to
SHORT_TEXT = "Read this sentence aloud, slowly and clearly."
LONG_TEXT = " ".join(f"This is sentence {i} of a long reading passage for the class." for i in range(80))
LONG_TEXT = LONG_TEXT[:4096]
PARAGRAPH = LONG_TEXT[:400]  # what each of a class of readers reads: three NIM requests, 24 s of audio
# The NIM as NVIDIA's published figures describe it: first audio 68 ms at 1 stream, 81 ms at 4, the
# default batch-8 profile. Its speed after the first audio is not published; 20x real time is assumed.
NIM_FIRST_AUDIO = 0.068
NIM_STREAM_LOAD = (0.081 - 0.068) / 3
NIM_BATCH = 8
NIM_REAL_TIME_FACTOR = 0.05


def _fields(text: str) -> dict[str, tuple[None, str]]:
    """The NIM's multipart fields, as the gateway sends them."""
    fields = {"text": text, "language": "en-US", "voice": VOICE, "sample_rate_hz": str(SAMPLE_RATE)}
    return {name: (None, value) for name, value in fields.items()}


def _direct(nim: httpx.Client, text: str) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        for piece in pieces_of(text):
            nim.post("/v1/audio/synthesize", files=_fields(piece)).raise_for_status()
        return time.perf_counter() - started

    return run


def _gateway(gateway: httpx.Client, text: str, fmt: str) -> Callable[[], float]:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": fmt}

    def run() -> float:
        started = time.perf_counter()
        gateway.post("/v1/audio/speech", params={"stream": "false"}, json=body).raise_for_status()
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


@contextmanager
def _setup(sim: MagpieNIM, **settings: str) -> Iterator[Gateway]:
    loop = BackgroundLoop()
    loop.run(sim.start())
    with tempfile.TemporaryDirectory() as tmp:
        env = clean_env(
            APPLIANCE_API_KEYS=CLIENT_KEY,
            APPLIANCE_DATA_DIR=tmp,
            APPLIANCE_TTS_URL=sim.url,
            APPLIANCE_TTS_SAMPLE_RATE=str(SAMPLE_RATE),
            APPLIANCE_TTS_PIECE_CHARS=str(PIECE_CHARS),
            APPLIANCE_LOG_LEVEL="warning",
            **settings,
        )
        gateway = Gateway(env, Path(tmp) / "gateway.log").start()
        try:
            yield gateway
        finally:
            gateway.stop()
            loop.run(sim.stop())
            loop.close()


def whole_file_table(short_repeats: int = 20, long_repeats: int = 5) -> str:
    sim = MagpieNIM(real_time_factor=0.0)
    rows = []
    with (
        _setup(sim) as gateway,
        httpx.Client(base_url=sim.url, timeout=120) as nim,
        gateway.http(timeout=120) as via,
    ):
        for label, text, repeats in (("short", SHORT_TEXT, short_repeats), ("long", LONG_TEXT, long_repeats)):
            pieces = pieces_of(text)
            audio = sum(sim.audio_seconds(p) for p in pieces)
            requests = f"{len(pieces)} NIM request{'s' if len(pieces) > 1 else ''}"
            what = f"{label} text ({len(text):,} chars, {requests}, {audio:.0f} s audio)"
            for fmt in ("mp3", "wav"):
                rows.append(_compare(f"{what}, {fmt}", _direct(nim, text), _gateway(via, text, fmt), repeats))

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
    header = [
        "Whole files (?stream=false) through the gateway vs. straight to the NIM simulator, medians,",
        f"{os.cpu_count()} CPU cores, {SAMPLE_RATE} Hz mono, about 16 characters of text a second of audio.",
        "",
        "| request | direct to NIM | through gateway | gateway adds |",
        "| --- | --- | --- | --- |",
    ]
    return "\n".join(header + rows)


# First audio.

Reader = Callable[[httpx.Client], float]


def _read(response: httpx.Response, started: float, whole: bool) -> float:
    """Seconds from `started` to the first body byte; then the rest is read, or the stream dropped."""
    response.raise_for_status()
    chunks = response.iter_raw()
    next(chunks)
    first = time.perf_counter() - started
    if whole:
        for _ in chunks:
            pass
    return first


def _nim_reader(text: str, whole: bool) -> Reader:
    """The NIM's own first audio: the first piece streamed straight from it (then the others, in order)."""
    pieces = pieces_of(text)

    def read(client: httpx.Client) -> float:
        started = time.perf_counter()
        firsts = []
        for piece in pieces if whole else pieces[:1]:
            with client.stream("POST", "/v1/audio/synthesize_online", files=_fields(piece)) as response:
                firsts.append(_read(response, started, whole))
        return firsts[0]

    return read


def _gateway_reader(text: str, fmt: str, whole: bool) -> Reader:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": fmt}

    def read(client: httpx.Client) -> float:
        started = time.perf_counter()
        with client.stream("POST", "/v1/audio/speech", json=body) as response:
            return _read(response, started, whole)

    return read


def _together(clients: list[httpx.Client], read: Reader, rounds: int) -> list[float]:
    """First-audio seconds of every reader, all readers starting together, round after round."""
    times: list[float] = []
    with ThreadPoolExecutor(len(clients)) as pool:
        for _ in range(rounds):
            start = threading.Barrier(len(clients))

            def one(client: httpx.Client, start: threading.Barrier = start) -> float:
                start.wait()
                return read(client)

            times += pool.map(one, clients)
    return times


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} / {max(values) * 1000:.0f} ms"


def first_audio_table(rounds: dict[int, int] | None = None, class_rounds: int = 2) -> str:
    rounds = rounds or {1: 15, 4: 6, 16: 3}
    sim = MagpieNIM(
        real_time_factor=NIM_REAL_TIME_FACTOR,
        first_audio_seconds=NIM_FIRST_AUDIO,
        stream_load_seconds=NIM_STREAM_LOAD,
        max_streams=NIM_BATCH,
    )
    rows = []
    with _setup(sim) as gateway:

        def idle() -> None:
            """Let syntheses of readers that stopped early end, so each round starts on an idle NIM."""
            deadline = time.monotonic() + 10
            while sim.active_streams and time.monotonic() < deadline:
                time.sleep(0.01)

        def compare(label: str, readers: int, nim: Reader, via: Reader, repeats: int) -> str:
            direct = [httpx.Client(base_url=sim.url, timeout=60) for _ in range(readers)]
            clients = [gateway.http(timeout=60) for _ in range(readers)]
            _together(direct, nim, 1), _together(clients, via, 1)  # warm connections and caches
            nim_s: list[float] = []
            via_s: list[float] = []
            for _ in range(repeats):  # alternate, so a busy machine slows both alike
                idle()
                nim_s += _together(direct, nim, 1)
                idle()
                via_s += _together(clients, via, 1)
            for client in direct + clients:
                client.close()
            added = (statistics.median(via_s) - statistics.median(nim_s)) * 1000
            return f"| {label} | {readers} | {_ms(nim_s)} | {_ms(via_s)} | {added:.0f} ms |"

        for readers, repeats in rounds.items():
            for name, text, whole in (("short", SHORT_TEXT, True), ("long", LONG_TEXT, False)):
                for fmt in ("mp3", "pcm") if name == "short" or readers == 1 else ("mp3",):
                    label = f"{name} text ({len(text):,} chars), {fmt}"
                    nim, via = _nim_reader(text, whole), _gateway_reader(text, fmt, whole)
                    rows.append(compare(label, readers, nim, via, repeats))

        sim.reset()
        requests = len(pieces_of(PARAGRAPH))
        label = f"class reading a paragraph ({len(PARAGRAPH)} chars, {requests} NIM requests) to the end, pcm"
        rows.append(
            compare(
                label, 30, _nim_reader(PARAGRAPH, True), _gateway_reader(PARAGRAPH, "pcm", True), class_rounds
            )
        )
        peak = sim.peak_streams
    header = [
        f"Time to first audio, streamed (the default), {os.cpu_count()} CPU cores: median / worst over all",
        "readers and rounds. The NIM simulator answers as NVIDIA publishes (68 ms at 1 stream, 81 ms at 4,",
        f"batch {NIM_BATCH}); the gateway lets {NIM_BATCH} synthesis requests run at once (its default).",
        "Short-text readers read to the end; long-text readers stop at the first audio; a class reads",
        "to the end.",
        "",
        "| request | readers | NIM's own first audio | through the gateway | gateway adds (medians) |",
        "| --- | --- | --- | --- | --- |",
    ]
    footer = ["", f"Most synthesis requests the NIM ran at once during the class: {peak}."]
    return "\n".join(header + rows + footer)


def run_tts_benchmark(which: str = "") -> str:
    tables = {"whole-file": whole_file_table, "first-audio": first_audio_table}
    return "\n\n".join(make() for name, make in tables.items() if which in ("", name))


if __name__ == "__main__":
    print(run_tts_benchmark(sys.argv[1] if len(sys.argv) > 1 else ""))
