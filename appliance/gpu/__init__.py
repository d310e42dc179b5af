"""GPU health through NVML: collection (snapshot.py) apart from pure evaluation (health.py).

Imports nothing but the standard library; `pynvml` (nvidia-ml-py) is imported only when a snapshot is
collected, so a host without it gets an "unavailable" verdict instead of an ImportError. Ansible runs
this on hosts that have nothing else installed yet.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from appliance.gpu.health import Thresholds, evaluate
from appliance.gpu.snapshot import GpuUnavailable, collect_snapshots

__all__ = [
    "EXIT_HEALTHY",
    "EXIT_UNAVAILABLE",
    "EXIT_UNHEALTHY",
    "GpuUnavailable",
    "Thresholds",
    "collect_snapshots",
    "evaluate",
    "health_report",
]

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNAVAILABLE = 0, 1, 2
EXIT_CODES = {"healthy": EXIT_HEALTHY, "unhealthy": EXIT_UNHEALTHY, "unavailable": EXIT_UNAVAILABLE}


def health_report(
    required_memory_mib: int | None = None,
    thresholds: Thresholds | None = None,
    snapshot: list[dict[str, Any]] | None = None,
) -> tuple[int, dict[str, Any]]:
    """(exit code, verdict) as `appliance gpu check` gives them: 0 healthy, 1 unhealthy, 2 unavailable.

    `snapshot` is evaluated instead of asking NVML, when given. `required_memory_mib` overrides the
    thresholds' value.
    """
    thresholds = thresholds or Thresholds()
    if required_memory_mib is not None:
        thresholds = replace(thresholds, required_memory_mib=required_memory_mib)
    if snapshot is None:
        try:
            snapshot = collect_snapshots()
        except GpuUnavailable as exc:
            result = {"status": "unavailable", "reasons": [str(exc)], "warnings": [], "gpus": []}
            return EXIT_UNAVAILABLE, {**result, "error": exc.error}
    result = evaluate(snapshot, thresholds)
    return EXIT_CODES[result["status"]], result
