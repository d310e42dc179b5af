"""A snapshot of each NVIDIA GPU through NVML, as plain JSON-able dicts.

Standard library and `nvidia-ml-py` (`pynvml`) only: Ansible runs this on hosts with nothing else.
Each field is read on its own; a field the GPU or driver does not support is None ("n/a"), never a
failure. Errors that mean "no usable driver or GPU" raise `GpuUnavailable` with one line to act on.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

MIB = 1024 * 1024

# Clock event ("throttle") reason bits, as in nvml.h; the names say what each means.
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

# nvmlGpuRecoveryAction_t: what the driver says must happen before the GPU is usable again.
RECOVERY_ACTIONS = {
    0: "none",
    1: "gpu_reset",
    2: "node_reboot",
    3: "drain_p2p",
    4: "drain_and_reset",
    5: "recover_imex_domain",
    6: "bus_reset",
    7: "system_reboot",
}

# NVML error names (pynvml's NVMLError_* classes) that mean there is no usable driver or GPU,
# each with a one-line explanation and what to do.
UNAVAILABLE_HINTS = {
    "LibraryNotFound": (
        "NVIDIA driver library (libnvidia-ml.so.1) not found: install the NVIDIA driver "
        "(e.g. `apt install nvidia-driver-580-server`) and reboot"
    ),
    "DriverNotLoaded": (
        "NVIDIA kernel driver is not loaded: check `lsmod | grep nvidia` and `dmesg`, load it with "
        "`modprobe nvidia` or reboot (Secure Boot may need the module signed)"
    ),
    "LibRmVersionMismatch": (
        "NVIDIA driver library and kernel module versions differ (driver upgraded without a reboot): "
        "reboot the machine"
    ),
    "NoPermission": "no permission to access the NVIDIA device files: run as root or fix /dev/nvidia* access",
    "GpuIsLost": "the GPU has fallen off the bus (GPU is lost): power-cycle the machine and check the card",
    "ResetRequired": "the GPU needs a reset: run `nvidia-smi -r` with nothing using it, or reboot",
    "Uninitialized": "NVML could not be initialised: reinstall the NVIDIA driver",
    "FunctionNotFound": "the NVIDIA driver is too old for this NVML call: upgrade the driver",
}


class GpuUnavailable(Exception):
    """No usable NVIDIA driver or GPU. The message is one line that says what to do."""

    def __init__(self, message: str, error: str = "unavailable") -> None:
        super().__init__(message)
        self.error = error  # NVML error name, e.g. "DriverNotLoaded", or "NoGpu", "NoLibrary"


def load_nvml() -> ModuleType:
    """Import pynvml only when needed, so a host without it gets a verdict, not an ImportError."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        raise GpuUnavailable(
            "the nvidia-ml-py Python package (pynvml) is not installed: `pip install nvidia-ml-py`",
            "NoPythonBindings",
        ) from None


def nvml_error_name(exc: BaseException) -> str:
    """`NVMLError_DriverNotLoaded` -> `DriverNotLoaded`."""
    return type(exc).__name__.removeprefix("NVMLError_")


def unavailable_from(exc: BaseException) -> GpuUnavailable:
    name = nvml_error_name(exc)
    hint = UNAVAILABLE_HINTS.get(name, f"NVML failed ({exc}): check the NVIDIA driver with `nvidia-smi`")
    return GpuUnavailable(hint, name)


class Reader:
    """Reads one NVML value at a time; "not supported" (and similar) becomes None."""

    def __init__(self, nvml: ModuleType) -> None:
        self.nvml = nvml

    def __call__(self, *calls: tuple[str, tuple[Any, ...]] | str, default: Any = None) -> Any:
        """Try each (function name, args) in turn: the current call first, then deprecated ones."""
        for call in calls:
            name, args = (call, ()) if isinstance(call, str) else call
            fn: Callable[..., Any] | None = getattr(self.nvml, name, None)
            if fn is None:
                continue
            try:
                return fn(*args)
            except self.nvml.NVMLError as exc:
                if nvml_error_name(exc) in ("GpuIsLost", "ResetRequired"):
                    raise unavailable_from(exc) from None
                continue  # NotSupported, FunctionNotFound, NoPermission, ...: try the next, then None
        return default


def text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def collect_snapshots(nvml: ModuleType | None = None) -> list[dict[str, Any]]:
    """One dict per GPU. Raises GpuUnavailable when there is no usable driver or GPU."""
    nvml = nvml or load_nvml()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise unavailable_from(exc) from None
    try:
        read = Reader(nvml)
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise GpuUnavailable("the NVIDIA driver is loaded but sees no GPU: check `nvidia-smi`", "NoGpu")
        system = {
            "driver_version": text(read("nvmlSystemGetDriverVersion")),
            "cuda_driver_version": cuda_version(
                read("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion")
            ),
        }
        return [device_snapshot(nvml, read, i, system) for i in range(count)]
    except nvml.NVMLError as exc:
        raise unavailable_from(exc) from None
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def cuda_version(value: int | None) -> str | None:
    return None if value is None else f"{value // 1000}.{value % 1000 // 10}"


def device_snapshot(nvml: ModuleType, read: Reader, index: int, system: dict[str, Any]) -> dict[str, Any]:
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    cc = read(("nvmlDeviceGetCudaComputeCapability", (h,)))
    return {
        "index": index,
        "name": text(read(("nvmlDeviceGetName", (h,)))),
        "uuid": text(read(("nvmlDeviceGetUUID", (h,)))),
        **system,
        "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
        "memory": memory(nvml, read, h),
        **temperatures(nvml, read, h),
        **power(read, h),
        "utilization": utilization(read, h),
        "clock_event_reasons": clock_event_reasons(read, h),
        "ecc": ecc(nvml, read, h),
        "retired_pages": retired_pages(nvml, read, h),
        "row_remap": row_remap(read, h),
        "recovery_action": recovery_action(nvml, read, h),
        "pcie": pcie(read, h),
        "persistence_mode": enabled(read(("nvmlDeviceGetPersistenceMode", (h,)))),
        "mig_mode": mig_mode(read, h),
        "processes": processes(read, h),
    }


def enabled(value: int | None) -> bool | None:
    return None if value is None else bool(value)


def memory(nvml: ModuleType, read: Reader, h: Any) -> dict[str, int | None]:
    # v2 leaves out the memory the driver reserves from "used"; v1 is the deprecated fallback.
    info = read(("nvmlDeviceGetMemoryInfo", (h, getattr(nvml, "nvmlMemory_v2", 0))))
    info = info or read(("nvmlDeviceGetMemoryInfo", (h,)))
    if info is None:
        return {"total_mib": None, "used_mib": None, "free_mib": None}
    return {"total_mib": info.total // MIB, "used_mib": info.used // MIB, "free_mib": info.free // MIB}


def temperatures(nvml: ModuleType, read: Reader, h: Any) -> dict[str, int | None]:
    gpu_sensor = nvml.NVML_TEMPERATURE_GPU
    return {
        "temperature_c": read(
            ("nvmlDeviceGetTemperatureV", (h, gpu_sensor)), ("nvmlDeviceGetTemperature", (h, gpu_sensor))
        ),
        "temperature_slowdown_c": read(
            ("nvmlDeviceGetTemperatureThreshold", (h, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))
        ),
        "temperature_shutdown_c": read(
            ("nvmlDeviceGetTemperatureThreshold", (h, nvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN))
        ),
    }


def watts(milliwatts: int | None) -> float | None:
    return None if milliwatts is None else round(milliwatts / 1000, 1)


def power(read: Reader, h: Any) -> dict[str, float | None]:
    return {
        "power_w": watts(read(("nvmlDeviceGetPowerUsage", (h,)))),
        "power_limit_w": watts(
            read(("nvmlDeviceGetEnforcedPowerLimit", (h,)), ("nvmlDeviceGetPowerManagementLimit", (h,)))
        ),
    }


def utilization(read: Reader, h: Any) -> dict[str, int | None]:
    rates = read(("nvmlDeviceGetUtilizationRates", (h,)))
    return {"gpu_percent": rates.gpu if rates else None, "memory_percent": rates.memory if rates else None}


def clock_event_reasons(read: Reader, h: Any) -> list[str] | None:
    mask = read(
        ("nvmlDeviceGetCurrentClocksEventReasons", (h,)),
        ("nvmlDeviceGetCurrentClocksThrottleReasons", (h,)),
    )
    if mask is None:
        return None
    return [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]


def ecc(nvml: ModuleType, read: Reader, h: Any) -> dict[str, Any]:
    mode = read(("nvmlDeviceGetEccMode", (h,)))

    def count(error_type: int, counter: int) -> int | None:
        return read(("nvmlDeviceGetTotalEccErrors", (h, error_type, counter)))

    corrected, uncorrected = nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    return {
        "enabled": enabled(mode[0]) if mode else None,
        "volatile": {
            "corrected": count(corrected, nvml.NVML_VOLATILE_ECC),
            "uncorrected": count(uncorrected, nvml.NVML_VOLATILE_ECC),
        },
        "aggregate": {
            "corrected": count(corrected, nvml.NVML_AGGREGATE_ECC),
            "uncorrected": count(uncorrected, nvml.NVML_AGGREGATE_ECC),
        },
    }


def retired_pages(nvml: ModuleType, read: Reader, h: Any) -> dict[str, Any] | None:
    """Page retirement (before Ampere); None on GPUs that remap rows instead."""
    pending = read(("nvmlDeviceGetRetiredPagesPendingStatus", (h,)))
    if pending is None:
        return None

    def pages(cause: int) -> int | None:
        found = read(("nvmlDeviceGetRetiredPages_v2", (h, cause)), ("nvmlDeviceGetRetiredPages", (h, cause)))
        return None if found is None else len(found)

    return {
        "single_bit": pages(nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
        "double_bit": pages(nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR),
        "pending": bool(pending),
    }


def row_remap(read: Reader, h: Any) -> dict[str, Any] | None:
    """Row remapping (Ampere and later); None where the GPU does not remap rows."""
    rows = read(("nvmlDeviceGetRemappedRows", (h,)))
    if rows is None:
        return None
    correctable, uncorrectable, pending, failure = rows
    return {
        "correctable": correctable,
        "uncorrectable": uncorrectable,
        "pending": bool(pending),
        "failure": bool(failure),
    }


def recovery_action(nvml: ModuleType, read: Reader, h: Any) -> str | None:
    """What the driver says must happen before the GPU is fully usable (newer drivers only)."""
    field_id = getattr(nvml, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)
    if field_id is None:
        return None
    values = read(("nvmlDeviceGetFieldValues", (h, [field_id])))
    if not values or values[0].nvmlReturn != 0:
        return None
    code = values[0].value.uiVal
    return RECOVERY_ACTIONS.get(code, f"unknown({code})")


def pcie(read: Reader, h: Any) -> dict[str, int | None]:
    return {
        "generation": read(("nvmlDeviceGetCurrPcieLinkGeneration", (h,))),
        # The GPU's own maximum; the older call reports the lower of GPU and slot.
        "max_generation": read(
            ("nvmlDeviceGetGpuMaxPcieLinkGeneration", (h,)), ("nvmlDeviceGetMaxPcieLinkGeneration", (h,))
        ),
        "width": read(("nvmlDeviceGetCurrPcieLinkWidth", (h,))),
        "max_width": read(("nvmlDeviceGetMaxPcieLinkWidth", (h,))),
    }


def mig_mode(read: Reader, h: Any) -> dict[str, bool] | None:
    mode = read(("nvmlDeviceGetMigMode", (h,)))
    return None if mode is None else {"current": bool(mode[0]), "pending": bool(mode[1])}


def processes(read: Reader, h: Any) -> list[dict[str, Any]] | None:
    found = read(
        ("nvmlDeviceGetComputeRunningProcesses_v3", (h,)),
        ("nvmlDeviceGetComputeRunningProcesses", (h,)),
    )
    if found is None:
        return None
    result = []
    for p in found:
        used = p.usedGpuMemory
        name = text(read(("nvmlSystemGetProcessName", (p.pid,))))
        # NVML reports "not available" as None (pynvml) or the max unsigned value.
        used_mib = None if used is None or used >= 2**63 else used // MIB
        result.append({"pid": p.pid, "name": name, "used_mib": used_mib})
    return result
