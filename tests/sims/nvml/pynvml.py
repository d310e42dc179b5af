"""A stand-in for nvidia-ml-py's `pynvml`, for machines without an NVIDIA GPU.

It has the same names, constants, error classes and return shapes as the real module for the calls the
appliance makes, and answers from a JSON description of the GPUs (the file named by $FAKE_NVML_CONFIG,
re-read at every nvmlInit, or `CONFIG` set directly). Its config can make any call fail the way NVML does:
`init_error` (e.g. "DriverNotLoaded", "LibraryNotFound", "LibRmVersionMismatch"), `not_supported` (calls
that answer NVML_ERROR_NOT_SUPPORTED) and `missing` (calls an older driver lacks: FunctionNotFound).
"""

from __future__ import annotations

import json
import os
import string
from types import SimpleNamespace
from typing import Any, ClassVar

# Return codes and constants, with the values nvml.h gives them.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0
NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 230
nvmlMemory_v2 = 0x02000028


class NVMLError(Exception):
    _classes: ClassVar[dict[int, type]] = {}

    def __new__(cls, value: int):
        if cls is NVMLError:
            cls = NVMLError._classes.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)

    def __str__(self) -> str:
        return f"NVML error {self.value}"


# pynvml makes NVMLError_<CapWords> subclasses from the NVML_ERROR_* names; so does this.
for _name, _value in list(globals().items()):
    if _name.startswith("NVML_ERROR_"):
        _cls_name = "NVMLError_" + string.capwords(_name[len("NVML_ERROR_") :], "_").replace("_", "")
        _cls = type(_cls_name, (NVMLError,), {})
        NVMLError._classes[_value] = _cls
        globals()[_cls_name] = _cls

ERROR_CODES = {cls.__name__.removeprefix("NVMLError_"): code for code, cls in NVMLError._classes.items()}

HEALTHY_H100 = {
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-00000000-1111-2222-3333-444444444444",
    "compute_capability": [9, 0],
    "memory_total_mib": 81559,
    "memory_used_mib": 1024,
    "temperature": 38,
    "slowdown": 87,
    "shutdown": 92,
    "power_mw": 72000,
    "power_limit_mw": 700000,
    "utilization": [0, 0],
    "clock_events": 0x1,  # idle
    "ecc_mode": [1, 1],
    "ecc": {"volatile": [0, 0], "aggregate": [0, 0]},
    "retired": None,  # Hopper remaps rows instead: NOT_SUPPORTED
    "remapped": [0, 0, 0, 0],
    "recovery_action": 0,
    "pcie": [5, 5, 16, 16],
    "persistence": 1,
    "mig": [0, 0],
    "processes": [],
}

CONFIG: dict[str, Any] | None = None
_state: dict[str, Any] = {"config": None}


def _config() -> dict[str, Any]:
    config = _state["config"]
    if config is None:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return config


def _device(handle: Any) -> dict[str, Any]:
    return {**HEALTHY_H100, **_config()["devices"][handle.index]}


def _call(name: str) -> None:
    config = _config()
    if name in config.get("missing", ()):
        raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
    if name in config.get("not_supported", ()):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    if name in config.get("errors", {}):
        raise NVMLError(ERROR_CODES[config["errors"][name]])


def _load() -> dict[str, Any]:
    if CONFIG is not None:
        return CONFIG
    path = os.environ.get("FAKE_NVML_CONFIG")
    if not path:
        return {"devices": [{}]}
    with open(path) as f:
        return json.load(f)


def nvmlInit() -> None:
    config = _load()
    if config.get("init_error"):
        raise NVMLError(ERROR_CODES[config["init_error"]])
    _state["config"] = config


def nvmlShutdown() -> None:
    _config()
    _state["config"] = None


def nvmlSystemGetDriverVersion() -> str:
    _call("nvmlSystemGetDriverVersion")
    return _config().get("driver_version", "580.95.05")


def nvmlSystemGetCudaDriverVersion_v2() -> int:
    _call("nvmlSystemGetCudaDriverVersion_v2")
    return _config().get("cuda_version", 13000)


def nvmlSystemGetCudaDriverVersion() -> int:
    _call("nvmlSystemGetCudaDriverVersion")
    return _config().get("cuda_version", 13000)


def nvmlSystemGetProcessName(pid: int) -> str:
    _call("nvmlSystemGetProcessName")
    return f"/usr/bin/process-{pid}"


def nvmlDeviceGetCount() -> int:
    _call("nvmlDeviceGetCount")
    return len(_config()["devices"])


def nvmlDeviceGetHandleByIndex(index: int) -> Any:
    _call("nvmlDeviceGetHandleByIndex")
    if index >= len(_config()["devices"]):
        raise NVMLError(2)
    return SimpleNamespace(index=index)


def _getter(name: str, answer):
    def query(handle: Any, *args: Any) -> Any:
        _call(name)
        value = answer(_device(handle), *args)
        if value is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return value

    query.__name__ = name
    return query


MIB = 1024 * 1024


def _memory(d: dict, version: int = 0) -> Any:
    total, used = d["memory_total_mib"] * MIB, d["memory_used_mib"] * MIB
    return SimpleNamespace(total=total, used=used, free=total - used, version=version)


def _processes(d: dict) -> list:
    return [SimpleNamespace(pid=p["pid"], usedGpuMemory=p.get("used_mib", 0) * MIB) for p in d["processes"]]


def _field_values(d: dict, field_ids: list) -> list:
    return [
        SimpleNamespace(fieldId=f, nvmlReturn=NVML_SUCCESS, value=SimpleNamespace(uiVal=d["recovery_action"]))
        if f == NVML_FI_DEV_GET_GPU_RECOVERY_ACTION and d["recovery_action"] is not None
        else SimpleNamespace(fieldId=f, nvmlReturn=NVML_ERROR_NOT_SUPPORTED, value=SimpleNamespace(uiVal=0))
        for f in field_ids
    ]


def _ecc(d: dict, error_type: int, counter: int) -> int | None:
    if d["ecc"] is None:
        return None
    return d["ecc"]["volatile" if counter == NVML_VOLATILE_ECC else "aggregate"][error_type]


def _retired_pages(d: dict, cause: int) -> list | None:
    if d["retired"] is None:
        return None
    count = d["retired"]["dbe" if cause == NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR else "sbe"]
    return [0x1000 * i for i in range(count)]


def _threshold(d: dict, which: int) -> int | None:
    return d["slowdown"] if which == NVML_TEMPERATURE_THRESHOLD_SLOWDOWN else d["shutdown"]


_QUERIES = {
    "nvmlDeviceGetName": lambda d: d["name"],
    "nvmlDeviceGetUUID": lambda d: d["uuid"],
    "nvmlDeviceGetCudaComputeCapability": lambda d: tuple(d["compute_capability"]),
    "nvmlDeviceGetMemoryInfo": _memory,
    "nvmlDeviceGetTemperatureV": lambda d, sensor: d["temperature"],
    "nvmlDeviceGetTemperature": lambda d, sensor: d["temperature"],
    "nvmlDeviceGetTemperatureThreshold": _threshold,
    "nvmlDeviceGetPowerUsage": lambda d: d["power_mw"],
    "nvmlDeviceGetEnforcedPowerLimit": lambda d: d["power_limit_mw"],
    "nvmlDeviceGetPowerManagementLimit": lambda d: d["power_limit_mw"],
    "nvmlDeviceGetUtilizationRates": lambda d: SimpleNamespace(
        gpu=d["utilization"][0], memory=d["utilization"][1]
    ),
    "nvmlDeviceGetCurrentClocksEventReasons": lambda d: d["clock_events"],
    "nvmlDeviceGetCurrentClocksThrottleReasons": lambda d: d["clock_events"],
    "nvmlDeviceGetEccMode": lambda d: d["ecc_mode"],
    "nvmlDeviceGetTotalEccErrors": _ecc,
    "nvmlDeviceGetRetiredPagesPendingStatus": lambda d: (
        None if d["retired"] is None else d["retired"]["pending"]
    ),
    "nvmlDeviceGetRetiredPages_v2": _retired_pages,
    "nvmlDeviceGetRetiredPages": _retired_pages,
    "nvmlDeviceGetRemappedRows": lambda d: None if d["remapped"] is None else tuple(d["remapped"]),
    "nvmlDeviceGetFieldValues": _field_values,
    "nvmlDeviceGetCurrPcieLinkGeneration": lambda d: d["pcie"][0],
    "nvmlDeviceGetGpuMaxPcieLinkGeneration": lambda d: d["pcie"][1],
    "nvmlDeviceGetMaxPcieLinkGeneration": lambda d: d["pcie"][1],
    "nvmlDeviceGetCurrPcieLinkWidth": lambda d: d["pcie"][2],
    "nvmlDeviceGetMaxPcieLinkWidth": lambda d: d["pcie"][3],
    "nvmlDeviceGetPersistenceMode": lambda d: d["persistence"],
    "nvmlDeviceGetMigMode": lambda d: None if d["mig"] is None else list(d["mig"]),
    "nvmlDeviceGetComputeRunningProcesses_v3": _processes,
    "nvmlDeviceGetComputeRunningProcesses": _processes,
}

for _name, _answer in _QUERIES.items():
    globals()[_name] = _getter(_name, _answer)
