"""Carrying on a streamed answer that broke off after the client had part of it.

The client keeps what it has; the next target is asked for the rest with that part as a prefix (chat:
an assistant message vLLM continues with `continue_final_message`; completions: the prompt with the
part appended), and only what it generates is relayed, dressed as the same answer (same id and model,
no second role chunk). Which answers can be carried on, and how the request for the rest looks, is
decided here; the relay (appliance.chat) decides where to ask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from appliance.sse import json_of

TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")


@dataclass
class Prefix:
    """What the client has received of the answer so far."""

    text: str = ""
    tokens: int = 0  # chunks that carried text: vLLM sends one token per chunk (no speculative decoding)
    id: str | None = None
    model: str | None = None
    finished: bool = False  # a finish_reason was sent: nothing is left to generate
    refusal: str | None = None  # why the answer cannot be carried on, if it cannot

    @classmethod
    def of(cls, sent: bytes, endpoint: str) -> Prefix:
        prefix = cls()
        key = "delta" if endpoint == "chat/completions" else None
        for event in sent.split(b"\n\n"):
            chunk = json_of(event)
            if isinstance(chunk, dict) and prefix.refusal is None:
                prefix._add(chunk, key)
        return prefix

    def _add(self, chunk: dict[str, Any], key: str | None) -> None:
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        choices = chunk.get("choices")
        choices = [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
        if len(choices) > 1 or any(c.get("index", 0) != 0 for c in choices):
            self.refusal = "the answer has several choices"
            return
        for choice in choices:
            part = choice.get(key) if key else choice
            if not isinstance(part, dict):
                continue
            if part.get("tool_calls"):
                self.refusal = "the answer calls tools"
            elif part.get("reasoning") or part.get("reasoning_content"):
                self.refusal = "the answer was reasoning (a prefix cannot carry reasoning)"
            text = part.get("content") if key else part.get("text")
            if isinstance(text, str) and text:
                self.text += text
                self.tokens += 1
            if choice.get("finish_reason") is not None:
                self.finished = True


def refusal(endpoint: str, body: dict[str, Any]) -> str | None:
    """Why a request's answer can never be carried on from a prefix, or None if it can."""
    if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
        return "several choices were asked for"
    if endpoint == "completions" and (not isinstance(body.get("prompt"), str) or body.get("echo")):
        return "the prompt is not one string, or is echoed"
    if body.get("continue_final_message"):
        return "the request continues a message itself"
    return None


def continuation_body(endpoint: str, body: dict[str, Any], prefix: Prefix) -> dict[str, Any]:
    """The request for the rest of the answer (the caller sets the target's model and defaults)."""
    rest = {**body, "stream": True}
    # Always ask for usage: the answer's usage is the prefix's tokens plus what the rest costs.
    rest["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    if prefix.text:
        if endpoint == "chat/completions":
            rest["messages"] = [*body["messages"], {"role": "assistant", "content": prefix.text}]
            rest["continue_final_message"] = True
            rest["add_generation_prompt"] = False
        else:
            rest["prompt"] = body["prompt"] + prefix.text
    for name in TOKEN_LIMITS:
        if isinstance(rest.get(name), int):
            rest[name] = max(1, rest[name] - prefix.tokens)
    return rest


class Stitch:
    """Rewrites the continuation's events into the answer the client is already reading."""

    def __init__(self, prefix: Prefix, client_wants_usage: bool, on_usage: Callable[[Any], None]) -> None:
        self.prefix = prefix
        self.client_wants_usage = client_wants_usage
        self.on_usage = on_usage

    def rewrite(self, events: bytes) -> bytes:
        out = []
        for event in events.split(b"\n\n"):
            chunk = json_of(event)
            if not isinstance(chunk, dict):
                if event.strip():
                    out.append(event + b"\n\n")
                continue
            if self._keep(chunk):
                out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        return b"".join(out)

    def _keep(self, chunk: dict[str, Any]) -> bool:
        if self.prefix.id is not None:
            chunk["id"] = self.prefix.id
        if self.prefix.model is not None:
            chunk["model"] = self.prefix.model
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._add_prefix_usage(usage)
            self.on_usage(usage)
            if not self.client_wants_usage:
                chunk.pop("usage")
        choices = chunk.get("choices") or []
        # The client has had its role chunk already; an empty one from the continuation would repeat it.
        return any(_carries_something(c) for c in choices) or "usage" in chunk

    def _add_prefix_usage(self, usage: dict[str, Any]) -> None:
        """The continuation counted the prefix as prompt; it was generated, so move it to completion."""
        tokens = self.prefix.tokens
        if isinstance(usage.get("completion_tokens"), int):
            usage["completion_tokens"] += tokens
        if isinstance(usage.get("prompt_tokens"), int):
            usage["prompt_tokens"] = max(0, usage["prompt_tokens"] - tokens)


def _carries_something(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    if choice.get("finish_reason") is not None or choice.get("text"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role")
