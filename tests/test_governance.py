"""Keys with owners and tiers, limits and quotas, the cloud budget and the usage ledger, through the real
CLI (`appliance keys`, `usage`, `admin-key`) and the real gateway, with the openai SDK as the client."""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import CLOUD_KEY
from tests.harness import Gateway, clean_env, run_appliance
from tests.sims.magpie_nim import MagpieNIM
from tests.stt_audio import make_audio
from tests.stt_gateway import start_stt_gateway
from tests.whisper_model import build_tiny_whisper

TIER1 = "nvidia/nemotron-mini-4b-instruct"
TIER2 = "nvidia/nemotron-3-nano-30b-a3b"
MESSAGES = [{"role": "user", "content": "Chek my sentense please, Tobias."}]
CONTENT_MARK = "Tobias"  # request content that must never reach the database

Rows = list[dict[str, Any]]
TIERS = """
tiers:
  class: {requests_per_minute: 3}
  slow: {requests_per_minute: 12}
  tokens: {tokens_per_minute: 1000}
  daily: {tokens_per_day: 30}
  monthly: {tokens_per_month: 30}
  speech: {characters_per_minute: 100}
  dictation: {audio_seconds_per_minute: 10}
"""


class Admin:
    """An admin at the appliance: one data directory and configuration, the `appliance` command."""

    def __init__(self, root: Path, config: str = TIERS) -> None:
        self.data = root / "data"
        self.config = root / "appliance.yaml"
        self.config.write_text(config)
        self.env = clean_env(APPLIANCE_DATA_DIR=str(self.data), APPLIANCE_CONFIG=str(self.config))

    @property
    def db(self) -> Path:
        return self.data / "appliance.db"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_appliance(*args, env=self.env)

    def ok(self, *args: str) -> str:
        proc = self.run(*args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def add(self, name: str, *options: str) -> str:
        """The new key's secret: the last line of stdout."""
        return self.ok("keys", "add", name, *options).splitlines()[-1]

    def usage(self, *args: str) -> list[dict[str, Any]]:
        return json.loads(self.ok("usage", "--json", *args))

    def wait_usage(
        self, check: Callable[[list[dict[str, Any]]], bool], *args: str, timeout: float = 15
    ) -> Any:
        deadline = time.monotonic() + timeout
        rows = self.usage(*args)
        while not check(rows) and time.monotonic() < deadline:
            time.sleep(0.3)
            rows = self.usage(*args)
        assert check(rows), rows
        return rows

    def gateway_settings(self, **extra: str) -> dict[str, str]:
        return {
            "APPLIANCE_DATA_DIR": str(self.data),
            "APPLIANCE_CONFIG": str(self.config),
            "APPLIANCE_API_KEYS": "",
            "APPLIANCE_USAGE_FLUSH_INTERVAL": "0.5",
            **extra,
        }


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    return Admin(tmp_path)


@pytest.fixture
def serve(start_gateway, admin, local_llm, cloud_llm):
    """The gateway on the admin's database, local vLLM and cloud simulators up, fast failure detection."""

    def start(**settings: str):
        env = {
            "APPLIANCE_LLM_URL": local_llm.base_url,
            "NVIDIA_NIM_BASE_URL": cloud_llm.base_url,
            "NVIDIA_NIM_API_KEY": CLOUD_KEY,
            "APPLIANCE_FIRST_BYTE_TIMEOUT": "2",
            "APPLIANCE_BREAKER_FAILURES": "100",  # every request tries every target
            **admin.gateway_settings(**settings),
        }
        return start_gateway(**env)

    return start


def chat(gw, key: str, model: str = TIER1, **kw: Any):
    return gw.client(api_key=key).chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, **kw
    )


def post_chat(gw, key: str, model: str = TIER1, **body: Any) -> httpx.Response:
    return httpx.post(
        gw.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": MESSAGES, **body},
        timeout=30,
    )


def ledger_status(gw) -> dict[str, Any]:
    return gw.readyz().json()["checks"]["governance"]["ledger"]


def until(check: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# The store and the keys.


def test_keys_are_hashed_in_a_private_wal_database_and_changes_reach_a_running_gateway(admin, serve):
    secret = admin.add("reading-app", "--school", "Lindenschule", "--group", "4b", "--app", "reader")
    assert secret.startswith("sk-appliance-")
    assert stat.S_IMODE(admin.db.stat().st_mode) == 0o600
    with sqlite3.connect(admin.db) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
    shown = json.loads(admin.ok("keys", "show", "reading-app"))
    assert shown["school"] == "Lindenschule" and shown["group"] == "4b" and shown["app"] == "reader"
    assert "digest" not in shown and secret not in json.dumps(shown)

    gw = serve()
    assert chat(gw, secret).headers["x-appliance-target"] == "box"

    # A key added now works within two seconds; a revoked one stops within two seconds.
    later = admin.add("quiz-app")
    assert until(lambda: post_chat(gw, later).status_code == 200, timeout=2.5)
    admin.ok("keys", "revoke", "quiz-app")
    assert until(lambda: post_chat(gw, later).status_code == 401, timeout=2.5)

    # Rotation: a new secret, the same identity and history.
    admin.wait_usage(lambda rows: sum(r["requests"] for r in rows) >= 1, "--key", "reading-app")
    rotated = admin.ok("keys", "rotate", "reading-app").splitlines()[-1]
    assert rotated != secret and rotated.startswith("sk-appliance-")
    assert until(lambda: post_chat(gw, secret).status_code == 401, timeout=2.5)
    assert post_chat(gw, rotated).status_code == 200
    rows = admin.wait_usage(lambda rows: sum(r["requests"] for r in rows) >= 2, "--key", "reading-app")
    assert {r["key"] for r in rows} == {"reading-app"}

    listed = admin.ok("keys", "list")
    assert "reading-app" in listed and "quiz-app" not in listed
    raw = b"".join(p.read_bytes() for p in admin.data.iterdir() if p.name.startswith("appliance.db"))
    for secret_text in (secret, rotated, later, CONTENT_MARK):
        assert secret_text.encode() not in raw


def test_the_keys_file_is_imported_on_first_start_and_env_keys_still_work(admin, serve):
    from appliance.auth import hash_key

    old_key = "sk-appliance-from-the-old-keys-file-000"
    admin.data.mkdir()
    (admin.data / "keys").write_text(f"# old\nteacher-app {hash_key(old_key)}\n")
    gw = serve(APPLIANCE_API_KEYS="simple-setup-key-123")
    assert post_chat(gw, old_key).status_code == 200
    assert post_chat(gw, "simple-setup-key-123").status_code == 200
    assert "teacher-app" in admin.ok("keys", "list")
    admin.wait_usage(lambda rows: {r["key"] for r in rows} == {"teacher-app", "env-1"})


def test_a_key_past_its_expiry_is_refused(admin, serve):
    key = admin.add("trip-app", "--expires", time.strftime("%Y-%m-%d"))  # works through today
    gw = serve()
    assert post_chat(gw, key).status_code == 200
    with sqlite3.connect(admin.db) as db:  # a day later, as far as the key is concerned
        db.execute("UPDATE keys SET expires_on = '2020-01-01' WHERE name = 'trip-app'")
    assert until(lambda: post_chat(gw, key).status_code == 401, timeout=2.5)
    assert post_chat(gw, key).json()["error"]["code"] == "expired_api_key"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("keys", "add", "x", "--tier", "platinum"), "unknown tier 'platinum'"),
        (("keys", "add", "x", "--expires", "2001-01-01"), "in the past"),
        (("keys", "add", "x", "--expires", "next week"), "YYYY-MM-DD"),
        (("keys", "add", "x", "--school", "S" * 65), "school label"),
        (("keys", "add", "bad name!"), "invalid key name"),
        (("keys", "add", "x", "--models", "gpt-5"), "unknown model 'gpt-5'"),
        (("keys", "set", "nobody", "--tier", "free"), "no active key named 'nobody'"),
        (("usage", "--since", "yesterday"), "YYYY-MM-DD"),
    ],
)
def test_bad_key_input_is_one_line(admin, args, message):
    proc = admin.run(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_negative_limit_in_a_tier_is_a_one_line_start_error(tmp_path):
    bad = Admin(tmp_path, "tiers: {class: {requests_per_minute: -1}}\n")
    proc = run_appliance("serve", "--port", "1", env={**bad.env, "APPLIANCE_API_KEYS": "k"})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "requests_per_minute" in proc.stderr and "Traceback" not in proc.stderr


def test_a_corrupt_database_is_a_one_line_start_error_naming_the_file(admin):
    admin.data.mkdir()
    admin.db.write_bytes(b"this is not a database, it is a school report\n" * 200)
    proc = run_appliance("serve", "--port", "1", env={**admin.env, "APPLIANCE_API_KEYS": "k"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(admin.db) in lines[0] and "move it aside" in lines[0], proc.stderr


# Tiers, limits and quotas.


def test_rate_limit_is_a_429_with_retry_after_and_openai_headers(admin, serve):
    key = admin.add("class-app", "--tier", "class")
    gw = serve()
    first = post_chat(gw, key)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    statuses = [post_chat(gw, key).status_code for _ in range(3)]
    assert statuses[:2] == [200, 200] and statuses[2] == 429
    refused = post_chat(gw, key)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'appliance_rate_limited_total{tier="class"} 2.0' in metrics
    # Other routes carry the headers too; an unlimited key's responses carry none.
    models = httpx.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {key}"})
    assert models.headers["x-ratelimit-limit-requests"] == "3"
    other = admin.add("staff-app")
    assert until(lambda: post_chat(gw, other).status_code == 200, timeout=2.5)
    assert "x-ratelimit-limit-requests" not in post_chat(gw, other).headers


def test_the_sdk_retries_after_retry_after_and_gets_through(admin, serve):
    key = admin.add("slow-app", "--tier", "slow")
    gw = serve()
    while post_chat(gw, key).status_code == 200:  # spend the minute's 12 requests
        pass
    statuses: list[int] = []
    hooks = {"response": [lambda r: statuses.append(r.status_code)]}
    client = openai.OpenAI(
        base_url=gw.base_url, api_key=key, max_retries=3, http_client=httpx.Client(event_hooks=hooks)
    )
    started = time.monotonic()
    completion = client.chat.completions.create(model=TIER1, messages=MESSAGES)
    assert completion.choices[0].message.content
    assert statuses[0] == 429 and statuses[-1] == 200
    assert time.monotonic() - started >= 0.5  # it waited as told, not at once


def test_tokens_per_minute_count_what_the_engine_reported(admin, serve, local_llm):
    key = admin.add("essay-app", "--tier", "tokens")
    gw = serve()
    first = post_chat(gw, key, max_tokens=500)  # estimated up front at 500 and more
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 500
    used = first.json()["usage"]["total_tokens"]
    # The next response shows the first corrected to the engine's count (and its own estimate, ~25).
    remaining = int(post_chat(gw, key).headers["x-ratelimit-remaining-tokens"])
    assert 1000 - used - 60 <= remaining <= 1000 - used
    # A request whose estimate does not fit the bucket waits for it.
    refused = post_chat(gw, key, max_tokens=990)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_daily_quota_is_a_429_insufficient_quota_that_survives_a_restart(admin, serve):
    key = admin.add("homework-app", "--tier", "daily")
    gw = serve()
    used = 0
    while used < 30:  # admitted while under the quota; each answer is counted once done
        answer = post_chat(gw, key)
        assert answer.status_code == 200
        used += answer.json()["usage"]["total_tokens"]
    refused = post_chat(gw, key)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert "resets on" in error["message"]
    assert refused.headers["x-should-retry"] == "false"
    with pytest.raises(openai.RateLimitError):
        gw.client(api_key=key, max_retries=2).chat.completions.create(model=TIER1, messages=MESSAGES)
    admin.wait_usage(lambda rows: sum(r["completion_tokens"] for r in rows) > 0)
    gw.stop()
    again = serve()
    assert post_chat(again, key).json()["error"]["code"] == "insufficient_quota"
    metrics = httpx.get(again.url + "/metrics").text
    assert 'appliance_quota_refused_total{tier="daily"} 1.0' in metrics


def test_a_monthly_quota_is_a_429_insufficient_quota_until_next_month_and_survives_a_restart(admin, serve):
    key = admin.add("term-app", "--tier", "monthly")
    gw = serve()
    used = 0
    while used < 30:
        answer = post_chat(gw, key)
        assert answer.status_code == 200
        used += answer.json()["usage"]["total_tokens"]
    error = post_chat(gw, key).json()["error"]
    assert error["code"] == "insufficient_quota" and "quota for the month" in error["message"]
    first_of_next_month = (date.today().replace(day=1) + timedelta(days=32)).replace(day=1).isoformat()
    assert f"resets on {first_of_next_month}" in error["message"]
    # The month's count is read back from the ledger: a restart does not give the quota back.
    admin.wait_usage(lambda rows: sum(r["completion_tokens"] for r in rows) > 0, "--key", "term-app")
    gw.stop()
    again = serve()
    assert post_chat(again, key).json()["error"]["code"] == "insufficient_quota"


def test_a_model_the_key_may_not_use_is_403_model_not_allowed(admin, serve):
    key = admin.add("quick-app", "--models", "nvidia/nemotron-mini-4b-instruct")
    gw = serve()
    assert post_chat(gw, key, TIER1).status_code == 200
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(gw, key, TIER2)
    assert exc.value.status_code == 403 and exc.value.body["code"] == "model_not_allowed"
    admin.ok("keys", "set", "quick-app", "--all-models")
    assert until(lambda: post_chat(gw, key, TIER2).status_code == 200, timeout=2.5)


def test_a_box_ceiling_keeps_a_keys_requests_on_the_box(admin, serve, local_llm, cloud_llm):
    boxed = admin.add("pupil-app", "--max-zone", "box")
    free = admin.add("staff-app")
    gw = serve()
    local_llm.fail("503")
    refused = post_chat(gw, boxed)
    assert refused.status_code == 503
    assert cloud_llm.seen == []  # the model's policy (on_failure) would have allowed the cloud
    assert chat(gw, free).headers["x-appliance-target"] == "cloud"  # the school's policy still holds
    assert len(cloud_llm.seen) == 1
    local_llm.clear()
    assert chat(gw, boxed).headers["x-appliance-target"] == "box"
    admin.ok("keys", "set", "pupil-app", "--max-zone", "district")  # district: like box for now
    local_llm.fail("503")
    time.sleep(2.5)
    assert post_chat(gw, boxed).status_code == 503
    assert len(cloud_llm.seen) == 1


# The cloud budget.


def test_the_cloud_budget_holds_the_cloud_under_its_rate_during_a_local_outage(
    admin, start_gateway, cloud_llm
):
    key = admin.add("reader")
    gw = start_gateway(
        APPLIANCE_LLM_URL="http://127.0.0.1:9/v1",  # the local engine is down
        NVIDIA_NIM_BASE_URL=cloud_llm.base_url,
        NVIDIA_NIM_API_KEY=CLOUD_KEY,
        NVIDIA_NIM_RPM="4",
        **admin.gateway_settings(),
    )
    answers = [post_chat(gw, key) for _ in range(10)]
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert len(served) == 4 and len(cloud_llm.seen) == 4
    for answer in refused:
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "cloud_budget_exhausted"
        assert int(answer.headers["retry-after"]) >= 1
    with pytest.raises(openai.InternalServerError) as exc:
        gw.client(api_key=key).chat.completions.create(model=TIER1, messages=MESSAGES)
    assert exc.value.body["code"] == "cloud_budget_exhausted"
    assert len(cloud_llm.seen) == 4


def test_the_sdk_with_its_default_retries_waits_out_the_cloud_budget(admin, start_gateway, cloud_llm):
    key = admin.add("reader")
    gw = start_gateway(
        APPLIANCE_LLM_URL="http://127.0.0.1:9/v1",  # the local engine is down
        NVIDIA_NIM_BASE_URL=cloud_llm.base_url,
        NVIDIA_NIM_API_KEY=CLOUD_KEY,
        NVIDIA_NIM_RPM="6",  # one request every 10 s once the minute's are spent
        **admin.gateway_settings(),
    )
    served = 0
    while post_chat(gw, key).status_code == 200:  # spend the minute's budget
        served += 1
    answers: list[httpx.Response] = []
    hooks = {"response": [answers.append]}
    client = openai.OpenAI(base_url=gw.base_url, api_key=key, http_client=httpx.Client(event_hooks=hooks))
    started = time.monotonic()
    completion = client.chat.completions.create(model=TIER1, messages=MESSAGES)
    waited = time.monotonic() - started
    assert completion.choices[0].message.content
    assert answers[0].status_code == 503 and answers[-1].status_code == 200
    retry_after = int(answers[0].headers["retry-after"])
    assert 1 <= retry_after <= 15
    assert waited >= retry_after - 1  # as told, not the SDK's own sub-second backoff
    assert len(cloud_llm.seen) == served + 1  # the retries never reached NVIDIA early


def test_a_429_from_nvidia_closes_the_cloud_until_its_retry_after(admin, start_gateway, cloud_llm):
    key = admin.add("reader")
    gw = start_gateway(
        APPLIANCE_LLM_URL="http://127.0.0.1:9/v1",
        NVIDIA_NIM_BASE_URL=cloud_llm.base_url,
        NVIDIA_NIM_API_KEY=CLOUD_KEY,
        APPLIANCE_BREAKER_FAILURES="100",
        **admin.gateway_settings(),
    )
    cloud_llm.fail("429", times=1, retry_after="3")
    assert post_chat(gw, key).json()["error"]["code"] == "upstream_unavailable"  # local down, cloud 429
    assert len(cloud_llm.seen) == 1
    blocked = post_chat(gw, key)
    assert blocked.status_code == 503 and blocked.json()["error"]["code"] == "cloud_budget_exhausted"
    assert len(cloud_llm.seen) == 1  # not called again while NVIDIA said to wait
    assert until(lambda: post_chat(gw, key).status_code == 200, timeout=8)


# The usage ledger.


def test_the_ledger_counts_without_content_and_survives_restart_and_kill(admin, serve, local_llm, cloud_llm):
    key = admin.add("reading-app", "--school", "Lindenschule", "--group", "4b")
    gw = serve()
    first = chat(gw, key)
    assert first.headers["x-appliance-target"] == "box"
    prompt_tokens = first.parse().usage.prompt_tokens  # the same for each of these requests
    local_llm.fail("503", times=2)  # the local engine is tried twice before the cloud
    assert chat(gw, key).headers["x-appliance-target"] == "cloud"
    # A stream without include_usage: the gateway asks the engine for usage and keeps it from the client.
    stream = gw.client(api_key=key).chat.completions.create(model=TIER1, messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert all(c.usage is None for c in chunks) and chunks[-1].choices
    assert local_llm.seen[-1].body["stream_options"] == {"include_usage": True}
    local_llm.fail("400", times=1)  # the engine refuses it: context too long
    with pytest.raises(openai.BadRequestError):
        chat(gw, key)

    def counted(rows: list[dict[str, Any]]) -> bool:
        return sum(r["requests"] for r in rows) == 4

    rows = admin.wait_usage(counted, timeout=5)  # within a few seconds, while serving
    (row,) = rows
    assert row["key"] == "reading-app" and row["model"] == TIER1 and row["day"] == time.strftime("%Y-%m-%d")
    assert row["served_box"] == 2 and row["served_cloud"] == 1 and row["cloud_on_failure"] == 1
    assert row["errors_client"] == 1
    assert row["prompt_tokens"] == 3 * prompt_tokens and row["completion_tokens"] > 0
    assert admin.usage("--school", "Lindenschule") == rows
    assert admin.usage("--group", "3a") == []
    csv_lines = admin.ok("usage", "--csv", "--by", "model").splitlines()
    assert csv_lines[0].startswith("key,model,day,requests") and f",{TIER1}," in csv_lines[1]
    listed = json.loads(admin.ok("keys", "list", "--json"))
    assert listed[0]["today"]["requests"] == 4 and listed[0]["last_used"] is not None

    gw.stop()  # a clean stop flushes
    gw = serve()
    assert post_chat(gw, key).status_code == 200
    admin.wait_usage(lambda rows: sum(r["requests"] for r in rows) == 5)
    assert post_chat(gw, key).status_code == 200
    time.sleep(2)  # more than the flush interval (0.5 s here)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait()
    assert sum(r["requests"] for r in admin.usage()) == 6
    raw = b"".join(p.read_bytes() for p in admin.data.iterdir() if p.name.startswith("appliance.db"))
    assert CONTENT_MARK.encode() not in raw and b"sentense" not in raw and key.encode() not in raw


def test_old_ledger_rows_are_deleted_after_the_retention_period(admin, serve):
    key = admin.add("reading-app")
    with sqlite3.connect(admin.db) as db:
        for day in ("2020-01-01", time.strftime("%Y-%m-%d", time.localtime(time.time() - 5 * 86400))):
            db.execute(
                "INSERT INTO usage (key_id, model, day, hour, requests) VALUES (1, ?, ?, 9, 7)", (TIER1, day)
            )
    assert len(admin.usage()) == 2
    gw = serve(APPLIANCE_USAGE_RETENTION_DAYS="30")
    assert post_chat(gw, key).status_code == 200
    rows = admin.wait_usage(lambda rows: all(r["day"] != "2020-01-01" for r in rows) and len(rows) == 2)
    assert sorted(r["requests"] for r in rows) == [1, 7]


# The admin API.


def test_the_admin_api_needs_the_admin_key(admin, serve):
    key = admin.add("reading-app", "--tier", "class")
    admin_key = admin.ok("admin-key").splitlines()[-1]
    assert admin.run("admin-key").returncode == 1  # exists: --rotate replaces it
    gw = serve(APPLIANCE_ADMIN_KEY="sk-admin-from-settings-0123")
    assert post_chat(gw, key).status_code == 200
    assert httpx.get(gw.url + "/admin/api/usage").status_code == 401
    as_client = httpx.get(gw.url + "/admin/api/usage", headers={"Authorization": f"Bearer {key}"})
    assert as_client.status_code == 403 and as_client.json()["error"]["code"] == "admin_key_required"
    auth = {"Authorization": f"Bearer {admin_key}"}

    def usage() -> list[dict[str, Any]]:
        return httpx.get(gw.url + "/admin/api/usage", headers=auth).json()

    assert until(lambda: sum(r["requests"] for r in usage()) == 1)
    assert usage() == admin.usage()
    keys = httpx.get(gw.url + "/admin/api/keys", headers=auth).json()
    assert [k["name"] for k in keys] == ["reading-app"] and keys[0]["tier"] == "class"
    assert "digest" not in keys[0] and "sha256" not in json.dumps(keys)
    health = httpx.get(gw.url + "/admin/api/health", headers=auth).json()
    assert health["governance"]["ledger"]["error"] is None
    bad = httpx.get(gw.url + "/admin/api/usage?since=soon", headers=auth)
    assert bad.status_code == 400
    settings_key = {"Authorization": "Bearer sk-admin-from-settings-0123"}
    assert httpx.get(gw.url + "/admin/api/keys", headers=settings_key).status_code == 200
    rotated = admin.ok("admin-key", "--rotate").splitlines()[-1]
    assert until(lambda: httpx.get(gw.url + "/admin/api/keys", headers=auth).status_code == 401, 2.5)
    assert httpx.get(gw.url + "/admin/api/keys", headers={"Authorization": f"Bearer {rotated}"}).is_success


# Robustness.


def test_a_locked_database_never_stops_serving_and_the_ledger_catches_up(admin, serve):
    key = admin.add("reading-app")
    gw = serve()
    locker = sqlite3.connect(admin.db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the write lock, held
    try:
        for _ in range(5):
            assert post_chat(gw, key).status_code == 200
        assert until(lambda: ledger_status(gw)["error"] is not None, timeout=10)
        assert "locked" in ledger_status(gw)["error"]
        assert post_chat(gw, key).status_code == 200
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    admin.wait_usage(lambda rows: sum(r["requests"] for r in rows) == 6)
    assert until(lambda: gw.readyz().json()["checks"]["governance"]["ledger"]["error"] is None)
    assert gw.logs().count('"usage ledger not written"') == 1  # logged once, not once per retry


def test_a_full_disk_never_stops_serving(admin, local_llm, tmp_path):
    key = admin.add("reading-app")
    env = clean_env(APPLIANCE_LLM_URL=local_llm.base_url, **admin.gateway_settings())
    # Files may grow to 33,000 bytes: room for SQLite's 32 KiB shared-memory index, not for the ledger's
    # write-ahead log to take a third batch. Writes past it fail as on a full disk.
    gw = Gateway(env, tmp_path / "gateway.log", file_size_limit=33_000).start()
    try:
        deadline = time.monotonic() + 20
        while ledger_status(gw)["error"] is None and time.monotonic() < deadline:
            assert post_chat(gw, key).status_code == 200
            time.sleep(0.1)
        assert ledger_status(gw)["error"] is not None
        for _ in range(3):
            assert post_chat(gw, key).status_code == 200
        status = ledger_status(gw)
        assert status["pending_rows"] >= 1 and status["dropped_requests"] == 0
    finally:
        gw.stop()
    assert gw.logs().count('"usage ledger not written"') == 1


def test_characters_spoken_per_minute_are_limited_and_counted(admin, start_gateway, bg_loop):
    nim = MagpieNIM(seconds_per_char=0.01)
    bg_loop.run(nim.start())
    try:
        key = admin.add("read-aloud", "--tier", "speech")
        gw = start_gateway(
            APPLIANCE_TTS_URL=nim.url, APPLIANCE_TTS_HEALTH_INTERVAL="0.1", **admin.gateway_settings()
        )
        assert until(lambda: gw.readyz().json()["checks"]["tts"]["ready"])
        client = gw.client(api_key=key)
        text = "The quick brown fox jumps over the lazy dog, twice today."  # 57 characters
        assert client.audio.speech.create(model="tts-1", voice="alloy", input=text).content
        with pytest.raises(openai.RateLimitError) as exc:
            client.audio.speech.create(model="tts-1", voice="alloy", input=text)
        assert exc.value.body["code"] == "rate_limit_exceeded"
        (row,) = admin.wait_usage(lambda rows: sum(r["requests"] for r in rows) == 2)
        assert row["model"] == "nvidia/magpietts" and row["characters"] == len(text)
        assert row["errors_limited"] == 1 and row["served_box"] == 1
    finally:
        bg_loop.run(nim.stop())


def test_seconds_transcribed_per_minute_are_limited_and_counted(admin, tmp_path):
    key = admin.add("dictation-app", "--tier", "dictation")
    gw = start_stt_gateway(
        tmp_path,
        "stt",
        APPLIANCE_STT_MODEL=str(build_tiny_whisper(tmp_path / "whisper")),
        **admin.gateway_settings(),
    )
    try:
        client = gw.client(api_key=key, timeout=60)
        clip = make_audio("wav", 7.3)
        for _ in range(2):  # admitted while some of the minute's 10 s are left, then charged in full
            assert client.audio.transcriptions.create(model="whisper-1", file=clip).text is not None
        with pytest.raises(openai.RateLimitError) as exc:
            client.audio.transcriptions.create(model="whisper-1", file=clip)
        assert exc.value.body["code"] == "rate_limit_exceeded"
        (row,) = admin.wait_usage(lambda rows: sum(r["requests"] for r in rows) == 3)
        assert row["model"].startswith("whisper") and row["audio_seconds"] == pytest.approx(14.6, abs=0.1)
        assert row["errors_limited"] == 1 and row["served_box"] == 2
    finally:
        gw.stop()
