"""GPU snapshots shaped as `appliance.gpu.collect_snapshots()` returns them, built for tests."""

from __future__ import annotations

from typing import Any


def healthy_gpu(**changes: Any) -> dict[str, Any]:
    """A healthy 48 GB-class card (an L40S); `a__b=v` sets nested field `b` of `a`."""
    gpu = {
        "index": 0,
        "name": "NVIDIA L40S",
        "uuid": "GPU-test",
        "driver_version": "580.95.05",
        "cuda_driver_version": "13.0",
        "compute_capability": "8.9",
        "memory": {"total_mib": 46068, "used_mib": 500, "free_mib": 45568},
        "temperature_c": 45,
        "temperature_slowdown_c": 87,
        "temperature_shutdown_c": 92,
        "power_w": 80.0,
        "power_limit_w": 350.0,
        "utilization": {"gpu_percent": 3, "memory_percent": 1},
        "clock_event_reasons": ["gpu_idle"],
        "ecc": {
            "enabled": True,
            "volatile": {"corrected": 0, "uncorrected": 0},
            "aggregate": {"corrected": 0, "uncorrected": 0},
        },
        "retired_pages": None,
        "row_remap": {"correctable": 0, "uncorrectable": 0, "pending": False, "failure": False},
        "recovery_action": "none",
        "pcie": {"generation": 4, "max_generation": 4, "width": 16, "max_width": 16},
        "persistence_mode": True,
        "mig_mode": {"current": False, "pending": False},
        "processes": [],
    }
    for path, value in changes.items():
        target = gpu
        *parents, leaf = path.split("__")
        for key in parents:
            target = target[key]
        target[leaf] = value
    return gpu
