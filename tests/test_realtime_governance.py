"""Live dictation under the key's governance: the seconds of each committed turn are charged to the key's
audio rate and quotas and counted in the usage ledger, as an upload's are; a key over its limits, or
one that may not use the transcription model, gets the HTTP path's error code as an `error` event and a
close. Through the real gateway with the openai SDK's realtime client and the tiny random-weight
Whisper: these tests are about the counting, not the words."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from tests.harness import Gateway
from tests.realtime_client import COMPLETED, PCM_RATE, Recorder, b64, connect, ga_session, pcm16
from tests.stt_gateway import start_stt_gateway
from tests.test_governance import Admin
from tests.whisper_model import build_tiny_whisper

TIERS = """
tiers:
  live-minute: {audio_seconds_per_minute: 1}
  live-day: {audio_seconds_per_day: 1}
"""
UPDATED = ("session.updated", "error")
TURN_SECONDS = 1.5
TURN = (0.3 * np.sin(np.arange(int(TURN_SECONDS * PCM_RATE)) * 2 * np.pi * 220 / PCM_RATE)).astype(np.float32)


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Admin:
    return Admin(tmp_path_factory.mktemp("realtime-governance"), TIERS)


@pytest.fixture(scope="module")
def keys(admin: Admin) -> dict[str, str]:
    """The apps' keys by name, made before the gateway starts (it needs one)."""
    return {
        "reading-app": admin.add("reading-app"),
        "quick-dictation": admin.add("quick-dictation", "--tier", "live-minute"),
        "daily-dictation": admin.add("daily-dictation", "--tier", "live-day"),
        "chat-only": admin.add("chat-only", "--models", "nvidia/nemotron-mini-4b-instruct"),
    }


@pytest.fixture(scope="module")
def gw(admin: Admin, keys: dict[str, str]) -> Iterator[Gateway]:
    root = Path(admin.config).parent
    gateway = start_stt_gateway(
        root,
        "governed",
        APPLIANCE_STT_MODEL=str(build_tiny_whisper(root / "whisper")),
        **admin.gateway_settings(),
    )
    yield gateway
    gateway.stop()


def dictate(gw: Gateway, key: str, turns: int) -> Recorder:
    """A session that commits `turns` turns of 1.5 s by hand, each once the last one's transcript is
    in, or until the gateway closes it; returns its events."""
    client = gw.client(api_key=key, timeout=60)
    with connect(client) as conn:
        events = Recorder(conn)
        with contextlib.suppress(ConnectionClosed):  # the gateway may close it at any step
            conn.session.update(session=ga_session(turn_detection=None))
            events.wait(lambda got: events.done or any(e.type in UPDATED for e in got), timeout=30)
            for done in range(1, turns + 1):
                if events.done:
                    break
                conn.input_audio_buffer.append(audio=b64(pcm16(TURN)))
                conn.input_audio_buffer.commit()
                events.wait(lambda got, n=done: events.done or sum(e.type == COMPLETED for e in got) >= n, 60)
    return events


def refusal(events: Recorder) -> str:
    """The code of the session's last `error` event, once the gateway has closed it (1008)."""
    closed = events.wait_closed()
    assert closed is not None and closed.rcvd is not None and closed.rcvd.code == 1008
    error = events.of("error")[-1].error
    assert error["message"]
    return error["code"]


def test_a_sessions_turns_are_counted_in_the_ledger_by_key_and_model(gw, admin, keys):
    key = keys["reading-app"]
    events = dictate(gw, key, turns=2)
    assert len(events.of(COMPLETED)) == 2 and not events.of("error")
    (row,) = admin.wait_usage(
        lambda rows: any(r["key"] == "reading-app" for r in rows), "--key", "reading-app"
    )
    assert row["model"].startswith("whisper")
    assert row["audio_seconds"] == pytest.approx(2 * TURN_SECONDS, abs=0.05)
    assert row["requests"] == 2 and row["served_box"] == 2 and row["served_cloud"] == 0


def test_a_turn_past_the_keys_audio_rate_ends_the_session_with_rate_limit_exceeded(gw, admin, keys):
    key = keys["quick-dictation"]
    # The first turn (1.5 s) passes on a full minute's allowance (1 s) and leaves the key in debt; the
    # second, committed at once, is refused, and the first still gets its transcript before the error.
    client = gw.client(api_key=key, timeout=60)
    with connect(client) as conn:
        events = Recorder(conn)
        conn.session.update(session=ga_session(turn_detection=None))
        for _ in range(2):
            conn.input_audio_buffer.append(audio=b64(pcm16(TURN)))
            conn.input_audio_buffer.commit()
        assert refusal(events) == "rate_limit_exceeded"
    assert [e.type for e in events.of(COMPLETED) + events.of("error")] == [COMPLETED, "error"]
    kinds = [e.type for e in events.wait(lambda got: True, 1)]
    assert kinds.index(COMPLETED) < kinds.index("error")
    assert events.of("error")[0].error["type"] == "rate_limit_error"
    # Still in debt, the key's next session is refused as it opens.
    assert refusal(dictate(gw, key, turns=1)) == "rate_limit_exceeded"
    (row,) = admin.wait_usage(lambda rows: sum(r["requests"] for r in rows) == 2, "--key", "quick-dictation")
    assert row["audio_seconds"] == pytest.approx(TURN_SECONDS, abs=0.05)
    assert row["errors_limited"] == 1 and row["served_box"] == 1


def test_a_key_past_its_daily_audio_quota_gets_insufficient_quota(gw, admin, keys):
    key = keys["daily-dictation"]
    events = dictate(gw, key, turns=2)
    assert len(events.of(COMPLETED)) == 1
    assert refusal(events) == "insufficient_quota"
    assert refusal(dictate(gw, key, turns=1)) == "insufficient_quota"


def test_a_key_that_may_not_use_the_transcription_model_is_refused(gw, admin, keys):
    key = keys["chat-only"]
    events = dictate(gw, key, turns=1)
    # The session update naming the transcription model ends the session; nothing is transcribed.
    assert refusal(events) == "model_not_allowed"
    assert len(events.of("error")) == 1 and events.of("error")[0].error["param"] == "model"
    assert not events.of(COMPLETED) and not events.of("session.updated")
    assert not any(r["key"] == "chat-only" and r["audio_seconds"] for r in admin.usage())
