"""`appliance doctor`: the first command an admin runs, and the one support asks for.

Each check is one line, ok / warn / fail, with the fix where there is one: the configuration as the
gateway understands it (secrets masked), the keys store, the GPU, every engine URL, the Whisper model,
the TTS NIM, the cloud key (by an authenticated call), clock skew, free disk for models, the TLS
certificate, and listening beyond loopback without TLS. Exit 0 all ok, 1 warnings, 2 failures.
Nothing here sends request content anywhere; the cloud check sends one fixed word.
"""

from __future__ import annotations

import json
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal

from appliance.catalog import Catalog, load_catalog
from appliance.config import ConfigError, Settings, is_loopback_host

Status = Literal["ok", "warn", "fail"]
EXIT = {"ok": 0, "warn": 1, "fail": 2}
HTTP_TIMEOUT = 5.0
SKEW_WARN_SECONDS, SKEW_FAIL_SECONDS = 30, 300  # TLS and token lifetimes start to break past minutes
CERT_WARN_DAYS = 30
DISK_WARN_MIB = 5 * 1024  # room for one more model and its partial download


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str
    fix: str | None = None

    def line(self) -> str:
        return f"{self.status:<4}  {self.check}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Listening:
    """How `appliance serve` will be started, as far as the doctor can be told."""

    host: str = "127.0.0.1"
    ssl_certfile: str | None = None


def run_checks(load: Callable[[], Settings], listening: Listening) -> list[Finding]:
    try:
        settings = load()
    except ConfigError as exc:
        return [Finding("config", "fail", str(exc), "correct the setting it names")]
    catalog = load_catalog()
    findings = [
        config_finding(settings, catalog),
        *policy_findings(settings, catalog),
        *chain_findings(settings, catalog),
        keys_finding(settings),
    ]
    findings.append(gpu_finding(catalog))
    findings += llm_findings(settings)
    findings.append(whisper_finding(settings, catalog))
    findings.append(tts_finding(settings))
    cloud, cloud_date = cloud_finding(settings, catalog)
    findings += [cloud, clock_finding(cloud_date), disk_finding(settings, catalog)]
    findings += tls_findings(listening)
    return findings


def exit_code(findings: list[Finding]) -> int:
    return max((EXIT[f.status] for f in findings), default=0)


def report(findings: list[Finding], as_json: bool) -> str:
    if as_json:
        worst = next((s for s in ("fail", "warn") if any(f.status == s for f in findings)), "ok")
        return json.dumps({"status": worst, "checks": [asdict(f) for f in findings]}, indent=2)
    return "\n".join(f.line() for f in findings)


# --- configuration, policy and keys ------------------------------------------------------------------


def masked(secret: Any) -> str:
    """'set (…a1b2)': enough for support to tell two keys apart, never enough to use one."""
    value = secret.get_secret_value() if secret is not None else ""
    return f"set (...{value[-4:]})" if len(value) >= 12 else ("set" if value else "not set")


def config_finding(settings: Settings, catalog: Catalog) -> Finding:
    from appliance.model_store import configured_stt_model

    parts = [
        f"LLM {settings.llm_url}",
        f"TTS {settings.tts_url}",
        f"STT model {settings.stt_model} ({configured_stt_model(settings, catalog)})",
        f"data {settings.data_dir}",
        f"cloud key {masked(settings.nvidia_nim_api_key)}",
        f"client keys from the environment {masked(settings.api_keys)}",
    ]
    return Finding("config", "ok", "; ".join(parts))


def policy_findings(settings: Settings, catalog: Catalog) -> list[Finding]:
    from appliance.policy import effective_policies

    return [Finding(f"policy {p.name}", "ok", p.reason) for p in effective_policies(settings, catalog)]


def keys_finding(settings: Settings) -> Finding:
    """The keys the gateway would serve: the governance database's, or, before it exists, the valid
    lines of the keys file it will import."""
    from appliance.governance.store import Store, StoreError, database_path

    db, env = database_path(settings.data_dir), len(settings.client_keys)
    if db.exists():
        try:
            store = Store(db)
            count = len(store.keys())
            store.close()
        except StoreError as exc:
            return Finding("keys", "fail", str(exc), "move the database aside and restore a backup")
        if count + env == 0:
            return Finding("keys", "fail", f"no client keys ({db})", "appliance keys add NAME")
        return Finding("keys", "ok", f"{count} in {db}, {env} from the environment")
    from appliance.auth import parse_keys_file

    path = settings.resolved_keys_file
    stored = parse_keys_file(path)
    count = len(stored.keys) + env
    if stored.problems:  # the import skips the line; serious only when no key is left
        status: Status = "warn" if count else "fail"
        detail = f"{stored.problems[0]} ({count} valid keys in use)"
        return Finding("keys", status, detail, f"correct or delete that line in {path}")
    if count == 0:
        return Finding("keys", "fail", f"no client keys ({path})", "appliance keys add NAME")
    return Finding("keys", "ok", f"{len(stored.keys)} in {path}, {env} from the environment")


# --- the GPU ---------------------------------------------------------------------------------------------


def gpu_finding(catalog: Catalog) -> Finding:
    from appliance.gpu import Thresholds, health_report
    from appliance.planner import engines_min_driver

    _, verdict = health_report(thresholds=Thresholds(min_driver=engines_min_driver(catalog)))
    status = verdict["status"]
    if status == "unavailable":
        why = verdict["reasons"][0]
        return Finding(
            "gpu", "warn", f"no usable NVIDIA GPU ({why}): the CPU plan applies", "see `appliance plan`"
        )
    names = ", ".join(f"{g.get('name')}" for g in verdict["gpus"])
    if status == "unhealthy":
        return Finding("gpu", "fail", f"{names}: {verdict['reasons'][0]}", "appliance gpu check")
    if verdict["warnings"]:
        return Finding("gpu", "warn", f"{names}: {verdict['warnings'][0]}", "appliance gpu check")
    return Finding("gpu", "ok", f"{names}: healthy")


# --- engines and the cloud ---------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes
    date: str | None


def http(
    url: str, headers: dict[str, str] | None = None, data: bytes | None = None, cafile: str | None = None
) -> Answer:
    """One bounded HTTP call; an HTTP error status is an answer, a network failure raises OSError."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    tls = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT, context=tls) as resp:
            return Answer(resp.status, resp.read(1 << 20), resp.headers.get("Date"))
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.read(1 << 20), exc.headers.get("Date"))


def unreachable(exc: OSError) -> str:
    reason = getattr(exc, "reason", exc)
    return str(getattr(reason, "strerror", None) or reason)


def llm_findings(settings: Settings) -> list[Finding]:
    """Every engine URL of the box (several: a pool, one vLLM per GPU) and of the file's other
    upstreams outside the cloud (a district), each answering an OpenAI model list."""
    from appliance.upstreams.chain import upstream_specs

    findings = []
    for spec in upstream_specs(settings).values():
        if spec.zone == "cloud":
            continue  # its model list is public and proves nothing: the cloud check calls it
        setting = "APPLIANCE_LLM_URL" if spec.name == "box" else f"upstreams.{spec.name}.urls"
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        for i, url in enumerate(spec.urls):
            check = "llm engine" if spec.name == "box" else f"upstream {spec.name}"
            check += f" {i + 1}" if i else ""
            findings.append(engine_finding(check, url, setting, headers, spec.ca_file))
    return findings


def engine_finding(
    check: str, url: str, setting: str, headers: dict[str, str], cafile: str | None
) -> Finding:
    from appliance.routing import model_ids

    try:
        answer = http(f"{url}/models", headers, cafile=cafile)
    except OSError as exc:
        return Finding(
            check,
            "warn",
            f"{url} unreachable ({unreachable(exc)}): chat goes to the next upstream where the policy allows",
            "start vLLM (see `appliance plan`) or correct " + setting,
        )
    served = model_ids(answer.body) if answer.status == 200 else None
    if served is None:
        fix = f"end {setting} in /v1" if not url.endswith("/v1") else "point it at vLLM's /v1"
        return Finding(check, "fail", f"GET {url}/models returned {answer.status}, not a model list", fix)
    return Finding(check, "ok", f"{url} serves {', '.join(sorted(served)) or 'no models'}")


def chain_findings(settings: Settings, catalog: Catalog) -> list[Finding]:
    """Each chat model's chain of upstreams, nearest zone first, as `appliance serve` logs it."""
    from appliance.upstreams.chain import effective_catalog, resolve_chains

    chains = resolve_chains(settings, effective_catalog(settings, catalog))
    return [Finding(f"chain {name}", "ok", chain.describe()) for name, chain in chains.items()]


def whisper_finding(settings: Settings, catalog: Catalog) -> Finding:
    from appliance.model_store import ModelStoreError, configured_stt_model, resolve

    name = configured_stt_model(settings, catalog)
    try:
        stored = resolve(name, settings, catalog)
    except ModelStoreError as exc:
        return Finding("whisper model", "fail", str(exc), f"appliance models pull {name}")
    return Finding("whisper model", "ok", f"{name} present and complete in {stored.path}")


def tts_finding(settings: Settings) -> Finding:
    url = settings.tts_url
    try:
        ready = http(f"{url}/v1/health/ready")
    except OSError as exc:
        return Finding(
            "tts engine", "warn", f"{url} unreachable ({unreachable(exc)})", "start the MagpieTTS NIM"
        )
    if ready.status == 404:
        return Finding(
            "tts engine",
            "fail",
            f"GET {url}/v1/health/ready returned 404: not a NIM",
            "correct APPLIANCE_TTS_URL",
        )
    if ready.status != 200:
        return Finding(
            "tts engine", "warn", f"{url} not ready (HTTP {ready.status})", "wait for the NIM to load"
        )
    try:
        voices = json.loads(http(f"{url}/v1/audio/list_voices").body)
        count = sum(len(v.get("voices", [])) for v in voices.values() if isinstance(v, dict))
    except (OSError, ValueError, AttributeError):
        return Finding("tts engine", "warn", f"{url} ready, but its voice list is unreadable")
    return Finding("tts engine", "ok", f"{url} ready, {count} voices")


def cloud_finding(settings: Settings, catalog: Catalog) -> tuple[Finding, str | None]:
    """The key checked by a call that needs it (the model list is public, so it proves nothing)."""
    from appliance.policy import effective_policies

    if not settings.cloud_enabled:
        return Finding("cloud", "ok", "no NVIDIA_NIM_API_KEY: nothing leaves the box"), None
    leaving = [p for p in effective_policies(settings, catalog) if p.leaves_box]
    if not leaving:
        return Finding("cloud", "ok", "key set, but the policy sends nothing to the cloud"), None
    key = settings.nvidia_nim_api_key.get_secret_value()  # type: ignore[union-attr]
    body = json.dumps(
        {"model": leaving[0].cloud_model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    ).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    url = settings.nvidia_nim_base_url
    try:
        answer = http(f"{url}/chat/completions", headers, body)
    except OSError as exc:
        return Finding("cloud", "fail", f"{url} unreachable ({unreachable(exc)})", "check the network"), None
    if answer.status in (401, 403):
        return Finding(
            "cloud", "fail", f"key rejected (HTTP {answer.status})", "update NVIDIA_NIM_API_KEY"
        ), answer.date
    if answer.status >= 400:
        return Finding(
            "cloud", "warn", f"key accepted, but the test call got HTTP {answer.status}"
        ), answer.date
    return Finding("cloud", "ok", f"key accepted by {url} ({leaving[0].cloud_model})"), answer.date


def clock_finding(date: str | None) -> Finding:
    if date is None:
        return Finding("clock", "ok", "not compared (no cloud call made)")
    try:
        skew = time.time() - parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return Finding("clock", "warn", "the cloud's Date header is unreadable")
    detail = f"{skew:+.0f} s against the cloud's clock"
    if abs(skew) >= SKEW_FAIL_SECONDS:
        return Finding("clock", "fail", detail, "enable time sync (timedatectl set-ntp true)")
    if abs(skew) >= SKEW_WARN_SECONDS:
        return Finding("clock", "warn", detail, "enable time sync (timedatectl set-ntp true)")
    return Finding("clock", "ok", detail)


# --- disk and TLS ----------------------------------------------------------------------------------------


def existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_finding(settings: Settings, catalog: Catalog) -> Finding:
    from appliance.model_store import configured_stt_model, missing_files

    name = configured_stt_model(settings, catalog)
    model = catalog.models.get(name)
    needed = 0
    if model is not None and missing_files(settings.models_dir / name):
        needed = int(model.params.get("weights_mib", 0))
    free = shutil.disk_usage(existing_parent(settings.models_dir)).free // 2**20
    detail = f"{free} MiB free under {settings.models_dir}"
    if free < needed:
        return Finding("disk", "fail", f"{detail}; {name} needs {needed} MiB", "free disk space")
    if free < needed + DISK_WARN_MIB:
        return Finding("disk", "warn", detail, "free disk space")
    return Finding("disk", "ok", detail)


def tls_findings(listening: Listening) -> Iterator[Finding]:
    if listening.ssl_certfile:
        yield certificate_finding(Path(listening.ssl_certfile))
    elif not is_loopback_host(listening.host):
        yield Finding(
            "tls",
            "fail",
            f"listening on {listening.host} without TLS: keys and pupils' text cross the network in clear",
            "give --ssl-certfile and --ssl-keyfile",
        )
    else:
        yield Finding("tls", "ok", f"no TLS, listening on loopback ({listening.host}) only")


def certificate_finding(path: Path) -> Finding:
    try:
        cert = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]  # the stdlib's PEM reader
        expires = ssl.cert_time_to_seconds(cert["notAfter"])
    except (OSError, ssl.SSLError, KeyError, ValueError) as exc:
        return Finding(
            "tls", "fail", f"cannot read certificate {path} ({type(exc).__name__})", "give a PEM file"
        )
    days = (expires - time.time()) / 86400
    if days < 0:
        return Finding("tls", "fail", f"certificate {path} expired {-days:.0f} days ago", "renew it")
    if days < CERT_WARN_DAYS:
        return Finding("tls", "warn", f"certificate {path} expires in {days:.0f} days", "renew it")
    return Finding("tls", "ok", f"certificate {path} valid for {days:.0f} more days")
