"""What each console page shows, worked out from the gateway's own state and the governance store's
reports (the same figures `/readyz`, `/admin/api/` and `appliance usage` give). Pure data for the
templates: no HTML here, and never a secret or any request content."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from appliance.catalog import Route
from appliance.governance.keys import KeyRecord
from appliance.governance.store import COUNTERS, REPORT_GROUPS, Store, UsageFilter
from appliance.planner import PlanPolicy, plan
from appliance.state import AppState

USAGE_DAYS = 30
CSV_COLUMNS = COUNTERS
LIVE_DAYS = 2  # yesterday and today are always read afresh; earlier days are summed once and kept
SETTLED_REFRESH = 300.0  # seconds between recomputing the kept sums of earlier days
MAX_SETTLED = 16  # regroupings kept at once (a few groupings; the window moves daily)
LABELS = ("school", "group", "app")
TABLE_GROUPS = {"key": "Key", "school": "School", "group": "Group", "app": "App"}
POLICY_WORDS = {
    "never": "Never leaves the box.",
    "on_failure": "Goes to NVIDIA's cloud only when the box cannot serve it (engine down or failing).",
    "on_overload": "Goes to NVIDIA's cloud when the box cannot serve it, or when the engine is overloaded "
    "({waiting} or more requests waiting).",
}


@dataclass
class ServiceStatus:
    name: str
    ready: bool
    reason: str
    not_ready: str = "Not ready"  # the badge's word when it is not ready


def when_text(at: float | None) -> str:
    return "never" if at is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def uptime_text(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h {minutes} min" if days else f"{hours} h {minutes} min"


# Overview.


def overview(state: AppState) -> dict[str, Any]:
    checks = {name: check() for name, check in state.readiness.items()}
    llm = checks.get("llm") or {}
    targets = llm.get("targets") or {}
    gpu = checks.get("gpu") or {"ready": False, "status": "off", "reasons": ["the GPU monitor is off"]}
    return {
        "services": services(state, checks),
        "gpu": gpu,
        "plan": vram_plan(state, gpu),
        "breakers": [{"name": name, **target} for name, target in targets.items()],
        "queue_depth": (targets.get("local") or {}).get("requests_waiting"),
        "overloaded": llm.get("overloaded", False),
        "governance": checks.get("governance") or {},
        "uptime": uptime_text(time.time() - state.started),
        "started": state.started,
    }


def services(state: AppState, checks: dict[str, dict[str, Any]]) -> list[ServiceStatus]:
    llm = checks.get("llm") or {"ready": False}
    local = (llm.get("targets") or {}).get("local") or {}
    served = local.get("served_models") or []
    if llm.get("ready") and served:
        chat_reason = f"vLLM answers at {local.get('url')} and serves {', '.join(served)}."
    elif llm.get("ready"):
        chat_reason = "The local engine is not serving; chat is answered by the cloud."
    elif local.get("last_error"):
        chat_reason = f"The local engine fails: {local['last_error']}."
    else:
        chat_reason = f"The local engine at {local.get('url')} has not answered yet."
    stt = checks.get("stt") or {"ready": False, "error": "speech-to-text is not installed"}
    stt_reason = (
        f"Whisper {stt.get('model')} is loaded on {stt.get('device')} ({stt.get('compute_type')})."
        if stt.get("ready")
        else stt.get("error") or f"The model is {stt.get('state', 'not loaded')}."
    )
    tts = checks.get("tts") or {"ready": False, "detail": "text-to-speech is not configured"}
    tts_reason = tts.get("detail") or ("The speech NIM is ready." if tts.get("ready") else "Not ready.")
    return [
        ServiceStatus("Chat (LLM engine)", bool(llm.get("ready")), chat_reason),
        ServiceStatus("Speech-to-text", bool(stt.get("ready")), stt_reason),
        ServiceStatus("Text-to-speech", bool(tts.get("ready")), tts_reason),
        cloud_status(state, llm, checks.get("governance") or {}),
    ]


def cloud_status(state: AppState, llm: dict[str, Any], governance: dict[str, Any]) -> ServiceStatus:
    cloud = (llm.get("targets") or {}).get("cloud")
    if cloud is None:
        reason = "Not configured (no NVIDIA key): nothing leaves the box."
        return ServiceStatus("Cloud fallback", False, reason, not_ready="Off")
    if cloud.get("breaker") == "open":
        return ServiceStatus("Cloud fallback", False, f"NVIDIA's cloud fails: {cloud.get('last_error')}.")
    budget = governance.get("cloud_budget") or {}
    if budget.get("paused_for_seconds"):
        seconds = round(budget["paused_for_seconds"])
        return ServiceStatus(
            "Cloud fallback", False, f"The cloud budget is spent; it refills in {seconds} s."
        )
    return ServiceStatus(
        "Cloud fallback", True, f"Available at {cloud.get('url')}, within the school's policy."
    )


def vram_plan(state: AppState, gpu: dict[str, Any]) -> dict[str, Any]:
    """The planner's answer for the card the monitor sees: what runs here, what goes to the cloud, why."""
    totals = [g.get("memory_total_mib") for g in gpu.get("gpus") or () if g.get("memory_total_mib")]
    if not totals:
        return {"gpu_memory_mib": None, "routes": [], "vllm": None}
    result = plan(
        state.catalog,
        totals[0],
        PlanPolicy(cloud_fallback=state.settings.fallback_policies(state.catalog.routes)),
    )
    return result.to_dict()


# Usage.


def usage_window(today: date | None = None) -> tuple[str, str, list[str]]:
    """The last 30 days, today included: (first day, last day, every day in order)."""
    last = today or date.today()
    days = [(last - timedelta(days=n)).isoformat() for n in range(USAGE_DAYS - 1, -1, -1)]
    return days[0], days[-1], days


class UsageReports:
    """The last 30 days' usage figures, fast with a year of ledger rows. The days before yesterday are
    read once, per key, model and day (one query), and regrouped in memory for each page; yesterday's
    and today's rows are read live and added. `refresh` (a background task, every few minutes) reads the
    earlier days again, so rows the ledger retried late after a database outage show within minutes.
    It reads through a connection of its own (WAL: readers run side by side), so the gateway's store
    is never held up. Labels (school, group, app) of earlier days are the current ones of the key's name."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._base: tuple[str, list[dict[str, Any]]] | None = None  # (first day, rows by key, model, day)
        self._grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}

    def report(self, by: str) -> list[dict[str, Any]]:
        _, until, days = usage_window()
        live = self.store.usage_report(UsageFilter(since=days[-LIVE_DAYS], until=until, by=by))
        return merge_reports(self._settled(by), live, REPORT_GROUPS[by])

    def refresh(self) -> None:
        """Read the earlier days again (on a worker thread)."""
        since, _, days = usage_window()
        rows = self.store.usage_report(UsageFilter(since=since, until=days[-1 - LIVE_DAYS]))
        self._base, self._grouped = (since, rows), {}
        for by in REPORT_GROUPS:  # each page's grouping, ready before it is asked for
            if by is not None:
                self._settled(by)

    def _settled(self, by: str) -> list[dict[str, Any]]:
        since = usage_window()[0]
        if self._base is None or self._base[0] != since:  # before the first refresh, or a new day
            self.refresh()
        assert self._base is not None
        labels = {r.name: r for r in self.store.keys(True)}  # by name: the newest key's labels
        fingerprint = hash(tuple((name, r.school, r.group, r.app) for name, r in labels.items()))
        cache_key = (by, since, fingerprint)
        found = self._grouped.get(cache_key)
        if found is None:
            found = regroup(self._base[1], by, labels)
            if len(self._grouped) >= MAX_SETTLED:
                self._grouped = {}
            self._grouped[cache_key] = found
        return found


def regroup(rows: list[dict[str, Any]], by: str, labels: dict[str, KeyRecord]) -> list[dict[str, Any]]:
    """Report rows by key, model and day, summed per `by` in the store's report shape."""
    regrouped = []
    for row in rows:
        if by in LABELS:
            record = labels.get(row["key"])
            value = getattr(record, by) if record is not None else None
        else:
            value = row[by]
        counts = {name: row[name] for name in COUNTERS}
        regrouped.append({"key": None, "model": None, "day": None, by: value, **counts})
    return merge_reports(regrouped, [], (by,))


def merge_reports(
    first: list[dict[str, Any]], second: list[dict[str, Any]], groups: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Two reports of the same grouping as one: counters summed per group, in the store's order."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in (*first, *second):
        group = tuple(row[g] for g in groups)
        into = merged.get(group)
        if into is None:
            merged[group] = dict(row)
            continue
        for name in COUNTERS:
            into[name] = into[name] + row[name]
    for row in merged.values():
        row["audio_seconds"] = round(row["audio_seconds"], 3)
    return [merged[g] for g in sorted(merged, key=lambda g: tuple((v is not None, v or "") for v in g))]


def usage(reports: UsageReports, by: str) -> dict[str, Any]:
    since, until, days = usage_window()
    per_day = {r["day"]: r for r in reports.report("day")}
    table = reports.report(by)
    daily = [per_day.get(day) or {"day": day} for day in days]
    return {
        "since": since,
        "until": until,
        "by": by,
        "daily": daily,
        "table": [{**row, "name": row.get(by)} for row in table],
        "share": share(per_day.values()),
    }


def share(rows: Any) -> dict[str, Any]:
    """Served on the box vs by the cloud, and why the cloud served, over `rows`."""
    totals = {
        name: sum(r.get(name, 0) for r in rows)
        for name in ("served_box", "served_cloud", "cloud_on_failure", "cloud_on_overload", "requests")
    }
    served = totals["served_box"] + totals["served_cloud"]
    totals["box_percent"] = round(100 * totals["served_box"] / served, 1) if served else None
    totals["cloud_percent"] = round(100 * totals["served_cloud"] / served, 1) if served else None
    return totals


# Keys.


def keys(state: AppState) -> dict[str, Any]:
    store = state.governance.store
    day = state.governance.clock.day
    today = {r["key"]: r for r in store.usage_report(UsageFilter(since=day, until=day, by="key"))}
    records = store.keys()
    return {
        "keys": [{**record.public(), "today": today.get(record.name) or {}} for record in records],
        "tiers": sorted(state.governance.keyring.tiers),
        "default_tier": state.settings.default_tier,
        "models": [r.name for r in state.catalog.routes],
        "audit": store.audit(),
    }


# Privacy.


def privacy(state: AppState, reports: UsageReports) -> dict[str, Any]:
    store = state.governance.store
    since, until, _ = usage_window()
    counts = {r["model"]: r for r in reports.report("model")}
    records = store.keys()
    policies = state.settings.fallback_policies(state.catalog.routes)
    cloud_on = state.settings.cloud_enabled
    return {
        "models": [
            model_policy(route, policies[route.name], cloud_on, state, counts)
            for route in state.catalog.routes
        ],
        "cloud_configured": cloud_on,
        "retention_days": state.settings.usage_retention_days,
        "box_only_keys": sorted(r.name for r in records if r.max_zone != "cloud"),
        "since": since,
        "until": until,
        "share": share(counts.values()),
    }


def model_policy(
    route: Route, policy: str, cloud_on: bool, state: AppState, counts: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    leaves = cloud_on and route.cloud is not None and policy != "never"
    if leaves:
        words = POLICY_WORDS[policy].format(waiting=state.settings.overload_waiting)
    elif route.cloud is None or policy == "never":
        words = POLICY_WORDS["never"]
    else:
        words = "Never leaves the box: no NVIDIA key is configured."
    row = counts.get(route.name) or {}
    return {
        "name": route.name,
        "kind": route.kind,
        "policy": policy if leaves else "never",
        "words": words,
        "cloud_model": route.cloud if leaves else None,
        "requests": row.get("requests", 0),
        "served_cloud": row.get("served_cloud", 0),
        "cloud_on_failure": row.get("cloud_on_failure", 0),
        "cloud_on_overload": row.get("cloud_on_overload", 0),
    }
