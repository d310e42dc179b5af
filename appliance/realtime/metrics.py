"""Live dictation's Prometheus series (on /metrics with the rest). Labels are the gateway's own codes:
why a session closed, which kind of pass waited."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SESSIONS = Gauge("appliance_realtime_sessions", "Live transcription sessions open now.")
CLOSED = Counter(
    "appliance_realtime_sessions_closed_total", "Live transcription sessions ended, by reason.", ["reason"]
)
AUDIO_SECONDS = Counter("appliance_realtime_audio_seconds_total", "Seconds of audio streamed by sessions.")
PASS_WAIT = Histogram(
    "appliance_realtime_pass_wait_seconds",
    "Time a pass waited for an engine slot, by kind (partial or final).",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
PARTIAL_WAIT, FINAL_WAIT = PASS_WAIT.labels("partial"), PASS_WAIT.labels("final")
DIVERGED = Counter(
    "appliance_realtime_turns_diverged_total",
    "Turns whose final pass read an already-sent word differently (the completed text then differs "
    "from the deltas).",
)
