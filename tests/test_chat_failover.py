"""Failover through the real gateway against engines that fail the way the field saw them fail: local
blips, slow first tokens, streams cut, stalled or ended by an error event after the first byte,
context overflow, a pooled connection closed after a long wait, a cloud key or model id that no longer
works, and SSE framed with CR line endings."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from appliance.upstream_http import IDLE_SECONDS
from tests.conftest import CLOUD_KEY
from tests.openapi import validate
from tests.sims.openai_upstream import REPLY
from tests.test_chat import MESSAGES, TIER1, TIER2, chat, served_by

WHOLE = f"{REPLY} [vllm] "  # the local engine's streamed answer, as the client assembles it


def stream_events(gw, model=TIER1, **body):
    """The SSE events of one streamed chat, parsed, and the response headers."""
    request = {"model": model, "messages": MESSAGES, "stream": True, **body}
    with gw.http() as http, http.stream("POST", "/v1/chat/completions", json=request) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        headers = r.headers
    assert lines[-1] == "data: [DONE]" or "error" in lines[-1]
    return [json.loads(line[6:]) for line in lines if line != "data: [DONE]"], headers


def content_of(chunks) -> list[str]:
    return [
        c["choices"][0]["delta"]["content"]
        for c in chunks
        if c.get("choices") and "content" in c["choices"][0]["delta"]
    ]


# A blip on the local engine stays on the box.


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_a_local_5xx_or_reset_is_retried_once_on_the_local_engine_first(gateway, local_llm, cloud_llm, mode):
    gw = gateway()
    # Past the pool's idle time, the connection the gateway opened at start is gone: the reset meets a
    # fresh connection, which the HTTP client itself never sends again.
    time.sleep(IDLE_SECONDS + 0.5)
    local_llm.fail(mode, times=1)
    raw = chat(gw)
    assert served_by(raw) == "box" and "x-appliance-fallback" not in raw.headers
    assert len(local_llm.seen) == 2 and cloud_llm.seen == []
    assert '"retrying":true' in gw.logs()


def test_a_pooled_connection_closed_after_a_long_wait_is_not_sent_again(gateway, local_llm, cloud_llm):
    gw = gateway(APPLIANCE_FIRST_BYTE_TIMEOUT="10")
    chat(gw)  # leaves a keep-alive connection in the pool
    local_llm.fail("reset", times=1, delay=1.5)  # the engine takes the request, then hangs up
    raw = chat(gw)
    # The engine may have started generating: it is not asked again; the cloud answers.
    assert served_by(raw) == "cloud"
    assert len(local_llm.seen) == 2


# Time limits for streams.


def test_a_slow_first_token_fails_over_before_the_first_byte(gateway, local_llm, cloud_llm, tmp_path):
    config = tmp_path / "appliance.yaml"
    config.write_text(f"models:\n  {TIER2}:\n    first_token_timeout: 8\n")
    gw = gateway(
        APPLIANCE_CONFIG=str(config),
        APPLIANCE_FIRST_TOKEN_TIMEOUT="0.5",
        APPLIANCE_STREAM_IDLE_TIMEOUT="8",
    )
    local_llm.fail("slow_first_token", times=1, after_chunks=0, delay=3)
    started = time.monotonic()
    chunks, headers = stream_events(gw)
    assert time.monotonic() - started < 2.5
    assert headers["x-appliance-target"] == "cloud" and headers["x-appliance-fallback"] == "true"
    assert "".join(content_of(chunks)).strip().endswith("[cloud]")
    # Per model: tier 2 may take longer for its first token.
    local_llm.fail("slow_first_token", times=1, after_chunks=0, delay=1.5)
    chunks, headers = stream_events(gw, TIER2, chat_template_kwargs={"enable_thinking": False})
    assert headers["x-appliance-target"] == "box"


def test_a_stall_mid_stream_is_detected_within_the_models_idle_limit(gateway, local_llm, cloud_llm, tmp_path):
    config = tmp_path / "appliance.yaml"
    config.write_text(f"models:\n  {TIER1}:\n    stream_idle_timeout: 0.5\n")
    gw = gateway(APPLIANCE_CONFIG=str(config), APPLIANCE_STREAM_IDLE_TIMEOUT="30")
    local_llm.fail("stall", times=1, after_chunks=2)
    started = time.monotonic()
    chunks, _ = stream_events(gw)
    assert time.monotonic() - started < 5
    # A stalled engine is not asked again and the cloud cannot carry on a prefix: the error, in-band.
    validate("ErrorResponse", chunks[-1])
    assert chunks[-1]["error"]["code"] == "stream_interrupted"


def test_an_unknown_per_model_setting_is_an_error(start_gateway, tmp_path):
    config = tmp_path / "appliance.yaml"
    config.write_text(f"models:\n  {TIER1}:\n    first_token_timout: 5\n")
    with pytest.raises(RuntimeError, match="first_token_timout"):
        start_gateway(APPLIANCE_CONFIG=str(config))


# After the first byte: the answer is carried on, not cut short.


def test_a_cut_stream_is_continued_from_what_the_client_has(gateway, local_llm, cloud_llm):
    gw = gateway()
    whole, _ = stream_events(gw, stream_options={"include_usage": True})
    local_llm.fail("drop", times=1, after_chunks=3)
    chunks, headers = stream_events(gw, stream_options={"include_usage": True})
    assert headers["x-appliance-target"] == "box"
    assert content_of(chunks) == content_of(whole)  # one whole answer, no chunk twice
    assert "".join(content_of(chunks)) == WHOLE
    assert len({c["id"] for c in chunks}) == 1
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", c)
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")) == 1
    assert chunks[-1]["usage"] == whole[-1]["usage"]  # what was generated, over both requests
    asked = local_llm.seen[-1].body
    assert asked["continue_final_message"] is True and asked["add_generation_prompt"] is False
    assert asked["messages"][-1] == {"role": "assistant", "content": "Your sentence "}
    assert cloud_llm.seen == []
    logs = [json.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]
    assert [e["completion_tokens"] for e in logs if e["event"] == "request"][-1] == whole[-1]["usage"][
        "completion_tokens"
    ]
    # The openai SDK sees one uninterrupted answer.
    local_llm.fail("drop", times=1, after_chunks=4)
    stream = gw.client().chat.completions.create(model=TIER1, messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == WHOLE


def test_an_error_event_mid_stream_is_continued(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("error_event", times=1, after_chunks=3)
    chunks, _ = stream_events(gw)
    assert "".join(content_of(chunks)) == WHOLE
    assert not any("error" in c for c in chunks)


def test_a_stream_stalled_on_the_cloud_is_continued_on_the_local_engine(gateway, local_llm, cloud_llm):
    gw = gateway(
        APPLIANCE_CLOUD_FALLBACK="on_overload",
        APPLIANCE_OVERLOAD_WAITING="5",
        APPLIANCE_OVERLOAD_POLL_INTERVAL="0.1",
    )
    local_llm.waiting = 12  # the local queue is long: new requests go to the cloud first
    time.sleep(0.5)
    cloud_llm.fail("stall", times=1, after_chunks=3)
    chunks, headers = stream_events(gw)
    assert headers["x-appliance-target"] == "cloud"
    assert "".join(content_of(chunks)) == WHOLE  # the cloud's start, the local engine's rest
    assert local_llm.seen[-1].body["messages"][-1] == {"role": "assistant", "content": "Your sentence "}


def test_a_target_that_refuses_the_prefix_leaves_the_real_error(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("drop", times=1, after_chunks=3)
    local_llm.fail("400", times=1)  # the continuation is refused
    chunks, _ = stream_events(gw)
    assert "".join(content_of(chunks)) == "Your sentence "
    assert chunks[-1]["error"]["code"] == "stream_interrupted"
    assert "content filter" not in json.dumps(chunks[-1])


def test_an_error_as_the_first_event_fails_over_before_the_first_byte(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("error_event", after_chunks=0)
    chunks, headers = stream_events(gw)
    assert headers["x-appliance-target"] == "cloud"
    assert "".join(content_of(chunks)).strip().endswith("[cloud]")
    assert len(local_llm.seen) == 2  # an engine error: retried once there first


# Context overflow.


def test_a_context_overflow_goes_once_to_a_target_with_a_longer_context(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("context", times=1)
    raw = chat(gw, TIER2)  # the cloud's context for tier 2 is not known to be shorter: try it
    assert served_by(raw) == "cloud" and raw.headers["x-appliance-fallback"] == "true"
    # Tier 1's cloud model has a 4,096-token context, no longer than the local engine's (4,096).
    local_llm.fail("context", times=1)
    with pytest.raises(openai.BadRequestError) as exc:
        chat(gw, TIER1)
    assert "maximum context length is 4096" in exc.value.message
    assert [s.body["model"] for s in cloud_llm.seen] == [TIER2]
    # Too long everywhere: the 400, once, with no loop.
    local_llm.fail("context", times=1)
    cloud_llm.fail("context", times=1)
    with pytest.raises(openai.BadRequestError):
        chat(gw, TIER2)


def test_a_context_overflow_stays_on_the_box_where_policy_says_so(gateway, local_llm, cloud_llm):
    gw = gateway(APPLIANCE_CLOUD_FALLBACK="never")
    local_llm.fail("context", times=1)
    with pytest.raises(openai.BadRequestError):
        chat(gw, TIER2)
    assert cloud_llm.seen == []


# The cloud: a key that works, a model that still exists.


def test_the_cloud_probe_proves_the_key_not_only_the_host(gateway, local_llm, cloud_llm):
    gw = gateway(APPLIANCE_BREAKER_FAILURES="1", APPLIANCE_BREAKER_PROBE_INTERVAL="0.2")
    local_llm.fail("500")
    cloud_llm.api_key = "nvapi-the-key-was-rotated"
    with pytest.raises(openai.InternalServerError) as exc:
        chat(gw)
    assert exc.value.body["code"] == "cloud_key_rejected"
    assert httpx.get(cloud_llm.base_url + "/models").status_code == 200  # public, whatever the key
    time.sleep(1.0)  # several probes
    assert gw.readyz().json()["checks"]["llm"]["targets"]["cloud"]["urls"][0]["breaker"] == "open"
    cloud_llm.api_key = CLOUD_KEY
    time.sleep(1.0)
    assert gw.readyz().json()["checks"]["llm"]["targets"]["cloud"]["urls"][0]["breaker"] != "open"
    assert served_by(chat(gw)) == "cloud"


def test_a_retired_cloud_model_is_a_clear_503_naming_it(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("503")
    cloud_llm.retired[TIER1] = 410
    with pytest.raises(openai.InternalServerError) as exc:
        chat(gw)
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "cloud_model_unavailable"
    assert TIER1 in exc.value.message and "catalog" in exc.value.message
    logs = gw.logs()
    assert "has reached its end of life" in logs  # NVIDIA's own words, for the operator
    assert CLOUD_KEY not in logs


# SSE framing and today's vLLM.


@pytest.mark.parametrize("separator", [b"\r\n\r\n", b"\r\r"])
def test_sse_events_separated_by_cr_line_endings_are_relayed(gateway, local_llm, cloud_llm, separator):
    local_llm.sse_separator = separator
    gw = gateway()
    stream = gw.client().chat.completions.create(model=TIER1, messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == WHOLE
    assert cloud_llm.seen == []


def test_engine_errors_pass_through_in_vllms_nested_shape(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("400", times=1)
    with pytest.raises(openai.BadRequestError) as exc:
        chat(gw)
    assert exc.value.body["type"] == "BadRequestError"  # vLLM's own type, passed through as it is
    with pytest.raises(openai.BadRequestError) as exc:
        chat(gw, stream_options={"include_usage": True})  # without stream: vLLM refuses it
    assert "stream" in exc.value.message
    assert cloud_llm.seen == []


def test_a_cut_completions_stream_is_continued_from_the_prompt_and_what_was_sent(gateway, local_llm):
    gw = gateway()
    local_llm.fail("drop", times=1, after_chunks=1)
    stream = gw.client().completions.create(model=TIER1, prompt="Once upon a time", stream=True)
    assert "".join(c.choices[0].text for c in stream) == "continued [vllm] "
    assert local_llm.seen[-1].body["prompt"] == "Once upon a time" + "continued "


def test_a_malformed_chunk_passes_through_without_breaking_the_stream(gateway, local_llm):
    gw = gateway()
    local_llm.fail("malformed_chunk", times=1, after_chunks=2)
    with gw.http() as http:
        body = {"model": TIER1, "messages": MESSAGES, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines if line.startswith('data: {"id"')]
    assert "".join(content_of(chunks)) == WHOLE
    assert "unhandled error" not in gw.logs()
