"""The ASGI layer every request crosses: request id, client auth, the access log, last-resort errors.

Written as plain ASGI (not Starlette's BaseHTTPMiddleware) because it sits on the hot path.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.errors import APIError
from appliance.log import access, logger
from appliance.metrics import UNAUTHENTICATED, UNMATCHED, record_request, record_tokens

if TYPE_CHECKING:
    from appliance.governance import Governance, Principal

# A hot-path handler: takes the request's scope and receive, returns the response to send (any ASGI app).
FastHandler = Callable[[Scope, Receive], Awaitable[ASGIApp]]
# The console's check of an admin request that carries no key: None lets it through, else the response
# that refuses it (a redirect to sign in, or a 401).
AdminGate = Callable[[Scope, "RequestContext"], ASGIApp | None]

# Paths that need no client key: liveness, readiness and metrics carry no request content, no secret and
# no internal address (/readyz's detail needs the admin key; see app.readyz).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Paths for the admin key only; client keys get 403 there.
ADMIN_PREFIX = "/admin/"
CONSOLE_ROOTS = frozenset({"/", "/admin"})  # redirect to the console


class RequestContext:
    """Per-request facts for the access log; handlers fill in what they learn (model, target, usage)."""

    __slots__ = (
        "audio_seconds",
        "characters",
        "cloud_reason",
        "completion_tokens",
        "estimated_tokens",
        "key_id",
        "model",
        "principal",
        "prompt_tokens",
        "request_id",
        "target",
        "zone",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.key_id: str | None = None
        self.principal: Principal | None = None
        self.model: str | None = None
        self.target: str | None = None
        self.zone: str | None = None  # the data zone of the target that served: box, district, cloud
        self.cloud_reason: str | None = None  # why the cloud served: "failure" or "overload"
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.estimated_tokens = 0  # taken from the key's token bucket up front
        self.audio_seconds = 0.0  # transcribed
        self.characters = 0  # spoken


def request_context(scope: Scope) -> RequestContext:
    return scope["state"]["ctx"]


def request_header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (`name` in lower case, as ASGI gives names)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def bearer_token(scope: Scope) -> str | None:
    scheme, _, token = (request_header(scope, b"authorization") or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


# Browsers cannot set headers on a WebSocket, so OpenAI's clients offer the key as a subprotocol.
KEY_SUBPROTOCOL = "openai-insecure-api-key."


def _subprotocol_key(scope: Scope) -> str | None:
    for protocol in scope.get("subprotocols", ()):
        if protocol.startswith(KEY_SUBPROTOCOL) and len(protocol) > len(KEY_SUBPROTOCOL):
            return protocol[len(KEY_SUBPROTOCOL) :]
    return None


async def deny_websocket(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
    """Refuse a WebSocket upgrade with the error's HTTP status and OpenAI-shaped body where the server
    can send one (uvicorn can), else with a policy-violation close."""
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        headers = [(b"content-type", b"application/json")]
        headers += [(k.encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": error.body()})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})


class RequestIds:
    """Unique, cheap request ids: a random per-process prefix and a counter (no syscall per request)."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(6)
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count:010x}"


class GatewayMiddleware:
    """Wraps the FastAPI app. `fast_routes` ((method, path) -> handler) are served here directly,
    skipping the framework's middleware stack: they are the relay's hot path."""

    def __init__(
        self,
        app: ASGIApp,
        governance: Governance,
        fast_routes: dict[tuple[str, str], FastHandler],
        admin_gate: AdminGate | None = None,
    ) -> None:
        self.app = app
        self.governance = governance
        self.fast_routes = fast_routes
        self.admin_gate = admin_gate
        self.ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        ctx = RequestContext(self.ids.next())
        scope.setdefault("state", {})["ctx"] = ctx
        rid = ctx.request_id.encode()
        status = 0
        refusal: ASGIApp | None = None
        fast: FastHandler | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", rid)]
                principal = ctx.principal
                if principal is not None and principal.allowance.headers:
                    headers += principal.allowance.rate_headers()
                message["headers"] = headers
            await send(message)

        try:
            # Authentication: every path but OPEN_PATHS needs a client key (the admin's under /admin/).
            refusal = self._refusal(scope, ctx)
            fast = self.fast_routes.get((scope["method"], scope["path"]))
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            elif fast is not None:
                try:
                    response = await fast(scope, receive)
                except APIError as exc:
                    response = exc.response()
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            logger.error("unhandled error", exc_info=True, extra={"fields": {"request_id": ctx.request_id}})
            if status == 0:  # nothing sent yet: answer in OpenAI's shape, without internals
                await APIError(500, "Internal error in the appliance gateway.").response()(
                    scope, receive, send_with_id
                )
        finally:
            self._log(scope, ctx, status, started, refusal is not None, fast is not None)
            self.governance.finish(ctx, status)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket upgrade: the same key check as every request, then the app; the session
        writes its own log line when it ends."""
        ctx = RequestContext(self.ids.next())
        scope.setdefault("state", {})["ctx"] = ctx
        error = self._authenticate(scope, ctx, bearer_token(scope) or _subprotocol_key(scope))
        if error is not None:
            await deny_websocket(scope, receive, send, error)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, ctx: RequestContext) -> ASGIApp | None:
        """The response that refuses an HTTP request, or None. An admin path without a key is the
        console's to judge (its session cookie); everything else is the key check's."""
        token = bearer_token(scope)
        if token is None and self.admin_gate is not None and _is_admin_path(scope["path"]):
            return self.admin_gate(scope, ctx)
        error = self._authenticate(scope, ctx, token)
        return None if error is None else error.response()

    def _authenticate(self, scope: Scope, ctx: RequestContext, token: str | None = None) -> APIError | None:
        path = scope["path"]
        if path in OPEN_PATHS:
            return None
        token = token or bearer_token(scope)
        if token is None:
            return APIError(
                401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        if _is_admin_path(path):
            return self._authenticate_admin(token, ctx)
        found = self.governance.authenticate(token)
        if isinstance(found, APIError):
            return found
        ctx.principal = found
        ctx.key_id = found.name
        return None

    def _authenticate_admin(self, token: str, ctx: RequestContext) -> APIError | None:
        if self.governance.is_admin(token):
            ctx.key_id = "admin"
            return None
        if isinstance(self.governance.authenticate(token), APIError):
            return APIError(401, "Incorrect admin key provided.", code="invalid_api_key")
        return APIError(
            403, "This is a client key; the admin API needs the admin key.", code="admin_key_required"
        )

    @staticmethod
    def _log(
        scope: Scope, ctx: RequestContext, status: int, started: float, refused: bool, fast: bool
    ) -> None:
        if scope["path"] in OPEN_PATHS:
            return
        seconds = time.perf_counter() - started
        record_request(_route_label(scope, refused, fast), status, ctx.target, seconds)
        if ctx.model is not None:
            record_tokens(ctx.model, ctx.prompt_tokens, ctx.completion_tokens)
        fields: dict[str, Any] = {
            "request_id": ctx.request_id,
            "key_id": ctx.key_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
        }
        for name in ("model", "target", "zone", "prompt_tokens", "completion_tokens"):
            value = getattr(ctx, name)
            if value is not None:
                fields[name] = value
        access(fields)


def _is_admin_path(path: str) -> bool:
    return path.startswith(ADMIN_PREFIX) or path in CONSOLE_ROOTS


def _route_label(scope: Scope, refused: bool, fast: bool) -> str:
    """The metrics label for a request: its route's path template, never the path the client sent."""
    if refused:
        return UNAUTHENTICATED
    if fast:
        return scope["path"]  # a fast route's path is one the gateway registered
    route = scope.get("route")  # set by the framework's router when a route matched (or only its path)
    return getattr(route, "path", None) or UNMATCHED
