"""`appliance gpu check` as an admin (and Ansible) runs it: exit codes, one clear line, JSON in every case.

On this machine there is no NVIDIA driver: the real pynvml finds no library. The other cases run the
command with the NVML stand-in first on PYTHONPATH, told how to answer.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.harness import REPO, clean_env, run_appliance
from tests.sims.nvml import FAKE_DIR, write_config


def appliance(
    *args: str, fake: dict | None = None, tmp_path: Path | None = None
) -> subprocess.CompletedProcess:
    env = clean_env()
    if fake is not None:
        assert tmp_path is not None
        env["PYTHONPATH"] = f"{FAKE_DIR}:{REPO}"
        env["FAKE_NVML_CONFIG"] = str(write_config(tmp_path / "nvml.json", fake))
    return run_appliance(*args, env=env)


def test_gpu_check_without_a_driver_is_exit_2_with_one_line_and_no_traceback():
    proc = appliance("gpu", "check")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "libnvidia-ml.so.1" in lines[0] and "install the NVIDIA driver" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""


def test_gpu_check_json_without_a_driver_is_one_object_and_exit_2():
    proc = appliance("gpu", "check", "--json")
    assert proc.returncode == 2
    verdict = json.loads(proc.stdout)
    assert verdict["status"] == "unavailable"
    assert verdict["error"] == "LibraryNotFound"
    assert verdict["gpus"] == [] and len(verdict["reasons"]) == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("error", "words"),
    [
        ("LibraryNotFound", "install the NVIDIA driver"),
        ("DriverNotLoaded", "modprobe nvidia"),
        ("LibRmVersionMismatch", "upgraded without a reboot"),
    ],
)
def test_each_no_driver_case_is_one_line_saying_what_to_do(tmp_path, error, words):
    proc = appliance("gpu", "check", fake={"init_error": error}, tmp_path=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    proc = appliance("gpu", "check", "--json", fake={"init_error": error}, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"] == error


def test_a_healthy_gpu_is_exit_0_with_its_warnings_listed(tmp_path):
    fake = {"devices": [{"persistence": 0}]}
    proc = appliance("gpu", "check", fake=fake, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "GPU 0: NVIDIA H100 80GB HBM3, 81559 MiB, driver 580.95.05" in proc.stdout
    assert "warning: GPU 0 (NVIDIA H100 80GB HBM3): persistence mode is off" in proc.stdout
    assert proc.stdout.strip().endswith("healthy")
    verdict = json.loads(appliance("gpu", "check", "--json", fake=fake, tmp_path=tmp_path).stdout)
    assert verdict["status"] == "healthy" and len(verdict["warnings"]) == 1
    assert verdict["gpus"][0]["memory"]["total_mib"] == 81559


def test_an_unhealthy_gpu_is_exit_1_with_each_reason_on_a_line(tmp_path):
    fake = {"devices": [{"ecc": {"volatile": [0, 2], "aggregate": [0, 2]}, "remapped": [0, 0, 0, 1]}]}
    proc = appliance("gpu", "check", fake=fake, tmp_path=tmp_path)
    assert proc.returncode == 1
    reasons = [line for line in proc.stdout.splitlines() if line.startswith("unhealthy: ")]
    assert len(reasons) == 2
    assert "double-bit" in reasons[0] and "row remapping failed" in reasons[1]
    proc = appliance("gpu", "check", "--json", fake=fake, tmp_path=tmp_path)
    assert proc.returncode == 1 and json.loads(proc.stdout)["status"] == "unhealthy"


def test_require_memory_fails_a_card_that_is_too_small(tmp_path):
    proc = appliance("gpu", "check", "--require-memory", "96", fake={"devices": [{}]}, tmp_path=tmp_path)
    assert proc.returncode == 1
    assert "the plan needs 98304 MiB of GPU memory, the largest GPU has 81559 MiB" in proc.stdout


def test_an_old_driver_fails_against_the_catalogs_minimum(tmp_path):
    proc = appliance(
        "gpu", "check", fake={"driver_version": "550.163.01", "devices": [{}]}, tmp_path=tmp_path
    )
    assert proc.returncode == 1
    assert "driver 550.163.01 is older than 575.51.03" in proc.stdout
