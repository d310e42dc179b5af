#!/usr/bin/python
"""Ansible module: GPU health through NVML, by way of the appliance's own `appliance.gpu`."""

from __future__ import annotations

import dataclasses
import sys
import traceback

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: nvml_health
short_description: Check the NVIDIA GPUs' health through NVML before the appliance uses them
description:
  - Runs C(appliance.gpu.health_report()), the same check as C(appliance gpu check), and returns its
    verdict as facts (C(ansible_facts.appliance_gpu)).
  - Fails, with the reasons, when the GPU is unhealthy, too small for the plan, or unusable (no driver,
    driver not loaded, no GPU). Warnings (thermal or power slowdowns, persistence mode off, ...) are
    reported as Ansible warnings and do not fail the task.
  - Only reads; it changes nothing, so it runs the same in check mode.
  - The C(appliance) package must be importable by the interpreter that runs the module (run it with the
    appliance's venv as C(ansible_python_interpreter)), or from a directory given in I(python_path).
    C(appliance.gpu) needs nothing but the standard library and C(nvidia-ml-py).
options:
  required_memory_mib:
    description: GPU memory the plan needs on one GPU, in MiB; a smaller GPU fails the check.
    type: int
  thresholds:
    description:
      - Limits for the evaluation, by name of C(appliance.gpu.Thresholds) field
        (C(min_driver), C(max_retired_pages), C(max_uncorrectable_remaps)). Unset fields keep their defaults.
    type: dict
  snapshot:
    description:
      - GPU snapshots (one dict per GPU, as C(appliance.gpu.collect_snapshots()) returns them) to evaluate
        instead of asking NVML. For tests and for checking a snapshot taken elsewhere.
    type: list
    elements: dict
  python_path:
    description:
      - Directories put first on C(sys.path) to find the C(appliance) package (e.g. a venv's site-packages).
    type: list
    elements: path
    default: []
  fail_on_unhealthy:
    description: Fail the task unless the GPU is healthy. With C(false), only report.
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Check the GPU before downloading anything
  nvml_health:
    required_memory_mib: 22528
  vars:
    ansible_python_interpreter: /opt/appliance/venv/bin/python
"""

RETURN = r"""
status:
  description: C(healthy), C(unhealthy) or C(unavailable).
  type: str
  returned: always
exit_code:
  description: The exit code C(appliance gpu check) would give (0 healthy, 1 unhealthy, 2 unavailable).
  type: int
  returned: always
reasons:
  description: Why the GPU is unhealthy or unavailable, one line each, prefixed by the GPU.
  type: list
  elements: str
  returned: always
gpu_warnings:
  description: What an admin should look at, one line each; also shown as Ansible warnings.
  type: list
  elements: str
  returned: always
gpus:
  description: The snapshot of each GPU (name, memory, temperatures, ECC, PCIe, ...).
  type: list
  elements: dict
  returned: always
ansible_facts:
  description: C(appliance_gpu), the verdict (status, exit_code, reasons, warnings, gpus).
  type: dict
  returned: success
"""


def import_health(python_path: list[str]):
    """(health_report, Thresholds) from the appliance package, or an ImportError that says where it looked."""
    for path in reversed(python_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    from appliance.gpu import Thresholds, health_report  # found through python_path

    return health_report, Thresholds


def build_thresholds(thresholds_cls, values: dict | None):
    if not values:
        return None
    known = {f.name for f in dataclasses.fields(thresholds_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown thresholds {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return thresholds_cls(**values)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "required_memory_mib": {"type": "int"},
            "thresholds": {"type": "dict"},
            "snapshot": {"type": "list", "elements": "dict"},
            "python_path": {"type": "list", "elements": "path", "default": []},
            "fail_on_unhealthy": {"type": "bool", "default": True},
        },
        supports_check_mode=True,  # it only reads
    )
    params = module.params
    try:
        health_report, thresholds_cls = import_health(params["python_path"])
    except ImportError as exc:
        module.fail_json(
            msg=f"cannot import appliance.gpu with {sys.executable} ({exc}): install the appliance package "
            "there, run the module with the appliance venv as ansible_python_interpreter, or set python_path"
        )
    try:
        thresholds = build_thresholds(thresholds_cls, params["thresholds"])
    except (TypeError, ValueError) as exc:
        module.fail_json(msg=f"thresholds: {exc}")

    try:
        exit_code, verdict = health_report(
            required_memory_mib=params["required_memory_mib"],
            thresholds=thresholds,
            snapshot=params["snapshot"],
        )
    except Exception as exc:  # a snapshot of the wrong shape, or an NVML surprise: say so, in one line
        module.fail_json(
            msg=f"GPU health check failed: {type(exc).__name__}: {exc}", exception=traceback.format_exc()
        )

    result = {
        "changed": False,
        "status": verdict["status"],
        "exit_code": exit_code,
        "reasons": verdict["reasons"],
        "gpu_warnings": verdict["warnings"],
        "gpus": verdict["gpus"],
    }
    for warning in verdict["warnings"]:
        module.warn(warning)
    if verdict["status"] != "healthy" and params["fail_on_unhealthy"]:
        module.fail_json(msg=f"GPU {verdict['status']}: " + "; ".join(verdict["reasons"]), **result)
    facts = {k: verdict[k] for k in ("status", "reasons", "warnings", "gpus")}
    module.exit_json(ansible_facts={"appliance_gpu": {**facts, "exit_code": exit_code}}, **result)


if __name__ == "__main__":
    main()
