"""Text-to-speech: OpenAI's /v1/audio/speech through the real gateway to a MagpieTTS NIM simulator."""

from __future__ import annotations

import io
import itertools
import struct
import threading
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import openai
import pytest
from aiohttp import web

from appliance.tts import FIRST_PIECE_CHARS, pcm_from_wav, split_text
from tests.harness import CLIENT_KEY, Gateway, clean_env, run_appliance
from tests.openapi import validate
from tests.sims.magpie_nim import MagpieNIM

SENTENCE = "The quick brown fox jumps over the lazy dog. "
WHOLE_FILE = {"stream": "false"}  # the query flag that asks for the complete file
MAX_STREAMS = 3  # the module gateway's APPLIANCE_TTS_MAX_STREAMS
TONE_HZ = 220.0  # the simulator's tone
# response_format -> (container, decoders, sample rate, content type)
FORMATS = {
    "mp3": ("mp3", {"mp3", "mp3float"}, 22050, "audio/mpeg"),
    "opus": ("ogg", {"opus", "libopus"}, 48000, "audio/opus"),
    "aac": ("aac", {"aac"}, 22050, "audio/aac"),
    "flac": ("flac", {"flac"}, 22050, "audio/flac"),
    "wav": ("wav", {"pcm_s16le"}, 22050, "audio/wav"),
    "pcm": ("s16le", {"pcm_s16le"}, 24000, "audio/pcm"),
}


@pytest.fixture(scope="module")
def nim(bg_loop) -> Iterator[MagpieNIM]:
    sim = MagpieNIM(seconds_per_char=0.02, real_time_factor=0.1, chunk_seconds=0.05)
    bg_loop.run(sim.start())
    yield sim
    bg_loop.run(sim.stop())


@pytest.fixture(autouse=True)
def fresh_nim(nim: MagpieNIM) -> Iterator[None]:
    nim.reset()
    yield
    nim.reset()


@pytest.fixture(scope="module")
def gateway(nim: MagpieNIM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("tts")
    env = clean_env(
        APPLIANCE_API_KEYS=CLIENT_KEY,
        APPLIANCE_DATA_DIR=str(tmp / "data"),
        APPLIANCE_LLM_URL="http://127.0.0.1:9/v1",
        APPLIANCE_TTS_URL=nim.url,
        APPLIANCE_TTS_HEALTH_INTERVAL="0.1",
        APPLIANCE_TTS_TIMEOUT="1",
        APPLIANCE_TTS_VOICES_TTL="1",
        APPLIANCE_TTS_MAX_STREAMS=str(MAX_STREAMS),
    )
    gw = Gateway(env, tmp / "gateway.log").start()
    wait_until(lambda: tts_check(gw)["ready"])
    yield gw
    gw.stop()


def wait_until(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def tts_check(gw: Gateway) -> dict[str, Any]:
    return gw.readyz().json()["checks"]["tts"]


def decode(data: bytes, fmt: str) -> tuple[str, str, int, np.ndarray]:
    """(container, codec, sample rate, mono float samples) of an encoded answer, read with PyAV."""
    if fmt == "pcm":  # headerless: OpenAI's pcm is s16le mono at 24 kHz
        return "s16le", "pcm_s16le", 24000, np.frombuffer(data, "<i2").astype(np.float32) / 32768
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = list(container.decode(stream))
        samples = np.concatenate([f.to_ndarray().astype(np.float32).reshape(-1) for f in frames])
        if frames[0].format.name.startswith("s16"):
            samples /= 32768
        return container.format.name, stream.codec_context.name, frames[0].sample_rate, samples


def seconds_of_audio(data: bytes, fmt: str) -> float:
    """How much audio the start of a stream holds (0 if it holds no whole frame yet)."""
    try:
        _, _, rate, samples = decode(data, fmt)
    except (av.FFmpegError, IndexError, ValueError):
        return 0.0
    return len(samples) / rate


def synthesised_seconds(nim: MagpieNIM) -> float:
    return sum(nim.audio_seconds(call.text) for call in nim.calls)


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def speech(gw: Gateway, params: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    with gw.http() as http:
        return http.post("/v1/audio/speech", params=params, json={"model": "tts-1", "voice": "alloy", **body})


def wav_sizes(data: bytes) -> tuple[int, int]:
    """(RIFF size, data size) of a canonical 44-byte WAV header."""
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    return struct.unpack("<I", data[4:8])[0], struct.unpack("<I", data[40:44])[0]


# Formats, speed, streaming.


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_file_on_request_decodes_to_the_expected_audio(gateway, nim, fmt):
    response = gateway.client().audio.speech.create(
        model="nvidia/magpietts",
        input=SENTENCE * 8,
        voice="default",
        response_format=fmt,
        extra_query=WHOLE_FILE,
    )
    container, codecs, rate, content_type = FORMATS[fmt]
    assert response.response.headers["content-type"] == content_type
    assert int(response.response.headers["content-length"]) == len(response.content)
    got_container, codec, got_rate, samples = decode(response.content, fmt)
    assert (got_container, got_rate) == (container, rate)
    assert codec in codecs
    # 360 characters: the first sentence, then two pieces of at most 250
    assert [c.path for c in nim.calls] == ["/v1/audio/synthesize"] * 3
    assert len(samples) / rate == pytest.approx(synthesised_seconds(nim), abs=0.12)
    if fmt == "wav":  # complete headers: the real sizes
        assert wav_sizes(response.content) == (len(response.content) - 8, len(response.content) - 44)


def test_mp3_is_the_default_format(gateway, nim):
    response = gateway.client().audio.speech.create(model="tts-1", input=SENTENCE, voice="alloy")
    assert response.response.headers["content-type"] == "audio/mpeg"
    assert decode(response.content, "mp3")[:3] == ("mp3", "mp3float", 22050)


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_speed_changes_duration_but_not_pitch(gateway, nim, speed):
    response = gateway.client().audio.speech.create(
        model="tts-1", input=SENTENCE * 2, voice="alloy", response_format="wav", speed=speed
    )
    _, _, rate, samples = decode(response.content, "wav")
    assert len(samples) / rate == pytest.approx(synthesised_seconds(nim) / speed, rel=0.03, abs=0.08)
    assert dominant_hz(samples, rate) == pytest.approx(TONE_HZ, abs=3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_speech_streams_by_default_in_every_format(gateway, nim, fmt):
    text = SENTENCE * 12  # 540 characters: the first sentence, then three pieces
    received: list[tuple[float, bytes]] = []
    with gateway.client().audio.speech.with_streaming_response.create(
        model="tts-1", input=text, voice="nova", response_format=fmt
    ) as response:
        assert response.headers["content-type"] == FORMATS[fmt][3]
        assert "content-length" not in response.headers  # chunked, as it is produced
        received += [(time.time(), chunk) for chunk in response.iter_bytes()]
    assert [c.path for c in nim.calls] == ["/v1/audio/synthesize_online"] * 4
    assert all(c.voice == "Magpie-Multilingual.EN-US.Sofia" for c in nim.calls)
    # Playable audio reached the client before the engine had finished the second of the four pieces.
    early = b"".join(chunk for at, chunk in received if at < nim.calls[1].finished_at)
    assert seconds_of_audio(early, fmt) > 0
    _, _, rate, samples = decode(b"".join(chunk for _, chunk in received), fmt)
    assert rate == FORMATS[fmt][2]
    assert len(samples) / rate == pytest.approx(synthesised_seconds(nim), abs=0.12)


def test_stream_format_audio_streams_too(gateway, nim):
    with gateway.client().audio.speech.with_streaming_response.create(
        model="tts-1", input=SENTENCE, voice="alloy", response_format="pcm", stream_format="audio"
    ) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        assert len(response.read()) > 0
    assert [c.path for c in nim.calls] == ["/v1/audio/synthesize_online"]


def test_streamed_wav_header_says_until_the_end_as_openai_does(gateway, nim):
    with gateway.client().audio.speech.with_streaming_response.create(
        model="tts-1", input=SENTENCE * 4, voice="alloy", response_format="wav"
    ) as response:
        data = response.read()
    # OpenAI's streaming WAV: the canonical 44-byte header with both sizes 0xFFFFFFFF, then the samples.
    assert wav_sizes(data) == (0xFFFFFFFF, 0xFFFFFFFF)
    with wave.open(io.BytesIO(data[:44])) as header:  # any WAV reader takes it
        assert (header.getnchannels(), header.getsampwidth(), header.getframerate()) == (1, 2, 22050)
    assert (len(data) - 44) / 2 / 22050 == pytest.approx(synthesised_seconds(nim), abs=0.01)


def test_first_audio_of_a_long_text_arrives_after_the_first_piece_not_all(gateway, nim):
    text = " ".join(f"This is sentence number {i} of the story." for i in range(30))  # 30 sentences
    nim.slow = 2  # 24 s of audio in about 5 s
    sent = time.time()
    with gateway.client().audio.speech.with_streaming_response.create(
        model="tts-1", input=text, voice="alloy", response_format="mp3"
    ) as response:
        chunks = response.iter_bytes()
        next(chunks)
        first_audio_at = time.time()
        rest = b"".join(chunks)
    calls = nim.calls
    assert len(calls) >= 5 and rest
    assert calls[0].text == "This is sentence number 0 of the story."  # the first piece: one sentence
    # The first bytes came once the engine had begun speaking, before it had finished the next piece,
    # and long before it began the last (the whole file waits for the last piece's end).
    assert calls[0].first_audio_at is not None and sent < calls[0].first_audio_at < first_audio_at
    assert first_audio_at < calls[1].finished_at < calls[-1].received_at


def test_long_text_reaches_the_engine_in_order_in_pieces_it_accepts(gateway, nim):
    text = " ".join(f"Sentence number {i} is read aloud, clearly and slowly." for i in range(80))[:4096]
    assert len(text) == 4096  # OpenAI's maximum, twice the NIM's 2,000 characters per request
    nim.slow = 0.1  # 82 s of audio: synthesise it quickly
    response = gateway.client().audio.speech.create(
        model="tts-1", input=text, voice="alloy", response_format="wav"
    )
    calls = nim.calls
    assert len(calls) >= 4096 // 250
    assert all(len(c.text) <= 250 <= nim.max_chars for c in calls)
    assert " ".join(c.text for c in calls) == text  # every word, in order, nothing repeated
    assert all(c.text.endswith((".", text[-10:])) for c in calls)  # cut between sentences
    # One piece at a time, each sent after the previous one was answered.
    assert all(later.received_at >= earlier.finished_at for earlier, later in itertools.pairwise(calls))
    _, _, rate, samples = decode(response.content, "wav")
    assert len(samples) / rate == pytest.approx(synthesised_seconds(nim), abs=0.01)


def test_text_splitting_prefers_sentences_then_clauses_then_words():
    text = "One two. Three four five; six seven, eight. " + "x" * 30
    pieces = split_text(text, 20)
    assert pieces == ["One two.", "Three four five;", "six seven, eight.", "x" * 20, "x" * 10]
    assert split_text("  Short text.  ", 250) == ["Short text."]


def test_the_first_piece_is_the_first_sentence_or_what_of_it_fits():
    text = "First one. " + "Then a much longer second sentence, which goes on. " * 4
    assert split_text(text, 100, 20) == [
        "First one.",
        *split_text(text.removeprefix("First one. "), 100),
    ]
    assert split_text("A long first sentence, with a clause. More.", 100, 25) == [
        "A long first sentence,",
        "with a clause. More.",
    ]
    assert split_text("Short text.", 100, 20) == ["Short text."]


def test_engine_wav_at_another_rate_or_layout_is_converted():
    out = io.BytesIO()
    with wave.open(out, "wb") as w:  # one second of stereo at 16 kHz
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(32000, "<i2").tobytes())
    assert len(pcm_from_wav(out.getvalue(), 22050)) / 2 == pytest.approx(22050, abs=64)


# Voices and languages.


@pytest.mark.parametrize(
    ("voice", "language", "magpie_voice", "magpie_language"),
    [
        ("default", None, "Magpie-Multilingual.EN-US.Aria", "en-US"),
        ("echo", None, "Magpie-Multilingual.EN-US.Jason", "en-US"),
        ("Shimmer", None, "Magpie-Multilingual.EN-US.Mia", "en-US"),
        ("coral", None, "Magpie-Multilingual.EN-US.Aria", "en-US"),  # OpenAI name not mapped: default
        ("Magpie-Multilingual.EN-US.Mia.Calm", None, "Magpie-Multilingual.EN-US.Mia.Calm", "en-US"),
        ("Magpie-Multilingual.DE-DE.Leo", None, "Magpie-Multilingual.DE-DE.Leo", "de-DE"),
        ("alloy", "de-de", "Magpie-Multilingual.DE-DE.Aria", "de-DE"),  # same speaker in German
        ("alloy", "fr-FR", "Magpie-Multilingual.FR-FR.Pascal", "fr-FR"),  # no French Aria
        ({"id": "Magpie-Multilingual.ES-US.Diego"}, None, "Magpie-Multilingual.ES-US.Diego", "es-US"),
    ],
)
def test_voices_map_to_magpie_voices_per_language(
    gateway, nim, voice, language, magpie_voice, magpie_language
):
    extra = {"language": language} if language else {}
    response = speech(gateway, input="Hello.", voice=voice, response_format="wav", **extra)
    assert response.status_code == 200, response.text
    assert [(c.voice, c.language) for c in nim.calls] == [(magpie_voice, magpie_language)]


def test_voices_are_listed_from_the_engine_and_cached(gateway, nim):
    time.sleep(1.1)  # let the gateway's cached list (APPLIANCE_TTS_VOICES_TTL=1) expire
    before = nim.voice_lists
    with gateway.http() as http:
        first = http.get("/v1/audio/voices").json()
        second = http.get("/v1/audio/voices").json()
    assert nim.voice_lists == before + 1
    assert first == second
    assert [v["id"] for v in first["data"]] == nim.voices
    assert {"id": "Magpie-Multilingual.DE-DE.Leo", "object": "voice", "language": "de-DE"} in first["data"]
    assert first["aliases"]["alloy"] == "Magpie-Multilingual.EN-US.Aria"
    assert "ja-JP" in first["languages"]


# Bad input: a clear OpenAI-shaped 4xx, and nothing sent to the engine.


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": ""}, 400, "input"),
        ({"input": "  \n "}, 400, "input"),
        ({"input": "a" * 4097}, 400, "input"),
        ({"voice": "robot"}, 400, "voice"),
        ({"voice": None}, 400, "voice"),
        ({"response_format": "ogg"}, 400, "response_format"),
        ({"speed": 5}, 400, "speed"),
        ({"speed": 0.1}, 400, "speed"),
        ({"speed": "fast"}, 400, "speed"),
        ({"stream_format": "sse"}, 400, "stream_format"),
        ({"language": "xx-XX"}, 400, "language"),
        ({"model": "tts-1-hd"}, 404, "model"),
        ({"model": None}, 400, "model"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_reaches_nothing(gateway, nim, body, status, param):
    response = speech(gateway, **{"input": "Hello.", **body})
    assert response.status_code == status, response.text
    validate("ErrorResponse", response.json())
    error = response.json()["error"]
    assert error["param"] == param or error["param"].startswith(f"{param}.")
    assert nim.calls == []


def test_unknown_voice_error_lists_the_valid_voices(gateway, nim):
    with pytest.raises(openai.BadRequestError) as exc:
        gateway.client().audio.speech.create(model="tts-1", input="Hello.", voice="robot")
    message = exc.value.body["message"]
    assert "'robot'" in message
    for valid in (
        "default",
        "alloy",
        "shimmer",
        "Magpie-Multilingual.EN-US.Aria",
        "Magpie-Multilingual.DE-DE.Leo",
    ):
        assert valid in message


def test_too_long_input_names_the_limit(gateway):
    response = speech(gateway, input="a" * 4097)
    assert response.json()["error"]["code"] == "string_above_max_length"
    assert "4097" in response.json()["error"]["message"] and "4096" in response.json()["error"]["message"]


def test_body_that_is_not_json_is_a_400(gateway, nim):
    with gateway.http() as http:
        response = http.post(
            "/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    validate("ErrorResponse", response.json())


@pytest.mark.parametrize(
    ("params", "body", "param"),
    [
        ({"stream": "maybe"}, {}, "stream"),
        (WHOLE_FILE, {"stream_format": "audio"}, "stream_format"),
    ],
)
def test_contradictory_or_unknown_stream_flag_is_a_400(gateway, nim, params, body, param):
    response = speech(gateway, params, input="Hello.", **body)
    assert response.status_code == 400, response.text
    validate("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == param
    assert nim.calls == []


def peak_rss_mb(gw: Gateway) -> float:
    assert gw.proc is not None
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def test_oversized_body_is_a_413_before_it_is_read_whole(gateway, nim):
    huge = {"model": "tts-1", "voice": "alloy", "input": "a" * (5 * 1024 * 1024)}  # over the 4 MiB cap
    peak_before = peak_rss_mb(gateway)
    with gateway.http() as http:
        declared = http.post("/v1/audio/speech", json=huge)

        def trickle() -> Iterator[bytes]:  # 200 MiB, chunked: no Content-Length to refuse it by
            yield b'{"model": "tts-1", "voice": "alloy", "input": "'
            for _ in range(200 * 16):
                yield b"a" * 65536
            yield b'"}'

        chunked = http.post(
            "/v1/audio/speech", content=trickle(), headers={"content-type": "application/json"}
        )
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        validate("ErrorResponse", response.json())
        assert response.json()["error"]["code"] == "request_too_large"
    assert nim.calls == []
    assert peak_rss_mb(gateway) - peak_before < 64  # read whole, the 200 MiB body had cost +600 MB


# A class reading at once: a capped number of NIM requests, the rest in line, then 429.


def test_readers_beyond_the_cap_wait_their_turn_and_all_get_their_audio(gateway, nim):
    readers = MAX_STREAMS * 3
    nim.slow = 4  # each piece takes a while, so the readers overlap
    results: list[tuple[int, float]] = []

    def read() -> None:
        with gateway.client(max_retries=0).audio.speech.with_streaming_response.create(
            model="tts-1", input=SENTENCE * 8, voice="alloy", response_format="pcm"
        ) as response:
            pcm = response.read()
        results.append((response.status_code, len(pcm) / 2 / 24000))

    threads = [threading.Thread(target=read) for _ in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == readers
    pieces = split_text(SENTENCE * 8, 250, FIRST_PIECE_CHARS)
    expected = sum(nim.audio_seconds(piece) for piece in pieces)
    assert [status for status, _ in results] == [200] * readers
    assert [seconds for _, seconds in results] == pytest.approx([expected] * readers, abs=0.05)
    assert nim.peak_streams == MAX_STREAMS  # never more at once than the cap (the NIM itself allows 8)
    assert len(nim.calls) == readers * len(pieces)


def test_waiting_readers_get_their_turn_in_arrival_order(start_gateway, nim):
    gw = start_gateway(
        APPLIANCE_TTS_URL=nim.url,
        APPLIANCE_TTS_HEALTH_INTERVAL="0.1",
        APPLIANCE_TTS_MAX_STREAMS="1",
        APPLIANCE_TTS_QUEUE_TIMEOUT="30",
    )
    wait_until(lambda: tts_check(gw)["ready"])
    nim.slow = 300  # the first reader's synthesis holds the one turn while the others line up
    answers: dict[str, httpx.Response] = {}

    def read(name: str) -> None:
        answers[name] = speech(gw, input=f"Reader {name}.", response_format="pcm")

    threads = [threading.Thread(target=read, args=(name,)) for name in "ABCD"]
    threads[0].start()
    wait_until(lambda: nim.active_streams == 1)
    for thread in threads[1:]:
        thread.start()
        time.sleep(0.5)  # B, C and D arrive in this order
    nim.slow = 1
    for thread in threads:
        thread.join(timeout=30)
    assert [c.text for c in nim.calls] == ["Reader A.", "Reader B.", "Reader C.", "Reader D."]
    assert all(answers[name].status_code == 200 and answers[name].content for name in "ABCD")
    assert nim.peak_streams == 1


def test_a_full_line_answers_429_busy_with_retry_after(start_gateway, nim):
    gw = start_gateway(
        APPLIANCE_TTS_URL=nim.url,
        APPLIANCE_TTS_HEALTH_INTERVAL="0.1",
        APPLIANCE_TTS_MAX_STREAMS="1",
        APPLIANCE_TTS_MAX_WAITING="1",
        APPLIANCE_TTS_QUEUE_TIMEOUT="3",
    )
    wait_until(lambda: tts_check(gw)["ready"])
    nim.slow = 300  # the one synthesis allowed at once takes about 6 s
    first: list[httpx.Response] = []
    reading = threading.Thread(target=lambda: first.append(speech(gw, input="Hello.", response_format="pcm")))
    reading.start()
    wait_until(lambda: nim.active_streams == 1)
    waited: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: waited.append(speech(gw, input="Hello.")))
    waiting.start()
    time.sleep(1)  # the second request is now in line
    line_full = speech(gw, input="Hello.")
    waiting.join(timeout=10)
    for response in (line_full, waited[0]):
        assert response.status_code == 429, response.text
        validate("ErrorResponse", response.json())
        assert response.json()["error"]["code"] == "busy"
        assert response.headers["retry-after"] == "2"
    assert "1 waiting" in line_full.json()["error"]["message"]  # refused at once: the line was full
    assert "0 waiting" in waited[0].json()["error"]["message"]  # refused after its wait
    assert len(nim.calls) == 1  # neither reached the engine
    nim.slow = 1
    reading.join(timeout=20)
    assert first[0].status_code == 200 and first[0].content


# Engine failures: a clear 503, never a hang, and /readyz tells.


def test_engine_not_ready_is_a_503_and_shows_on_readyz(gateway, nim):
    nim.fail = "not_ready"
    wait_until(lambda: not tts_check(gateway)["ready"])
    ready = gateway.readyz()
    assert ready.status_code == 503
    assert "nvidia/magpietts" not in ready.json()["servable"]
    assert "not ready" in ready.json()["checks"]["tts"]["detail"]
    assert "nvidia/magpietts" not in [m.id for m in gateway.client().models.list()]
    with pytest.raises(openai.InternalServerError) as exc:
        gateway.client().audio.speech.create(model="tts-1", input="Hello.", voice="alloy")
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "tts_not_ready" and "not ready" in exc.value.body["message"]

    nim.fail = None
    wait_until(lambda: tts_check(gateway)["ready"])
    assert gateway.client().audio.speech.create(model="tts-1", input="Hello.", voice="alloy").content


@pytest.mark.parametrize("params", [None, WHOLE_FILE])
def test_engine_error_is_a_503_that_readyz_remembers(gateway, nim, params):
    nim.fail, nim.error_status = "error", 500
    response = speech(gateway, params, input="Hello.")
    assert response.status_code == 503
    validate("ErrorResponse", response.json())
    assert response.json()["error"]["code"] == "tts_failed"
    assert "failed (HTTP 500): Internal server error" in response.json()["error"]["message"]
    assert tts_check(gateway)["last_failure"]["code"] == "tts_failed"


def test_engine_dropping_connections_is_a_503(gateway, nim):
    nim.fail = "refuse"
    response = speech(gateway, input="Hello.")
    assert response.status_code == 503
    assert response.json()["error"]["code"] in ("tts_unreachable", "tts_not_ready")
    wait_until(lambda: "unreachable" in tts_check(gateway)["detail"])


@pytest.mark.parametrize("params", [None, WHOLE_FILE])
def test_stalled_engine_times_out_with_a_503(gateway, nim, params):
    nim.fail = "stall"
    started = time.monotonic()
    response = speech(gateway, params, input="Hello.")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "tts_timeout"
    assert "did not answer within 1 s" in response.json()["error"]["message"]
    assert time.monotonic() - started < 3


def test_stream_broken_midway_ends_with_an_incomplete_body(gateway, nim):
    nim.fail, nim.stall_after_chunks = "stall", 20
    received = 0
    started = time.monotonic()
    with (
        pytest.raises(Exception, match="incomplete chunked read"),
        gateway.client().audio.speech.with_streaming_response.create(
            model="tts-1", input=SENTENCE * 4, voice="alloy", response_format="wav"
        ) as response,
    ):
        for chunk in response.iter_bytes():
            received += len(chunk)
    assert received > 0  # audio had started: the cut, not a short file, tells the client it failed
    assert time.monotonic() - started < 4
    assert tts_check(gateway)["last_failure"]["code"] == "tts_timeout"


def test_unreachable_engine_is_not_ready_and_speech_is_a_503(start_gateway):
    gw = start_gateway(APPLIANCE_TTS_HEALTH_INTERVAL="0.1")  # nothing listens at APPLIANCE_TTS_URL
    wait_until(lambda: "unreachable" in tts_check(gw)["detail"])
    assert gw.readyz().status_code == 503
    response = speech(gw, input="Hello.")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "tts_not_ready"
    assert "unreachable at http://127.0.0.1:9" in response.json()["error"]["message"]


def test_speech_never_goes_to_the_cloud(start_gateway, bg_loop, nim):
    cloud_requests: list[str] = []

    async def record(request: web.Request) -> web.Response:
        cloud_requests.append(request.path)
        return web.json_response({"error": {"message": "no"}}, status=500)

    async def start_cloud() -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = bg_loop.run(start_cloud())
    try:
        port = runner.addresses[0][1]
        gw = start_gateway(
            NVIDIA_NIM_API_KEY="nvapi-test-key",
            NVIDIA_NIM_BASE_URL=f"http://127.0.0.1:{port}/v1",
            APPLIANCE_CLOUD_FALLBACK="on_failure",
            APPLIANCE_TTS_URL=nim.url,
        )
        wait_until(lambda: tts_check(gw)["ready"])
        nim.fail = "error"
        secret = "Mia's diary entry for Tuesday."
        response = speech(gw, input=secret)
        assert response.status_code == 503
        assert cloud_requests == []
        assert "diary" not in gw.logs()
    finally:
        bg_loop.run(runner.cleanup())


def test_invalid_voice_table_is_one_clear_line():
    proc = run_appliance(
        "serve", "--port", "1", env=clean_env(APPLIANCE_API_KEYS="k", APPLIANCE_TTS_VOICES="[alloy, echo]")
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "APPLIANCE_TTS_VOICES" in proc.stderr
