"""Live dictation's edges: keys, intents, bad settings and audio, oversized appends, idle sessions, a
client that never reads, and the session cap. Each bad session gets a clear `error` event and a close;
the others carry on. The engine here is the tiny random-weight Whisper: these tests are about the
session, not the words."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.harness import CLIENT_KEY, Gateway
from tests.realtime_client import COMPLETED, PCM_RATE, Recorder, b64, connect, ga_session, pcm16
from tests.stt_gateway import start_stt_gateway
from tests.whisper_model import build_tiny_whisper

MAX_SESSIONS = 4
MAX_APPEND = 48000  # bytes of audio: 1 s of PCM16 at 24 kHz
TONE = (0.3 * np.sin(np.arange(int(0.5 * PCM_RATE)) * 2 * np.pi * 220 / PCM_RATE)).astype(np.float32)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("realtime-limits")
    gateway = start_stt_gateway(
        tmp,
        "limits",
        APPLIANCE_STT_MODEL=str(build_tiny_whisper(tmp / "whisper")),
        APPLIANCE_REALTIME_MAX_SESSIONS=str(MAX_SESSIONS),
        APPLIANCE_REALTIME_MAX_APPEND_BYTES=str(MAX_APPEND),
        APPLIANCE_REALTIME_IDLE_TIMEOUT="2",
        APPLIANCE_REALTIME_SEND_BUFFER_BYTES="65536",
        APPLIANCE_REALTIME_SEND_TIMEOUT="2",
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(gw: Gateway) -> openai.OpenAI:
    return gw.client(timeout=60)


def ws_url(gw: Gateway, query: str = "intent=transcription") -> str:
    return gw.base_url.replace("http://", "ws://") + "/realtime?" + query


def realtime_status(gw: Gateway) -> dict:
    return gw.readyz().json()["checks"]["realtime"]


def wait_until_no_sessions(gw: Gateway, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (status := realtime_status(gw))["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


def assert_error_and_close(events: Recorder, code: str, param: str | None = None, close: int = 1008) -> None:
    (error,) = events.wait_for("error", timeout=30)
    assert error.error["code"] == code and error.error["message"]
    assert error.error["type"] in ("invalid_request_error", "rate_limit_error")
    if param is not None:
        assert error.error["param"] == param
    closed = events.wait_closed()
    assert closed is not None and closed.rcvd is not None and closed.rcvd.code == close


def test_keys_are_checked_on_the_upgrade(gw):
    with pytest.raises(InvalidStatus) as missing:
        ws_connect(ws_url(gw))
    assert missing.value.response.status_code == 401
    assert json.loads(missing.value.response.body)["error"]["code"] == "missing_api_key"
    with pytest.raises(InvalidStatus) as wrong:
        ws_connect(ws_url(gw), additional_headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.value.response.status_code == 401
    assert json.loads(wrong.value.response.body)["error"]["code"] == "invalid_api_key"


def test_browsers_key_subprotocol_is_accepted_and_never_echoed(gw):
    offered = ["realtime", f"openai-insecure-api-key.{CLIENT_KEY}"]
    with ws_connect(ws_url(gw), subprotocols=offered) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(ws.recv())["type"] == "session.created"
    assert CLIENT_KEY not in gw.logs()


def test_only_the_transcription_intent_is_served(gw):
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(
            ws_url(gw, "model=gpt-realtime"), additional_headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        )
    assert refused.value.response.status_code == 400
    assert json.loads(refused.value.response.body)["error"]["param"] == "intent"


def test_a_wrong_sample_rate_is_an_error_and_a_close(client):
    with connect(client) as conn:
        events = Recorder(conn)
        session = ga_session(turn_detection=None)
        session["audio"]["input"]["format"]["rate"] = 16000
        conn.session.update(session=session)
        assert_error_and_close(events, "invalid_audio_format", "session.audio.input.format.rate")


def test_a_wrong_format_is_an_error_and_a_close(client):
    with connect(client) as conn:
        events = Recorder(conn)
        conn.send({"type": "transcription_session.update", "session": {"input_audio_format": "pcm32"}})
        assert_error_and_close(events, "invalid_audio_format", "session.input_audio_format")


def test_audio_that_is_not_pcm16_is_an_error_and_a_close(client):
    with connect(client) as conn:
        events = Recorder(conn)
        conn.input_audio_buffer.append(audio=b64(b"\x01\x02\x03"))  # half a sample short
        assert_error_and_close(events, "invalid_audio", "audio")


def test_an_oversized_append_is_an_error_and_a_close(gw, client):
    with connect(client) as conn:
        events = Recorder(conn)
        conn.input_audio_buffer.append(audio=b64(bytes(MAX_APPEND + 2)))
        assert_error_and_close(events, "append_too_large", "audio")
    assert wait_until_no_sessions(gw)["buffered_bytes"] == 0


def test_an_idle_session_is_closed(client):
    with connect(client) as conn:
        events = Recorder(conn)
        events.wait_for("session.created")
        assert_error_and_close(events, "idle_timeout")


def test_settings_it_does_not_serve_are_errors_and_the_session_goes_on(client):
    with connect(client) as conn:
        events = Recorder(conn)
        noisy = ga_session(turn_detection=None, noise_reduction={"type": "near_field"})
        conn.session.update(session=noisy)
        conn.session.update(session=ga_session(turn_detection={"type": "semantic_vad"}))
        conn.session.update(session=ga_session(turn_detection=None, language="xx"))
        conn.send({"type": "response.create"})
        conn.input_audio_buffer.commit()  # nothing to commit yet
        conn.session.update(session=ga_session(turn_detection=None))
        events.wait_for("session.updated")
        codes = [e.error["code"] for e in events.of("error")]
        params = [e.error["param"] for e in events.of("error")]
    assert codes == [
        "unsupported_setting",
        "unsupported_setting",
        "invalid_request",
        "invalid_event",
        "input_audio_buffer_commit_empty",
    ]
    assert params[:3] == [
        "session.audio.input.noise_reduction",
        "session.audio.input.turn_detection.type",
        "session.audio.input.transcription.language",
    ]


def test_a_client_that_never_reads_is_cut_off_and_others_carry_on(gw, client):
    # A client whose socket takes in almost nothing and that reads nothing, while it sends events
    # that each have an answer.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    silent = ws_connect(
        ws_url(gw),
        sock=sock,
        additional_headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        max_queue=1,
        compression=None,  # compressed, its answers would take ages to fill the socket's buffers
    )
    stop = threading.Event()

    def flood() -> None:
        wrong = json.dumps({"type": "no.such.event"})  # each one answered with an error event
        with contextlib.suppress(Exception):
            while not stop.is_set():
                silent.send(wrong)

    flooding = threading.Thread(target=flood, daemon=True)
    flooding.start()
    with connect(client) as conn:  # a child dictating meanwhile
        events = Recorder(conn)
        conn.session.update(session=ga_session(turn_detection=None))
        conn.input_audio_buffer.append(audio=b64(pcm16(TONE)))
        conn.input_audio_buffer.commit()
        events.wait_for(COMPLETED, timeout=60)
        assert not events.of("error")
    deadline = time.monotonic() + 90
    while '"close":"client_not_reading"' not in gw.logs() and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    sock.shutdown(socket.SHUT_RDWR)  # ends the flood's blocked send (the client's own close waits on it)
    flooding.join(10)
    sock.close()
    assert '"close":"client_not_reading"' in gw.logs(), "the gateway kept a session whose client never reads"
    status = wait_until_no_sessions(gw)
    assert status["sessions"] == 0 and status["buffered_bytes"] == 0


def test_past_the_session_cap_a_new_session_is_refused_cleanly(gw, client):
    managers = [connect(client) for _ in range(MAX_SESSIONS)]
    open_ = [m.__enter__() for m in managers]
    stop = threading.Event()

    def keep_alive() -> None:  # children still dictating: none of them is idle
        while not stop.wait(0.5):
            for conn in list(open_):
                with contextlib.suppress(Exception):
                    conn.input_audio_buffer.clear()

    threading.Thread(target=keep_alive, daemon=True).start()
    try:
        with connect(client) as extra:
            events = Recorder(extra)
            assert_error_and_close(events, "busy", close=1013)
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'appliance_realtime_sessions_closed_total{reason="busy"}' in metrics
        assert f"appliance_realtime_sessions {MAX_SESSIONS}.0" in metrics
        open_.pop(0)
        managers.pop(0).__exit__(None, None, None)
        deadline = time.monotonic() + 10
        while realtime_status(gw)["sessions"] >= MAX_SESSIONS and time.monotonic() < deadline:
            time.sleep(0.05)
        with connect(client) as again:
            events = Recorder(again)
            assert events.wait_for("session.created")
    finally:
        stop.set()
        for manager in managers:
            manager.__exit__(None, None, None)


def test_while_passes_wait_past_the_bound_new_sessions_are_refused(tmp_path):
    """The engine is the bottleneck (one slot, a bound of 10 ms): sessions already dictating keep it
    busy, and a newcomer is refused instead of slowing them."""
    gw = start_stt_gateway(
        tmp_path,
        "lag",
        APPLIANCE_STT_MODEL=str(build_tiny_whisper(tmp_path / "whisper")),
        APPLIANCE_STT_WORKERS="1",
        APPLIANCE_REALTIME_MAX_LAG="0.01",
        APPLIANCE_REALTIME_PARTIAL_INTERVAL="0.1",
    )
    client = gw.client(timeout=60)
    stop = threading.Event()

    def dictate() -> None:
        with connect(client) as conn:
            conn.session.update(session=ga_session(turn_detection=None))
            while not stop.is_set():
                conn.input_audio_buffer.append(audio=b64(pcm16(TONE)))
                time.sleep(0.1)
                if realtime_status(gw)["buffered_bytes"] > 16000 * 4 * 20:
                    conn.input_audio_buffer.clear()

    talkers = [threading.Thread(target=dictate, daemon=True) for _ in range(3)]
    for talker in talkers:
        talker.start()
    try:
        refusal = None
        deadline = time.monotonic() + 60
        while refusal is None and time.monotonic() < deadline:
            with connect(client) as conn:
                events = Recorder(conn)
                first = events.wait(lambda e: bool(e), timeout=30)[0]
                if first.type == "error":
                    refusal = first
                    closed = events.wait_closed()
            time.sleep(0.2)
        assert refusal is not None, "a newcomer was let in however long passes waited"
        assert refusal.error["code"] == "busy" and "too busy" in refusal.error["message"]
        assert closed is not None and closed.rcvd is not None and closed.rcvd.code == 1013
    finally:
        stop.set()
        for talker in talkers:
            talker.join(30)
        gw.stop()


def test_without_a_model_a_session_is_refused_with_the_reason(tmp_path):
    gw = start_stt_gateway(tmp_path, "missing", APPLIANCE_STT_MODEL="large-v3")
    try:
        with connect(gw.client(timeout=30)) as conn:
            events = Recorder(conn)
            (error,) = events.wait_for("error", timeout=30)
            closed = events.wait_closed()
        assert (
            error.error["code"] == "model_unavailable" and "appliance models pull" in error.error["message"]
        )
        assert closed is not None and closed.rcvd is not None and closed.rcvd.code == 1011
        assert realtime_status(gw)["sessions"] == 0
    finally:
        gw.stop()
