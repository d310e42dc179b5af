"""Who may see the console: the gateway layer asks here about every `/admin/` request that carries no
key. The sign-in page and the static assets are open; everything else needs a live session, and a
state-changing admin API call also its CSRF token (`X-CSRF-Token`). Console forms carry theirs in the
form, checked by the route that reads it."""

from __future__ import annotations

from starlette.requests import cookie_parser
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Scope

from appliance.console.sessions import COOKIE, Session, Sessions, tokens_match
from appliance.errors import APIError
from appliance.middleware import CONSOLE_ROOTS, RequestContext, request_header

SIGN_IN_PATH = "/admin/sign-in"
STATIC_PREFIX = "/admin/static/"
API_PREFIX = "/admin/api/"
OPEN_PATHS = CONSOLE_ROOTS | {SIGN_IN_PATH}
SAFE_METHODS = frozenset({"GET", "HEAD"})


def cookie(scope: Scope, name: str) -> str | None:
    header = request_header(scope, b"cookie")
    return cookie_parser(header).get(name) if header else None


def session_of(scope: Scope) -> Session | None:
    """The session the gate let through, for a route that needs its CSRF token."""
    return scope["state"].get("session")


class ConsoleGate:
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def __call__(self, scope: Scope, ctx: RequestContext) -> ASGIApp | None:
        path = scope["path"]
        if path in OPEN_PATHS or path.startswith(STATIC_PREFIX):
            return None
        session = self.sessions.get(cookie(scope, COOKIE))
        api = path.startswith(API_PREFIX)
        if session is None:
            if api:
                return APIError(
                    401,
                    "Sign in to the console, or send 'Authorization: Bearer <admin key>'.",
                    code="missing_api_key",
                ).response()
            return RedirectResponse(SIGN_IN_PATH, status_code=303, headers={"Cache-Control": "no-store"})
        csrf = request_header(scope, b"x-csrf-token")
        if api and scope["method"] not in SAFE_METHODS and not tokens_match(csrf, session.csrf):
            return APIError(403, "Missing or wrong CSRF token.", code="csrf_token_invalid").response()
        ctx.key_id = "admin"
        scope["state"]["session"] = session
        return None
