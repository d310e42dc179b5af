"""Prometheus metrics, served on /metrics. Labels are bounded by construction: route templates, statuses,
targets, catalog model names; never a value a client chose."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

REQUESTS = Counter(
    "appliance_requests_total",
    "Requests answered, by path, status and serving target.",
    ["path", "status", "target"],
)
LATENCY = Histogram(
    "appliance_request_duration_seconds",
    "Time to the end of the response (streams: to the last byte), by path.",
    ["path"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
UPSTREAM_FAILURES = Counter(
    "appliance_upstream_failures_total", "Upstream attempts that failed before the first byte.", ["target"]
)
FALLBACKS = Counter(
    "appliance_fallbacks_total", "Requests served by a later target than the first.", ["model"]
)
TOKENS = Counter("appliance_tokens_total", "Tokens reported by the engines.", ["model", "direction"])
# Per tier, never per key: keys are many, tiers a handful named by the admin.
RATE_LIMITED = Counter("appliance_rate_limited_total", "Requests refused by a rate limit, by tier.", ["tier"])
QUOTA_REFUSED = Counter("appliance_quota_refused_total", "Requests refused over a quota, by tier.", ["tier"])
CLOUD_BUDGET_EXHAUSTED = Counter(
    "appliance_cloud_budget_exhausted_total",
    "Cloud attempts skipped because the NVIDIA key's budget was spent.",
)


# Path labels for requests that matched no route, and for requests that failed authentication (which
# are answered before routing): one label each, so arbitrary client paths never become series.
UNMATCHED = "unmatched"
UNAUTHENTICATED = "unauthenticated"

# Labelled children, looked up once: `labels()` costs more than the increment on the hot path. The key
# is bounded: route templates (or the two labels above), the statuses the gateway sends, targets.
_request_series: dict[tuple[str, int, str | None], tuple[Any, Any]] = {}


def record_request(route: str, status: int, target: str | None, seconds: float) -> None:
    """`route` is a route's path template (`/v1/models/{model_id:path}`), UNMATCHED or UNAUTHENTICATED,
    never the path a client sent."""
    series = _request_series.get((route, status, target))
    if series is None:
        series = (REQUESTS.labels(route, str(status), target or "none"), LATENCY.labels(route))
        _request_series[(route, status, target)] = series
    series[0].inc()
    series[1].observe(seconds)


@functools.cache  # model names come from the catalog: a bounded set
def _token_series(model: str) -> tuple[Any, Any]:
    return TOKENS.labels(model, "prompt"), TOKENS.labels(model, "completion")


def record_tokens(model: str, prompt: int | None, completion: int | None) -> None:
    prompt_series, completion_series = _token_series(model)
    if prompt:
        prompt_series.inc(prompt)
    if completion:
        completion_series.inc(completion)


def limited(tier: str) -> None:
    RATE_LIMITED.labels(tier).inc()


def quota_refused(tier: str) -> None:
    QUOTA_REFUSED.labels(tier).inc()


def exposition() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
