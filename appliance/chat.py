"""`/v1/chat/completions` and `/v1/completions`: relay to the local engine, fall back to the cloud.

The hot path. The request body is parsed once (to check it and rewrite `model` per target) and the
response is passed through as bytes, touched only to add the second name of reasoning text, or to
read token counts for the log. A stream is relayed event by event as it arrives, never buffered.
Failover happens only before the first byte reaches the client.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope

from appliance.app import AppState
from appliance.errors import APIError, bad_request, error_body
from appliance.limits import read_body
from appliance.log import event
from appliance.metrics import FALLBACKS, UPSTREAM_FAILURES
from appliance.middleware import RequestContext, request_context
from appliance.responses import EventStreamResponse, JSONBytesResponse
from appliance.routing import Attempt, LLMRouter, Target, parse_retry_after
from appliance.upstream_http import ReadTimeout, UpstreamError, UpstreamResponse

NUMBER = (int, float)
# Types of the fields the gateway checks itself; the engine validates the rest.
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "stream": (bool,),
    "messages": (list,),
    "prompt": (str, list),
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "n": (int,),
    "seed": (int,),
    "temperature": NUMBER,
    "top_p": NUMBER,
    "presence_penalty": NUMBER,
    "frequency_penalty": NUMBER,
    "stop": (str, list),
    "stream_options": (dict,),
    "chat_template_kwargs": (dict,),
    "user": (str,),
}
REQUIRED = {"chat/completions": "messages", "completions": "prompt"}
REASONING_KEY = b'"reasoning'  # the start of both names: "reasoning" and "reasoning_content"


class UpstreamFailure(Exception):
    """A target failed before the first byte reached the client: try the next one."""

    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.target = ""  # set by the relay: which target failed


class CloudKeyRejected(UpstreamFailure):
    pass


def parse_request(raw: bytes, endpoint: str) -> dict[str, Any]:
    if not raw:
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON ({exc.args[0].split(':')[0]}).") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    required = REQUIRED[endpoint]
    for name in ("model", required):
        if name not in body:
            raise bad_request(f"Missing required parameter: '{name}'.", param=name)
    for name, types in FIELD_TYPES.items():
        value = body.get(name)
        # bool is an int in Python, but not in JSON Schema.
        if value is not None and (
            not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        ):
            expected = " or ".join(_JSON_TYPE[t] for t in types)
            raise bad_request(f"Invalid type for '{name}': expected {expected}.", param=name)
    if endpoint == "chat/completions":
        _check_messages(body["messages"])
    return body


_JSON_TYPE = {
    str: "a string",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    int: "an integer",
    float: "a number",
}


def _check_messages(messages: list[Any]) -> None:
    if not messages:
        raise bad_request("'messages' must contain at least one message.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(
                f"Invalid message at messages[{i}]: expected an object with a 'role'.", param=f"messages[{i}]"
            )


@dataclass
class Relay:
    """One client request, tried against each target in turn."""

    state: AppState
    router: LLMRouter
    endpoint: str
    body: dict[str, Any]
    ctx: RequestContext
    retried: bool = False  # a 429's Retry-After was honoured once already

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    async def run(self, attempts: list[Attempt]) -> ASGIApp:
        failures: list[UpstreamFailure] = []
        for attempt in attempts:
            target = attempt.target
            if not target.breaker.allows():  # opened meanwhile by other requests
                continue
            headers = [(b"x-appliance-target", target.name.encode())]
            if failures:
                headers.append((b"x-appliance-fallback", b"true"))
            try:
                response = await self._try(attempt, headers)
            except UpstreamFailure as failure:
                failure.target = target.name
                target.breaker.failure(failure.reason)
                UPSTREAM_FAILURES.labels(target.name).inc()
                event(
                    "upstream failed",
                    request_id=self.ctx.request_id,
                    target=target.name,
                    reason=failure.reason,
                )
                failures.append(failure)
                continue
            target.breaker.success()
            self.ctx.target = target.name
            if failures:
                FALLBACKS.labels(self.ctx.model).inc()
            return response
        raise self._exhausted(failures, self.retried or len(failures) > 1)

    def _exhausted(self, failures: list[UpstreamFailure], retried: bool) -> APIError:
        headers = {"x-should-retry": "false"} if retried else {}
        if any(isinstance(f, CloudKeyRejected) for f in failures):
            return APIError(
                503,
                "The local engine failed and the cloud fallback is misconfigured: the NVIDIA NIM API key was "
                "rejected. The appliance operator must update NVIDIA_NIM_API_KEY.",
                type="server_error",
                code="cloud_key_rejected",
                headers=headers,
            )
        if failures and all(f.status == 429 for f in failures):
            wait = max((f.retry_after or 0) for f in failures)
            headers["retry-after"] = str(max(1, round(wait)))
            return APIError(
                429, "The model is overloaded; try again shortly.", code="overloaded", headers=headers
            )
        reasons = "; ".join(f"{f.target}: {f.reason}" for f in failures)
        return APIError(
            503,
            f"No engine could serve '{self.ctx.model}' now ({reasons or 'all targets are failing'}).",
            type="server_error",
            code="upstream_unavailable",
            headers=headers,
        )

    async def _try(self, attempt: Attempt, headers: list[tuple[bytes, bytes]]) -> ASGIApp:
        """Send to one target; return the client's response (with `headers`) once its first byte is in
        hand."""
        body = {**attempt.defaults, **self.body} if attempt.defaults else self.body
        body["model"] = attempt.model
        upstream = await self._send(attempt.target, orjson.dumps(body))
        if upstream.status >= 400:
            return await self._client_error(upstream, headers)
        if self.stream:
            return await self._start_stream(upstream, headers)
        return await self._whole(upstream, headers)

    async def _send(self, target: Target, payload: bytes) -> UpstreamResponse:
        """POST, honouring one short Retry-After on 429. Connection trouble, 5xx and 429 raise."""
        settings = self.state.settings
        timeout = settings.stream_idle_timeout if self.stream else settings.first_byte_timeout
        waited = False  # per target: one short wait, then move on
        while True:
            try:
                resp = await target.pool.request("POST", self.endpoint, payload, timeout=timeout)
            except UpstreamError as exc:
                raise UpstreamFailure(exc.reason) from None
            if resp.status == 429:
                resp.release()
                wait = parse_retry_after(resp.headers.get("retry-after"))
                if not waited and wait is not None and wait <= settings.retry_after_max:
                    waited = self.retried = True
                    await asyncio.sleep(wait)
                    continue
                raise UpstreamFailure("rate limited (429)", 429, wait if wait is not None else 0.0)
            if resp.status >= 500:
                resp.release()
                raise UpstreamFailure(f"HTTP {resp.status}", resp.status)
            if target.is_cloud and resp.status in (401, 403):
                resp.release()
                event(
                    "cloud key rejected",
                    level=40,
                    status=resp.status,
                    action="the NVIDIA NIM API key was rejected: update NVIDIA_NIM_API_KEY",
                )
                raise CloudKeyRejected(f"cloud key rejected (HTTP {resp.status})", resp.status)
            return resp

    async def _client_error(self, upstream: UpstreamResponse, headers: list[tuple[bytes, bytes]]) -> ASGIApp:
        """A 4xx goes back to the client as it is, in OpenAI's shape if the engine used another."""
        raw = await _read_whole(upstream, "while reading an error")
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if not (isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)):
            message = parsed.get("message") if isinstance(parsed, dict) else None
            raw = error_body(
                str(message or f"The engine refused the request (HTTP {upstream.status})."),
                "invalid_request_error",
            )
        return JSONBytesResponse(raw, upstream.status, headers=headers)

    async def _whole(self, upstream: UpstreamResponse, headers: list[tuple[bytes, bytes]]) -> ASGIApp:
        raw = await _read_whole(upstream, "before the answer was complete")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamFailure("invalid JSON from the engine") from None
        self._count_tokens(data.get("usage"))
        if REASONING_KEY in raw and alias_reasoning(data.get("choices"), "message"):
            raw = orjson.dumps(data)
        return JSONBytesResponse(raw, headers=headers)

    async def _start_stream(self, upstream: UpstreamResponse, headers: list[tuple[bytes, bytes]]) -> ASGIApp:
        """Wait for the first event (failover is still possible until then), then relay the rest."""
        pieces = upstream.pieces()
        buffer = b""
        try:
            while b"\n\n" not in buffer:
                buffer += await anext(pieces)
        except StopAsyncIteration:
            upstream.release()
            raise UpstreamFailure("stream ended before the first event") from None
        except UpstreamError as exc:
            upstream.release()
            raise UpstreamFailure(f"stream failed before the first event ({exc.reason})") from None
        return EventStreamResponse(self._relay(upstream, pieces, buffer), headers)

    async def _relay(
        self, upstream: UpstreamResponse, pieces: AsyncIterator[bytes], buffer: bytes
    ) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                complete, _, buffer = buffer.rpartition(b"\n\n")
                if complete:
                    yield self._rewrite_events(complete + b"\n\n")
                try:
                    buffer += await anext(pieces)
                except StopAsyncIteration:
                    break
            if buffer.strip():
                yield self._rewrite_events(buffer)
        except UpstreamError as exc:
            reason = "stalled" if isinstance(exc, ReadTimeout) else "connection lost"
            event("stream broken", request_id=self.ctx.request_id, target=self.ctx.target, reason=reason)
            message = f"The engine's stream broke off ({reason}); the answer is incomplete."
            yield b"data: " + error_body(message, "server_error", None, "stream_interrupted") + b"\n\n"
        finally:
            upstream.release()

    def _rewrite_events(self, events: bytes) -> bytes:
        """Add the second name of reasoning deltas and read usage; untouched bytes pass through."""
        has_reasoning = REASONING_KEY in events
        has_usage = b'"usage":{' in events
        if not (has_reasoning or has_usage):
            return events
        out = []
        for line in events.split(b"\n"):
            if line.startswith(b"data: {"):
                data = orjson.loads(line[6:])
                if has_usage:
                    self._count_tokens(data.get("usage"))
                if has_reasoning and alias_reasoning(data.get("choices"), "delta"):
                    line = b"data: " + orjson.dumps(data)
            out.append(line)
        return b"\n".join(out)

    def _count_tokens(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.ctx.prompt_tokens = usage.get("prompt_tokens")
            self.ctx.completion_tokens = usage.get("completion_tokens")


async def _read_whole(upstream: UpstreamResponse, when: str) -> bytes:
    try:
        return await upstream.read()
    except UpstreamError as exc:
        raise UpstreamFailure(f"{exc.reason} {when}") from None
    finally:
        upstream.release()


def alias_reasoning(choices: Any, key: str) -> bool:
    """Give reasoning text both names clients look for (`reasoning`, `reasoning_content`)."""
    changed = False
    for choice in choices if isinstance(choices, list) else ():
        part = choice.get(key) if isinstance(choice, dict) else None
        if not isinstance(part, dict):
            continue
        text = part.get("reasoning") or part.get("reasoning_content")
        if text is not None and (part.get("reasoning") != text or part.get("reasoning_content") != text):
            part["reasoning"] = part["reasoning_content"] = text
            changed = True
    return changed


def install(app: FastAPI, state: AppState) -> None:
    router = LLMRouter(state.settings, state.catalog)
    state.availability["llm"] = router.available
    state.readiness["llm"] = router.readiness
    state.startup.append(router.start)
    state.shutdown.append(router.stop)

    async def relay(scope: Scope, receive: Receive, endpoint: str) -> ASGIApp:
        ctx = request_context(scope)
        body = parse_request(await read_body(scope, receive, state.settings.max_body_bytes), endpoint)
        route = state.require_route(body["model"], "llm")
        ctx.model = route.name
        attempts = router.attempts(route)
        if not attempts:
            if not router.candidates(route):
                raise APIError(
                    503,
                    f"'{route.name}' cannot be served on this appliance: no local engine serves it and the "
                    "school's policy (or configuration) does not allow the cloud.",
                    type="server_error",
                    code="model_unavailable",
                )
            raise APIError(
                503,
                f"Every engine for '{route.name}' is failing; try again shortly.",
                type="server_error",
                code="upstream_unavailable",
            )
        return await Relay(state, router, endpoint, body, ctx).run(attempts)

    for path, endpoint in (("/v1/chat/completions", "chat/completions"), ("/v1/completions", "completions")):
        state.add_fast_route(app, path, functools.partial(relay, endpoint=endpoint))
