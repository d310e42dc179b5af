"""Speech-to-text through the real gateway: faster-whisper runs for real on a tiny random-weight model,
the openai SDK is the client, and the audio is made here with PyAV."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
from tests.stt_audio import CONTAINERS, make_audio
from tests.stt_gateway import start_stt_gateway
from tests.whisper_model import build_tiny_whisper

MAX_SECONDS = 100


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper"))


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
        model="whisper-large-v3", file=wav, response_format="verbose_json", language="en"
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


@pytest.mark.parametrize("kind", ["flac", "mp3", "webm"])
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
    assert max(latencies) < 0.1, f"slowest /healthz {max(latencies) * 1000:.0f} ms"


def test_audio_and_transcripts_stay_out_of_logs_and_off_disk(gw, client):
    name, data = make_audio("wav", 40.0)  # over 1 MB: a spooled upload would reach the disk
    assert len(data) > 1024 * 1024
    text = client.audio.transcriptions.create(model="whisper-1", file=(name, data)).text
    logs = gw.logs()
    assert text.strip() and text.strip() not in logs
    assert "Detected language" not in logs
    assert '"model":"whisper-large-v3","target":"local"' in logs
    assert list(Path(gw.env["TMPDIR"]).iterdir()) == []


def test_models_list_and_readyz_show_speech_to_text(gw, client):
    names = {m.id for m in client.models.list()}
    assert {"whisper-large-v3", "whisper-1"} <= names
    stt = gw.readyz().json()["checks"]["stt"]
    assert stt == {
        "ready": True,
        "state": "ready",
        "model": gw.env["APPLIANCE_STT_MODEL"],
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
    assert engine.status() == {"ready": False, "state": "loading", "model": str(whisper_dir)}
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
