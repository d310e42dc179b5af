"""Speech-to-text benchmark: the same audio through the gateway and through faster-whisper in-process.

Reports the gateway's added time per request for a 10 s clip, against two in-process baselines with the
same model and settings: `WhisperModel.transcribe` on the file bytes (faster-whisper's own decoding),
and the engine's exact work (the gateway's decoder, then `transcribe` on the samples), so the second
difference is what HTTP, multipart, the worker pool and formatting cost. Then throughput with 1 and 8
concurrent clients. Uses the tiny test model unless given a model directory, so it runs anywhere.

    python -m tests.bench.stt [MODEL_DIR]
"""

from __future__ import annotations

import http.client
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson

from appliance import stt  # first: it sets the CPU runtime up as the gateway does, before ctranslate2 loads
from appliance.audio.decode import decode_audio
from tests.harness import CLIENT_KEY, Gateway, clean_env
from tests.stt_audio import make_audio
from tests.whisper_model import build_tiny_whisper

CLIP_SECONDS = 10.0
LATENCY_ROUNDS = 60
THROUGHPUT_REQUESTS = 32
PATH = "/v1/audio/transcriptions"
OPTIONS = {"language": "en", "beam_size": 5, "temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)}


def _direct(model_dir: Path, workers: int) -> dict[str, Callable[[bytes], str]]:
    """faster-whisper called in this process, set up the way the gateway sets it up: on the file as
    faster-whisper decodes it, and on samples from the gateway's own decoder (the engine's whole work)."""
    from faster_whisper import WhisperModel

    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE", stt.__name__
    threads = max(1, (os.cpu_count() or 1) // workers)
    model = WhisperModel(
        str(model_dir), device="cpu", compute_type="int8", cpu_threads=threads, num_workers=workers
    )

    def on_file(data: bytes) -> str:
        segments, _ = model.transcribe(io.BytesIO(data), **OPTIONS)
        return "".join(s.text for s in segments)

    def on_samples(data: bytes) -> str:
        segments, _ = model.transcribe(decode_audio(data).samples, **OPTIONS)
        return "".join(s.text for s in segments)

    return {"file": on_file, "samples": on_samples}


def _gateway(model_dir: Path, tmp: Path, workers: int) -> Gateway:
    env = clean_env(
        APPLIANCE_API_KEYS=CLIENT_KEY,
        APPLIANCE_DATA_DIR=str(tmp / "data"),
        APPLIANCE_STT_MODEL=str(model_dir),
        APPLIANCE_STT_DEVICE="cpu",
        APPLIANCE_STT_WORKERS=str(workers),
        APPLIANCE_LOG_LEVEL="warning",
    )
    gateway = Gateway(env, tmp / f"gateway-{workers}.log").start()
    deadline = time.monotonic() + 120
    while gateway.readyz().json()["checks"]["stt"]["state"] == "loading":
        if time.monotonic() > deadline:
            raise RuntimeError(gateway.logs())
        time.sleep(0.05)
    return gateway


class LeanClient:
    """The transcription route called the way `wrk` calls the chat route: the multipart body encoded
    once, sent with the standard library's http.client on a keep-alive connection per thread. The time
    measured is then the gateway's, not a Python HTTP client's (httpx's encoding and parsing add about
    3 ms per call on the 2-core machine)."""

    def __init__(self, url: str, clip: tuple[str, bytes]) -> None:
        self.address = urlsplit(url).netloc
        request = httpx.Request(
            "POST", url + PATH, files={"file": clip}, data={"model": "whisper-1", "language": "en"}
        )
        self.body = request.read()
        self.headers = {
            "Content-Type": request.headers["content-type"],
            "Authorization": f"Bearer {CLIENT_KEY}",
        }
        self.local = threading.local()

    def transcribe(self) -> str:
        if not hasattr(self.local, "conn"):
            self.local.conn = http.client.HTTPConnection(self.address, timeout=300)
        self.local.conn.request("POST", PATH, body=self.body, headers=self.headers)
        response = self.local.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
        return orjson.loads(data)["text"]


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _throughput(call: Callable[[], object], clients: int) -> float:
    with ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        list(pool.map(lambda _: call(), range(THROUGHPUT_REQUESTS)))
        return THROUGHPUT_REQUESTS / (time.perf_counter() - started)


def run_stt_benchmark(model_dir: Path | None = None) -> str:
    """Run the benchmark and return its results as a markdown table."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = model_dir or build_tiny_whisper(tmp / "tiny-whisper")
        clip = make_audio("wav", CLIP_SECONDS)
        rows = _latency_rows(model_dir, tmp, clip) + _throughput_rows(model_dir, tmp, clip)
    header = (
        "| 10 s WAV clip, CPU, medians | faster-whisper in-process | through the gateway | gateway adds |\n"
        "| --- | --- | --- | --- |\n"
    )
    return header + "\n".join(rows) + "\n"


def _latency_rows(model_dir: Path, tmp: Path, clip: tuple[str, bytes]) -> list[str]:
    # One worker with every core on both sides; runs alternate so drift hits all alike.
    direct = _direct(model_dir, workers=1)
    gateway = _gateway(model_dir, tmp, workers=1)
    times: dict[str, list[float]] = {"file": [], "samples": [], "gateway": []}
    try:
        calls = {name: (lambda fn=fn: fn(clip[1])) for name, fn in direct.items()}
        calls["gateway"] = LeanClient(gateway.url, clip).transcribe
        for _ in range(3):  # warm all
            for call in calls.values():
                call()
        for _ in range(LATENCY_ROUNDS):
            for name, call in calls.items():
                # The gateway and this process each hold the model; whichever runs right after the
                # other finds its weights evicted from the CPU caches. An untimed call first puts
                # every measured call on warm caches, so the comparison is not of cache states.
                call()
                times[name].append(_timed(call))
    finally:
        gateway.stop()
    via_ms = statistics.median(times["gateway"]) * 1000
    labels = {
        "file": "`WhisperModel.transcribe(file)`",  # its decode_audio runs gc.collect() every call
        "samples": "the engine's decode + `transcribe(samples)`",  # exactly the gateway's engine work
    }
    rows = []
    for name, label in labels.items():
        # Paired differences cancel the drift a shared machine brings; their median is the added time.
        added = statistics.median(v - o for o, v in zip(times[name], times["gateway"], strict=True))
        own_ms = statistics.median(times[name]) * 1000
        rows.append(
            f"| latency, 1 client, in-process = {label} "
            f"| {own_ms:.1f} ms | {via_ms:.1f} ms | {added * 1000:+.1f} ms |"
        )
    return rows


def _throughput_rows(model_dir: Path, tmp: Path, clip: tuple[str, bytes]) -> list[str]:
    workers = 2  # the gateway's default pool
    direct = _direct(model_dir, workers=workers)["samples"]
    gateway = _gateway(model_dir, tmp, workers=workers)
    rows = []
    try:
        client = LeanClient(gateway.url, clip)
        client.transcribe()  # warm both
        direct(clip[1])
        for clients in (1, 8):
            own = _throughput(lambda: direct(clip[1]), clients)
            via = _throughput(client.transcribe, clients)
            rows.append(
                f"| throughput, {clients} concurrent client{'s' if clients > 1 else ''} "
                f"({workers} workers) | {own:.2f} req/s | {via:.2f} req/s | {via / own - 1:+.1%} |"
            )
    finally:
        gateway.stop()
    return rows


if __name__ == "__main__":
    print(run_stt_benchmark(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
