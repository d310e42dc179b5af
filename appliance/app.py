"""The app factory: one FastAPI app, the shared state its features use, and the routes every kind shares."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from appliance import __version__
from appliance.catalog import Route, load_catalog
from appliance.config import Settings
from appliance.console import routes as console_routes
from appliance.errors import APIError, model_not_found
from appliance.governance import Governance
from appliance.metrics import exposition
from appliance.middleware import GatewayMiddleware, bearer_token
from appliance.state import AppState
from appliance.upstreams.chain import effective_catalog


def new_http_client(settings: Settings) -> aiohttp.ClientSession:
    # Idle pooled connections are dropped before the engines' own keep-alive (uvicorn: 5 s) ends
    # them, so a request rarely meets a connection the other side has just closed.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=4)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


def create_app(settings: Settings, governance: Governance | None = None) -> GatewayMiddleware:
    """The ASGI app to serve: the gateway layer around the FastAPI app (`.app`). Raises StoreError when
    the governance database cannot be used."""
    state = AppState(
        settings=settings,
        catalog=effective_catalog(settings, load_catalog()),
        governance=governance or Governance.open(settings),
    )
    state.readiness["governance"] = state.governance.readiness
    state.startup.append(state.governance.start)

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
            await state.governance.stop()  # last: the ledger counts every request that finished

    app = FastAPI(title="School AI appliance", version=__version__, lifespan=lifespan, docs_url=None)
    app.state.appliance = state
    _install_common_routes(app, state)
    for install in _feature_installers():
        install(app, state)
    admin_gate = console_routes.install(app, state)
    _install_error_handlers(app)
    return GatewayMiddleware(
        app, governance=state.governance, fast_routes=state.fast_routes, admin_gate=admin_gate
    )


def _feature_installers() -> list[Callable[[FastAPI, AppState], None]]:
    """Each feature module registers its routes, readiness and background tasks."""
    from appliance import chat, gpu_monitor, realtime, speech, transcription
    from appliance.governance import admin_api

    # realtime after transcription: it uses the speech-to-text engine that transcription installs.
    return [
        chat.install,
        transcription.install,
        realtime.install,
        speech.install,
        gpu_monitor.install,
        admin_api.install,
    ]


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
    if not state.governance.is_admin(token):
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
