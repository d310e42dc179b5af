"""What the gateway's features share: settings, the catalog, governance, and the hooks each feature
registers (routes served ahead of the framework, readiness, availability, start and stop).

Its own module so that feature modules need not import the app factory that imports them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from starlette.types import ASGIApp

from appliance.catalog import Catalog, Route
from appliance.config import Settings
from appliance.errors import APIError, model_not_found
from appliance.governance import Governance
from appliance.middleware import FastHandler

Check = Callable[[], dict[str, Any]]


@dataclass
class AppState:
    """What the features share. Features register their readiness and availability here."""

    settings: Settings
    catalog: Catalog
    governance: Governance
    started: int = field(default_factory=lambda: int(time.time()))
    http: aiohttp.ClientSession | None = None  # pooled client for the speech NIM (LLM targets: upstream_http)
    # name -> {"ready": bool, ...}; shown on /readyz.
    readiness: dict[str, Check] = field(default_factory=dict)
    # kind ("llm", "stt", "tts") -> whether a route of that kind can be served now.
    availability: dict[str, Callable[[Route], bool]] = field(default_factory=dict)
    # (method, path) -> handler served before the framework's stack (the relay's hot path).
    fast_routes: dict[tuple[str, str], FastHandler] = field(default_factory=dict)
    # name -> an engine one feature owns and another uses ("stt": the SpeechEngine).
    services: dict[str, Any] = field(default_factory=dict)
    startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def add_fast_route(self, app: FastAPI, path: str, handler: FastHandler) -> None:
        """A POST route the gateway layer serves ahead of the framework's stack. The framework knows
        it too, so that other methods get its 405."""
        self.fast_routes[("POST", path)] = handler

        async def endpoint(request: Request) -> ASGIApp:
            return await handler(request.scope, request.receive)

        app.add_route(path, endpoint, methods=["POST"])

    def available(self, route: Route) -> bool:
        check = self.availability.get(route.kind)
        return check is not None and check(route)

    def require_route(self, model: Any, kind: str) -> Route:
        """The route for a request's `model`, or the 4xx that explains why there is none."""
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required and must be a string.", param="model")
        route = self.catalog.route(model)
        if route is None or route.kind != kind:
            raise model_not_found(model)
        return route


def app_state(request: Request) -> AppState:
    return request.app.state.appliance
