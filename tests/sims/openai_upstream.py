"""Simulators of the two OpenAI-protocol upstreams: a local vLLM server and NVIDIA's cloud NIM.

Real HTTP servers on loopback that follow the documented protocols: OpenAI request/response bodies,
SSE framing (`data: {...}` events, `data: [DONE]`), vLLM's `/health`, `/v1/models` (with
`max_model_len`) and Prometheus `/metrics`, the cloud's Bearer auth and `reasoning_content`, error
bodies and `Retry-After`. As today's vLLM does, the "vllm" flavor answers errors in OpenAI's nested
shape, refuses `stream_options` without `stream`, and carries on a final assistant message with
`continue_final_message`; the "cloud" flavor answers errors in NVIDIA's RFC 7807 shape, lists its
models to anyone, and answers 410 for retired model ids. Tests command failures with `fail(...)`:
refuse connections, reset (at once or after a wait), 5xx, 429, context-length and other 400s, slow
answers or first tokens, stalls, streams that drop midway, and error events in a stream.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.sims.server import LoopbackServer

FAILURE = web.RequestKey("failure", object)
STREAM_MODES = ("drop", "stall", "error_event", "slow_first_token", "malformed_chunk")
MAX_MODEL_LEN = 4096
REPLY = "Your sentence is correct. Well done!"
REASONING = "The user wants a check. The sentence has no errors."


@dataclass
class Failure:
    """One commanded failure. `times=None` lasts until `clear()`."""

    # Before the answer: "reset" (after `delay`), "500", "502", "503", "429", "400" (a refusal such as a
    # content filter), "context" (prompt too long), "401", "slow" (`delay`), "stall".
    # In a stream, at chunk `after_chunks`: "drop", "stall", "error_event", "slow_first_token" (`delay`),
    # "malformed_chunk" (a truncated JSON event, then the rest as usual).
    mode: str
    times: int | None = None
    retry_after: str | None = None  # for 429
    delay: float = 0.0  # for slow, slow_first_token and reset
    after_chunks: int = 2  # for the in-stream modes


@dataclass
class Seen:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)


class OpenAIUpstream(LoopbackServer):
    """flavor "vllm": no auth, reasoning under `reasoning`, /health and /metrics.
    flavor "cloud": Bearer key required, reasoning under `reasoning_content`."""

    def __init__(
        self, flavor: str = "vllm", models: tuple[str, ...] = (), api_key: str | None = None
    ) -> None:
        self.flavor = flavor
        self.models = list(models)
        self.api_key = api_key
        self.reasoning_models = {m for m in models if "30b" in m.lower() or "nano" in m.lower()}
        self.seen: list[Seen] = []
        self.failures: list[Failure] = []
        self.waiting = 0  # vllm:num_requests_waiting
        self.chunk_delay = 0.0
        self.healthy = True
        self.abandoned_streams = 0  # streams whose reader went away before the end
        self.max_model_len = MAX_MODEL_LEN  # vllm: reported on /v1/models, enforced on prompts
        self.retired: dict[str, int] = {}  # cloud: model id -> 404 or 410
        self.sse_separator = b"\n\n"  # the SSE specification also allows \r\n\r\n and \r\r

    # Lifecycle (call through the test's BackgroundLoop).

    async def start(self, port: int = 0, tls: ssl.SSLContext | None = None) -> OpenAIUpstream:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        if self.flavor == "vllm":
            app.router.add_get("/health", self._health)
            app.router.add_get("/metrics", self._metrics)
        await self._serve(app, port or self.port, tls)
        return self

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    # Commands.

    def fail(self, mode: str, times: int | None = None, **kw: Any) -> None:
        self.failures.append(Failure(mode, times, **kw))

    def clear(self) -> None:
        self.failures.clear()

    def served_paths(self) -> list[str]:
        return [s.path for s in self.seen]

    def _next_failure(self) -> Failure | None:
        if not self.failures:
            return None
        failure = self.failures[0]
        if failure.times is not None:
            failure.times -= 1
            if failure.times <= 0:
                self.failures.pop(0)
        return failure

    # Protocol.

    def _error(
        self, status: int, message: str, type_: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        if self.flavor == "cloud":
            # NVIDIA's API gateway answers in RFC 7807 shape, not OpenAI's.
            body: dict[str, Any] = {"status": status, "title": type_, "detail": message}
        else:  # vLLM since v0.10.1: OpenAI's nested shape
            body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
        return web.json_response(body, status=status, headers=headers)

    async def _read(self, request: web.Request) -> tuple[dict[str, Any] | None, web.StreamResponse | None]:
        """Parse and check a request; on any commanded failure before the answer, return it."""
        if self.flavor == "cloud":
            auth = request.headers.get("Authorization", "")
            if self.api_key is None or auth != f"Bearer {self.api_key}":
                return None, self._error(401, "Authentication failed", "unauthorized")
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            return None, self._error(400, "Invalid JSON body", "BadRequestError")
        self.seen.append(Seen(request.path, body, dict(request.headers)))
        failure = self._next_failure()
        mid_stream = failure is not None and failure.mode in STREAM_MODES and bool(body.get("stream"))
        if failure is not None and not mid_stream:
            early = await self._fail_early(request, failure)
            if early is not None:
                return None, early
        refused = self._refuse(body)
        if refused is not None:
            return None, refused
        request[FAILURE] = failure if mid_stream else None
        return body, None

    def _refuse(self, body: dict[str, Any]) -> web.Response | None:
        """What the real service refuses of a well-formed JSON request."""
        model = body.get("model")
        if model in self.retired:
            status = self.retired[model]
            detail = f"Function for model '{model}' has reached its end of life and is no longer available."
            return self._error(status, detail, "Gone" if status == 410 else "Not Found")
        if model not in self.models:
            return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
        if self.flavor == "vllm" and body.get("stream_options") is not None and not body.get("stream"):
            return self._error(
                400, "Stream options can only be defined when `stream=True`.", "BadRequestError"
            )
        if self.flavor == "vllm" and body.get("continue_final_message"):
            if body.get("add_generation_prompt", True):
                return self._error(
                    400,
                    "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                    "BadRequestError",
                )
            last = (body.get("messages") or [{}])[-1]
            if not isinstance(last, dict) or last.get("role") != "assistant":
                return self._error(
                    400, "continue_final_message needs a final assistant message.", "BadRequestError"
                )
        if self.flavor == "vllm" and self._prompt_tokens(body) > self.max_model_len:
            return self._context_error(self._prompt_tokens(body))
        return None

    def _context_error(self, tokens: int) -> web.Response:
        return self._error(
            400,
            f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
            f"{tokens} input tokens. Please reduce the length of the input messages.",
            "BadRequestError",
        )

    @staticmethod
    def _prompt_tokens(body: dict[str, Any]) -> int:
        """One token per word, as far as the simulator is concerned."""
        if isinstance(body.get("prompt"), str):
            return len(body["prompt"].split())
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        return sum(
            len(m["content"].split())
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), str)
        )

    async def _fail_early(self, request: web.Request, failure: Failure) -> web.StreamResponse | None:
        if failure.mode in ("reset", "drop"):
            await asyncio.sleep(failure.delay)
            request.transport.abort()  # type: ignore[union-attr]
            return web.Response(status=500)  # never reaches the client: the connection is gone
        if failure.mode in ("500", "502", "503"):
            return self._error(int(failure.mode), "Engine failure", "InternalServerError")
        if failure.mode in ("400", "422"):
            return self._error(
                int(failure.mode), "The request was refused by the content filter.", "BadRequestError"
            )
        if failure.mode == "context":
            return self._context_error(self.max_model_len + 1)
        if failure.mode == "401":
            return self._error(401, "Authentication failed", "unauthorized")
        if failure.mode == "429":
            headers = {"Retry-After": failure.retry_after} if failure.retry_after else None
            return self._error(429, "Too many requests", "rate_limit_exceeded", headers)
        if failure.mode == "slow":
            await asyncio.sleep(failure.delay)
        if failure.mode == "stall":
            await asyncio.sleep(3600)
        return None

    def _reasoning_key(self) -> str:
        return "reasoning" if self.flavor == "vllm" else "reasoning_content"

    def _thinks(self, body: dict[str, Any]) -> bool:
        kwargs = body.get("chat_template_kwargs") or {}
        return body["model"] in self.reasoning_models and kwargs.get("enable_thinking", True) is not False

    def _usage(self, body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
        prompt_tokens = self._prompt_tokens(body)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _rest_of(self, body: dict[str, Any], reply: str) -> str:
        """With `continue_final_message`, the model carries on the final assistant message: the same
        answer, less what that message already holds (a deterministic model)."""
        if not body.get("continue_final_message"):
            return reply
        prefix = body["messages"][-1].get("content") or ""
        return reply[len(prefix) :] if reply.startswith(prefix) else reply

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, error = await self._read(request)
        if error is not None:
            return error
        assert body is not None
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return self._error(400, "messages must be a non-empty list", "BadRequestError")
        reply = self._rest_of(body, f"{REPLY} [{self.flavor}]")
        thinking = REASONING if self._thinks(body) and not body.get("continue_final_message") else None
        if body.get("stream"):
            return await self._stream_chat(request, body, reply, thinking)
        message: dict[str, Any] = {"role": "assistant", "content": reply, "refusal": None, "tool_calls": []}
        if thinking is not None:
            message[self._reasoning_key()] = thinking
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                "usage": self._usage(body, len(reply.split())),
            },
            dumps=lambda o: orjson.dumps(o).decode(),
        )

    async def _stream_chat(
        self, request: web.Request, body: dict[str, Any], reply: str, thinking: str | None
    ) -> web.StreamResponse:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if thinking:
            deltas += [{self._reasoning_key(): w + " "} for w in thinking.split()]
        deltas += [{"content": w + " "} for w in reply.split()]
        chunks = [chunk(d) for d in deltas] + [chunk({}, "stop")]
        if (body.get("stream_options") or {}).get("include_usage"):
            generated = len(deltas) - 1
            chunks.append({**chunk({}), "choices": [], "usage": self._usage(body, generated)})
        return await self._send_sse(request, chunks)

    async def _send_sse(self, request: web.Request, chunks: list[dict[str, Any]]) -> web.StreamResponse:
        failure: Failure | None = request[FAILURE]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        end = self.sse_separator
        try:
            for i, c in enumerate(chunks):
                if failure is not None and i == failure.after_chunks:
                    if failure.mode == "drop":
                        request.transport.abort()  # type: ignore[union-attr]
                        return resp
                    if failure.mode == "stall":
                        await asyncio.sleep(3600)
                    if failure.mode == "slow_first_token":
                        await asyncio.sleep(failure.delay)
                    if failure.mode == "malformed_chunk":
                        await resp.write(b'data: {"usage":{"prompt_tokens": 1' + end)
                    if failure.mode == "error_event":
                        # vLLM: the status line said 200 already, so the error comes as an event.
                        error = {
                            "error": {"message": "Engine failure", "type": "InternalServerError", "code": 500}
                        }
                        await resp.write(b"data: " + orjson.dumps(error) + end)
                        await resp.write(b"data: [DONE]" + end)
                        await resp.write_eof()
                        return resp
                await resp.write(b"data: " + orjson.dumps(c) + end)
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await resp.write(b"data: [DONE]" + end)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            # vLLM aborts the request's generation here; the count shows the gateway let go.
            self.abandoned_streams += 1
            raise
        return resp

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, error = await self._read(request)
        if error is not None:
            return error
        assert body is not None
        if not isinstance(body.get("prompt"), str | list):
            return self._error(400, "prompt must be a string or a list", "BadRequestError")
        text = f" continued [{self.flavor}]"
        if isinstance(body.get("prompt"), str) and body["prompt"].rstrip().endswith("continued"):
            text = f" [{self.flavor}]"  # carrying on a prompt that holds the start of the answer
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(t: str, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": t, "logprobs": None, "finish_reason": finish}

        base = {"id": cid, "object": "text_completion", "created": created, "model": body["model"]}
        if body.get("stream"):
            chunks = [{**base, "choices": [choice(w + " ", None)]} for w in text.split()]
            chunks.append({**base, "choices": [choice("", "length")]})
            return await self._send_sse(request, chunks)
        return web.json_response(
            {**base, "choices": [choice(text, "length")], "usage": self._usage(body, len(text.split()))},
            dumps=lambda o: orjson.dumps(o).decode(),
        )

    async def _models(self, request: web.Request) -> web.Response:
        # NVIDIA's listing is public: it answers 200 whatever the key, so it proves nothing about one.
        data: list[dict[str, Any]] = [
            {"id": m, "object": "model", "created": 0, "owned_by": self.flavor} for m in self.models
        ]
        if self.flavor == "vllm":
            for model in data:
                model["max_model_len"] = self.max_model_len
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
        ]
        lines += [f'vllm:num_requests_running{{engine="0",model_name="{m}"}} 1.0' for m in self.models]
        lines += [
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
        ]
        lines += [
            f'vllm:num_requests_waiting{{engine="0",model_name="{m}"}} {float(self.waiting)}'
            for m in self.models
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
