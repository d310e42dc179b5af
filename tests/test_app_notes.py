"""What README's notes for app developers promise, through the real gateway with the openai SDK:
`model` in an answer names the model that produced it, local or cloud alike, and speech is audio bytes
(`response.content`), not JSON."""

from __future__ import annotations

import pytest

from tests.conftest import CLOUD_KEY

TIER1 = "nvidia/nemotron-mini-4b-instruct"
LOCAL_TIER1 = "nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8"
MESSAGES = [{"role": "user", "content": "Chek my sentense please."}]


def test_model_in_an_answer_is_the_model_that_served_it(start_gateway, local_llm, cloud_llm):
    gw = start_gateway(
        APPLIANCE_LLM_URL=local_llm.base_url,
        NVIDIA_NIM_BASE_URL=cloud_llm.base_url,
        NVIDIA_NIM_API_KEY=CLOUD_KEY,
    )
    client = gw.client()
    local = client.chat.completions.with_raw_response.create(model=TIER1, messages=MESSAGES)
    assert (local.headers["x-appliance-target"], local.parse().model) == ("box", LOCAL_TIER1)
    chunks = list(client.chat.completions.create(model=TIER1, messages=MESSAGES, stream=True))
    assert {c.model for c in chunks} == {LOCAL_TIER1}
    local_llm.fail("503")
    cloud = client.chat.completions.with_raw_response.create(model=TIER1, messages=MESSAGES)
    assert (cloud.headers["x-appliance-target"], cloud.parse().model) == ("cloud", TIER1)  # the cloud's id


def test_speech_is_audio_bytes_not_json(start_gateway, magpie):
    gw = start_gateway(APPLIANCE_TTS_URL=magpie.url, APPLIANCE_TTS_HEALTH_INTERVAL="0.1")
    speech = gw.client(max_retries=3).audio.speech.create(model="tts-1", voice="alloy", input="Hello there.")
    assert speech.response.headers["content-type"] == "audio/mpeg"
    assert len(speech.content) > 1000
    with pytest.raises(ValueError):  # what an integration that calls .json() runs into
        speech.json()
