"""The admin console over real HTTP: who may see it, sessions, CSRF, the sign-in throttle, TLS cookies,
and that no secret or request content reaches a page. (The browser test drives it in Chromium.)"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import CLOUD_KEY
from tests.console import (
    ADMIN_KEY,
    API_CALLS,
    PAGES,
    admin_api,
    browser,
    console_settings,
    shown_secret,
    sign_in,
    signed_in,
    wait_for,
    working_client,
)
from tests.harness import CLIENT_KEY, Gateway, clean_env, run_appliance, self_signed_certificate

PROMPT = "Pupil Lena Example in class 4b asks about her asthma medication"
CHAT_MODEL = "nvidia/nemotron-mini-4b-instruct"


@pytest.fixture
def console(start_gateway, local_llm):
    return start_gateway(APPLIANCE_LLM_URL=local_llm.base_url, **console_settings())


def forms(name: str) -> list[tuple[str, dict[str, str]]]:
    """Every form the console has (path, fields without the CSRF token), acting on key `name`."""
    return [
        ("/admin/keys", {"name": "made-by-forgery", "tier": "free"}),
        (f"/admin/keys/{name}/rotate", {}),
        (f"/admin/keys/{name}/revoke", {}),
        (f"/admin/keys/{name}/change", {"tier": "free", "all_models": "1"}),
        ("/admin/sign-out", {}),
    ]


def assert_refused(
    client: httpx.Client, headers: dict[str, str] | None = None, api_status: int = 401
) -> None:
    """Every page is refused (a redirect to sign in, or a 403 for a client key), every API call too."""
    for path in PAGES:
        response = client.get(path, headers=headers)
        if api_status == 403:
            assert response.status_code == 403, (path, response.status_code)
            assert response.json()["error"]["code"] == "admin_key_required"
        else:
            assert response.status_code == 303, (path, response.status_code)
            assert response.headers["location"] == "/admin/sign-in"
        assert "<table" not in response.text
    for path in API_CALLS:
        response = client.get(path, headers=headers)
        assert response.status_code == api_status, (path, response.status_code)
        assert response.json()["error"]["type"] in ("authentication_error", "permission_error")


def test_root_redirects_and_nothing_opens_without_a_session_or_with_a_client_key(console):
    anonymous = browser(console)
    for root in ("/", "/admin"):
        response = anonymous.get(root)
        assert response.status_code == 307 and response.headers["location"] == "/admin/"
    assert_refused(anonymous)
    assert_refused(anonymous, {"Authorization": f"Bearer {CLIENT_KEY}"}, api_status=403)
    for path, fields in forms("env-1"):
        response = anonymous.post(path, data={**fields, "csrf": "x"})
        assert response.status_code == 303 and response.headers["location"] == "/admin/sign-in"
    # A client key does not sign in; the admin key does (and the bearer admin key reads the API).
    refused = sign_in(console, CLIENT_KEY)
    assert refused.status_code == 401 and "not the admin key" in refused.text
    assert "appliance_session" not in refused.headers.get("set-cookie", "")
    assert [k["name"] for k in admin_api(console, "/admin/api/keys")] == []


def test_a_session_opens_every_page_until_sign_out_ends_it_on_the_server(console):
    client, csrf = signed_in(console)
    cookie = client.cookies["appliance_session"]
    set_cookie = sign_in(console).headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and "Secure" not in set_cookie
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        if not path.endswith(".csv"):
            assert response.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in response.headers["content-security-policy"]
            assert '<main id="main"' in response.text
    for path in API_CALLS:
        assert client.get(path).status_code == 200
    # The session's token guards the admin API's state-changing methods too.
    assert client.post("/admin/api/keys").status_code == 403
    assert client.post("/admin/api/keys", headers={"X-CSRF-Token": csrf}).status_code == 405

    out = client.post("/admin/sign-out", data={"csrf": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/admin/sign-in"
    replay = browser(console)  # the old cookie, sent again after sign-out
    replay.cookies.set("appliance_session", cookie)
    assert_refused(replay)


def test_every_form_refuses_a_missing_or_wrong_csrf_token_and_changes_nothing(console):
    client, csrf = signed_in(console)
    made = client.post("/admin/keys", data={"name": "reader", "tier": "standard", "csrf": csrf})
    assert made.status_code == 200
    secret = shown_secret(made.text)
    for path, fields in forms("reader"):
        for token in (None, "wrong-token", csrf[:-2]):
            data = fields if token is None else {**fields, "csrf": token}
            response = client.post(path, data=data)
            assert response.status_code == 403, (path, token, response.status_code)
            assert "security token" in response.text
    keys = admin_api(console, "/admin/api/keys")
    assert [(k["name"], k["tier"], k["revoked"]) for k in keys] == [("reader", "standard", None)]
    wait_for(lambda: working_client(console, secret))  # the secret still works
    assert client.get("/admin/").status_code == 200  # and sign-out did not happen
    # The sign-in form's own token: missing or wrong, no session.
    for token in ("", "wrong"):
        response = browser(console).post(
            "/admin/sign-in", data={"sign_in_token": token, "admin_key": ADMIN_KEY}
        )
        assert response.status_code == 403 and "appliance_session" not in response.headers.get(
            "set-cookie", ""
        )


def test_keys_change_tier_and_models_and_every_change_is_audited_with_the_cli_s(console, tmp_path):
    client, csrf = signed_in(console)
    created = client.post("/admin/keys", data={"name": "quiz", "app": "quiz", "csrf": csrf})
    secret = shown_secret(created.text)
    changed = client.post(
        "/admin/keys/quiz/change",
        data={"tier": "free", "models": CHAT_MODEL, "all_models": "1", "csrf": csrf},
    )
    assert changed.status_code == 303 and changed.headers["location"] == "/admin/keys"
    (key,) = admin_api(console, "/admin/api/keys")
    assert (key["tier"], key["models"], key["app"]) == ("free", [CHAT_MODEL], "quiz")
    app = wait_for(lambda: working_client(console, secret))
    with pytest.raises(openai.PermissionDeniedError):  # the change is in force at once
        app.chat.completions.create(
            model="nvidia/nemotron-3-nano-30b-a3b", messages=[{"role": "user", "content": "x"}]
        )
    bad = client.post("/admin/keys/quiz/change", data={"tier": "platinum", "csrf": csrf})
    assert bad.status_code == 400 and "unknown tier" in bad.text
    # A change from the command line shows in the same audit list.
    env = clean_env(APPLIANCE_DATA_DIR=console.env["APPLIANCE_DATA_DIR"])
    assert run_appliance("keys", "revoke", "quiz", env=env).returncode == 0
    rows = re.findall(
        r"<tr><td>[^<]+</td><td>([^<]+)</td><td>(\w+)</td><td>quiz</td>", client.get("/admin/keys").text
    )
    assert [action for _, action in rows] == ["revoke", "change", "create"]
    assert rows[0][0].startswith("appliance keys (user ") and rows[1][0] == "admin console (127.0.0.1)"


def test_privacy_and_usage_show_what_went_to_the_cloud_and_why(start_gateway, cloud_llm):
    # The local engine is down (nothing listens there): chat goes to the cloud, as the policy allows.
    gw = start_gateway(
        NVIDIA_NIM_BASE_URL=cloud_llm.base_url,
        NVIDIA_NIM_API_KEY=CLOUD_KEY,
        APPLIANCE_MODELS='{"nvidia/nemotron-3-nano-30b-a3b": {"cloud_fallback": "never"}}',
        **console_settings(),
    )
    app = gw.client()
    wait_for(lambda: any(m.id == CHAT_MODEL for m in app.models.list().data))
    app.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": PROMPT}])
    wait_for(lambda: admin_api(gw, "/admin/api/usage"))
    client, _ = signed_in(gw)
    privacy = client.get("/admin/privacy").text
    rows = {
        cells[0]: cells[1:]
        for cells in (
            re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)
            for row in re.findall(r"<tr>(.*?)</tr>", privacy.split('id="policy-table"')[1], re.S)
        )
        if cells
    }
    chat = rows[CHAT_MODEL]
    assert '"badge warn">yes<' in chat[1] and "only when the box cannot serve it" in chat[2]
    assert chat[3:] == ["1", "1 (1 / 0)"]  # one request, sent to the cloud because the box failed
    assert '"badge ok">no<' in rows["nvidia/nemotron-3-nano-30b-a3b"][1]  # this model's policy: never
    speech = [cells for cells in rows.values() if cells[0] in ("speech-to-text", "text-to-speech")]
    assert speech and all("Never leaves the box" in cells[2] for cells in speech)  # audio stays here
    assert "kept for <strong>365 days</strong>" in privacy
    usage = client.get("/admin/usage").text
    assert "<strong>0.0 %</strong> on the box" in usage and "<strong>100.0 %</strong> by NVIDIA" in usage
    assert "1 because the box failed" in usage and PROMPT not in privacy + usage
    overview = client.get("/admin/").text
    assert "Available at" in overview and "The local engine" in overview


def test_an_expired_session_is_refused(start_gateway, local_llm):
    gw = start_gateway(
        APPLIANCE_LLM_URL=local_llm.base_url, **console_settings(APPLIANCE_ADMIN_SESSION_MINUTES="0.05")
    )
    client, _ = signed_in(gw)
    max_age = sign_in(gw).headers["set-cookie"].split("Max-Age=")[1].split(";")[0]
    assert max_age == "3"
    wait_for(lambda: client.get("/admin/").status_code == 303, timeout=10)
    assert_refused(client)


def test_failed_sign_ins_are_throttled_and_logged_without_the_key(console):
    tried = [f"sk-appliance-admin-guess-{n}" for n in range(5)]
    for guess in tried:
        assert sign_in(console, guess).status_code == 401
    throttled = sign_in(console)  # even the right key waits now
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    assert "Too many failed sign-ins" in throttled.text
    logs = console.logs()
    assert logs.count('"event":"admin sign-in failed"') == 5
    assert '"event":"admin sign-in refused"' in logs
    assert not any(guess in logs for guess in tried) and ADMIN_KEY not in logs


def test_no_secret_and_no_request_content_in_any_page(console):
    client, csrf = signed_in(console)
    made = client.post(
        "/admin/keys",
        data={"name": "quiz", "school": "Lindenschule", "group": "4b", "app": "quiz", "csrf": csrf},
    )
    secret = shown_secret(made.text)
    assert secret.startswith("sk-appliance-") and made.headers["cache-control"] == "no-store"
    app = wait_for(lambda: working_client(console, secret))
    app.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": PROMPT}])
    wait_for(lambda: any(r["key"] == "quiz" for r in admin_api(console, "/admin/api/usage")))

    pages = {}
    for path in (
        *PAGES,
        *API_CALLS,
        "/admin/usage?by=group",
        "/admin/usage.csv?by=day",
        "/admin/api/usage?by=group",
    ):
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        pages[path] = response.text
    session = client.cookies["appliance_session"]
    for path, body in pages.items():
        for secret_text in (secret, ADMIN_KEY, CLIENT_KEY, session, *PROMPT.split()[1:3], "asthma"):
            assert secret_text not in body, (path, secret_text)
    rows = list(csv.DictReader(io.StringIO(pages["/admin/usage.csv"])))
    assert [(r["key"], r["requests"], r["served_box"]) for r in rows] == [("quiz", "1", "1")]
    assert "Lindenschule" in pages["/admin/usage?by=school"] and "4b" in pages["/admin/usage?by=group"]
    # The audit list names the action and the key, never the secret.
    assert "create" in pages["/admin/keys"] and "school=Lindenschule" in pages["/admin/keys"]


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


def test_the_session_cookie_is_secure_over_tls(tmp_path, certificate, monkeypatch):
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # this test trusts the appliance's certificate
    env = clean_env(APPLIANCE_DATA_DIR=str(tmp_path / "data"), **console_settings())
    gw = Gateway(env, tmp_path / "tls.log", ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key)))
    gw.url = gw.url.replace("http://", "https://")
    try:
        gw.start()
        response = sign_in(gw)
        assert response.status_code == 303
        assert "Secure" in response.headers["set-cookie"] and "HttpOnly" in response.headers["set-cookie"]
    finally:
        gw.stop()
