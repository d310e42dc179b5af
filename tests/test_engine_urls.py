"""Engine URLs are checked, not trusted: an APPLIANCE_LLM_URL that answers but is not an OpenAI API (no
/v1, a /chat/completions URL, the TTS container's port) is skipped as a failing engine would be, and
/readyz and the log say why; an APPLIANCE_TTS_URL that is not a NIM is said the same way."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.conftest import CLOUD_KEY

TIER1 = "nvidia/nemotron-mini-4b-instruct"
MESSAGES = [{"role": "user", "content": "Chek my sentense please."}]


def local_check(gw) -> dict:
    return gw.readyz().json()["checks"]["llm"]["targets"]["box"]["urls"][0]


def logged(gw, name: str) -> list[dict]:
    lines = [json.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]
    return [e for e in lines if e["event"] == name]


@pytest.mark.parametrize("suffix", ["", "/v1/chat/completions"])
def test_an_llm_url_without_v1_fails_over_and_says_why(start_gateway, local_llm, cloud_llm, suffix):
    url = local_llm.url + suffix
    gw = start_gateway(
        APPLIANCE_LLM_URL=url,
        NVIDIA_NIM_BASE_URL=cloud_llm.base_url,
        NVIDIA_NIM_API_KEY=CLOUD_KEY,
        APPLIANCE_OVERLOAD_POLL_INTERVAL="0.1",
    )
    raw = gw.client().chat.completions.with_raw_response.create(model=TIER1, messages=MESSAGES)
    assert raw.headers["x-appliance-target"] == "cloud"  # not the engine's 404 as the app's mistake
    assert local_llm.seen == []
    reason = f"APPLIANCE_LLM_URL should end in /v1: GET {url}/models returned 404"
    check = local_check(gw)
    assert (check["ready"], check["error"]) == (False, reason)
    time.sleep(1)  # ten more polls
    assert [e["reason"] for e in logged(gw, "local engine misconfigured")] == [reason]  # said once


def test_with_policy_never_a_misaddressed_engine_is_a_503_and_nothing_leaves(
    start_gateway, local_llm, cloud_llm
):
    gw = start_gateway(
        APPLIANCE_LLM_URL=local_llm.url,
        NVIDIA_NIM_BASE_URL=cloud_llm.base_url,
        NVIDIA_NIM_API_KEY=CLOUD_KEY,
        APPLIANCE_CLOUD_FALLBACK="never",
    )
    with pytest.raises(openai.InternalServerError) as exc:
        gw.client().chat.completions.create(model=TIER1, messages=MESSAGES)
    assert exc.value.status_code == 503
    assert local_llm.seen == [] and cloud_llm.seen == []
    ready = gw.readyz()
    assert ready.status_code == 503
    assert ready.json()["checks"]["llm"]["ready"] is False


def test_the_tts_containers_port_as_llm_url_is_not_an_openai_engine(start_gateway, magpie):
    gw = start_gateway(APPLIANCE_LLM_URL=magpie.url + "/v1")
    assert local_check(gw)["error"] == (
        f"APPLIANCE_LLM_URL is not an OpenAI-compatible engine: GET {magpie.url}/v1/models returned 404"
    )


def test_a_right_url_is_not_flagged(start_gateway, local_llm):
    gw = start_gateway(APPLIANCE_LLM_URL=local_llm.base_url)
    assert "error" not in local_check(gw)
    assert logged(gw, "local engine misconfigured") == []


def test_a_tts_url_that_is_not_a_nim_says_so(start_gateway, local_llm):
    gw = start_gateway(APPLIANCE_TTS_URL=local_llm.url, APPLIANCE_TTS_HEALTH_INTERVAL="0.1")
    detail = (
        f"not a NIM: GET {local_llm.url}/v1/health/ready returned 404; APPLIANCE_TTS_URL should be the "
        "MagpieTTS NIM's base URL, without /v1"
    )
    deadline = time.monotonic() + 10
    while gw.readyz().json()["checks"]["tts"]["detail"] != detail:
        assert time.monotonic() < deadline, gw.readyz().text
        time.sleep(0.1)
    with pytest.raises(openai.InternalServerError) as exc:
        gw.client().audio.speech.create(model="tts-1", voice="alloy", input="Hello.")
    assert exc.value.status_code == 503 and "not a NIM" in exc.value.message
    time.sleep(0.5)
    assert [e["detail"] for e in logged(gw, "tts_engine")] == [detail]
