"""The gateway's view of GPU health: an NVML snapshot refreshed in a background thread, shown on /readyz.

NVML calls block (and can take a while on a struggling GPU), so they run on their own thread and /readyz
only reads the last verdict. No GPU, no driver or no pynvml is reported there, never fatal: the gateway
still serves what the cloud can.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from fastapi import FastAPI

from appliance.gpu import health_report
from appliance.log import event
from appliance.state import AppState


def key_figures(gpu: dict[str, Any]) -> dict[str, Any]:
    """What an admin glances at; the full snapshot stays with `appliance gpu check --json`."""
    memory = gpu.get("memory") or {}
    ecc = (gpu.get("ecc") or {}).get("volatile") or {}
    return {
        "index": gpu.get("index"),
        "name": gpu.get("name"),
        "memory_used_mib": memory.get("used_mib"),
        "memory_total_mib": memory.get("total_mib"),
        "utilization_percent": (gpu.get("utilization") or {}).get("gpu_percent"),
        "temperature_c": gpu.get("temperature_c"),
        "power_w": gpu.get("power_w"),
        "ecc_volatile_uncorrected": ecc.get("uncorrected"),
        "clock_event_reasons": gpu.get("clock_event_reasons"),
    }


class GpuMonitor:
    """Keeps the latest GPU verdict, refreshed every `interval` seconds on a daemon thread."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.latest: dict[str, Any] = {"ready": False, "status": "pending"}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        code, verdict = health_report()
        previous = self.latest.get("status")
        self.latest = {
            "ready": verdict["status"] == "healthy",
            "status": verdict["status"],
            "reasons": verdict["reasons"],
            "warnings": verdict["warnings"],
            "gpus": [key_figures(g) for g in verdict["gpus"]],
            "checked_at": int(time.time()),
        }
        if verdict["status"] != previous:
            event("gpu_status", status=verdict["status"], exit_code=code, reasons=verdict["reasons"])

    def _run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception as exc:  # the monitor must outlive any NVML surprise
                self.latest = {"ready": False, "status": "error", "reasons": [f"{type(exc).__name__}: {exc}"]}
            if self._stop.wait(self.interval):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def install(app: FastAPI, state: AppState) -> None:
    interval = state.settings.gpu_refresh_interval
    if interval <= 0:
        return
    monitor = GpuMonitor(interval)

    async def start() -> None:
        monitor.start()

    async def stop() -> None:
        await asyncio.to_thread(monitor.stop)  # an NVML call in flight may take a moment

    state.startup.append(start)
    state.shutdown.append(stop)
    state.readiness["gpu"] = lambda: monitor.latest
