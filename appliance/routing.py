"""LLM routing: for a public model name, the ordered targets to try (local vLLM, then NVIDIA's cloud).

The order follows the school's policy (`never`, `on_failure`, `on_overload`), skips targets whose
breaker is open, and uses what the local engine reports about itself: which model ids it serves
(`/v1/models`) and how long its queue is (`vllm:num_requests_waiting` on `/metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from time import time
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from appliance.breaker import CircuitBreaker
from appliance.catalog import Catalog, Route
from appliance.config import Settings
from appliance.log import event
from appliance.upstream_http import UpstreamError, UpstreamPool

PROBE_SECONDS = 3.0
SERVED_REFRESH_TICKS = 10  # re-read the served model list every this many load polls


@dataclass
class Target:
    """One OpenAI-protocol upstream."""

    name: str  # "local" or "cloud"
    pool: UpstreamPool  # its base URL (ends in /v1) and connections; requests carry the target's headers
    breaker: CircuitBreaker
    # Can carry on an answer from a prefix (vLLM: `continue_final_message`). NVIDIA's hosted API
    # documents no such option (its references ask for a user message last), so the cloud is not asked.
    continues_prefix: bool = False

    @property
    def is_cloud(self) -> bool:
        return self.name == "cloud"


@dataclass(frozen=True)
class Attempt:
    target: Target
    model: str  # the model id this target knows the public name by
    defaults: dict[str, Any] = field(default_factory=dict, hash=False)  # fields the client did not set


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None


class LLMRouter:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.served: set[str] | None = None  # None until the local engine has answered /v1/models
        # Why APPLIANCE_LLM_URL answers but not as an OpenAI API (a URL without /v1, another service's
        # port); while set, the local target is skipped, as a failing engine would be.
        self.misconfigured: str | None = None
        self.context: dict[str, int] = {}  # local model id -> its max_model_len, as vLLM reports it
        self.waiting: float | None = None
        self._task: asyncio.Task[None] | None = None

        json_headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        self.local = Target(
            "local",
            UpstreamPool(settings.llm_url, json_headers, settings.connect_timeout),
            self._breaker("local", self._probe_local),
            continues_prefix=True,
        )
        self.cloud: Target | None = None
        if settings.cloud_enabled:
            key = settings.nvidia_nim_api_key.get_secret_value()  # type: ignore[union-attr]
            cloud_headers = {**json_headers, "Authorization": f"Bearer {key}"}
            self.cloud = Target(
                "cloud",
                UpstreamPool(settings.nvidia_nim_base_url, cloud_headers, settings.connect_timeout),
                self._breaker("cloud", self._probe_cloud),
            )
        self.watch_load = any(self.policy(r) == "on_overload" for r in catalog.routes_of_kind("llm"))

    def _breaker(self, name: str, probe: Callable[[], Awaitable[bool]]) -> CircuitBreaker:
        s = self.settings
        return CircuitBreaker(name, s.breaker_failures, s.breaker_probe_interval, probe)

    def policy(self, route: Route) -> str:
        return self.settings.fallback_policy(route.name, "on_failure")

    @property
    def overloaded(self) -> bool:
        return self.waiting is not None and self.waiting >= self.settings.overload_waiting

    def local_model(self, route: Route) -> str | None:
        """The local model id for a route: the first candidate the engine serves (or would, before it
        has said what it serves)."""
        if not route.local:
            return None
        if self.served is None:
            return route.local[0]
        return next((m for m in route.local if m in self.served), None)

    def candidates(self, route: Route) -> list[Attempt]:
        """Every target the policy allows for a route, in order, breakers not considered."""
        policy = self.policy(route)
        local_id = self.local_model(route)
        local = (
            [Attempt(self.local, local_id, route.local_defaults)]
            if local_id and not self.misconfigured
            else []
        )
        if self.cloud is None or route.cloud is None or policy == "never":
            return local
        cloud = [Attempt(self.cloud, route.cloud)]
        if policy == "on_overload" and self.overloaded:
            return cloud + local
        return local + cloud

    def context_length(self, route: Route, attempt: Attempt) -> int | None:
        """The context length of a target's model for a route, where known."""
        if attempt.target.is_cloud:
            return route.cloud_context
        return self.context.get(attempt.model)

    def attempts(self, route: Route) -> list[Attempt]:
        return [a for a in self.candidates(route) if a.target.breaker.allows()]

    def available(self, route: Route) -> bool:
        """Servable now: a target is allowed, and it is the cloud or a local engine that has answered."""
        return any(a.target.is_cloud or self.served is not None for a in self.attempts(route))

    # Background: what the local engine serves and how loaded it is.

    async def start(self) -> None:
        await self._refresh_served()  # so /v1/models is right from the first request
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for target in (self.local, self.cloud):
            if target is not None:
                await target.breaker.close()
                await target.pool.close()

    async def _watch(self) -> None:
        tick = 1  # start() has just read the model list
        while True:
            if self.served is None or tick % SERVED_REFRESH_TICKS == 0:
                await self._refresh_served()
            if self.watch_load:
                await self._refresh_load()
            tick += 1
            await asyncio.sleep(self.settings.overload_poll_interval)

    async def _refresh_served(self) -> None:
        try:
            status, raw = await self.local.pool.get("models", PROBE_SECONDS)
        except (UpstreamError, TimeoutError):
            return  # not answering: the breaker and its probes deal with that
        if status >= 500:
            return  # failing, not misaddressed: likewise
        served = model_ids(raw) if status == 200 else None
        self._note_misconfigured(None if served is not None else self._url_problem(status))
        if served is None:
            return
        if served != self.served:
            event("local models", served=sorted(served))
        self.served = served
        self.context = context_lengths(raw)

    def _url_problem(self, status: int) -> str:
        url = self.local.pool.base_url
        answer = f"returned {status}" if status != 200 else "did not return an OpenAI model list"
        if not url.endswith("/v1"):
            return f"APPLIANCE_LLM_URL should end in /v1: GET {url}/models {answer}"
        return f"APPLIANCE_LLM_URL is not an OpenAI-compatible engine: GET {url}/models {answer}"

    def _note_misconfigured(self, problem: str | None) -> None:
        if problem != self.misconfigured:  # logged once per change, not once per poll
            if problem:
                event("local engine misconfigured", logging.WARNING, reason=problem)
            self.misconfigured = problem

    async def _refresh_load(self) -> None:
        try:
            status, raw = await self.local.pool.get(f"{self.local_root}/metrics", PROBE_SECONDS)
            text = raw.decode() if status == 200 else ""
        except (UpstreamError, TimeoutError, UnicodeDecodeError):
            text = ""
        self.waiting = waiting_requests(text) if text else None

    @property
    def local_root(self) -> str:
        """The engine's own paths (/health, /metrics) sit beside /v1."""
        return self.local.pool.base_path.removesuffix("/v1")

    async def _probe_local(self) -> bool:
        status, _ = await self.local.pool.get(f"{self.local_root}/health", PROBE_SECONDS)
        return status == 200

    async def _probe_cloud(self) -> bool:
        """The key must work, not only the host answer: NVIDIA's /v1/models answers 200 to anyone. A
        chat request with no messages is authenticated first (a wrong key: 401/403) and then refused as
        invalid (400/422) without generating anything."""
        assert self.cloud is not None
        probe = orjson.dumps({"model": self.cloud_probe_model, "messages": []})
        async with asyncio.timeout(PROBE_SECONDS):
            response = await self.cloud.pool.request("POST", "chat/completions", probe, timeout=PROBE_SECONDS)
            try:
                await response.read()
            finally:
                response.release()
        return response.status in (200, 400, 422)

    @property
    def cloud_probe_model(self) -> str:
        return next((r.cloud for r in self.catalog.routes_of_kind("llm") if r.cloud), "")

    def readiness(self) -> dict[str, object]:
        targets: dict[str, object] = {
            "local": {
                "url": self.local.pool.base_url,
                "served_models": sorted(self.served or ()),
                "requests_waiting": self.waiting,
                **self.local.breaker.status(),
                **({"ready": False, "error": self.misconfigured} if self.misconfigured else {}),
            },
        }
        if self.cloud is not None:
            targets["cloud"] = {"url": self.cloud.pool.base_url, **self.cloud.breaker.status()}
        ready = any(self.available(r) for r in self.catalog.routes_of_kind("llm"))
        return {"ready": ready, "overloaded": self.overloaded, "targets": targets}


def model_ids(raw: bytes) -> set[str] | None:
    """The ids in an OpenAI model list (`{"data": [{"id": ...}]}`), or None if it is not one."""
    try:
        data = orjson.loads(raw)
    except ValueError:
        return None
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) and "id" in m for m in models):
        return None
    return {m["id"] for m in models}


def context_lengths(raw: bytes) -> dict[str, int]:
    """Model id -> `max_model_len` from vLLM's model list (an OpenAI list with vLLM's extra field)."""
    models = orjson.loads(raw)["data"]  # model_ids() has checked the shape
    return {m["id"]: m["max_model_len"] for m in models if type(m.get("max_model_len")) is int}


def waiting_requests(metrics_text: str) -> float | None:
    """Sum of `vllm:num_requests_waiting` over all engines and models in a Prometheus text page."""
    total = None
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "vllm:num_requests_waiting":
            total = sum(sample.value for sample in family.samples)
    return total
