"""Pools: one upstream, one or more engine URLs. Each URL is a `Target` with its own connections,
breaker and what its engine reports about itself (the models it serves, its queue).

Choosing a URL for a request: the fewest requests in flight from this gateway, then the engine's own
queue (`vllm:num_requests_waiting` + `vllm:num_requests_running`) where it exposes one, then a turn
that moves on with every request, so ties are shared fairly and never all land on the first URL. A
session id keeps a conversation on one URL while that URL is healthy, so its prefix cache is reused.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import orjson
from prometheus_client.parser import text_string_to_metric_families

from appliance.breaker import CircuitBreaker
from appliance.log import event
from appliance.upstream_http import UpstreamError, UpstreamPool
from appliance.upstreams.chain import UpstreamSpec
from appliance.upstreams.zones import Zone

PROBE_SECONDS = 3.0
QUEUE_SCALE = 1 << 20
SESSIONS_KEPT = 10_000  # remembered session -> URL pairs per pool (least recently used dropped)
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@dataclass(eq=False)
class Target:
    """One engine URL of an upstream."""

    name: str  # the upstream's name: what `x-appliance-target` says
    zone: Zone
    pool: UpstreamPool  # its base URL (ends in /v1) and connections; requests carry the upstream's headers
    index: int = 0  # its place in the upstream's list of URLs
    first_byte_timeout: float | None = None  # None: the gateway's setting
    breaker: CircuitBreaker = field(init=False)
    served: set[str] | None = None  # model ids from its /v1/models; None until it has answered
    context: dict[str, int] = field(default_factory=dict)  # model id -> max_model_len, as vLLM reports it
    # Why its URL answers, but not as an OpenAI API (no /v1, another service's port); skipped while set.
    misconfigured: str | None = None
    waiting: float | None = None  # its engine's queue gauges, where it exposes them
    running: float | None = None
    queue: int = 0  # waiting + running, as a whole number for the chooser

    @property
    def is_cloud(self) -> bool:
        return self.zone == "cloud"

    @property
    def continues_prefix(self) -> bool:
        """Can carry on an answer from a prefix (vLLM: `continue_final_message`; a district's router
        passes it to its vLLM engines). NVIDIA's hosted API documents no such option (its references
        ask for a user message last), so the cloud is not asked."""
        return self.zone != "cloud"

    @property
    def label(self) -> str:
        """For logs and breakers: the upstream's name, with the URL's place when there are several."""
        return self.name if self.index == 0 else f"{self.name}#{self.index}"

    @property
    def root(self) -> str:
        """The engine's own paths (/health, /metrics) sit beside /v1."""
        return self.pool.base_path.removesuffix("/v1")

    def serves(self, model: str) -> bool:
        return self.served is None or model in self.served

    async def probe(self, health_path: str, model: str) -> bool:
        """Whether a failed URL may take requests again. For the cloud the key must work, not only the
        host answer: NVIDIA's /v1/models answers 200 to anyone. A chat request with no messages is
        authenticated first (a wrong key: 401/403) and then refused as invalid (400/422) without
        generating anything."""
        if self.zone != "cloud":
            path = f"{self.root}{health_path}" if health_path.startswith("/") else health_path
            status, _ = await self.pool.get(path, PROBE_SECONDS)
            return status == 200
        probe = orjson.dumps({"model": model, "messages": []})
        async with asyncio.timeout(PROBE_SECONDS):
            response = await self.pool.request("POST", "chat/completions", probe, timeout=PROBE_SECONDS)
            try:
                await response.read()
            finally:
                response.release()
        return response.status in (200, 400, 422)

    async def refresh_served(self) -> bool:
        """Re-read the served model list; True when it changed. A URL that answers, but not with an
        OpenAI model list, is marked misconfigured (and its reason logged once) until it does."""
        try:
            status, raw = await self.pool.get("models", PROBE_SECONDS)
        except (UpstreamError, TimeoutError):
            return False  # not answering: the breaker and its probes deal with that
        if status >= 500:
            return False  # failing, not misaddressed: likewise
        served = model_ids(raw) if status == 200 else None
        self._note_misconfigured(None if served is not None else self._url_problem(status))
        if served is None:
            return False
        self.context = context_lengths(raw)
        changed, self.served = served != self.served, served
        return changed

    def _url_problem(self, status: int) -> str:
        url = self.pool.base_url
        setting = "APPLIANCE_LLM_URL" if self.zone == "box" else f"upstreams.{self.name}.urls"
        answer = f"returned {status}" if status != 200 else "did not return an OpenAI model list"
        if not url.endswith("/v1"):
            return f"{setting} should end in /v1: GET {url}/models {answer}"
        return f"{setting} is not an OpenAI-compatible engine: GET {url}/models {answer}"

    def _note_misconfigured(self, problem: str | None) -> None:
        if problem != self.misconfigured:  # logged once per change, not once per poll
            if problem:
                event("local engine misconfigured", logging.WARNING, target=self.label, reason=problem)
            self.misconfigured = problem

    async def refresh_load(self) -> None:
        try:
            status, raw = await self.pool.get(f"{self.root}/metrics", PROBE_SECONDS)
            text = raw.decode() if status == 200 else ""
        except (UpstreamError, TimeoutError, UnicodeDecodeError):
            text = ""
        self.waiting, self.running = queue_gauges(text) if text else (None, None)
        self.queue = min(int((self.waiting or 0) + (self.running or 0)), QUEUE_SCALE - 1)

    def status(self) -> dict[str, object]:
        return {
            "url": self.pool.base_url,
            "served_models": None if self.zone == "cloud" else sorted(self.served or ()),
            "in_flight": self.pool.in_flight,
            "requests_waiting": self.waiting,
            "requests_running": self.running,
            **self.breaker.status(),
            **({"ready": False, "error": self.misconfigured} if self.misconfigured else {}),
        }


class EnginePool:
    """The URLs of one upstream and how a request picks among them."""

    def __init__(self, spec: UpstreamSpec, connect_timeout: float, breaker_failures: int, probe_s: float):
        headers = dict(JSON_HEADERS)
        if spec.api_key:
            headers["Authorization"] = f"Bearer {spec.api_key}"
        self.name = spec.name
        self.zone = spec.zone
        self.health_path = spec.health_path
        self.probe_model = ""  # a model the cloud serves, for its key probe
        self.members: list[Target] = []
        for index, url in enumerate(spec.urls):
            pool = UpstreamPool(url, headers, spec.connect_timeout or connect_timeout, spec.ca_file)
            target = Target(spec.name, spec.zone, pool, index, spec.first_byte_timeout)
            target.breaker = CircuitBreaker(
                target.label,
                breaker_failures,
                probe_s,
                lambda t=target: t.probe(self.health_path, self.probe_model),
            )
            self.members.append(target)
        self._turn = 0
        # Each request starts its scan one URL further on: ties go to each URL in turn.
        self._rotations = [self.members[i:] + self.members[:i] for i in range(len(self.members))]
        self._sessions: OrderedDict[int, Target] = OrderedDict()

    def model_for(self, models: tuple[str, ...]) -> str | None:
        """The first of a link's model ids some URL serves (or would, before any has said)."""
        answered = [m.served for m in self.members if m.served is not None]
        if not answered:
            return models[0] if models else None
        return next((model for model in models if any(model in s for s in answered)), None)

    def ordered(self, model: str, session: str | None = None) -> list[Target]:
        """The URLs to try for one request: breakers closed, serving `model`; the least loaded first,
        the others in turn order (they are tried only if it fails). One pass, no sorting: this runs
        for every request."""
        members = self.members
        if len(members) == 1:  # the common case costs nothing more than before pools
            only = members[0]
            return [only] if only.breaker.allows() and not only.misconfigured else []
        rotation = self._rotations[self._turn % len(members)]
        self._turn += 1
        usable: list[Target] = []
        best, best_load = 0, -1
        for m in rotation:
            if not m.breaker.allows() or m.misconfigured or (m.served is not None and model not in m.served):
                continue
            # In flight first; the engine's queue only breaks ties (it is < QUEUE_SCALE requests).
            load = m.pool.in_flight * QUEUE_SCALE + m.queue
            if best_load < 0 or load < best_load:
                best, best_load = len(usable), load
            usable.append(m)
        if best:
            usable[0], usable[best] = usable[best], usable[0]
        if session is not None and usable:
            self._stick(hash(session), usable)
        return usable

    def _stick(self, key: int, usable: list[Target]) -> None:
        """Put the session's URL first while it is usable; otherwise give the session the best one.
        Only a hash of the session id is kept, in memory."""
        sessions = self._sessions
        kept = sessions.get(key)
        if kept is not None and kept in usable:
            sessions.move_to_end(key)
            if usable[0] is not kept:
                usable.remove(kept)
                usable.insert(0, kept)
            return
        sessions[key] = usable[0]
        sessions.move_to_end(key)
        if len(sessions) > SESSIONS_KEPT:
            sessions.popitem(last=False)

    @property
    def overloaded_at(self) -> float | None:
        """The shortest engine queue (waiting) among usable URLs, None when none reports one."""
        queues = [m.waiting for m in self.members if m.breaker.allows() and m.waiting is not None]
        return min(queues) if queues else None

    def status(self) -> dict[str, object]:
        return {"zone": self.zone, "urls": [m.status() for m in self.members]}


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


def queue_gauges(metrics_text: str) -> tuple[float | None, float | None]:
    """(waiting, running): `vllm:num_requests_waiting` and `vllm:num_requests_running`, summed over
    engines and models, from a Prometheus text page; None where a gauge is absent."""
    totals: dict[str, float | None] = {"vllm:num_requests_waiting": None, "vllm:num_requests_running": None}
    try:
        for family in text_string_to_metric_families(metrics_text):
            if family.name in totals:
                totals[family.name] = sum(sample.value for sample in family.samples)
    except (ValueError, TypeError, IndexError):  # not a Prometheus page (a router, a proxy's error page)
        return None, None
    return totals["vllm:num_requests_waiting"], totals["vllm:num_requests_running"]
