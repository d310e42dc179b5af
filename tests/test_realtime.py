"""Live dictation (`/v1/realtime?intent=transcription`): the openai SDK's realtime client against the real
gateway, on speech espeak-ng speaks and the packaged real Whisper base model.

The model runs on this machine's CPU, where one pass costs seconds, so the tests wait on events rather
than time, and the latency figures live in `tests/bench/realtime.py`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from tests.harness import Gateway
from tests.real_speech import silence, speak, wav_bytes, word_error_rate
from tests.realtime_client import (
    COMPLETED,
    DELTA,
    PCM_RATE,
    Recorder,
    b64,
    chunks,
    connect,
    ga_session,
    pcm16,
)
from tests.stt_gateway import start_stt_gateway

SENTENCE = "Plants need sunlight and water to grow."
CHUNK = PCM_RATE * 2 // 10  # 100 ms of PCM16


@pytest.fixture(scope="module")
def gw(real_whisper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("realtime")
    gateway = start_stt_gateway(
        tmp, "real", APPLIANCE_STT_MODEL=str(real_whisper_dir), APPLIANCE_STT_WORKERS="1"
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(gw: Gateway) -> openai.OpenAI:
    return gw.client(timeout=120)


def realtime_status(gw: Gateway) -> dict:
    return gw.readyz().json()["checks"]["realtime"]


def test_deltas_come_early_never_change_and_the_completed_text_is_the_uploads(gw, client):
    """Manual commits: speech streamed in real time, then silence until text shows, then the commit."""
    speech = speak(SENTENCE, rate=PCM_RATE)
    sent: list[np.ndarray] = []
    with connect(client) as conn:
        events = Recorder(conn)
        conn.session.update(session=ga_session(turn_detection=None))
        events.wait_for("session.updated")
        for piece in chunks(pcm16(speech), CHUNK):
            conn.input_audio_buffer.append(audio=b64(piece))
            time.sleep(0.1)
        sent.append(speech)
        # A child pausing to think: silence goes on (up to 40 s on a loaded CPU) until words show.
        deadline = time.monotonic() + 40
        while not events.of(DELTA) and time.monotonic() < deadline:
            pause = silence(0.1, PCM_RATE)
            conn.input_audio_buffer.append(audio=b64(pcm16(pause)))
            sent.append(pause)
            time.sleep(0.1)
        conn.input_audio_buffer.commit()
        events.wait_for(COMPLETED, timeout=120)
    order = [e.type for e in events.wait(lambda _: True, 1)]
    assert order[:2] == ["session.created", "session.updated"]
    committed = order.index("input_audio_buffer.committed")
    assert DELTA in order[:committed], "no text arrived while the turn was still open"
    deltas = events.of(DELTA)
    (completed,) = events.of(COMPLETED)
    assert "".join(d.delta for d in deltas) == completed.transcript
    assert {d.item_id for d in deltas} == {completed.item_id}
    assert word_error_rate(SENTENCE, completed.transcript) <= 0.3
    audio = np.concatenate(sent)
    assert completed.usage["seconds"] == pytest.approx(len(audio) / PCM_RATE, abs=0.01)
    upload = client.audio.transcriptions.create(
        model="whisper-1", file=("dictation.wav", wav_bytes(audio, PCM_RATE)), language="en"
    )
    assert completed.transcript == upload.text
    # Nothing of what was said reaches the logs or the disk.
    assert "sunlight" not in gw.logs().lower()
    assert '"event":"realtime_session"' in gw.logs()
    assert list(Path(gw.env["TMPDIR"]).iterdir()) == []


def test_server_vad_splits_two_sentences_at_the_pause(client):
    first, second = "The cat sat on the mat.", "My brother likes to read books."
    pause = silence(1.5, PCM_RATE)
    audio = np.concatenate(
        [silence(0.5, PCM_RATE), speak(first, rate=PCM_RATE), pause, speak(second, rate=PCM_RATE), pause]
    )
    vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 700}
    with connect(client) as conn:
        events = Recorder(conn)
        conn.session.update(session=ga_session(turn_detection=vad))
        events.wait_for("session.updated")
        for piece in chunks(pcm16(audio), 4 * CHUNK):
            conn.input_audio_buffer.append(audio=b64(piece))
        completed = events.wait_for(COMPLETED, count=2, timeout=180)
    started = events.of("input_audio_buffer.speech_started")
    stopped = events.of("input_audio_buffer.speech_stopped")
    committed = events.of("input_audio_buffer.committed")
    assert len(started) == len(stopped) == len(committed) == len(completed) == 2
    assert [e.item_id for e in started] == [e.item_id for e in stopped] == [e.item_id for e in completed]
    assert committed[1].previous_item_id == committed[0].item_id
    first_end = (0.5 + len(speak(first)) / 16000) * 1000
    assert 200 <= started[0].audio_start_ms < stopped[0].audio_end_ms < started[1].audio_start_ms
    assert first_end < stopped[0].audio_end_ms < first_end + 1500
    assert word_error_rate(first, completed[0].transcript) <= 0.35
    assert word_error_rate(second, completed[1].transcript) <= 0.35
    for turn in completed:
        deltas = [d.delta for d in events.of(DELTA) if d.item_id == turn.item_id]
        assert "".join(deltas) == turn.transcript


def test_beta_dialect_with_g711_and_manual_commit(gw):
    """`client.beta.realtime` speaks `transcription_session.update`; G.711 mu-law at 8 kHz. (The beta
    client always dials wss:// unless given a WebSocket base URL; the test gateway is plain ws://.)"""
    client = gw.client(timeout=120, websocket_base_url=gw.base_url.replace("http://", "ws://"))
    speech = np.concatenate([speak(SENTENCE, rate=8000), silence(0.3, 8000)])
    with client.beta.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
        events = Recorder(conn)
        conn.transcription_session.update(
            session={
                "input_audio_format": "g711_ulaw",
                "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": None,
            }
        )
        events.wait_for("transcription_session.updated")
        for piece in chunks(ulaw(speech), 4000):
            conn.input_audio_buffer.append(audio=b64(piece))
        conn.input_audio_buffer.commit()
        (completed,) = events.wait_for(COMPLETED, timeout=120)
    order = [e.type for e in events.wait(lambda _: True, 1)]
    assert order[0] == "transcription_session.created"
    assert "conversation.item.created" in order and "conversation.item.added" not in order
    assert word_error_rate(SENTENCE, completed.transcript) <= 0.35


def test_eight_sessions_at_once_each_get_their_own_text(gw, client):
    sentences = [
        "The sun is hot.",
        "I like green apples.",
        "We walk to school.",
        "Birds can fly high.",
        "The dog is sleeping.",
        "Please close the door.",
        "It is raining today.",
        "My pencil is red.",
    ]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def dictate(index: int) -> None:
        try:
            audio = np.concatenate([speak(sentences[index], rate=PCM_RATE), silence(0.3, PCM_RATE)])
            with connect(client) as conn:
                events = Recorder(conn)
                conn.session.update(session=ga_session(turn_detection=None))
                events.wait_for("session.updated", timeout=60)
                for piece in chunks(pcm16(audio), 5 * CHUNK):
                    conn.input_audio_buffer.append(audio=b64(piece))
                conn.input_audio_buffer.commit()
                (completed,) = events.wait_for(COMPLETED, timeout=300)
                results[index] = completed.transcript
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=dictate, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(360)
    assert not errors, errors
    for index, text in results.items():
        # Each session heard its own child: its text is nearer its own sentence than any other.
        rates = [word_error_rate(sentence, text) for sentence in sentences]
        assert rates[index] < min(r for i, r in enumerate(rates) if i != index), (sentences[index], text)
    assert len(results) == 8
    deadline = time.monotonic() + 10
    while realtime_status(gw)["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert realtime_status(gw)["sessions"] == 0 and realtime_status(gw)["buffered_bytes"] == 0


def ulaw(samples: np.ndarray) -> bytes:
    """G.711 mu-law bytes of float samples (the standard's segment encoding, as telephony sends it)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int32)
    sign = np.where(pcm < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(pcm), 32635) + 0x84
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()
