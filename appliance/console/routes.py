"""The console's routes under `/admin/`: sign-in and sign-out, the four pages, the usage CSV, the key
actions, and the static assets. The gate (`console.gate`) has already let each request through.

Every page is rendered on the server; database reads run on a worker thread. Every form carries the
session's CSRF token (the sign-in form, a token of its own in a SameSite=Strict cookie).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse, RedirectResponse, Response

from appliance import __version__
from appliance.console import views
from appliance.console.charts import figure, usage_charts
from appliance.console.gate import SIGN_IN_PATH, STATIC_PREFIX, ConsoleGate, cookie, session_of
from appliance.console.sessions import COOKIE, SIGN_IN_COOKIE, Sessions, SignInThrottle, tokens_match
from appliance.governance.keyadmin import change_key, create_key, key_fields, revoke_key, rotate_key
from appliance.governance.keys import KeyInputError
from appliance.governance.store import Store
from appliance.log import event
from appliance.middleware import CONSOLE_ROOTS
from appliance.state import AppState

HERE = Path(__file__).parent
MAX_FORM_BYTES = 16 * 1024  # the largest form (a new key with every model ticked) is far smaller
# Pages never leave the appliance's own origin, run no inline script, and are never framed or cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


class FormError(Exception):
    """A form the console cannot take: the page says why (status 400, 403, 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["figure"] = figure
    env.filters["when"] = views.when_text
    return env


def static_files() -> dict[str, tuple[bytes, str]]:
    """The console's CSS and JavaScript, read once: name -> (body, content type)."""
    found = (HERE / "static").iterdir()
    return {p.name: (p.read_bytes(), STATIC_TYPES[p.suffix]) for p in found if p.suffix in STATIC_TYPES}


async def read_form(request: Request) -> dict[str, list[str]]:
    """A url-encoded form, read up to MAX_FORM_BYTES (a sign-in attempt costs the same whatever is sent)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormError(413, "The form is too large.")
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def field(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class Console:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.sessions = Sessions(state.settings.admin_session_minutes * 60)
        self.throttle = SignInThrottle()
        self.env = templates()
        self.static = static_files()
        self.reports = views.UsageReports(Store(state.governance.store.path))

    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        session = session_of(request.scope)
        html = self.env.get_template(template).render(
            csrf=session.csrf if session else None,
            path=request.url.path,
            version=__version__,
            **context,
        )
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    async def checked_form(self, request: Request) -> dict[str, list[str]]:
        """The form of a signed-in admin, its CSRF token checked."""
        form = await read_form(request)
        session = session_of(request.scope)
        if session is None or not tokens_match(field(form, "csrf"), session.csrf):
            raise FormError(403, "The form's security token is missing or wrong; reload the page, try again.")
        return form

    async def refresh_reports(self) -> None:
        """Sum the usage of earlier days ahead of the pages that show it (at start, then now and then)."""
        while True:
            try:
                await asyncio.to_thread(self.reports.refresh)
            except sqlite3.Error as exc:  # the governance layer reports the database's state
                event("console usage sums not refreshed", level=30, error=str(exc))
            await asyncio.sleep(views.SETTLED_REFRESH)

    def actor(self, request: Request) -> str:
        return f"admin console ({client_address(request)})"

    # Sign-in and sign-out.

    def sign_in_page(self, request: Request, status: int = 200, error: str | None = None) -> HTMLResponse:
        token = secrets.token_urlsafe(32)
        response = self.page(request, "sign_in.html", status, sign_in_token=token, error=error)
        self.set_cookie(request, response, SIGN_IN_COOKIE, token, max_age=600)
        return response

    def set_cookie(self, request: Request, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/admin/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    async def sign_in(self, request: Request) -> Response:
        client = client_address(request)
        wait = self.throttle.wait(client)
        if wait > 0:
            event("admin sign-in refused", level=30, client=client, reason="too many failures")
            seconds = int(wait) + 1
            response = self.sign_in_page(request, 429, f"Too many failed sign-ins; try again in {seconds} s.")
            response.headers["Retry-After"] = str(seconds)
            return response
        form = await read_form(request)
        if not tokens_match(field(form, "sign_in_token"), cookie(request.scope, SIGN_IN_COOKIE) or "\0"):
            return self.sign_in_page(request, 403, "The sign-in form expired; please try again.")
        if not self.state.governance.is_admin((field(form, "admin_key") or "").strip()):
            self.throttle.failed(client)
            event("admin sign-in failed", level=30, client=client)  # never the key that was tried
            return self.sign_in_page(request, 401, "That is not the admin key.")
        session_id, _ = self.sessions.create(client)
        event("admin signed in", client=client)
        response = RedirectResponse("/admin/", status_code=303, headers={"Cache-Control": "no-store"})
        self.set_cookie(request, response, COOKIE, session_id, max_age=int(self.sessions.lifetime))
        response.delete_cookie(SIGN_IN_COOKIE, path="/admin/", httponly=True, samesite="strict")
        return response

    async def sign_out(self, request: Request) -> Response:
        await self.checked_form(request)
        self.sessions.end(cookie(request.scope, COOKIE))
        event("admin signed out", client=client_address(request))
        response = RedirectResponse(SIGN_IN_PATH, status_code=303, headers={"Cache-Control": "no-store"})
        response.delete_cookie(COOKIE, path="/admin/", httponly=True, samesite="strict")
        return response

    # Key actions.

    async def key_action(self, request: Request, name: str, action: str) -> Response:
        form = await self.checked_form(request)
        try:
            response = await self.change_keys(request, form, name, action)
        except KeyInputError as exc:
            data = await asyncio.to_thread(views.keys, self.state)
            return self.page(request, "keys.html", 400, error=str(exc), **data)
        await asyncio.to_thread(self.state.governance.reload_keys)  # in force before the page shows
        return response

    async def change_keys(
        self, request: Request, form: dict[str, list[str]], name: str, action: str
    ) -> Response:
        """Do a key action; the page with a new secret, or a redirect to the keys."""
        store, actor = self.state.governance.store, self.actor(request)
        if action == "create":
            fields = self.fields_from(form, creating=True)
            name = (field(form, "name") or "").strip()
            record, secret = await asyncio.to_thread(create_key, store, name, fields, actor)
            return self.secret_page(request, record.name, secret, "created")
        if action == "rotate":
            secret = await asyncio.to_thread(rotate_key, store, name, actor)
            if secret is None:
                raise KeyInputError(f"no active key named '{name}'")
            return self.secret_page(request, name, secret, "rotated")
        if action == "revoke":
            if not await asyncio.to_thread(revoke_key, store, name, actor):
                raise KeyInputError(f"no active key named '{name}'")
        else:  # change
            fields = self.fields_from(form, creating=False)
            if await asyncio.to_thread(change_key, store, name, fields, actor) is None:
                raise KeyInputError(f"no active key named '{name}'")
        return RedirectResponse("/admin/keys", status_code=303)

    def fields_from(self, form: dict[str, list[str]], creating: bool) -> dict[str, Any]:
        """Key fields from a form: empty labels are left out; no model ticked means every model."""
        labels = {name: (field(form, name) or "").strip() or None for name in ("school", "group", "app")}
        models = form.get("models") or []
        fields = key_fields(
            self.state.settings,
            tier=field(form, "tier") or None,
            models=models or None,
            max_zone=field(form, "max_zone") or None,
            expires=field(form, "expires") or None,
            catalog=self.state.catalog,
            **(labels if creating else {}),
        )
        if not creating and field(form, "all_models") is not None and not models:
            fields["models"] = None
        return fields

    def secret_page(self, request: Request, name: str, secret: str, what: str) -> HTMLResponse:
        return self.page(request, "key_secret.html", name=name, secret=secret, what=what)


def install(app: FastAPI, state: AppState) -> ConsoleGate:
    """The console's routes; returns the gate the gateway layer asks about unauthenticated admin requests."""
    console = Console(state)

    def get(path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return app.get(path, include_in_schema=False)

    def post(path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return app.post(path, include_in_schema=False)

    async def to_console() -> Response:
        return RedirectResponse("/admin/", status_code=307)

    for root in CONSOLE_ROOTS:
        app.add_api_route(root, to_console, methods=["GET"], include_in_schema=False)

    @get(SIGN_IN_PATH)
    async def sign_in_form(request: Request) -> Response:
        if console.sessions.get(cookie(request.scope, COOKIE)) is not None:
            return RedirectResponse("/admin/", status_code=303)
        return console.sign_in_page(request)

    @post(SIGN_IN_PATH)
    async def sign_in(request: Request) -> Response:
        return await console.sign_in(request)

    @post("/admin/sign-out")
    async def sign_out(request: Request) -> Response:
        return await console.sign_out(request)

    @get("/admin/")
    async def overview(request: Request) -> Response:
        return console.page(request, "overview.html", **views.overview(state))

    @get("/admin/usage")
    async def usage(request: Request, by: str = "key") -> Response:
        by = by if by in views.TABLE_GROUPS else "key"
        data = await asyncio.to_thread(views.usage, console.reports, by)
        charts = usage_charts(data["daily"])
        return console.page(request, "usage.html", charts=charts, groups=views.TABLE_GROUPS, **data)

    @get("/admin/usage.csv")
    async def usage_csv(request: Request, by: str = "key") -> Response:
        by = by if by in {*views.TABLE_GROUPS, "day"} else "key"
        rows = await asyncio.to_thread(console.reports.report, by)
        out = io.StringIO()
        columns = [by, *views.CSV_COLUMNS]
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        filename = f"usage-by-{by}-{views.usage_window()[0]}.csv"
        headers = {**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{filename}"'}
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)

    @get("/admin/keys")
    async def keys(request: Request) -> Response:
        return console.page(request, "keys.html", **await asyncio.to_thread(views.keys, state))

    @post("/admin/keys")
    async def create(request: Request) -> Response:
        return await console.key_action(request, "", "create")

    @post("/admin/keys/{name}/{action}")
    async def change(request: Request, name: str, action: str) -> Response:
        if action not in ("rotate", "revoke", "change"):
            return console.page(request, "error.html", 404, message=f"Unknown key action '{action}'.")
        return await console.key_action(request, name, action)

    @get("/admin/privacy")
    async def privacy(request: Request) -> Response:
        return console.page(
            request, "privacy.html", **await asyncio.to_thread(views.privacy, state, console.reports)
        )

    @get(STATIC_PREFIX + "{name}")
    async def static(name: str) -> Response:
        found = console.static.get(name)
        if found is None:
            return Response(b"not found", status_code=404, media_type="text/plain")
        body, content_type = found
        headers = {"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"}
        return Response(body, media_type=content_type, headers=headers)

    @app.exception_handler(FormError)
    async def form_error(request: Request, exc: FormError) -> Response:
        return console.page(request, "error.html", exc.status, message=str(exc))

    refresher: list[asyncio.Task[None]] = []

    async def start() -> None:
        refresher.append(asyncio.get_running_loop().create_task(console.refresh_reports()))

    async def stop() -> None:
        for task in refresher:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        console.reports.store.close()

    state.startup.append(start)
    state.shutdown.append(stop)
    return ConsoleGate(console.sessions)
