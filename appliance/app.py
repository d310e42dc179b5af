"""The app factory: one FastAPI app, the shared state its features use, and the routes every kind shares."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from appliance import __version__
from appliance.auth import AdminKeys, KeyStore
from appliance.catalog import Catalog, Route, load_catalog
from appliance.config import Settings
from appliance.errors import APIError, model_not_found
from appliance.metrics import exposition
from appliance.middleware import FastHandler, GatewayMiddleware, bearer_token
from appliance.upstreams.chain import effective_catalog

Check = Callable[[], dict[str, Any]]


@dataclass
class AppState:
    """What the features share. Features register their readiness and availability here."""

    settings: Settings
    catalog: Catalog
    keys: KeyStore
    admin_keys: AdminKeys
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


def new_http_client(settings: Settings) -> aiohttp.ClientSession:
    # Idle pooled connections are dropped before the engines' own keep-alive (uvicorn: 5 s) ends
    # them, so a request rarely meets a connection the other side has just closed.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=4)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


def create_app(settings: Settings, keys: KeyStore | None = None) -> GatewayMiddleware:
    """The ASGI app to serve: the gateway layer around the FastAPI app (`.app`)."""
    state = AppState(
        settings=settings,
        catalog=effective_catalog(settings, load_catalog()),
        keys=keys or KeyStore(settings.client_keys, settings.resolved_keys_file),
        admin_keys=AdminKeys.from_keys(settings.admin_keys),  # hashed here; the plain key is not kept
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.http = new_http_client(settings)
        for start in state.startup:
            await start()
        try:
            yield
        finally:
            for stop in reversed(state.shutdown):
                await stop()
            await state.http.close()

    app = FastAPI(title="School AI appliance", version=__version__, lifespan=lifespan, docs_url=None)
    app.state.appliance = state
    _install_common_routes(app, state)
    for install in _feature_installers():
        install(app, state)
    _install_error_handlers(app)
    return GatewayMiddleware(app, keys=state.keys, fast_routes=state.fast_routes)


def _feature_installers() -> list[Callable[[FastAPI, AppState], None]]:
    """Each feature module registers its routes, readiness and background tasks."""
    from appliance import chat, gpu_monitor, realtime, speech, transcription

    # realtime after transcription: it uses the speech-to-text engine that transcription installs.
    return [chat.install, transcription.install, realtime.install, speech.install, gpu_monitor.install]


def _install_common_routes(app: FastAPI, state: AppState) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        # Monitoring needs no key: without one, only ready or not, per service. The detail (engine URLs,
        # model paths, last upstream errors, GPU figures) needs the admin key.
        detail = _admin_authenticated(request, state)
        checks = {name: check() for name, check in state.readiness.items()}
        servable = [r.name for r in state.catalog.routes if state.available(r)]
        ready = bool(servable)
        body: dict[str, Any] = {"status": "ready" if ready else "unavailable"}
        if detail:
            body.update(servable=servable, checks=checks)
        else:
            body["services"] = {name: _ready_word(check) for name, check in checks.items()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    def model_card(route: Route, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.started, "owned_by": "appliance"}

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        data = [
            model_card(r, name)
            for r in state.catalog.routes
            if state.available(r)
            for name in (r.name, *r.aliases)
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        route = state.catalog.route(model_id)
        if route is None or not state.available(route):
            raise model_not_found(model_id)
        return JSONResponse(model_card(route, model_id))


def _ready_word(check: dict[str, Any]) -> str:
    """A service's readiness in one word: `loading` lets a health check wait for a model still loading
    (the compose file starts vLLM only after Whisper holds its memory)."""
    if check.get("ready"):
        return "ready"
    return "loading" if check.get("state") == "loading" else "not ready"


def _admin_authenticated(request: Request, state: AppState) -> bool:
    """Whether the request carries the admin key: False without a key, 401 for any other key."""
    token = bearer_token(request.scope)
    if token is None:
        return False
    if not state.admin_keys.verify(token):
        raise APIError(401, "Incorrect admin key provided.", code="invalid_admin_key")
    return True


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"Invalid '{param}': {first['msg']}." if param else f"Invalid request: {first['msg']}."
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404:
            message = f"Unknown path {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        # The framework's headers carry what HTTP requires with the status (405: Allow).
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()
