"""GPU health as a pure function of a snapshot (see snapshot.py) and thresholds.

The rules follow DCGM's health watches (modules/health/DcgmHealthWatch.cpp in NVIDIA/DCGM):
failures are what make a GPU unfit to serve; warnings are what an admin should look at. A field that
is None ("n/a": the GPU does not report it) never fails a rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# DCGM_LIMIT_MAX_RETIRED_PAGES (dcgm_gpu_hardware_limits.h): fail when SBE + DBE retired pages reach it.
MAX_RETIRED_PAGES = 60
# Our own conservative limit for rows remapped because of uncorrectable errors; a remap *failure*
# (bank out of spare rows) always fails. See NVIDIA's "GPU Memory Error Management", row remapping.
MAX_UNCORRECTABLE_REMAPS = 8
# The oldest driver the engines run on: the vLLM image's CUDA 12.9 (models/catalog.toml `min_driver`;
# `appliance gpu check` reads it from there, this is the default when no catalog is at hand).
MIN_DRIVER = "575.51.03"

THERMAL_EVENTS = ("sw_thermal_slowdown", "hw_thermal_slowdown", "hw_slowdown")
POWER_EVENTS = ("sw_power_cap", "hw_power_brake_slowdown")
RESET_ACTIONS = ("gpu_reset", "drain_and_reset", "bus_reset", "node_reboot", "system_reboot")


@dataclass(frozen=True)
class Thresholds:
    """Limits the evaluation applies; defaults follow DCGM and the engines' needs."""

    required_memory_mib: int | None = None  # what the plan needs on one GPU (None: not checked)
    min_driver: str | None = MIN_DRIVER
    max_retired_pages: int = MAX_RETIRED_PAGES
    max_uncorrectable_remaps: int = MAX_UNCORRECTABLE_REMAPS


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("."):
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def evaluate(gpus: list[dict[str, Any]], thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The verdict over all GPUs: status, failure reasons and warnings, each prefixed by the GPU."""
    thresholds = thresholds or Thresholds()
    reasons: list[str] = []
    warnings: list[str] = []
    if not gpus:
        return verdict("unavailable", ["no NVIDIA GPU found"], [], gpus)
    for gpu in gpus:
        where = f"GPU {gpu.get('index', '?')} ({gpu.get('name') or 'unknown'})"
        reasons += [f"{where}: {r}" for r in gpu_failures(gpu, thresholds)]
        warnings += [f"{where}: {w}" for w in gpu_warnings(gpu)]
    if thresholds.required_memory_mib is not None:
        best = max((gpu_memory_total(g) or 0) for g in gpus)
        if best < thresholds.required_memory_mib:
            reasons.append(
                f"the plan needs {thresholds.required_memory_mib} MiB of GPU memory, "
                f"the largest GPU has {best} MiB"
            )
    return verdict("unhealthy" if reasons else "healthy", reasons, warnings, gpus)


def verdict(status: str, reasons: list[str], warnings: list[str], gpus: list[dict[str, Any]]) -> dict:
    return {"status": status, "reasons": reasons, "warnings": warnings, "gpus": gpus}


def gpu_memory_total(gpu: dict[str, Any]) -> int | None:
    return (gpu.get("memory") or {}).get("total_mib")


def gpu_failures(gpu: dict[str, Any], t: Thresholds) -> list[str]:
    failures = []
    ecc = gpu.get("ecc") or {}
    dbe = (ecc.get("volatile") or {}).get("uncorrected")
    if dbe:  # DCGM_FR_VOLATILE_DBE_DETECTED
        failures.append(f"{dbe} volatile uncorrectable (double-bit) ECC errors since the driver loaded")

    remap = gpu.get("row_remap")
    if remap:
        if remap.get("failure"):  # DCGM_FR_ROW_REMAP_FAILURE
            failures.append("row remapping failed: a memory bank has no spare rows left (replace the GPU)")
        unc = remap.get("uncorrectable")
        if unc is not None and unc > t.max_uncorrectable_remaps:
            limit = t.max_uncorrectable_remaps
            failures.append(f"{unc} rows remapped for uncorrectable errors (limit {limit})")
        if remap.get("pending"):
            failures.append("row remapping pending: reset the GPU (`nvidia-smi -r`) or reboot")

    pages = gpu.get("retired_pages")
    if pages:
        total = (pages.get("single_bit") or 0) + (pages.get("double_bit") or 0)
        if total >= t.max_retired_pages:  # DCGM_FR_RETIRED_PAGES_LIMIT
            failures.append(f"{total} retired memory pages (limit {t.max_retired_pages})")

    action = gpu.get("recovery_action")
    if action in RESET_ACTIONS:
        failures.append(f"the driver asks for recovery action '{action}' before the GPU is usable")

    temp, slowdown = gpu.get("temperature_c"), gpu.get("temperature_slowdown_c")
    if temp is not None and slowdown is not None and temp >= slowdown:
        failures.append(f"temperature {temp} °C at or above the slowdown threshold {slowdown} °C")

    driver = gpu.get("driver_version")
    if t.min_driver and driver and version_tuple(driver) < version_tuple(t.min_driver):
        failures.append(f"driver {driver} is older than {t.min_driver}, the minimum the engines need")
    return failures


def gpu_warnings(gpu: dict[str, Any]) -> list[str]:
    warnings = []
    events = gpu.get("clock_event_reasons") or []
    thermal = [e for e in events if e in THERMAL_EVENTS]
    if thermal:  # DCGM_HEALTH_WATCH_THERMAL: thermal violations
        warnings.append(f"clocks slowed for heat ({', '.join(thermal)}): check airflow and fans")
    power = [e for e in events if e in POWER_EVENTS]
    if power:  # DCGM_HEALTH_WATCH_POWER: power violations
        warnings.append(f"clocks capped by power ({', '.join(power)}): check the power limit and supply")

    pages = gpu.get("retired_pages")
    if pages and pages.get("pending"):  # DCGM_FR_PENDING_PAGE_RETIREMENTS
        warnings.append("memory pages pending retirement: reboot or reset the GPU when convenient")

    link = gpu.get("pcie") or {}
    gen, max_gen = link.get("generation"), link.get("max_generation")
    width, max_width = link.get("width"), link.get("max_width")
    # An idle GPU lowers its link generation to save power; the width should not drop.
    if (gen is not None and max_gen is not None and gen < max_gen) or (
        width is not None and max_width is not None and width < max_width
    ):
        warnings.append(
            f"PCIe link at gen {gen} x{width}, below the GPU's gen {max_gen} x{max_width} "
            "(normal at idle for the generation; check the slot and riser if it stays low under load)"
        )

    if gpu.get("persistence_mode") is False:
        warnings.append("persistence mode is off: enable it (`nvidia-smi -pm 1` or nvidia-persistenced)")
    mig = gpu.get("mig_mode") or {}
    if mig.get("current") or mig.get("pending"):
        warnings.append("MIG mode is on: the engines expect the whole GPU")
    return warnings
