"""NVML collection against the NVML stand-in: current calls first, deprecated ones after, "not supported"
as n/a, and the errors that mean no usable driver or GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pynvml as real_pynvml
import pytest

from appliance.gpu import GpuUnavailable, collect_snapshots, evaluate
from appliance.gpu import snapshot as snapshot_module
from tests.sims.nvml import load_fake


def test_the_stand_in_has_the_real_bindings_names_values_and_error_classes():
    """The stand-in is only worth its answers if it looks like nvidia-ml-py where the appliance touches it."""
    fake = load_fake({"devices": [{}]})
    # Every NVML name the collection uses: quoted call names and `nvml.<attribute>`s.
    source = Path(snapshot_module.__file__).read_text()
    used = set(re.findall(r'"(nvml\w+)"', source)) | set(re.findall(r"nvml\.((?:nvml|NVML)\w+)", source))
    assert {
        "nvmlDeviceGetRemappedRows",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "NVMLError",
        "NVML_VOLATILE_ECC",
    } <= used
    for name in used:
        assert hasattr(real_pynvml, name), f"pynvml has no {name}"
        assert hasattr(fake, name), f"the stand-in has no {name}"
        if not callable(getattr(real_pynvml, name)):
            assert getattr(fake, name) == getattr(real_pynvml, name), name
    for name in dir(fake):
        if name.startswith("NVML_ERROR_"):
            code = getattr(fake, name)
            assert type(fake.NVMLError(code)).__name__ == type(real_pynvml.NVMLError(code)).__name__
    # The snapshot's bit names follow nvml.h's clock event reasons.
    assert snapshot_module.CLOCK_EVENT_REASONS[real_pynvml.nvmlClocksEventReasonSwThermalSlowdown] == (
        "sw_thermal_slowdown"
    )
    assert snapshot_module.CLOCK_EVENT_REASONS[real_pynvml.nvmlClocksEventReasonSwPowerCap] == "sw_power_cap"
    assert snapshot_module.RECOVERY_ACTIONS[real_pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET] == "gpu_reset"


def test_a_full_snapshot_through_the_current_calls():
    gpus = collect_snapshots(
        load_fake(
            {
                "driver_version": "580.95.05",
                "cuda_version": 13000,
                "devices": [
                    {
                        "processes": [{"pid": 4242, "used_mib": 30000}],
                        "utilization": [87, 40],
                        "clock_events": 0x4,
                    }
                ],
            }
        )
    )
    assert len(gpus) == 1
    gpu = gpus[0]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert (gpu["driver_version"], gpu["cuda_driver_version"], gpu["compute_capability"]) == (
        "580.95.05",
        "13.0",
        "9.0",
    )
    assert gpu["memory"] == {"total_mib": 81559, "used_mib": 1024, "free_mib": 80535}
    assert (gpu["temperature_c"], gpu["temperature_slowdown_c"], gpu["temperature_shutdown_c"]) == (
        38,
        87,
        92,
    )
    assert (gpu["power_w"], gpu["power_limit_w"]) == (72.0, 700.0)
    assert gpu["utilization"] == {"gpu_percent": 87, "memory_percent": 40}
    assert gpu["clock_event_reasons"] == ["sw_power_cap"]
    assert gpu["ecc"]["volatile"] == {"corrected": 0, "uncorrected": 0}
    assert gpu["retired_pages"] is None  # Hopper remaps rows instead
    assert gpu["row_remap"] == {"correctable": 0, "uncorrectable": 0, "pending": False, "failure": False}
    assert gpu["recovery_action"] == "none"
    assert gpu["pcie"] == {"generation": 5, "max_generation": 5, "width": 16, "max_width": 16}
    assert gpu["persistence_mode"] is True
    assert gpu["mig_mode"] == {"current": False, "pending": False}
    assert gpu["processes"] == [{"pid": 4242, "name": "/usr/bin/process-4242", "used_mib": 30000}]


def test_an_older_driver_without_the_current_calls_is_read_through_the_deprecated_ones():
    missing = [
        "nvmlDeviceGetTemperatureV",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlSystemGetCudaDriverVersion_v2",
        "nvmlDeviceGetGpuMaxPcieLinkGeneration",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetRetiredPages_v2",
    ]
    device = {"temperature": 61, "clock_events": 0x20, "retired": {"sbe": 2, "dbe": 1, "pending": 1}}
    fake = load_fake({"missing": missing, "cuda_version": 12040, "devices": [device]})
    gpu = collect_snapshots(fake)[0]
    assert gpu["temperature_c"] == 61
    assert gpu["clock_event_reasons"] == ["sw_thermal_slowdown"]
    assert gpu["cuda_driver_version"] == "12.4"
    assert gpu["pcie"]["max_generation"] == 5
    assert gpu["power_limit_w"] == 700.0
    assert gpu["retired_pages"] == {"single_bit": 2, "double_bit": 1, "pending": True}
    assert gpu["processes"] == []


def test_fields_the_gpu_does_not_support_are_na_and_not_a_failure():
    everything = [
        "nvmlDeviceGetTemperatureThreshold",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetPowerManagementLimit",
        "nvmlDeviceGetEccMode",
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetRemappedRows",
        "nvmlDeviceGetFieldValues",
        "nvmlDeviceGetPersistenceMode",
        "nvmlDeviceGetMigMode",
        "nvmlDeviceGetCurrPcieLinkGeneration",
        "nvmlDeviceGetMaxPcieLinkWidth",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetUtilizationRates",
    ]
    gpu = collect_snapshots(load_fake({"not_supported": everything, "devices": [{}]}))[0]
    for key in (
        "temperature_slowdown_c",
        "power_w",
        "power_limit_w",
        "row_remap",
        "recovery_action",
        "persistence_mode",
        "mig_mode",
        "clock_event_reasons",
        "processes",
    ):
        assert gpu[key] is None, key
    assert gpu["ecc"] == {
        "enabled": None,
        "volatile": {"corrected": None, "uncorrected": None},
        "aggregate": {"corrected": None, "uncorrected": None},
    }
    assert gpu["pcie"]["generation"] is None and gpu["pcie"]["max_width"] is None
    assert gpu["temperature_c"] == 38  # what is supported is still read
    assert evaluate([gpu])["status"] == "healthy"


@pytest.mark.parametrize(
    ("error", "words"),
    [
        ("LibraryNotFound", "libnvidia-ml.so.1"),
        ("DriverNotLoaded", "kernel driver is not loaded"),
        ("LibRmVersionMismatch", "reboot"),
        ("NoPermission", "permission"),
    ],
)
def test_init_errors_mean_no_usable_driver(error, words):
    with pytest.raises(GpuUnavailable) as exc:
        collect_snapshots(load_fake({"init_error": error}))
    assert exc.value.error == error
    assert words in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_gpu_lost_in_the_middle_of_a_snapshot_is_unavailable_and_nvml_is_shut_down():
    fake = load_fake({"errors": {"nvmlDeviceGetUUID": "GpuIsLost"}, "devices": [{}]})
    with pytest.raises(GpuUnavailable) as exc:
        collect_snapshots(fake)
    assert exc.value.error == "GpuIsLost"
    assert fake._state["config"] is None  # nvmlShutdown ran


def test_a_driver_that_sees_no_gpu_is_unavailable():
    with pytest.raises(GpuUnavailable) as exc:
        collect_snapshots(load_fake({"devices": []}))
    assert exc.value.error == "NoGpu"
