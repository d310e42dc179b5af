"""LLM routing: for a public model name, the ordered targets to try, nearest data zone first.

Each model's chain of upstreams (box, district, cloud; `appliance.upstreams.chain`) follows the
school's policy (`never`, `on_failure`, `on_overload`, `max_zone`) and the client key's ceiling; each
upstream's URLs are ordered by load, session and breaker (`appliance.upstreams.pool`). What the engines
report about themselves is read in the background: which model ids they serve (`/v1/models`) and how
long their queues are (`/metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from time import time
from typing import Any

from appliance.catalog import Catalog, Route
from appliance.config import Settings
from appliance.log import event
from appliance.upstreams.chain import Chain, resolve_chain, upstream_specs
from appliance.upstreams.pool import EnginePool, Target, model_ids
from appliance.upstreams.zones import Zone, within

SERVED_REFRESH_TICKS = 10  # re-read the served model lists every this many load polls

__all__ = ["Attempt", "LLMRouter", "Target", "model_ids", "parse_retry_after"]


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
        self._task: asyncio.Task[None] | None = None
        specs = upstream_specs(settings)
        self.upstreams = {
            name: EnginePool(
                spec, settings.connect_timeout, settings.breaker_failures, settings.breaker_probe_interval
            )
            for name, spec in specs.items()
        }
        self.chains: dict[str, Chain] = {
            r.name: resolve_chain(settings, r, specs) for r in catalog.routes_of_kind("llm")
        }
        self.watch_load = any(c.policy == "on_overload" for c in self.chains.values())
        # The cloud's breaker probes the key with a request for a model it serves (see Target.probe).
        probe_model = next((r.cloud for r in catalog.routes_of_kind("llm") if r.cloud), "")
        for pool in self.upstreams.values():
            pool.probe_model = probe_model
        self._resolve()

    def policy(self, route: Route) -> str:
        return self.chains[route.name].policy

    @property
    def overloaded(self) -> bool:
        """The box's least busy engine has at least `overload_waiting` requests queued."""
        waiting = self.upstreams["box"].overloaded_at
        return waiting is not None and waiting >= self.settings.overload_waiting

    def _resolve(self) -> None:
        """Each route's upstreams with the model id each serves it under, and one Attempt per URL:
        made again when what the engines serve changes, not for every request."""
        self._resolved: dict[str, list[tuple[Zone, EnginePool, str, dict[Target, Attempt]]]] = {}
        for name, chain in self.chains.items():
            entries = []
            for link in chain.links:
                pool = self.upstreams[link.upstream]
                model = pool.model_for(link.models)
                if model is not None:
                    made = {t: Attempt(t, model, link.defaults) for t in pool.members}
                    entries.append((link.zone, pool, model, made))
            self._resolved[name] = entries

    def candidates(self, route: Route, key_max_zone: Zone | None = None) -> list[Attempt]:
        """Every target the policy allows for a route, in order, breakers and load not considered."""
        return [
            attempt
            for zone, _, _, made in self._resolved[route.name]
            if key_max_zone is None or within(zone, key_max_zone)
            for attempt in made.values()
            if not attempt.target.misconfigured
        ]

    def attempts(
        self, route: Route, session: str | None = None, key_max_zone: Zone | None = None
    ) -> list[Attempt]:
        """The targets to try for one request, in order: each upstream's usable URLs, best first.
        `key_max_zone` is the client key's own ceiling, where it has one."""
        found: list[Attempt] = []
        for zone, pool, model, made in self._resolved[route.name]:
            if key_max_zone is None or within(zone, key_max_zone):
                found += [made[target] for target in pool.ordered(model, session)]
        if self.watch_load and self.chains[route.name].policy == "on_overload" and self.overloaded:
            # The box's queue is long: the farther zones first, the box as the last resort.
            found.sort(key=lambda a: a.target.zone == "box")
        return found

    def context_length(self, route: Route, attempt: Attempt) -> int | None:
        """The context length of a target's model for a route, where known."""
        if attempt.target.is_cloud:
            return route.cloud_context
        return attempt.target.context.get(attempt.model)

    def available(self, route: Route) -> bool:
        """Servable now: a target is allowed, and it is the cloud or an engine that has answered."""
        return any(a.target.is_cloud or a.target.served is not None for a in self.attempts(route))

    # Background: what the engines serve and how loaded they are.

    def _engines(self) -> list[Target]:
        """URLs whose model lists mean something (the cloud lists models an account cannot call)."""
        return [t for pool in self.upstreams.values() if pool.zone != "cloud" for t in pool.members]

    def _gauged(self) -> list[Target]:
        """URLs whose queue the gateway reads: every URL of a pool, and the box when a model spills
        over on overload."""
        return [
            t
            for pool in self.upstreams.values()
            if pool.zone != "cloud" and (len(pool.members) > 1 or (self.watch_load and pool.zone == "box"))
            for t in pool.members
        ]

    async def start(self) -> None:
        await self._refresh_served()  # so /v1/models is right from the first request
        for name, chain in self.chains.items():
            event("model chain", model=name, chain=chain.describe())
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pool in self.upstreams.values():
            for target in pool.members:
                await target.breaker.close()
                await target.pool.close()

    async def _watch(self) -> None:
        tick = 1  # start() has just read the model lists
        gauged = self._gauged()
        while True:
            if tick % SERVED_REFRESH_TICKS == 0 or any(t.served is None for t in self._engines()):
                await self._refresh_served()
            await asyncio.gather(*(t.refresh_load() for t in gauged))
            tick += 1
            await asyncio.sleep(self.settings.overload_poll_interval)

    async def _refresh_served(self) -> None:
        engines = [t for t in self._engines() if t.served is None or t.breaker.allows()]
        changed = await asyncio.gather(*(t.refresh_served() for t in engines))
        for target, news in zip(engines, changed, strict=True):
            if news:
                event("engine models", target=target.label, served=sorted(target.served or ()))
        if any(changed):
            self._resolve()

    def readiness(self) -> dict[str, object]:
        targets = {name: pool.status() for name, pool in self.upstreams.items()}
        ready = any(self.available(r) for r in self.catalog.routes_of_kind("llm"))
        chains = {name: chain.describe() for name, chain in self.chains.items()}
        return {"ready": ready, "overloaded": self.overloaded, "targets": targets, "chains": chains}
