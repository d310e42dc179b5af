"""The gateway's GPU section on /readyz: reported, refreshed in the background, never fatal."""

from __future__ import annotations

import time

import httpx

from tests.harness import REPO
from tests.sims.nvml import FAKE_DIR, write_config


def gpu_check(gw) -> dict:
    return gw.readyz(timeout=10).json()["checks"]["gpu"]


def wait_for(gw, predicate, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        check = gpu_check(gw)
        if predicate(check) or time.monotonic() > deadline:
            return check
        time.sleep(0.1)


def test_no_gpu_is_reported_on_readyz_and_the_gateway_still_serves(start_gateway):
    gw = start_gateway()
    check = wait_for(gw, lambda c: c["status"] != "pending")
    assert check["ready"] is False
    assert check["status"] == "unavailable"
    assert "libnvidia-ml.so.1" in check["reasons"][0]
    assert check["gpus"] == []
    assert httpx.get(gw.url + "/healthz").status_code == 200


def test_readyz_shows_the_gpus_key_figures_and_follows_a_gpu_going_bad(start_gateway, tmp_path):
    config = write_config(
        tmp_path / "nvml.json", {"devices": [{"utilization": [42, 10], "memory_used_mib": 20000}]}
    )
    gw = start_gateway(
        PYTHONPATH=f"{FAKE_DIR}:{REPO}", FAKE_NVML_CONFIG=str(config), APPLIANCE_GPU_REFRESH_INTERVAL="0.2"
    )
    check = wait_for(gw, lambda c: c["status"] == "healthy")
    assert check["ready"] is True
    assert check["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "memory_used_mib": 20000,
            "memory_total_mib": 81559,
            "utilization_percent": 42,
            "temperature_c": 38,
            "power_w": 72.0,
            "ecc_volatile_uncorrected": 0,
            "clock_event_reasons": ["gpu_idle"],
        }
    ]
    write_config(config, {"devices": [{"ecc": {"volatile": [0, 1], "aggregate": [0, 1]}}]})
    check = wait_for(gw, lambda c: c["status"] == "unhealthy")
    assert check["ready"] is False
    assert "double-bit" in check["reasons"][0]
    assert check["gpus"][0]["ecc_volatile_uncorrected"] == 1
    write_config(config, {"init_error": "DriverNotLoaded"})
    check = wait_for(gw, lambda c: c["status"] == "unavailable")
    assert "kernel driver is not loaded" in check["reasons"][0]
    assert '"event":"gpu_status"' in gw.logs()


def test_the_monitor_can_be_turned_off(start_gateway):
    gw = start_gateway(APPLIANCE_GPU_REFRESH_INTERVAL="0")
    assert "gpu" not in gw.readyz().json()["checks"]
