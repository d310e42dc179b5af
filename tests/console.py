"""The admin console as a browser without JavaScript meets it: sign-in, pages, forms (over httpx)."""

from __future__ import annotations

import re
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import openai

from tests.harness import CLIENT_KEY, Gateway

ADMIN_KEY = "sk-appliance-admin-test-0123456789abcdef"
PAGES = (
    "/admin/",
    "/admin/usage",
    "/admin/usage?by=school",
    "/admin/usage.csv",
    "/admin/keys",
    "/admin/privacy",
)
API_CALLS = ("/admin/api/usage", "/admin/api/keys", "/admin/api/health")
T = TypeVar("T")


def console_settings(**extra: str) -> dict[str, str]:
    """A gateway with an admin key and a client key, writing its ledger often."""
    return {
        "APPLIANCE_ADMIN_KEY": ADMIN_KEY,
        "APPLIANCE_API_KEYS": CLIENT_KEY,
        "APPLIANCE_USAGE_FLUSH_INTERVAL": "0.3",
        **extra,
    }


def hidden(html: str, name: str) -> str:
    """The value of a form's hidden field."""
    found = re.search(rf'name="{name}" value="([^"]+)"', html)
    assert found, f"no {name} field in the page"
    return found.group(1)


def shown_secret(html: str) -> str:
    """The new secret on the page that shows it once."""
    found = re.search(r'id="secret"[^>]*value="([^"]+)"', html)
    assert found, "no secret on the page"
    return found.group(1)


def browser(gw: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gw.url, timeout=30, follow_redirects=False)


def sign_in(gw: Gateway, key: str = ADMIN_KEY, client: httpx.Client | None = None) -> httpx.Response:
    """Open the sign-in form and send it with `key`, as a browser does (cookies kept in the client)."""
    client = client or browser(gw)
    form = client.get("/admin/sign-in")
    assert form.status_code == 200, form.text
    return client.post(
        "/admin/sign-in", data={"sign_in_token": hidden(form.text, "sign_in_token"), "admin_key": key}
    )


def signed_in(gw: Gateway) -> tuple[httpx.Client, str]:
    """A client with a live session, and the session's CSRF token."""
    client = browser(gw)
    response = sign_in(gw, client=client)
    assert response.status_code == 303 and response.headers["location"] == "/admin/", response.text
    page = client.get("/admin/keys")
    assert page.status_code == 200
    return client, hidden(page.text, "csrf")


def wait_for(check: Callable[[], T], timeout: float = 20, every: float = 0.3) -> T:
    """Poll until `check` returns something true (the ledger writes in batches), within a bound."""
    deadline = time.monotonic() + timeout
    result = check()
    while not result and time.monotonic() < deadline:
        time.sleep(every)
        result = check()
    assert result, f"not true within {timeout} s"
    return result


def working_client(gw: Gateway, secret: str) -> openai.OpenAI | None:
    """An SDK client with `secret`, once the gateway knows the key (changes reach it within seconds)."""
    app = gw.client(api_key=secret)
    try:
        app.models.list()
    except openai.AuthenticationError:
        return None
    return app


def admin_api(gw: Gateway, path: str) -> Any:
    response = httpx.get(gw.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def png_colours(data: bytes, limit: int = 16) -> set[bytes]:
    """Distinct pixel colours of an 8-bit RGB(A) PNG (a browser's screenshot), up to `limit`: enough to
    tell a rendered page from a blank one without an imaging library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, pos = {}, 8
    while pos < len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        kind = data[pos + 4 : pos + 8]
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and colour_type in (2, 6), (depth, colour_type)
    size = 4 if colour_type == 6 else 3
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = width * size
    previous = bytearray(stride)
    colours: set[bytes] = set()
    for y in range(height):
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):  # undo the row's filter (PNG spec, section 9)
            left = row[i - size] if i >= size else 0
            up = previous[i]
            corner = previous[i - size] if i >= size else 0
            if kind == 1:
                row[i] = (row[i] + left) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + up) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                row[i] = (row[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        previous = row
        if y % 8 == 0:
            colours.update(bytes(row[x : x + 3]) for x in range(0, stride, size * 4))
            if len(colours) >= limit:
                break
    return colours
