"""The effective chain per public model: which upstreams it may use, nearest zone first, as far as the
school's policy allows. Pure functions of the settings and the catalog, so that the start-up log,
`appliance doctor` and the gateway all read the same answer.

A model's ceiling is the strictest of: its `max_zone`, its `cloud_fallback` (`never` = `box`), and,
per request, the client key's own ceiling (`Chain.links_within(key_max_zone)`): a key may be stricter
than the model, never looser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.catalog import Catalog, Route
from appliance.upstreams.zones import ZONES, Zone, ceiling_of_policy, nearest, within

if TYPE_CHECKING:
    from appliance.config import Settings


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream as configured (YAML, or the defaults from today's variables)."""

    name: str
    zone: Zone
    urls: tuple[str, ...]
    api_key: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    connect_timeout: float | None = None
    first_byte_timeout: float | None = None
    health_path: str = "models"


DEFAULT_HEALTH = {"box": "/health", "district": "models", "cloud": "models"}


def upstream_specs(settings: Settings) -> dict[str, UpstreamSpec]:
    """Every usable upstream: `box` from APPLIANCE_LLM_URL and `cloud` from NVIDIA_NIM_* unless the
    file declares them, then the file's. The cloud exists only with a key."""
    box = UpstreamSpec("box", "box", tuple(settings.llm_urls), health_path=DEFAULT_HEALTH["box"])
    specs = {"box": box}
    nim_key = settings.nvidia_nim_api_key.get_secret_value() if settings.nvidia_nim_api_key else None
    if nim_key:
        specs["cloud"] = UpstreamSpec("cloud", "cloud", (settings.nvidia_nim_base_url,), nim_key)
    for name, u in settings.upstreams.items():
        key = u.api_key() or (nim_key if name == "cloud" else None)
        if u.zone == "cloud" and not key:
            specs.pop(name, None)  # a cloud upstream without a key cannot serve: as today
            continue
        specs[name] = UpstreamSpec(
            name,
            u.zone,
            tuple(u.urls),
            key,
            str(u.ca_file) if u.ca_file else None,
            u.connect_timeout,
            u.first_byte_timeout,
            u.health_path or DEFAULT_HEALTH[u.zone],
        )
    return specs


def effective_catalog(settings: Settings, catalog: Catalog) -> Catalog:
    """The catalog with the file's `routes:` added; a route of the same name replaces the catalog's."""
    if not settings.routes:
        return catalog
    added = {
        r.name: Route(
            name=r.name,
            kind=r.kind,
            aliases=tuple(r.aliases),
            local_defaults=dict(r.local_defaults),
            targets=tuple((t.upstream, t.model) for t in r.targets),
        )
        for r in settings.routes
    }
    kept = tuple(r for r in catalog.routes if r.name not in added)
    return Catalog(routes=kept + tuple(added.values()), models=catalog.models)


@dataclass(frozen=True)
class Link:
    """One upstream in a model's chain, and the model ids it may know the public name by (best first)."""

    upstream: str
    zone: Zone
    models: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Chain:
    """A model's upstreams, nearest zone first, already cut at the model's ceiling."""

    route: str
    policy: str  # when to leave the box: never, on_failure, on_overload
    ceiling: Zone
    links: tuple[Link, ...]
    refused: tuple[str, ...] = ()  # upstreams the route names that the ceiling forbids

    def links_within(self, key_max_zone: Zone | None = None) -> tuple[Link, ...]:
        """The links a request may use under its key's ceiling (None: the model's own ceiling)."""
        if key_max_zone is None or within(self.ceiling, key_max_zone):
            return self.links
        return tuple(link for link in self.links if within(link.zone, key_max_zone))

    def describe(self) -> str:
        path = " -> ".join(f"{link.upstream} ({link.zone})" for link in self.links) or "nothing"
        return f"{path}; up to {self.ceiling}, {self.policy}"


def route_links(route: Route, specs: dict[str, UpstreamSpec]) -> list[Link]:
    """Every upstream a route could use, before policy, nearest zone first (stable within a zone)."""
    if route.targets:
        by_upstream: dict[str, list[str]] = {}
        for upstream, model in route.targets:
            by_upstream.setdefault(upstream, []).append(model)
        links = [
            Link(name, specs[name].zone, tuple(models), route.local_defaults)
            for name, models in by_upstream.items()
            if name in specs
        ]
    else:
        # Catalog routes: the box and the district serve the catalog's model ids (a district that
        # deploys them under other ids says so in `routes:`); the cloud its own id.
        links = []
        for spec in specs.values():
            if spec.zone == "cloud":
                if route.cloud is not None:
                    links.append(Link(spec.name, "cloud", (route.cloud,)))
            elif route.local:
                links.append(Link(spec.name, spec.zone, route.local, route.local_defaults))
    return sorted(links, key=lambda link: ZONES.index(link.zone))


def model_ceiling(settings: Settings, route: Route) -> tuple[str, Zone]:
    """(cloud_fallback policy, farthest zone) for one public model."""
    policy = settings.fallback_policy(route.name, "on_failure")
    override = settings.models.get(route.name)
    return policy, nearest(ceiling_of_policy(policy), override.max_zone if override else None)


def resolve_chain(settings: Settings, route: Route, specs: dict[str, UpstreamSpec]) -> Chain:
    policy, ceiling = model_ceiling(settings, route)
    links = route_links(route, specs)
    allowed = tuple(link for link in links if within(link.zone, ceiling))
    refused = tuple(link.upstream for link in links if not within(link.zone, ceiling))
    return Chain(route.name, policy, ceiling, allowed, refused)


def resolve_chains(settings: Settings, catalog: Catalog) -> dict[str, Chain]:
    """The chain of every LLM route (by public name) of an effective catalog."""
    specs = upstream_specs(settings)
    return {r.name: resolve_chain(settings, r, specs) for r in catalog.routes_of_kind("llm")}
