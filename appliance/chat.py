"""`/v1/chat/completions` and `/v1/completions`: relay to the local engine, fall back to the cloud.

The hot path. The request body is parsed once (to check it and rewrite `model` per target) and the
response is passed through as bytes, touched only to add the second name of reasoning text, or to
read token counts for the log. A stream is relayed event by event as it arrives, never buffered.
Before the first byte reaches the client a failing target is retried (local blips) or failed over;
after it, a stream that breaks off is carried on by a target that can continue from a prefix
(appliance.continuation), or ends with the error in-band.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope

from appliance.catalog import Route
from appliance.continuation import Prefix, Stitch, continuation_body
from appliance.continuation import refusal as continuation_refusal
from appliance.errors import APIError, bad_request, error_body
from appliance.governance.service import estimate_tokens
from appliance.limits import read_body
from appliance.log import event
from appliance.metrics import FALLBACKS, UPSTREAM_FAILURES
from appliance.middleware import RequestContext, request_context, request_header
from appliance.responses import EventStreamResponse, JSONBytesResponse
from appliance.routing import Attempt, LLMRouter, Target, parse_retry_after
from appliance.sse import ERROR_KEY, EventSplitter, is_error, json_of, split_at_error
from appliance.state import AppState
from appliance.upstream_http import ConnectionLost, ReadTimeout, UpstreamError, UpstreamResponse
from appliance.upstreams.district import DistrictHeaders

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
DONE_EVENT = b"data: [DONE]"
DONE_TAIL = DONE_EVENT + b"\n\n"
LOCAL_RETRY_PAUSE = (0.05, 0.25)  # seconds, drawn at random so retries of many requests do not align
# A 400 that says the prompt does not fit: OpenAI's code, vLLM's messages (prompt, or prompt + max_tokens).
CONTEXT_EXCEEDED = re.compile(rb"context_length_exceeded|maximum context length|maximum model length", re.I)
CONTEXT_LIMIT = re.compile(rb"maximum (?:context|model) length (?:is|of) (\d+)", re.I)
KEY_LIKE = re.compile(r"nvapi-[A-Za-z0-9_\-]+")  # NVIDIA key format, kept out of logged error text
DETAIL_CHARS = 300


class UpstreamFailure(Exception):
    """A target failed before the first byte reached the client (or while continuing a stream): try
    the next one."""

    counts_against_target = True  # feeds the target's circuit breaker

    def __init__(
        self,
        reason: str,
        status: int | None = None,
        retry_after: float | None = None,
        *,
        retry_here: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        # A blip worth one more try on the same local engine: a 5xx, an error event, or a connection lost
        # before the engine can have started on the request.
        self.retry_here = retry_here
        self.target = ""  # set by the relay: which target failed


class CloudKeyRejected(UpstreamFailure):
    pass


class CloudModelGone(UpstreamFailure):
    """The cloud no longer serves the model id in the catalog (404/410): the operator must act."""

    counts_against_target = False  # the cloud itself works; other models may still be served

    def __init__(self, reason: str, status: int, model: str) -> None:
        super().__init__(reason, status)
        self.model = model


class ContextOverflow(Exception):
    """The target's context is too short for the request; `response` is its 400, for the client."""

    def __init__(self, response: ASGIApp, limit: int | None) -> None:
        super().__init__("context length exceeded")
        self.response = response
        self.limit = limit  # the target's context length, where it said or is known


class StreamBroken(Exception):
    """A stream broke off after the client had part of it."""

    def __init__(self, reason: str, *, retry_here: bool, error_event: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_here = retry_here  # the same local engine may be asked for the rest
        self.error_event = error_event  # the engine's own in-band error, to pass on if nobody continues

    def client_event(self) -> bytes:
        if self.error_event is not None:
            return self.error_event
        message = f"The engine's stream broke off ({self.reason}); the answer is incomplete."
        return b"data: " + error_body(message, "server_error", None, "stream_interrupted") + b"\n\n"


class CloudBudgetSpent(UpstreamFailure):
    """The NVIDIA key's budget has no room for this request now: the cloud is skipped, not called."""


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
class LiveStream:
    """A target's stream whose first event is in hand."""

    attempt: Attempt
    upstream: UpstreamResponse
    pieces: AsyncIterator[bytes]
    splitter: EventSplitter
    first: bytes


@dataclass
class Relay:
    """One client request, tried against each target in turn."""

    state: AppState
    router: LLMRouter
    route: Route
    endpoint: str
    body: dict[str, Any]
    ctx: RequestContext
    district: DistrictHeaders
    retried: bool = False  # retried or failed over already: the client's SDK should not retry on top
    context_limit: int | None = None  # after a context-length 400: later targets must have more
    continued_on: set[str] = field(default_factory=set)  # targets asked for the rest of a broken stream
    first_token_timeout: float = 0.0  # streams only
    idle_timeout: float = 0.0
    deadline: float = 0.0  # streams: loop time by which the first event must be in
    hide_usage: bool = False  # the gateway asked for the stream's usage chunk; the client did not

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    async def run(self, attempts: list[Attempt]) -> ASGIApp:
        if self.stream:
            self.first_token_timeout, self.idle_timeout = self.state.settings.stream_timeouts(self.route.name)
        failures: list[UpstreamFailure] = []
        too_long: ContextOverflow | None = None
        for attempt in attempts:
            target = attempt.target
            if not target.breaker.allows() or not self._long_enough(attempt):  # breaker: opened meanwhile
                continue
            if target.is_cloud and (
                wait := self.state.governance.cloud_budget.spend(self.ctx.estimated_tokens)
            ):
                failures.append(CloudBudgetSpent("cloud budget spent", retry_after=wait))
                continue
            headers = [(b"x-appliance-target", target.name.encode())]
            if failures or too_long:
                headers.append((b"x-appliance-fallback", b"true"))
            try:
                response = await self._try_with_retry(attempt, headers)
            except ContextOverflow as overflow:
                if too_long is not None:
                    return overflow.response  # a longer context was tried once; that is enough
                too_long = overflow
                self.context_limit = overflow.limit or self.router.context_length(self.route, attempt)
                continue
            except UpstreamFailure as failure:
                self._failed(attempt, failure)
                if attempt.target.is_cloud and failure.status == 429:
                    self.state.governance.cloud_budget.rejected(failure.retry_after)
                failures.append(failure)
                continue
            target.breaker.success()
            self.ctx.target, self.ctx.zone = target.name, target.zone
            if target.is_cloud:  # for the ledger: the cloud served after a failure, or ahead of a queue
                self.ctx.cloud_reason = "failure" if failures else "overload"
            if failures or too_long:
                FALLBACKS.labels(self.ctx.model).inc()
            return response
        if too_long is not None:
            return too_long.response
        raise self._exhausted(failures, self.retried or len(failures) > 1)

    def _long_enough(self, attempt: Attempt) -> bool:
        if self.context_limit is None:
            return True
        length = self.router.context_length(self.route, attempt)
        return length is None or length > self.context_limit

    async def _try_with_retry(self, attempt: Attempt, headers: list[tuple[bytes, bytes]]) -> ASGIApp:
        """A blip on the local engine is tried once more there, after a short jittered pause, before
        anything goes elsewhere: pupils' text should not leave the box for a hiccup."""
        try:
            return await self._try(attempt, headers)
        except UpstreamFailure as failure:
            if not failure.retry_here or attempt.target.zone != "box":
                raise
            failure.target = attempt.target.name
            self._log_failure(failure, retrying=True)
            self.retried = True
        await asyncio.sleep(random.uniform(*LOCAL_RETRY_PAUSE))
        return await self._try(attempt, headers)

    def _failed(self, attempt: Attempt, failure: UpstreamFailure) -> None:
        failure.target = attempt.target.name
        if failure.counts_against_target:
            attempt.target.breaker.failure(failure.reason)
        self._log_failure(failure)

    def _log_failure(self, failure: UpstreamFailure, retrying: bool = False) -> None:
        UPSTREAM_FAILURES.labels(failure.target).inc()
        fields = {"retrying": True} if retrying else {}
        event(
            "upstream failed",
            request_id=self.ctx.request_id,
            target=failure.target,
            reason=failure.reason,
            **fields,
        )

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
        gone = next((f for f in failures if isinstance(f, CloudModelGone)), None)
        if gone is not None:
            return APIError(
                503,
                f"'{self.ctx.model}' cannot be served now: the local engine failed and NVIDIA's cloud "
                f"no longer serves the model '{gone.model}' (HTTP {gone.status}). The appliance operator "
                "must update the model's cloud id in the model catalog.",
                type="server_error",
                code="cloud_model_unavailable",
                headers=headers,
            )
        spent = [f for f in failures if isinstance(f, CloudBudgetSpent)]
        if spent:
            headers["retry-after"] = str(max(1, math.ceil(spent[0].retry_after or 0)))
            return APIError(
                503,
                f"No local engine could serve '{self.ctx.model}' now and the appliance's cloud budget (the "
                "NVIDIA key's rate limit) is spent; try again after Retry-After.",
                type="server_error",
                code="cloud_budget_exhausted",
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
        if self.hide_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        upstream = await self._send(attempt, orjson.dumps(body))
        if upstream.status >= 400:
            return await self._client_error(upstream, headers)
        if self.stream:
            stream = await self._open_stream(attempt, upstream)
            return EventStreamResponse(self._relay(stream), headers)
        return await self._whole(upstream, headers)

    async def _send(self, attempt: Attempt, payload: bytes) -> UpstreamResponse:
        """POST, honouring one short Retry-After on 429. Connection trouble, 5xx, 429 and the cloud's
        refusals of the key or the model raise."""
        settings = self.state.settings
        target = attempt.target
        timeout = self.first_token_timeout if self.stream else settings.first_byte_timeout
        timeout = min(timeout, target.first_byte_timeout or timeout)  # the upstream's own limit
        headers = self.district.lines() if target.zone == "district" else b""
        waited = False  # per target: one short wait, then move on
        while True:
            self.deadline = asyncio.get_running_loop().time() + timeout
            try:
                resp = await target.pool.request(
                    "POST", self.endpoint, payload, timeout=timeout, headers=headers
                )
            except UpstreamError as exc:
                raise UpstreamFailure(exc.reason, retry_here=_early_loss(exc)) from None
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
                raise UpstreamFailure(f"HTTP {resp.status}", resp.status, retry_here=True)
            if target.is_cloud and resp.status in (401, 403):
                resp.release()
                event(
                    "cloud key rejected",
                    level=40,
                    status=resp.status,
                    action="the NVIDIA NIM API key was rejected: update NVIDIA_NIM_API_KEY",
                )
                raise CloudKeyRejected(f"cloud key rejected (HTTP {resp.status})", resp.status)
            if target.is_cloud and resp.status in (404, 410):
                raise await self._cloud_model_gone(attempt, resp)
            return resp

    async def _cloud_model_gone(self, attempt: Attempt, resp: UpstreamResponse) -> CloudModelGone:
        raw = await _read_whole(resp, "while reading an error")
        event(
            "cloud model unavailable",
            level=40,
            model=attempt.model,
            status=resp.status,
            detail=self._cloud_detail(raw),
            action=f"NVIDIA's cloud no longer serves '{attempt.model}': update its cloud id in the catalog",
        )
        reason = f"cloud model '{attempt.model}' gone (HTTP {resp.status})"
        return CloudModelGone(reason, resp.status, attempt.model)

    def _cloud_detail(self, raw: bytes) -> str:
        """NVIDIA's own words (`detail`, or an OpenAI-shaped message), short and without the key."""
        detail = error_message(raw) or raw.decode("utf-8", "replace")
        key = self.state.settings.nvidia_nim_api_key
        if key is not None and key.get_secret_value():
            detail = detail.replace(key.get_secret_value(), "[key]")
        return KEY_LIKE.sub("[key]", detail)[:DETAIL_CHARS]

    async def _client_error(self, upstream: UpstreamResponse, headers: list[tuple[bytes, bytes]]) -> ASGIApp:
        """A 4xx goes back to the client as it is, in OpenAI's shape if the engine used another. A
        context-length 400 raises ContextOverflow: a target with a longer context may take it."""
        raw = await _read_whole(upstream, "while reading an error")
        overflow = upstream.status == 400 and CONTEXT_EXCEEDED.search(raw) is not None
        response = JSONBytesResponse(
            openai_error(raw, upstream.status, overflow), upstream.status, headers=headers
        )
        if overflow:
            limit = CONTEXT_LIMIT.search(raw)
            raise ContextOverflow(response, int(limit.group(1)) if limit else None)
        return response

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

    # Streams.

    async def _open_stream(self, attempt: Attempt, upstream: UpstreamResponse) -> LiveStream:
        """Wait for the first event (failover is still possible until then) within the first-token
        limit; an error as that first event is a failure like a 5xx."""
        splitter, pieces = EventSplitter(), upstream.pieces()
        loop = asyncio.get_running_loop()
        events = b""
        try:
            while not events:
                upstream.timeout = max(0.001, self.deadline - loop.time())
                events = splitter.feed(await anext(pieces))
        except StopAsyncIteration:
            upstream.release()
            raise UpstreamFailure("stream ended before the first event") from None
        except ReadTimeout:
            upstream.release()
            raise UpstreamFailure(f"no first token within {self.first_token_timeout:g} s") from None
        except UpstreamError as exc:
            upstream.release()
            raise UpstreamFailure(
                f"stream failed before the first event ({exc.reason})", retry_here=_early_loss(exc)
            ) from None
        except BaseException:  # the client left while a continuation was starting: free the engine
            upstream.release()
            raise
        first = events.partition(b"\n\n")[0]
        if ERROR_KEY in first and is_error(json_of(first)):
            upstream.release()
            raise UpstreamFailure("error event before the first token", retry_here=True)
        upstream.timeout = self.idle_timeout
        return LiveStream(attempt, upstream, pieces, splitter, events)

    async def _relay(self, stream: LiveStream) -> AsyncGenerator[bytes, None]:
        """Relay events as they come. If the stream breaks off, carry the answer on elsewhere where a
        target can, else end with the error in-band. The loop is the streaming hot path: plain byte
        scans per piece, JSON only where an event needs rewriting."""
        sent: list[bytes] = []  # what the client has: the prefix to carry on from
        stitch: Stitch | None = None
        while True:
            broken: StreamBroken | None = None
            events, done = stream.first, False
            pieces, feed = stream.pieces, stream.splitter.feed
            try:
                while True:
                    if events:
                        if ERROR_KEY in events:
                            events, broken = _cut_at_error(events)
                        done = done or events.endswith(DONE_TAIL)  # [DONE] is the last event
                        if stitch is not None:
                            events = stitch.rewrite(events)
                        if events:
                            events = self._rewrite_events(events)
                            sent.append(events)
                            yield events
                        if broken is not None:
                            break
                    try:
                        events = feed(await anext(pieces))
                    except StopAsyncIteration:
                        rest = stream.splitter.rest()
                        if rest.strip():
                            events = rest + b"\n\n"
                            continue
                        if not done:
                            broken = StreamBroken("it ended before the answer was complete", retry_here=True)
                        break
            except ReadTimeout:
                broken = StreamBroken("stalled", retry_here=False)
            except UpstreamError:
                broken = StreamBroken("connection lost", retry_here=True)
            finally:
                stream.upstream.release()
            if broken is None:
                return
            self._stream_failed(stream.attempt, broken)
            prefix = Prefix.of(b"".join(sent), self.endpoint)
            if prefix.finished:  # only the end of the stream was lost
                yield DONE_TAIL
                return
            resumed = await self._resume(prefix, broken, stream.attempt)
            if resumed is None:
                yield broken.client_event()
                return
            stream, stitch = resumed

    def _stream_failed(self, attempt: Attempt, broken: StreamBroken) -> None:
        attempt.target.breaker.failure(broken.reason)
        UPSTREAM_FAILURES.labels(attempt.target.name).inc()
        target = attempt.target.name
        event("stream broken", request_id=self.ctx.request_id, target=target, reason=broken.reason)

    async def _resume(
        self, prefix: Prefix, broken: StreamBroken, broken_attempt: Attempt
    ) -> tuple[LiveStream, Stitch] | None:
        """Ask the next target that can for the rest of the answer; None if none can."""
        why_not = prefix.refusal or continuation_refusal(self.endpoint, self.body)
        if why_not is not None:
            event("stream not continued", request_id=self.ctx.request_id, reason=why_not)
            return None
        for attempt in self._continuation_attempts(broken_attempt.target, broken.retry_here):
            self.continued_on.add(attempt.target.name)
            body = continuation_body(self.endpoint, {**attempt.defaults, **self.body}, prefix)
            body["model"] = attempt.model
            try:
                upstream = await self._send(attempt, orjson.dumps(body))
                if upstream.status >= 400:  # it refuses the prefix: not a fault of the target
                    await _read_whole(upstream, "while reading an error")
                    event(
                        "continuation refused",
                        request_id=self.ctx.request_id,
                        target=attempt.target.name,
                        status=upstream.status,
                    )
                    continue
                stream = await self._open_stream(attempt, upstream)
            except UpstreamFailure as failure:
                self._failed(attempt, failure)
                continue
            attempt.target.breaker.success()
            event(
                "stream continued",
                request_id=self.ctx.request_id,
                target=attempt.target.name,
                after_tokens=prefix.tokens,
            )
            wants_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
            return stream, Stitch(prefix, wants_usage, self._count_tokens)
        return None

    def _continuation_attempts(self, broken: Target, same_again: bool) -> list[Attempt]:
        """The targets allowed now that can carry on a prefix, the ones after the broken target first;
        each is asked once, and the broken one only after a cut (not a stall)."""
        attempts = _within_ceiling(self.ctx, self.router.attempts(self.route, self.district.session))
        after = next((i + 1 for i, a in enumerate(attempts) if a.target is broken), 0)
        return [
            a
            for a in attempts[after:] + attempts[:after]
            if a.target.continues_prefix
            and a.target.name not in self.continued_on
            and (same_again or a.target is not broken)
        ]

    def _rewrite_events(self, events: bytes) -> bytes:
        """Add the second name of reasoning deltas and read usage; untouched bytes pass through."""
        has_reasoning = REASONING_KEY in events
        has_usage = b'"usage":{' in events
        if not (has_reasoning or has_usage):
            return events
        out = []
        for line in events.split(b"\n"):
            if line.startswith(b"data: {"):
                try:
                    data = orjson.loads(line[6:])
                except orjson.JSONDecodeError:  # a malformed chunk passes as it came; the client decides
                    out.append(line)
                    continue
                if has_usage:
                    self._count_tokens(data.get("usage"))
                    if self.hide_usage and data.get("choices") == [] and data.get("usage"):
                        continue  # the usage chunk the client did not ask for
                if has_reasoning and alias_reasoning(data.get("choices"), "delta"):
                    line = b"data: " + orjson.dumps(data)
            out.append(line)
        return b"\n".join(out)

    def _count_tokens(self, usage: Any) -> None:
        """The request's usage as the client is told it (for a continued stream: the whole answer's).
        The access log and the token metrics read it from the request context when the request ends."""
        if isinstance(usage, dict):
            self.ctx.prompt_tokens = usage.get("prompt_tokens")
            self.ctx.completion_tokens = usage.get("completion_tokens")


def _early_loss(exc: UpstreamError) -> bool:
    return isinstance(exc, ConnectionLost) and exc.early


def _cut_at_error(events: bytes) -> tuple[bytes, StreamBroken | None]:
    """The events to relay, and a break if the engine sent an error event among them."""
    cut = split_at_error(events)
    if cut is None:
        return events, None
    return cut[0], StreamBroken("the engine sent an error", retry_here=True, error_event=cut[1])


def openai_error(raw: bytes, status: int, overflow: bool) -> bytes:
    """An engine's error body in OpenAI's shape: passed as it is when it already is (vLLM's nested
    errors carry the status as an integer `code`, where OpenAI has a string or null)."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    nested = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(nested, dict):
        nested = {}
    code = nested.get("code")
    if (
        nested.get("message")
        and isinstance(nested.get("type"), str)
        and (code is None or isinstance(code, str))
    ):
        return raw
    return error_body(
        error_message(raw) or f"The engine refused the request (HTTP {status}).",
        nested.get("type") if isinstance(nested.get("type"), str) else "invalid_request_error",
        nested.get("param") if isinstance(nested.get("param"), str) else None,
        code if isinstance(code, str) else ("context_length_exceeded" if overflow else None),
    )


def error_message(raw: bytes) -> str | None:
    """The message of an error body in any of the engines' shapes: OpenAI's nested one, vLLM's older
    flat one, NVIDIA's RFC 7807 `detail`."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    nested = parsed.get("error")
    if isinstance(nested, dict) and nested.get("message"):
        return str(nested["message"])
    message = parsed.get("message") or parsed.get("detail")
    return str(message) if message else None


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


def _max_tokens(body: dict[str, Any]) -> object:
    return body.get("max_completion_tokens") or body.get("max_tokens")


def _usage_unasked(body: dict[str, Any]) -> bool:
    """A stream whose final usage chunk the client did not ask for: the gateway asks for it itself (its
    limits and ledger count tokens) and keeps it from the client."""
    options = body.get("stream_options")
    return body.get("stream") is True and not (isinstance(options, dict) and options.get("include_usage"))


def _within_ceiling(ctx: RequestContext, attempts: list[Attempt]) -> list[Attempt]:
    """The attempts the key's data ceiling allows: a `box` key's requests never leave the box, a
    `district` key's never reach the cloud."""
    zones = ctx.principal.zones if ctx.principal is not None else None
    if zones is None:
        return attempts
    return [a for a in attempts if a.target.zone in zones]


def install(app: FastAPI, state: AppState) -> None:
    settings = state.settings
    session_header = settings.session_header.encode()
    router = LLMRouter(settings, state.catalog)
    state.availability["llm"] = router.available
    state.readiness["llm"] = router.readiness
    state.startup.append(router.start)
    state.shutdown.append(router.stop)

    async def relay(scope: Scope, receive: Receive, endpoint: str) -> ASGIApp:
        ctx = request_context(scope)
        raw = await read_body(scope, receive, state.settings.max_body_bytes)
        body = parse_request(raw, endpoint)
        route = state.require_route(body["model"], "llm")
        ctx.model = route.name
        session = body.get("user") or request_header(scope, session_header)
        state.governance.admit(ctx, route, tokens=estimate_tokens(len(raw), _max_tokens(body)))
        attempts = _within_ceiling(ctx, router.attempts(route, session))
        if not attempts:
            if not _within_ceiling(ctx, router.candidates(route)):
                raise APIError(
                    503,
                    f"'{route.name}' cannot be served on this appliance: no local engine serves it and the "
                    "school's policy, this key's limit or the configuration does not allow the cloud.",
                    type="server_error",
                    code="model_unavailable",
                )
            raise APIError(
                503,
                f"Every engine for '{route.name}' is failing; try again shortly.",
                type="server_error",
                code="upstream_unavailable",
            )
        district = DistrictHeaders(settings, route, ctx.key_id, session)
        relay = Relay(state, router, route, endpoint, body, ctx, district, hide_usage=_usage_unasked(body))
        return await relay.run(attempts)

    for path, endpoint in (("/v1/chat/completions", "chat/completions"), ("/v1/completions", "completions")):
        state.add_fast_route(app, path, functools.partial(relay, endpoint=endpoint))
