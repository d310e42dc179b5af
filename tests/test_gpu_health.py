"""GPU health evaluation: each DCGM-style rule and its boundary, on snapshots built here."""

from __future__ import annotations

import copy
import json

import pytest

from appliance.gpu import Thresholds, evaluate, health_report
from appliance.gpu.health import MAX_RETIRED_PAGES, MAX_UNCORRECTABLE_REMAPS
from tests.gpu_snapshots import healthy_gpu


def verdict_of(gpu: dict, **thresholds) -> dict:
    return evaluate([gpu], Thresholds(**thresholds))


def test_a_healthy_gpu_has_no_reasons_and_no_warnings():
    v = verdict_of(healthy_gpu())
    assert v == {"status": "healthy", "reasons": [], "warnings": [], "gpus": [healthy_gpu()]}


def test_no_gpu_is_unavailable():
    assert evaluate([])["status"] == "unavailable"


@pytest.mark.parametrize(("count", "status"), [(0, "healthy"), (1, "unhealthy")])
def test_volatile_double_bit_ecc_fails_from_the_first(count, status):
    v = verdict_of(healthy_gpu(ecc__volatile__uncorrected=count))
    assert v["status"] == status
    if count:
        assert "volatile uncorrectable (double-bit) ECC" in v["reasons"][0]
        assert v["reasons"][0].startswith("GPU 0 (NVIDIA L40S): ")


def test_aggregate_errors_and_correctable_errors_alone_do_not_fail():
    gpu = healthy_gpu(ecc__aggregate__uncorrected=3, ecc__volatile__corrected=1000)
    assert verdict_of(gpu)["status"] == "healthy"


def test_row_remap_failure_fails():
    v = verdict_of(healthy_gpu(row_remap__failure=True))
    assert v["status"] == "unhealthy"
    assert "no spare rows" in v["reasons"][0]


@pytest.mark.parametrize(
    ("count", "status"), [(MAX_UNCORRECTABLE_REMAPS, "healthy"), (MAX_UNCORRECTABLE_REMAPS + 1, "unhealthy")]
)
def test_uncorrectable_remaps_over_the_limit_fail(count, status):
    assert verdict_of(healthy_gpu(row_remap__uncorrectable=count))["status"] == status
    assert (
        verdict_of(healthy_gpu(row_remap__uncorrectable=3), max_uncorrectable_remaps=2)["status"]
        == "unhealthy"
    )


def test_a_pending_row_remap_needs_a_reset():
    v = verdict_of(healthy_gpu(row_remap__pending=True))
    assert v["status"] == "unhealthy"
    assert "reset" in v["reasons"][0]


@pytest.mark.parametrize(
    ("total", "status"), [(MAX_RETIRED_PAGES - 1, "healthy"), (MAX_RETIRED_PAGES, "unhealthy")]
)
def test_retired_pages_fail_at_the_limit(total, status):
    # DCGM counts single- and double-bit retirements together and fails at the limit itself.
    pages = {"single_bit": total - 2, "double_bit": 2, "pending": False}
    assert verdict_of(healthy_gpu(retired_pages=pages))["status"] == status


def test_pending_page_retirement_is_a_warning():
    v = verdict_of(healthy_gpu(retired_pages={"single_bit": 1, "double_bit": 0, "pending": True}))
    assert v["status"] == "healthy"
    assert any("pending retirement" in w for w in v["warnings"])


@pytest.mark.parametrize(
    ("action", "status"), [("none", "healthy"), ("gpu_reset", "unhealthy"), ("node_reboot", "unhealthy")]
)
def test_a_pending_gpu_reset_fails(action, status):
    assert verdict_of(healthy_gpu(recovery_action=action))["status"] == status


@pytest.mark.parametrize(("temp", "status"), [(86, "healthy"), (87, "unhealthy"), (95, "unhealthy")])
def test_temperature_fails_at_the_slowdown_threshold(temp, status):
    assert verdict_of(healthy_gpu(temperature_c=temp))["status"] == status


@pytest.mark.parametrize(("required", "status"), [(46068, "healthy"), (46069, "unhealthy")])
def test_less_memory_than_the_plan_needs_fails(required, status):
    v = verdict_of(healthy_gpu(), required_memory_mib=required)
    assert v["status"] == status
    if status == "unhealthy":
        assert "46069 MiB" in v["reasons"][0]


@pytest.mark.parametrize(
    ("driver", "status"),
    [
        ("575.51.03", "healthy"),
        ("575.51.02", "unhealthy"),
        ("570.195.03", "unhealthy"),
        ("580.95.05", "healthy"),
    ],
)
def test_a_driver_older_than_the_engines_need_fails(driver, status):
    v = verdict_of(healthy_gpu(driver_version=driver), min_driver="575.51.03")
    assert v["status"] == status


@pytest.mark.parametrize(
    ("events", "needle"),
    [
        (["sw_thermal_slowdown"], "heat"),
        (["hw_thermal_slowdown"], "heat"),
        (["sw_power_cap"], "power"),
        (["hw_power_brake_slowdown"], "power"),
    ],
)
def test_throttling_is_a_warning(events, needle):
    v = verdict_of(healthy_gpu(clock_event_reasons=events))
    assert v["status"] == "healthy"
    assert len(v["warnings"]) == 1 and needle in v["warnings"][0]


@pytest.mark.parametrize("link", [{"generation": 3}, {"width": 8}])
def test_a_pcie_link_below_its_maximum_is_a_warning(link):
    gpu = healthy_gpu()
    gpu["pcie"].update(link)
    v = verdict_of(gpu)
    assert v["status"] == "healthy"
    assert "PCIe link" in v["warnings"][0]


def test_persistence_mode_off_and_mig_on_are_warnings():
    v = verdict_of(healthy_gpu(persistence_mode=False, mig_mode={"current": True, "pending": True}))
    assert v["status"] == "healthy"
    assert [w.split(": ", 1)[1].split(" ")[0] for w in v["warnings"]] == ["persistence", "MIG"]


def test_fields_the_gpu_does_not_report_never_fail():
    gpu = healthy_gpu()
    for key in list(gpu):
        if key not in ("index", "name"):
            gpu[key] = None
    v = verdict_of(gpu, required_memory_mib=None)
    assert v["status"] == "healthy", v
    assert v["warnings"] == []


def test_every_gpu_is_judged_and_named():
    sick = healthy_gpu(index=1, ecc__volatile__uncorrected=2)
    v = evaluate([healthy_gpu(), sick])
    assert v["status"] == "unhealthy"
    assert v["reasons"] == [
        "GPU 1 (NVIDIA L40S): 2 volatile uncorrectable (double-bit) ECC errors since the driver loaded"
    ]


def test_health_report_on_an_injected_snapshot_gives_the_exit_code_and_json_verdict():
    snapshot = [healthy_gpu()]
    code, verdict = health_report(snapshot=copy.deepcopy(snapshot))
    assert (code, verdict["status"]) == (0, "healthy")
    assert json.loads(json.dumps(verdict)) == verdict
    code, verdict = health_report(snapshot=[healthy_gpu(temperature_c=90)])
    assert (code, verdict["status"]) == (1, "unhealthy")
    code, verdict = health_report(required_memory_mib=50000, snapshot=snapshot)
    assert code == 1 and "50000 MiB" in verdict["reasons"][0]
