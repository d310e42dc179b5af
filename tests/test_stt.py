"""Speech-to-text through the real gateway: faster-whisper runs for real on a tiny random-weight model,
the openai SDK is the client, and the audio is made here with PyAV."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
from faster_whisper.tokenizer import _LANGUAGE_CODES

from appliance.catalog import load_catalog
from appliance.config import load_settings
from appliance.errors import APIError
from appliance.stt import LANGUAGES, SpeechEngine
from tests.harness import REPO, Gateway, clean_env
from tests.openapi import validate
from tests.real_speech import WATER_CYCLE, passage, speak, wav_bytes, word_error_rate, words
from tests.stt_audio import (
    CONTAINERS,
    declare_flac_samples,
    make_audio,
    pad_flac,
    silent_flac,
    wav_with_channels,
)
from tests.stt_gateway import start_stt_gateway
from tests.whisper_model import build_tiny_whisper

MAX_SECONDS = 100
TINY = "whisper-tiny-random"  # the public name a gateway gives the model in `.../tiny-random`


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-random")


@pytest.fixture(scope="module")
def gw(whisper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for most tests: VAD off, so long tones still give segments."""
    tmp = tmp_path_factory.mktemp("stt")
    gateway = start_stt_gateway(
        tmp,
        "main",
        APPLIANCE_STT_MODEL=str(whisper_dir),
        APPLIANCE_STT_VAD="false",
        APPLIANCE_STT_MAX_SECONDS=str(MAX_SECONDS),
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(gw: Gateway) -> openai.OpenAI:
    return gw.client(timeout=60)


@pytest.fixture(scope="module")
def wav() -> tuple[str, bytes]:
    return make_audio("wav", 7.3)


SRT_CUE = re.compile(r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.*)\n")
VTT_CUE = re.compile(r"(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})\n(.*)\n")


def seconds(stamp: str) -> float:
    h, m, s = stamp.replace(",", ".").split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def assert_cues_in_order(cues: list[tuple[str, str]], duration: float) -> None:
    assert cues
    previous_end = 0.0
    for start_, end in cues:
        assert previous_end <= seconds(start_) <= seconds(end) <= duration + 0.001
        previous_end = seconds(end)


# Formats.


def test_json_validates_and_reports_duration_usage(client, wav):
    r = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=wav)
    assert r.headers["content-type"].startswith("application/json")
    body = r.http_response.json()
    validate("CreateTranscriptionResponseJson", body)
    assert body["text"].strip()
    assert body["usage"] == {"type": "duration", "seconds": 8}


def test_verbose_json_duration_matches_input_and_validates(client, wav):
    r = client.audio.transcriptions.with_raw_response.create(
        model=TINY, file=wav, response_format="verbose_json", language="en"
    )
    body = r.http_response.json()
    validate("CreateTranscriptionResponseVerboseJson", body)
    assert body["duration"] == pytest.approx(7.3, abs=0.001)
    assert body["language"] == "english"
    assert body["task"] == "transcribe"
    assert "words" not in body
    assert body["segments"] and body["text"] == "".join(s["text"] for s in body["segments"]).strip()
    for segment in body["segments"]:
        assert 0 <= segment["start"] <= segment["end"] <= body["duration"]


def test_word_timestamps(client, wav):
    r = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=wav, response_format="verbose_json", timestamp_granularities=["word"]
    )
    body = r.http_response.json()
    validate("CreateTranscriptionResponseVerboseJson", body)
    assert body["words"] and "segments" not in body
    for word in body["words"]:
        assert word["word"].strip()
        assert 0 <= word["start"] <= word["end"] <= 7.3
    both = client.audio.transcriptions.create(
        model="whisper-1",
        file=wav,
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert both.words and both.segments
    assert " ".join(w.word.strip() for w in both.words) == " ".join(both.text.split())


def test_text_srt_and_vtt_are_well_formed(client, wav):
    text = client.audio.transcriptions.create(model="whisper-1", file=wav, response_format="text")
    plain = client.audio.transcriptions.create(model="whisper-1", file=wav)
    assert text == plain.text + "\n"

    srt = client.audio.transcriptions.create(model="whisper-1", file=wav, response_format="srt")
    cues = SRT_CUE.findall(srt)
    assert "\n".join(f"{n}\n{a} --> {b}\n{t}\n" for n, a, b, t in cues) == srt
    assert [int(n) for n, *_ in cues] == list(range(1, len(cues) + 1))
    assert_cues_in_order([(a, b) for _, a, b, _ in cues], 7.3)

    vtt = client.audio.transcriptions.create(model="whisper-1", file=wav, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    cues = VTT_CUE.findall(vtt)
    assert "WEBVTT\n\n" + "\n".join(f"{a} --> {b}\n{t}\n" for a, b, t in cues) == vtt
    assert_cues_in_order([(a, b) for a, b, _ in cues], 7.3)


def test_streaming_sends_deltas_then_done(client):
    # 65 s: three windows through the batched pipeline, so more than one delta.
    stream = client.audio.transcriptions.create(model="whisper-1", file=make_audio("ogg", 65.0), stream=True)
    events = [event.model_dump(exclude_none=True) for event in stream]
    for event in events:
        validate("CreateTranscriptionResponseStreamEvent", event)
    *deltas, done = events
    assert len(deltas) == 3 and all(e["type"] == "transcript.text.delta" for e in deltas)
    assert done["type"] == "transcript.text.done"
    assert done["text"] == "".join(e["delta"] for e in deltas).strip()
    assert (
        done["usage"]["type"] == "tokens" and done["usage"]["input_token_details"]["audio_tokens"] == 65 * 50
    )
    assert (
        done["usage"]["total_tokens"] == done["usage"]["input_tokens"] + done["usage"]["output_tokens"] > 3250
    )


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_translation_streams_too(client, wav):
    stream = client.audio.translations.with_raw_response.create(
        model="whisper-1", file=wav, extra_body={"stream": True}
    )
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in stream.http_response.text.split("\n\n") if line]
    for event in events:
        validate("CreateTranscriptionResponseStreamEvent", event)
    assert [e["type"] for e in events][-1] == "transcript.text.done" and len(events) >= 2


def test_streaming_wire_format_is_server_sent_events(gw, wav):
    with gw.http() as http:
        r = http.post(
            "/v1/audio/transcriptions",
            files={"file": wav},
            data={"model": "whisper-1", "stream": "true", "response_format": "text"},
        )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: {") for e in events[:-1])
    assert '"transcript.text.done"' in events[-2]


def test_long_audio_without_vad_covers_every_window(client):
    verbose = client.audio.transcriptions.create(
        model="whisper-1", file=make_audio("mp3", 65.0), response_format="verbose_json"
    )
    assert verbose.duration == pytest.approx(65.0, abs=0.01)
    assert [round(s.start) // 30 for s in verbose.segments] == [0, 1, 2]
    assert all(0 <= s.start <= s.end <= verbose.duration for s in verbose.segments)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks translations so
def test_translation_json_and_verbose_json(client, wav):
    r = client.audio.translations.with_raw_response.create(model="whisper-1", file=wav)
    validate("CreateTranslationResponseJson", r.http_response.json())
    r = client.audio.translations.with_raw_response.create(
        model="whisper-1", file=wav, response_format="verbose_json", prompt="Hello."
    )
    body = r.http_response.json()
    validate("CreateTranslationResponseVerboseJson", body)
    assert body["task"] == "translate" and body["language"] == "english"
    assert body["duration"] == pytest.approx(7.3, abs=0.001)
    srt = client.audio.translations.create(model="whisper-1", file=wav, response_format="srt")
    assert SRT_CUE.match(srt)


def test_options_language_prompt_temperature(client, wav):
    verbose = client.audio.transcriptions.create(
        model="whisper-1",
        file=wav,
        response_format="verbose_json",
        language="DE",
        prompt="Ein Diktat.",
        temperature=0.4,
    )
    assert verbose.language == "german"
    assert {s.temperature for s in verbose.segments} == {0.4}


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_every_container(client, kind):
    verbose = client.audio.transcriptions.create(
        model="whisper-1", file=make_audio(kind, 4.0, channels=2), response_format="verbose_json"
    )
    # AAC adds its encoder delay (about 23 ms at 44.1 kHz) to what it decodes.
    assert verbose.duration == pytest.approx(4.0, abs=0.03)
    assert verbose.text


# Limits and bad input.


def assert_error(exc: openai.APIStatusError, status: int, code: str | None, param: str | None) -> dict:
    assert exc.status_code == status
    body = exc.response.json()
    validate("ErrorResponse", body)
    assert body["error"]["code"] == code and body["error"]["param"] == param
    assert body["error"]["message"]
    return body["error"]


def test_file_over_size_cap_is_413(client, gw):
    too_big = ("big.wav", b"\0" * (25 * 1024 * 1024 + 1))
    with pytest.raises(openai.APIStatusError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=too_big)
    assert "25 MB" in assert_error(exc.value, 413, "file_too_large", "file")["message"]

    # Without a Content-Length (chunked upload) the cap is enforced while reading.
    boundary = "audio-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(26):
            yield b"\0" * (1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    with gw.http() as http:
        r = http.post(
            "/v1/audio/transcriptions",
            content=body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"


def test_audio_over_duration_cap_is_400(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=make_audio("flac", MAX_SECONDS + 5))
    assert f"{MAX_SECONDS} s" in assert_error(exc.value, 400, "audio_too_long", "file")["message"]


@pytest.mark.parametrize(
    ("upload", "code"),
    [
        (("notes.txt", b"Dear diary, this is not audio.\n" * 20), "invalid_audio"),
        (("clip.wav", bytes(range(256)) * 64), "invalid_audio"),
        (("image.png", bytes.fromhex("89504e470d0a1a0a0000000d49484452") + b"\0" * 512), "invalid_audio"),
        (("empty.wav", b""), "empty_file"),
    ],
    ids=["text", "binary", "png", "zero-length"],
)
def test_bytes_that_are_not_audio_are_400(client, wav, upload, code):
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=upload)
    assert_error(exc.value, 400, code, "file")
    # A decoder failure takes nothing down: the next request is served.
    assert client.audio.transcriptions.create(model="whisper-1", file=wav).text


@pytest.mark.parametrize("kind", ["flac", "mp3", "webm", "m4a", "ogg"])
def test_truncated_file_is_400(client, kind):
    name, data = make_audio(kind, 6.0)
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=(name, data[: len(data) // 40]))
    error = assert_error(exc.value, 400, exc.value.body["code"], "file")
    assert error["code"] in ("truncated_audio", "invalid_audio")
    assert "truncated" in error["message"] or "damaged" in error["message"]


@pytest.mark.parametrize("kind", ["flac", "mp3", "webm", "wav", "ogg"])
def test_file_cut_in_half_says_truncated(client, kind):
    name, data = make_audio(kind, 6.0)
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=(name, data[: len(data) // 2]))
    assert "truncated" in assert_error(exc.value, 400, "truncated_audio", "file")["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": "diarized_json"}, "response_format"),
        ({"response_format": "xml"}, "response_format"),
        ({"language": "xx"}, "language"),
        ({"language": "english"}, "language"),
        ({"temperature": "1.5"}, "temperature"),
        ({"temperature": "warm"}, "temperature"),
        ({"timestamp_granularities[]": "word"}, "timestamp_granularities"),
        (
            {"timestamp_granularities[]": "sentence", "response_format": "verbose_json"},
            "timestamp_granularities",
        ),
        ({"stream": "true", "response_format": "srt"}, "stream"),
        ({"stream": "maybe"}, "stream"),
    ],
)
def test_bad_parameters_are_400(gw, wav, fields, param):
    with gw.http() as http:
        r = http.post("/v1/audio/transcriptions", files={"file": wav}, data={"model": "whisper-1", **fields})
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param


def test_missing_file_model_and_wrong_body(gw, client, wav):
    with pytest.raises(openai.NotFoundError) as exc:
        client.audio.transcriptions.create(model="nvidia/magpietts", file=wav)
    assert exc.value.body["code"] == "model_not_found"
    with gw.http() as http:
        r = http.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"other": ("x", b"1")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"
        r = http.post("/v1/audio/transcriptions", files={"file": wav})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = http.post("/v1/audio/transcriptions", json={"model": "whisper-1", "file": "x"})
        assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
        r = http.post(
            "/v1/audio/transcriptions",
            content=b"--b\r\nContent-Disposition: form-data\r\n\r\nno end",
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert r.status_code == 400


# Concurrency, privacy, availability.


def test_eight_concurrent_transcriptions_while_healthz_stays_fast(gw):
    # The eight clients run in a process of their own: their client-side work must not slow the probe.
    load = subprocess.Popen(
        [sys.executable, "-m", "tests.stt_load", gw.base_url, "8", "20"],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=clean_env(),
    )
    latencies: list[float] = []
    with httpx.Client(base_url=gw.url) as http:
        while load.poll() is None:
            started = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    texts = json.loads(load.stdout.read())
    assert load.returncode == 0 and len(texts) == 8 and all(texts)
    assert len(latencies) >= 20
    # Decoding holds no lock the event loop needs: a blocked loop would stall /healthz for seconds. On a
    # 2-core machine the probe still shares the cores with eight decodes, so single probes can wait a
    # scheduler slice; the median shows the loop is free, the maximum that it never stalls.
    median = sorted(latencies)[len(latencies) // 2]
    assert median < 0.05, f"median /healthz {median * 1000:.0f} ms"
    assert max(latencies) < 1.0, f"slowest /healthz {max(latencies) * 1000:.0f} ms"


def test_audio_and_transcripts_stay_out_of_logs_and_off_disk(gw, client):
    name, data = make_audio("wav", 40.0)  # over 1 MB: a spooled upload would reach the disk
    assert len(data) > 1024 * 1024
    text = client.audio.transcriptions.create(model="whisper-1", file=(name, data)).text
    logs = gw.logs()
    assert text.strip() and text.strip() not in logs
    assert "Detected language" not in logs
    assert f'"model":"{TINY}","target":"local"' in logs
    assert list(Path(gw.env["TMPDIR"]).iterdir()) == []


def test_models_list_and_readyz_show_speech_to_text(gw, client):
    names = {m.id for m in client.models.list()}
    assert {TINY, "whisper-1"} <= names and "whisper-large-v3" not in names
    stt = gw.readyz().json()["checks"]["stt"]
    assert stt == {
        "ready": True,
        "state": "ready",
        "model": gw.env["APPLIANCE_STT_MODEL"],
        "name": TINY,
        "device": "cpu",
        "compute_type": "int8",
    }


def test_missing_model_is_503_naming_the_pull_command(tmp_path, wav):
    gw = start_stt_gateway(tmp_path, "missing", APPLIANCE_STT_MODEL="large-v3")
    try:
        client = gw.client()
        with pytest.raises(openai.InternalServerError) as exc:
            client.audio.transcriptions.create(model="whisper-1", file=wav)
        error = assert_error(exc.value, 503, "model_unavailable", None)
        assert error["message"] == (
            "Speech-to-text is unavailable: model 'large-v3' is not installed; "
            "run `appliance models pull large-v3`"
        )  # the command, never the server's paths
        assert exc.value.response.headers["x-should-retry"] == "false"  # no use retrying
        assert "whisper-1" not in {m.id for m in client.models.list()}
        assert httpx.get(gw.url + "/healthz").status_code == 200
        ready = gw.readyz()
        assert ready.status_code == 503
        assert "appliance models pull large-v3" in ready.json()["checks"]["stt"]["error"]
    finally:
        gw.stop()


def test_broken_model_is_503_and_the_gateway_keeps_serving(tmp_path, whisper_dir, wav):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in whisper_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "model.bin").write_bytes(b"not a model")
    gw = start_stt_gateway(tmp_path, "broken", APPLIANCE_STT_MODEL=str(broken))
    try:
        with pytest.raises(openai.InternalServerError) as exc:
            gw.client().audio.transcriptions.create(model="whisper-1", file=wav)
        message = assert_error(exc.value, 503, "model_unavailable", None)["message"]
        assert message == "Speech-to-text is unavailable: speech-to-text model failed to load; see /readyz"
        assert httpx.get(gw.url + "/healthz").status_code == 200
        assert "Traceback" not in gw.logs()
    finally:
        gw.stop()


def test_vad_drops_a_long_tone(tmp_path, whisper_dir):
    gw = start_stt_gateway(tmp_path, "vad", APPLIANCE_STT_MODEL=str(whisper_dir))  # VAD on by default
    try:
        verbose = gw.client(timeout=60).audio.transcriptions.create(
            model="whisper-1", file=make_audio("wav", 45.0), response_format="verbose_json"
        )
        assert verbose.duration == pytest.approx(45.0, abs=0.01)
        assert verbose.text == "" and verbose.segments == []
    finally:
        gw.stop()


def test_every_whisper_language_has_a_name():
    assert set(LANGUAGES) == set(_LANGUAGE_CODES)


def test_engine_answers_503_loading_until_its_model_is_in(whisper_dir):
    engine = SpeechEngine(load_settings(stt_model=str(whisper_dir)), load_catalog())
    with pytest.raises(APIError) as exc:
        engine.require_ready()
    assert (exc.value.status, exc.value.code) == (503, "loading")
    assert exc.value.headers == {"retry-after": "5"}
    assert engine.status() == {"ready": False, "state": "loading", "model": str(whisper_dir), "name": TINY}
    engine.load()
    engine.require_ready()
    assert engine.status()["ready"]


def test_past_the_pending_cap_new_requests_get_a_429_not_a_queue(whisper_dir, tmp_path):
    gateway = start_stt_gateway(
        tmp_path,
        "busy",
        APPLIANCE_STT_MODEL=str(whisper_dir),
        APPLIANCE_STT_VAD="false",
        APPLIANCE_STT_MAX_PENDING="1",
        APPLIANCE_STT_WORKERS="1",
    )
    try:
        name, data = make_audio("wav", 60.0)
        with ThreadPoolExecutor(4) as pool, gateway.http(timeout=120) as http:
            results = list(
                pool.map(
                    lambda _: http.post(
                        "/v1/audio/transcriptions", files={"file": (name, data)}, data={"model": "whisper-1"}
                    ),
                    range(4),
                )
            )
        statuses = sorted(r.status_code for r in results)
        assert statuses[0] == 200 and statuses[-1] == 429, statuses
        busy = next(r for r in results if r.status_code == 429)
        validate("ErrorResponse", busy.json())
        assert busy.json()["error"]["code"] == "busy" and busy.headers["retry-after"] == "2"
    finally:
        gateway.stop()


# What an upload may cost.


def gateway_usage(gw: Gateway) -> tuple[float, int]:
    """CPU seconds the gateway process has used, and its resident memory in bytes."""
    pid = gw.proc.pid
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return cpu, rss * 1024


BOMBS = {
    # 29 min of silence in 320 KB (under the 30 min cap): more than a recording of that size could hold.
    "silence": (lambda: silent_flac(29 * 60), "invalid_audio", "more audio than its size allows"),
    "192 kHz": (lambda: silent_flac(10, 192000, "7.1"), "invalid_audio", "192000 Hz"),
    "16 channels": (lambda: wav_with_channels(16), "invalid_audio", "16 channels"),
    "declares 1 h": (lambda: declare_flac_samples(silent_flac(10), 3600 * 16000), "audio_too_long", "1800 s"),
    # 29 min of 8 channels at 96 kHz (1.3 G samples to decode) in 1 MB: enough bytes for 29 min of
    # mono speech, not for what decoding this would cost.
    "8 x 96 kHz": (
        lambda: pad_flac(declare_flac_samples(silent_flac(1, 96000, "7.1"), 29 * 60 * 96000), 1 << 20),
        "invalid_audio",
        "more audio than its size allows",
    ),
}


def test_audio_bombs_are_refused_before_they_cost_cpu_or_memory(tmp_path, whisper_dir, wav):
    gw = start_stt_gateway(tmp_path, "bombs", APPLIANCE_STT_MODEL=str(whisper_dir))  # 1800 s cap
    try:
        client = gw.client(timeout=60, max_retries=0)
        assert client.audio.transcriptions.create(model="whisper-1", file=wav).text  # warm
        cpu_before, rss_before = gateway_usage(gw)
        for name, (make, code, words) in BOMBS.items():
            with ThreadPoolExecutor(8) as pool:
                errors = list(pool.map(partial(_refusal, client), [make()] * 8))
            for error in errors:
                assert error["code"] == code and words in error["message"], (name, error)
        cpu_after, rss_after = gateway_usage(gw)
        # Before: 10 CPU seconds for each 192 kHz bomb, 3.8 for the silence, and +425 MB held after.
        assert cpu_after - cpu_before < 3.0, f"{cpu_after - cpu_before:.1f} CPU seconds for 40 bombs"
        assert rss_after - rss_before < 100 * 1024 * 1024, f"+{(rss_after - rss_before) >> 20} MB"
    finally:
        gw.stop()


def _refusal(client: openai.OpenAI, data: bytes) -> dict:
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=("bomb.flac", data))
    return assert_error(exc.value, 400, exc.value.body["code"], "file")


def test_a_stream_holds_its_admission_slot_until_it_ends(whisper_dir, tmp_path, wav):
    gw = start_stt_gateway(
        tmp_path,
        "stream-cap",
        APPLIANCE_STT_MODEL=str(whisper_dir),
        APPLIANCE_STT_VAD="false",
        APPLIANCE_STT_MAX_PENDING="1",
        APPLIANCE_STT_WORKERS="1",
    )
    try:
        long = make_audio("wav", 600.0)  # twenty windows: the stream runs while the second request comes
        with gw.http(timeout=120) as http:
            fields = {"model": "whisper-1", "stream": "true"}
            with http.stream("POST", "/v1/audio/transcriptions", files={"file": long}, data=fields) as first:
                assert first.status_code == 200
                lines = first.iter_lines()
                assert next(line for line in lines if line).startswith("data: ")
                second = http.post(
                    "/v1/audio/transcriptions", files={"file": wav}, data={"model": "whisper-1"}
                )
                rest = list(lines)
            assert second.status_code == 429 and second.json()["error"]["code"] == "busy"
            assert '"transcript.text.done"' in rest[-2]
            # The slot is free again once the stream has ended.
            third = http.post("/v1/audio/transcriptions", files={"file": wav}, data={"model": "whisper-1"})
            assert third.status_code == 200
        # A client that leaves mid-stream frees the slot too.
        path = "/v1/audio/transcriptions"
        with (
            gw.http(timeout=120) as http,
            http.stream("POST", path, files={"file": long}, data=fields) as left,
        ):
            assert next(line for line in left.iter_lines() if line).startswith("data: ")
        with gw.http(timeout=120) as http:
            deadline = time.monotonic() + 30
            while True:
                r = http.post(path, files={"file": wav}, data={"model": "whisper-1"})
                if r.status_code != 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert r.status_code == 200, "the slot of a stream whose client left was never freed"
    finally:
        gw.stop()


# Which model is loaded.


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_english_only_model_refuses_other_languages_and_translation(tmp_path_factory, tmp_path, wav):
    model = build_tiny_whisper(tmp_path_factory.mktemp("models") / "tiny-random.en", english_only=True)
    gw = start_stt_gateway(tmp_path, "english", APPLIANCE_STT_MODEL=str(model))
    try:
        client = gw.client(max_retries=0)
        assert {"whisper-tiny-random.en", "whisper-1"} <= {m.id for m in client.models.list()}
        verbose = client.audio.transcriptions.create(
            model="whisper-tiny-random.en", file=wav, language="en", response_format="verbose_json"
        )
        assert verbose.language == "english"
        with pytest.raises(openai.BadRequestError) as exc:
            client.audio.transcriptions.create(model="whisper-1", file=wav, language="de")
        assert "English-only" in assert_error(exc.value, 400, None, "language")["message"]
        with pytest.raises(openai.BadRequestError) as exc:
            client.audio.translations.create(model="whisper-1", file=wav)
        assert "cannot translate" in assert_error(exc.value, 400, None, "model")["message"]
    finally:
        gw.stop()


def test_model_directory_without_preprocessor_config_is_complete(tmp_path, whisper_dir):
    converted = tmp_path / "faster-whisper-small"
    converted.mkdir()
    for file in whisper_dir.iterdir():
        if file.name != "preprocessor_config.json":
            (converted / file.name).write_bytes(file.read_bytes())
    verify = subprocess.run(
        [sys.executable, "-m", "appliance", "models", "verify", str(converted)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


# Real speech: the packaged Whisper base model hears espeak-ng, as a school's gateway hears a pupil.

GERMAN = ("Die Kinder spielen im Garten.", "Morgen fahren wir mit dem Zug in die Stadt.")


@pytest.fixture(scope="module")
def real_gw(real_whisper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway on the real model with the shipped defaults (VAD on, batch 8, 30 min cap)."""
    gateway = start_stt_gateway(
        tmp_path_factory.mktemp("real"), "real", APPLIANCE_STT_MODEL=str(real_whisper_dir)
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def water_cycle() -> tuple[str, bytes]:
    """About 48 s of speech in one breath: two 30 s windows, and a sentence across the first window's
    edge that batched decoding with segment timestamps dropped (README: WER 18.5%)."""
    return "water-cycle.wav", wav_bytes(speak(" ".join(WATER_CYCLE)))


def assert_phrases_heard(text: str) -> None:
    """The sentence lost at the first window's edge before (batched decoding with segment timestamps),
    and the first and the last, are all there."""
    heard = " ".join(words(text))
    phrases = ("the water cycle describes", "the drops in a cloud grow heavy", "rain or snow", "fresh water")
    for phrase in phrases:
        assert phrase in heard, text


def test_real_speech_over_30_s_loses_no_words(real_gw, water_cycle):
    client = real_gw.client(timeout=300, max_retries=0)
    assert {"whisper-base", "whisper-1"} <= {m.id for m in client.models.list()}
    reference = " ".join(WATER_CYCLE)
    text = client.audio.transcriptions.create(model="whisper-base", file=water_cycle, language="en").text
    assert word_error_rate(reference, text) <= 0.15, text
    assert_phrases_heard(text)
    verbose = client.audio.transcriptions.create(
        model="whisper-1",
        file=water_cycle,
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert verbose.language == "english" and verbose.duration > 45
    assert word_error_rate(reference, verbose.text) <= 0.15, verbose.text
    assert_phrases_heard(verbose.text)
    assert verbose.segments[-1].end > 45
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts) and starts[-1] > 45


def test_streamed_text_arrives_while_the_rest_is_decoded(real_gw):
    clip = ("water-cycle.wav", wav_bytes(passage(WATER_CYCLE)))  # 53 s, sentences 0.6 s apart
    fields = {"model": "whisper-1", "stream": "true", "language": "en"}
    arrivals: list[tuple[float, dict]] = []
    with real_gw.http(timeout=300) as http:
        started = time.perf_counter()
        with http.stream("POST", "/v1/audio/transcriptions", files={"file": clip}, data=fields) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    arrivals.append((time.perf_counter() - started, json.loads(line.removeprefix("data: "))))
    *deltas, (done_at, done) = arrivals
    validate("CreateTranscriptionResponseStreamEvent", done)
    assert len(deltas) >= 3 and done["type"] == "transcript.text.done"
    assert word_error_rate(" ".join(WATER_CYCLE), done["text"]) <= 0.15, done["text"]
    # The first window's text comes before the second window is decoded, not with the rest at the end.
    first_at = deltas[0][0]
    print(f"first text at {first_at:.2f} s, done at {done_at:.2f} s, {len(deltas)} deltas")  # with -s
    assert first_at < 0.75 * done_at, [round(t, 2) for t, _ in arrivals]


def test_real_speech_language_is_detected(real_gw):
    clip = ("satz.wav", wav_bytes(passage(GERMAN, voice="de")))
    verbose = real_gw.client(timeout=120).audio.transcriptions.create(
        model="whisper-1", file=clip, response_format="verbose_json"
    )
    assert verbose.language == "german"
    assert word_error_rate(" ".join(GERMAN), verbose.text) <= 0.4, verbose.text
