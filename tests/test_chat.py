"""Chat and completions through the real gateway: happy paths with the openai SDK, every failure mode,
and which target served (or that none did)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import CLOUD_KEY
from tests.harness import unanswered_port
from tests.openapi import validate
from tests.sims.openai_upstream import REASONING, REPLY

TIER1 = "nvidia/nemotron-mini-4b-instruct"
TIER2 = "nvidia/nemotron-3-nano-30b-a3b"
MESSAGES = [{"role": "user", "content": "Chek my sentense please."}]


def chat(gw, model=TIER1, **kw):
    return gw.client().chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **kw)


def served_by(raw) -> str:
    return raw.headers["x-appliance-target"]


# Happy paths.


def test_chat_is_served_locally_and_conforms_to_the_spec(gateway, local_llm, cloud_llm):
    gw = gateway()
    raw = chat(gw)
    completion = raw.parse()
    validate("CreateChatCompletionResponse", json.loads(raw.content))
    assert served_by(raw) == "box"
    assert completion.choices[0].message.content == f"{REPLY} [vllm]"
    assert raw.headers["x-request-id"]
    # The gateway rewrote the public name to the local engine's model id; the cloud saw nothing.
    assert local_llm.seen[-1].body["model"] == "nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8"
    assert cloud_llm.seen == []


def test_streaming_chat_is_relayed_chunk_by_chunk(gateway, local_llm):
    gw = gateway()
    with (
        gw.http() as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": TIER1,
                "messages": MESSAGES,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", c)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip() == f"{REPLY} [vllm]"
    assert chunks[-1]["usage"]["completion_tokens"] > 0

    stream = gw.client().chat.completions.create(model=TIER1, messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == f"{REPLY} [vllm]"


def test_stream_reaches_the_client_before_the_engine_finishes(gateway, local_llm):
    local_llm.chunk_delay = 0.15
    gw = gateway()
    started = time.monotonic()
    stream = gw.client().chat.completions.create(model=TIER1, messages=MESSAGES, stream=True)
    first = next(iter(stream))
    first_at = time.monotonic() - started
    rest = list(stream)
    total = time.monotonic() - started
    assert first.choices[0].delta.role == "assistant"
    assert len(rest) >= 6
    assert first_at < total / 3  # not buffered until the end


def test_a_local_engine_that_never_answers_the_connect_falls_back_after_the_connect_timeout(
    gateway, cloud_llm
):
    with unanswered_port() as port:
        gw = gateway(
            APPLIANCE_LLM_URL=f"http://127.0.0.1:{port}/v1",
            APPLIANCE_CONNECT_TIMEOUT="0.5",
            APPLIANCE_FIRST_BYTE_TIMEOUT="5",
        )
        started = time.monotonic()
        raw = gw.client().chat.completions.with_raw_response.create(model=TIER1, messages=MESSAGES)
        assert raw.headers["x-appliance-target"] == "cloud"
        assert raw.headers["x-appliance-fallback"] == "true"
        assert time.monotonic() - started < 2.5  # the connect timeout, not the first-byte one


def test_a_cloud_key_read_with_a_trailing_newline_still_works(gateway, local_llm, cloud_llm):
    gw = gateway(NVIDIA_NIM_API_KEY=CLOUD_KEY + "\n")
    local_llm.fail("503")
    raw = gw.client().chat.completions.with_raw_response.create(model=TIER1, messages=MESSAGES)
    assert raw.headers["x-appliance-target"] == "cloud"
    assert cloud_llm.seen[-1].headers["Authorization"] == f"Bearer {CLOUD_KEY}"


def test_a_client_that_leaves_mid_stream_frees_the_engine(gateway, local_llm):
    """The engine must learn that nobody reads the answer any more, or it keeps generating."""
    local_llm.chunk_delay = 0.2
    gw = gateway()
    body = {"model": TIER1, "messages": MESSAGES, "stream": True}
    with gw.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert next(r.iter_lines()).startswith("data: {")
    deadline = time.monotonic() + 5
    while local_llm.abandoned_streams == 0:
        assert time.monotonic() < deadline, "the engine was left streaming to nobody"
        time.sleep(0.05)
    assert "unhandled error" not in gw.logs() and "stream broken" not in gw.logs()


def test_completions_stream_and_not(gateway, local_llm):
    gw = gateway()
    raw = gw.client().completions.with_raw_response.create(model=TIER1, prompt="Once upon a time")
    validate("CreateCompletionResponse", json.loads(raw.content))
    assert raw.parse().choices[0].text.strip() == "continued [vllm]"
    stream = gw.client().completions.create(model=TIER1, prompt="Once upon a time", stream=True)
    assert "".join(c.choices[0].text for c in stream).strip() == "continued [vllm]"
    with (
        gw.http() as http,
        http.stream("POST", "/v1/completions", json={"model": TIER1, "prompt": "Once", "stream": True}) as r,
    ):
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    # The spec has no chunk schema for completions; the last chunk is a whole completion response
    # (earlier ones carry finish_reason null, as OpenAI and vLLM send them).
    validate("CreateCompletionResponse", chunks[-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert local_llm.served_paths() == ["/v1/completions"] * 3


def test_models_lists_servable_names(gateway):
    gw = gateway()
    with gw.http() as http:
        listing = http.get("/v1/models").json()
        validate("ListModelsResponse", listing)
        one = http.get(f"/v1/models/{TIER2}")
        validate("Model", one.json())
    names = {m["id"] for m in listing["data"]}
    assert {TIER1, TIER2} <= names
    assert gw.client().models.retrieve(TIER1).id == TIER1


# Failover before the first byte.


@pytest.mark.parametrize("mode", ["reset", "500", "503", "slow", "stall"])
def test_local_failure_falls_back_to_cloud(gateway, local_llm, cloud_llm, mode):
    gw = gateway()
    local_llm.fail(mode, delay=3 if mode == "slow" else 0)  # a 5xx or reset is retried once locally first
    raw = chat(gw)
    assert served_by(raw) == "cloud"
    assert raw.headers["x-appliance-fallback"] == "true"
    assert raw.parse().choices[0].message.content.endswith("[cloud]")
    assert cloud_llm.seen[-1].body["model"] == TIER1  # the cloud's own model id
    assert cloud_llm.seen[-1].headers["Authorization"] == f"Bearer {CLOUD_KEY}"


def test_refused_connection_falls_back_and_streams_from_cloud(gateway, local_llm, cloud_llm, bg_loop):
    bg_loop.run(local_llm.stop())
    gw = gateway()
    stream = gw.client().chat.completions.create(model=TIER1, messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip().endswith("[cloud]")


def test_stream_that_fails_before_its_first_event_falls_back(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("drop", times=2, after_chunks=0)  # the local engine is asked twice
    stream = gw.client().chat.completions.create(model=TIER1, messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip().endswith("[cloud]")


def test_short_retry_after_is_honoured_on_the_same_target(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("429", times=1, retry_after="0.4")
    started = time.monotonic()
    raw = chat(gw)
    assert time.monotonic() - started >= 0.4
    assert served_by(raw) == "box"
    assert len(local_llm.seen) == 2 and cloud_llm.seen == []


def test_long_retry_after_goes_to_cloud_at_once(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("429", retry_after="30")
    started = time.monotonic()
    raw = chat(gw)
    assert time.monotonic() - started < 2
    assert served_by(raw) == "cloud"


def test_429_everywhere_is_a_429_the_sdk_will_not_multiply(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("429", retry_after="30")
    cloud_llm.fail("429", retry_after="20")
    with pytest.raises(openai.RateLimitError) as exc:
        chat(gw)
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert int(exc.value.response.headers["retry-after"]) >= 20


def test_client_errors_are_returned_as_they_are_without_fallback(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("400", times=1)
    with pytest.raises(openai.BadRequestError) as exc:
        chat(gw)
    assert "content filter" in exc.value.message
    validate("ErrorResponse", exc.value.response.json())
    assert cloud_llm.seen == []


# Policy.


def test_policy_never_keeps_every_byte_on_the_box(gateway, local_llm, cloud_llm):
    gw = gateway(APPLIANCE_CLOUD_FALLBACK="never")
    local_llm.fail("503")
    with pytest.raises(openai.InternalServerError) as exc:
        chat(gw)
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "upstream_unavailable"
    assert cloud_llm.seen == []


def test_per_model_policy_from_the_yaml_file(gateway, local_llm, cloud_llm, tmp_path):
    config = tmp_path / "appliance.yaml"
    config.write_text(f"cloud_fallback: on_failure\nmodels:\n  {TIER2}:\n    cloud_fallback: never\n")
    gw = gateway(APPLIANCE_CONFIG=str(config))
    local_llm.fail("500")
    assert served_by(chat(gw, TIER1)) == "cloud"
    with pytest.raises(openai.InternalServerError):
        chat(gw, TIER2)
    assert [s.body["model"] for s in cloud_llm.seen] == [TIER1]


def test_model_the_engine_does_not_serve_goes_to_cloud_only(start_gateway, bg_loop, cloud_llm):
    # A 24 GB card: vLLM serves only the 4B model, so tier 2 must come from the cloud.
    from tests.sims.openai_upstream import OpenAIUpstream

    small = bg_loop.run(OpenAIUpstream("vllm", ("nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8",)).start())
    try:
        gw = start_gateway(
            APPLIANCE_LLM_URL=small.base_url,
            NVIDIA_NIM_BASE_URL=cloud_llm.base_url,
            NVIDIA_NIM_API_KEY=CLOUD_KEY,
        )
        time.sleep(0.3)  # the gateway reads the engine's model list at start
        assert served_by(chat(gw, TIER2)) == "cloud"
        assert served_by(chat(gw, TIER1)) == "box"
        assert [s.body["model"] for s in small.seen] == ["nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8"]
    finally:
        bg_loop.run(small.stop())


def test_without_cloud_a_model_that_does_not_fit_is_unavailable(start_gateway, bg_loop):
    from tests.sims.openai_upstream import OpenAIUpstream

    small = bg_loop.run(OpenAIUpstream("vllm", ("nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8",)).start())
    try:
        gw = start_gateway(APPLIANCE_LLM_URL=small.base_url)
        time.sleep(0.3)
        with pytest.raises(openai.InternalServerError) as exc:
            chat(gw, TIER2)
        assert exc.value.body["code"] == "model_unavailable"
        ids = {m.id for m in gw.client().models.list()}
        assert TIER1 in ids and TIER2 not in ids
    finally:
        bg_loop.run(small.stop())


def test_on_overload_spills_to_cloud_while_the_queue_is_long(gateway, local_llm, cloud_llm):
    gw = gateway(
        APPLIANCE_CLOUD_FALLBACK="on_overload",
        APPLIANCE_OVERLOAD_WAITING="5",
        APPLIANCE_OVERLOAD_POLL_INTERVAL="0.1",
    )
    local_llm.waiting = 12
    time.sleep(0.5)
    assert served_by(chat(gw)) == "cloud"
    assert gw.readyz().json()["checks"]["llm"]["overloaded"] is True
    local_llm.waiting = 0
    time.sleep(0.5)
    assert served_by(chat(gw)) == "box"
    local_llm.fail("500")  # on_overload also covers failure
    assert served_by(chat(gw)) == "cloud"


# Cloud trouble and secrets.


def test_rejected_cloud_key_is_a_clear_503_and_never_leaks(gateway, local_llm, cloud_llm):
    gw = gateway()
    local_llm.fail("500")
    cloud_llm.api_key = "nvapi-some-other-key"
    with pytest.raises(openai.InternalServerError) as exc:
        chat(gw)
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "cloud_key_rejected"
    assert "NVIDIA NIM API key was rejected" in exc.value.message
    assert exc.value.response.headers["x-should-retry"] == "false"
    logs = gw.logs()
    assert "NVIDIA NIM API key was rejected" in logs
    assert CLOUD_KEY not in logs and CLOUD_KEY not in exc.value.response.text


def test_cloud_unreachable_and_local_down_is_a_clear_503(gateway, local_llm, cloud_llm, bg_loop):
    bg_loop.run(cloud_llm.stop())
    gw = gateway()
    local_llm.fail("502")
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as exc:
        chat(gw)
    assert time.monotonic() - started < 5
    assert exc.value.body["code"] == "upstream_unavailable"
    assert "connection refused" in exc.value.message
    assert exc.value.response.headers["x-should-retry"] == "false"


def test_no_request_content_or_keys_in_logs(gateway, local_llm, cloud_llm):
    gw = gateway()
    chat(gw)
    local_llm.fail("500", times=2)
    chat(gw, stream=False)
    logs = gw.logs()
    assert "Chek my sentense" not in logs and REPLY not in logs
    assert CLOUD_KEY not in logs and "sk-test-client-key" not in logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    requests = [entry for entry in lines if entry["event"] == "request"]
    assert requests[-1]["model"] == TIER1 and requests[-1]["target"] == "cloud"
    assert requests[-1]["completion_tokens"] > 0 and requests[-1]["key_id"] == "env-1"


# After the first byte.


def test_stream_that_no_target_can_continue_ends_with_an_error_event(gateway, local_llm, cloud_llm):
    gw = gateway()
    # Cut, carried on by the local engine once, cut again: the cloud cannot carry on a prefix.
    local_llm.fail("drop", times=2, after_chunks=3)
    received = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in gw.client().chat.completions.create(model=TIER1, messages=MESSAGES, stream=True):
            received.append(chunk)
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert text == "Your sentence is correct. "  # what arrived before the breaks, nothing twice
    assert "broke off" in str(exc.value)
    assert cloud_llm.seen == []


def test_stream_stalled_midway_ends_with_an_error_event_not_a_hang(gateway, local_llm):
    gw = gateway()
    local_llm.fail("stall", times=1, after_chunks=2)
    started = time.monotonic()
    with (
        gw.http() as http,
        http.stream(
            "POST", "/v1/chat/completions", json={"model": TIER1, "messages": MESSAGES, "stream": True}
        ) as r,
    ):
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert time.monotonic() - started < 5
    last = json.loads(events[-1][6:])
    validate("ErrorResponse", last)
    assert last["error"]["code"] == "stream_interrupted"


# Circuit breaker.


def test_breaker_skips_a_failing_engine_then_recovers(gateway, local_llm, cloud_llm):
    gw = gateway(APPLIANCE_BREAKER_FAILURES="3", APPLIANCE_BREAKER_PROBE_INTERVAL="0.3")
    local_llm.fail("500")
    local_llm.healthy = False  # /health fails too, so the probe keeps the breaker open until cleared
    for _ in range(3):
        assert served_by(chat(gw)) == "cloud"
    tried = len(local_llm.seen)
    assert served_by(chat(gw)) == "cloud"
    assert len(local_llm.seen) == tried  # skipped at once, not tried
    assert gw.readyz().json()["checks"]["llm"]["targets"]["box"]["urls"][0]["breaker"] == "open"
    local_llm.clear()
    local_llm.healthy = True
    time.sleep(0.8)  # the background probe sees /health answer again
    assert served_by(chat(gw)) == "box"


# Reasoning.


def test_reasoning_comes_under_both_names_and_can_be_turned_off(gateway, local_llm, cloud_llm):
    gw = gateway()
    on = chat(gw, TIER2)
    body = json.loads(on.content)
    message = body["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == REASONING
    validate("CreateChatCompletionResponse", body)

    off = chat(gw, TIER2, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert "reasoning" not in json.loads(off.content)["choices"][0]["message"]
    assert local_llm.seen[-1].body["chat_template_kwargs"] == {"enable_thinking": False}

    local_llm.fail("500")  # the cloud names it reasoning_content; clients still get both
    message = json.loads(chat(gw, TIER2).content)["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == REASONING


def test_streamed_reasoning_comes_under_both_names(gateway, local_llm):
    gw = gateway()
    with (
        gw.http() as http,
        http.stream(
            "POST", "/v1/chat/completions", json={"model": TIER2, "messages": MESSAGES, "stream": True}
        ) as r,
    ):
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if "reasoning" in c["choices"][0]["delta"]]
    assert deltas and all(d["reasoning"] == d["reasoning_content"] for d in deltas)
    assert "".join(d["reasoning"] for d in deltas).strip() == REASONING


# Bad input: a clear 4xx, never a 500, and nothing reaches an engine.


BAD_REQUESTS = [
    (b"{not json", 400, None),
    (b"", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": MESSAGES}).encode(), 400, "model"),
    (json.dumps({"model": TIER1}).encode(), 400, "messages"),
    (json.dumps({"model": 42, "messages": MESSAGES}).encode(), 400, "model"),
    (json.dumps({"model": TIER1, "messages": "hello"}).encode(), 400, "messages"),
    (json.dumps({"model": TIER1, "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": TIER1, "messages": ["hi"]}).encode(), 400, "messages[0]"),
    (json.dumps({"model": TIER1, "messages": MESSAGES, "stream": "yes"}).encode(), 400, "stream"),
    (
        json.dumps({"model": TIER1, "messages": MESSAGES, "temperature": "hot"}).encode(),
        400,
        "temperature",
    ),
    (json.dumps({"model": TIER1, "messages": MESSAGES, "max_tokens": True}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "gpt-4o", "messages": MESSAGES}).encode(), 404, "model"),
    (json.dumps({"model": "whisper-1", "messages": MESSAGES}).encode(), 404, "model"),
]


def test_bad_requests_are_clear_4xx(gateway, local_llm, cloud_llm):
    gw = gateway()
    with gw.http(headers={"content-type": "application/json"}) as http:
        for body, status, param in BAD_REQUESTS:
            r = http.post("/v1/chat/completions", content=body)
            assert r.status_code == status, (body, r.text)
            validate("ErrorResponse", r.json())
            assert r.json()["error"]["param"] == param, body
            assert r.json()["error"]["message"]
    assert local_llm.seen == [] and cloud_llm.seen == []


def test_oversized_body_is_413_with_and_without_content_length(gateway, local_llm):
    gw = gateway(APPLIANCE_MAX_BODY_BYTES="2000")
    big = json.dumps({"model": TIER1, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    with gw.http() as http:
        r = http.post("/v1/chat/completions", content=big)
        assert r.status_code == 413
        validate("ErrorResponse", r.json())
        r = http.post("/v1/chat/completions", content=iter([big[:1000], big[1000:]]))  # chunked
        assert r.status_code == 413
    assert local_llm.seen == []


def test_every_response_has_a_request_id(gateway, local_llm):
    gw = gateway()
    with gw.http() as http:
        ok = http.post("/v1/chat/completions", json={"model": TIER1, "messages": MESSAGES})
        bad = http.post("/v1/chat/completions", content=b"{")
    unauth = httpx.post(gw.base_url + "/chat/completions", json={})
    ids = {ok.headers["x-request-id"], bad.headers["x-request-id"], unauth.headers["x-request-id"]}
    assert len(ids) == 3


def test_metrics_count_requests_fallbacks_and_tokens(gateway, local_llm, cloud_llm):
    gw = gateway()
    chat(gw)
    local_llm.fail("500", times=2)  # the local engine is asked twice, then the cloud
    chat(gw)
    text = httpx.get(gw.url + "/metrics").text
    assert 'appliance_requests_total{path="/v1/chat/completions",status="200",target="box"} 1.0' in text
    assert 'appliance_requests_total{path="/v1/chat/completions",status="200",target="cloud"} 1.0' in text
    assert f'appliance_fallbacks_total{{model="{TIER1}"}} 1.0' in text
    assert 'appliance_upstream_failures_total{target="box"} 2.0' in text
    assert f'appliance_tokens_total{{direction="completion",model="{TIER1}"}}' in text


def test_tier1_asks_local_engine_for_no_reasoning_unless_the_app_does(gateway, local_llm, cloud_llm):
    gw = gateway()
    chat(gw, TIER1)
    assert local_llm.seen[-1].body["chat_template_kwargs"] == {"enable_thinking": False}
    chat(gw, TIER1, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert local_llm.seen[-1].body["chat_template_kwargs"] == {"enable_thinking": True}
    chat(gw, TIER2)
    assert "chat_template_kwargs" not in local_llm.seen[-1].body
    local_llm.fail("500")
    chat(gw, TIER1)  # the cloud's tier-1 model has no such template switch
    assert "chat_template_kwargs" not in cloud_llm.seen[-1].body
