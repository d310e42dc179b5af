"""The Ansible side: lint and syntax, the nvml_health module run the way Ansible runs it, and the parts of
site.yml that need no root, GPU or Docker run for real into a temporary prefix, twice."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

import ansible
from appliance.config import load_settings
from tests.gpu_snapshots import healthy_gpu
from tests.harness import REPO, clean_env, free_port, run_appliance

ANSIBLE_DIR = REPO / "ansible"
MODULE = ANSIBLE_DIR / "library" / "nvml_health.py"
BIN = Path(sys.executable).parent  # the venv's ansible tools, wherever CI puts the venv
SECRETS = {"NGC_API_KEY": "ngc-test-secret-6f1d2c", "NVIDIA_NIM_API_KEY": "nvapi-test-secret-93ab47"}


def ansible_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The test's environment for ansible commands: this repo's ansible.cfg, state kept under `tmp`.
    No PYTHONPATH: the playbook's venv must find the package it installed, not this checkout."""
    env = clean_env(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_HOME=str(tmp / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        **extra,
    )
    env.pop("PYTHONPATH")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def gpu(**changes: Any) -> dict[str, Any]:
    """A healthy 24 GB-class card (an L4, which reports 23,034 MiB)."""
    l4 = {"name": "NVIDIA L4", "memory": {"total_mib": 23034, "used_mib": 1, "free_mib": 22533}}
    return healthy_gpu(**{**l4, **changes})


def run_module(
    tmp_path: Path, args: dict[str, Any], pythonpath: str | None = str(REPO), no_site: bool = False
) -> dict[str, Any]:
    """Run nvml_health as Ansible does: a separate Python with the arguments in a JSON file."""
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = clean_env()
    env.pop("PYTHONPATH")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(
        [sys.executable, *(["-S"] if no_site else []), str(MODULE), str(args_file)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    result = json.loads(proc.stdout)
    assert proc.returncode == (1 if result.get("failed") else 0), proc.stderr
    assert "Traceback" not in proc.stderr
    return result


def test_module_reports_a_healthy_gpu_as_facts(tmp_path):
    card = gpu()
    result = run_module(tmp_path, {"snapshot": [card], "required_memory_mib": 22528})
    assert not result.get("failed") and result["changed"] is False
    assert (result["status"], result["exit_code"], result["reasons"]) == ("healthy", 0, [])
    facts = result["ansible_facts"]["appliance_gpu"]
    assert facts["status"] == "healthy" and facts["exit_code"] == 0
    assert facts["gpus"] == [card]
    assert "warnings" not in result


def test_module_fails_with_every_reason_on_an_unhealthy_gpu(tmp_path):
    card = gpu(
        ecc={"enabled": True, "volatile": {"corrected": 3, "uncorrected": 2}, "aggregate": {}},
        row_remap={"correctable": 0, "uncorrectable": 1, "pending": False, "failure": True},
    )
    result = run_module(tmp_path, {"snapshot": [card]})
    assert result["failed"] is True
    assert result["status"] == "unhealthy" and result["exit_code"] == 1
    assert result["msg"] == "GPU unhealthy: " + "; ".join(result["reasons"])
    assert "GPU 0 (NVIDIA L4): 2 volatile uncorrectable (double-bit) ECC errors" in result["msg"]
    assert "row remapping failed" in result["msg"]
    assert "ansible_facts" not in result  # facts only from a passing check


def test_module_fails_on_a_gpu_too_small_for_the_plan(tmp_path):
    result = run_module(tmp_path, {"snapshot": [gpu()], "required_memory_mib": 32768})
    assert result["failed"] is True
    assert "the plan needs 32768 MiB of GPU memory, the largest GPU has 23034 MiB" in result["msg"]


def test_module_passes_warnings_through_without_failing(tmp_path):
    card = gpu(clock_event_reasons=["sw_thermal_slowdown"], persistence_mode=False)
    result = run_module(tmp_path, {"snapshot": [card]})
    assert not result.get("failed") and result["status"] == "healthy"
    assert len(result["gpu_warnings"]) == 2
    shown = json.dumps(result["warnings"])  # Ansible prints these as [WARNING] lines
    assert "clocks slowed for heat (sw_thermal_slowdown)" in shown
    assert "persistence mode is off" in shown


def test_module_can_report_without_failing(tmp_path):
    card = gpu(temperature_c=90)
    result = run_module(tmp_path, {"snapshot": [card], "fail_on_unhealthy": False})
    assert not result.get("failed")
    assert result["status"] == "unhealthy" and result["exit_code"] == 1
    assert "temperature 90 °C at or above the slowdown threshold 87 °C" in result["reasons"][0]
    assert result["ansible_facts"]["appliance_gpu"]["status"] == "unhealthy"


def test_module_thresholds_by_field_name(tmp_path):
    result = run_module(tmp_path, {"snapshot": [gpu()], "thresholds": {"min_driver": "590.10"}})
    assert result["failed"] is True
    assert "driver 580.95.05 is older than 590.10" in result["msg"]
    result = run_module(tmp_path, {"snapshot": [gpu()], "thresholds": {"max_temperature": 80}})
    assert result["failed"] is True
    assert result["msg"].startswith("thresholds: unknown thresholds max_temperature; known: ")
    assert "min_driver" in result["msg"]


def test_module_says_no_gpu_when_the_snapshot_has_none(tmp_path):
    result = run_module(tmp_path, {"snapshot": []})
    assert result["failed"] is True
    assert (result["status"], result["exit_code"]) == ("unavailable", 2)
    assert result["msg"] == "GPU unavailable: no NVIDIA GPU found"


def test_module_asks_nvml_when_given_no_snapshot(tmp_path):
    """The real collection path; on a machine without a GPU it must explain, in one line, why."""
    result = run_module(tmp_path, {})
    assert result["status"] in ("healthy", "unhealthy", "unavailable")
    if result["status"] == "unavailable":
        assert result["failed"] is True and result["exit_code"] == 2
        assert len(result["reasons"]) == 1 and result["msg"] == "GPU unavailable: " + result["reasons"][0]
        assert result["gpus"] == []
    else:
        assert result["gpus"] and all("memory" in g for g in result["gpus"])


def test_module_argument_spec_rejects_bad_arguments(tmp_path):
    result = run_module(tmp_path, {"snapshot": [gpu()], "required_memory_mib": "lots"})
    assert result["failed"] is True and "required_memory_mib" in result["msg"]
    assert "int" in result["msg"]
    result = run_module(tmp_path, {"snapshot": [gpu()], "memory": 1})
    assert result["failed"] is True and "Unsupported parameters" in result["msg"]
    result = run_module(tmp_path, {"snapshot": "GPU 0"})
    assert result["failed"] is True and "snapshot" in result["msg"]


def test_module_finds_the_package_through_python_path(tmp_path):
    result = run_module(tmp_path, {"snapshot": [gpu()], "python_path": [str(REPO)]}, pythonpath=None)
    assert not result.get("failed") and result["status"] == "healthy"


def test_module_without_the_package_says_to_set_python_path(tmp_path):
    # A server's Python has Ansible but not the appliance package. The test interpreter has both (the
    # README installs it), so run it without its site-packages (-S) and with only Ansible on the path.
    only_ansible = tmp_path / "only-ansible"
    only_ansible.mkdir()
    (only_ansible / "ansible").symlink_to(Path(ansible.__file__).parent)
    result = run_module(tmp_path, {"snapshot": [gpu()]}, pythonpath=str(only_ansible), no_site=True)
    assert result["failed"] is True
    assert result["msg"].startswith(f"cannot import appliance.gpu with {sys.executable}")
    assert "python_path" in result["msg"]


def test_module_in_check_mode_through_ansible_sets_facts(tmp_path):
    report = tmp_path / "report.json"
    check = {"snapshot": [gpu(clock_event_reasons=["hw_slowdown"])], "required_memory_mib": 20000}
    tasks = [
        {"name": "Check", "nvml_health": {**check, "python_path": [str(REPO)]}, "register": "result"},
        {
            "name": "Keep what the check returned and the facts it set",
            "ansible.builtin.copy": {
                "content": "{{ {'result': result, 'fact': appliance_gpu} | to_json }}",
                "dest": str(report),
                "mode": "0644",
            },
            "check_mode": False,
        },
    ]
    playbook = tmp_path / "check.yml"
    play = {"name": "Check mode", "hosts": "localhost", "gather_facts": False, "tasks": tasks}
    playbook.write_text(yaml.safe_dump([play]))
    proc = subprocess.run(
        [
            BIN / "ansible-playbook",
            "--check",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(playbook),
        ],
        env=ansible_env(tmp_path, ANSIBLE_LIBRARY=str(MODULE.parent)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]: GPU 0 (NVIDIA L4): clocks slowed for heat (hw_slowdown)" in proc.stdout + proc.stderr
    kept = json.loads(report.read_text())
    assert kept["result"]["changed"] is False and kept["result"]["status"] == "healthy"
    assert kept["fact"]["status"] == "healthy" and kept["fact"]["gpus"][0]["name"] == "NVIDIA L4"
    assert recap(proc.stdout)["changed"] == 1  # the report file written outside check mode, nothing else


# --- Lint and syntax ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lint(tmp_path_factory: pytest.TempPathFactory) -> subprocess.Popen[str]:
    """ansible-lint, started early: it runs beside the playbook runs, which leave a core idle."""
    tmp = tmp_path_factory.mktemp("lint")
    proc = subprocess.Popen(
        [BIN / "ansible-lint", "--offline", "--profile", "production", "--nocolor"],
        env=ansible_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ANSIBLE_DIR,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_playbook_syntax_check_passes(tmp_path):
    proc = subprocess.run(
        [BIN / "ansible-playbook", "--syntax-check", "-i", "inventory.example.yml", "site.yml"],
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        cwd=ANSIBLE_DIR,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_role_variable_is_documented_in_group_vars_with_its_default():
    documented: dict[str, Any] = {}
    text = (ANSIBLE_DIR / "group_vars" / "all.yml").read_text()
    for line in text.splitlines():
        if match := re.fullmatch(r"# ([a-z][a-z0-9_]*): (.*)", line):
            documented[match[1]] = yaml.safe_load(match[2])
    assert yaml.safe_load(text) is None  # all commented out: the roles' defaults hold
    for defaults in sorted((ANSIBLE_DIR / "roles").glob("*/defaults/main.yml")):
        role = defaults.parts[-3]
        for name, value in yaml.safe_load(defaults.read_text()).items():
            assert name.startswith(role + "_"), f"{name} in {role} lacks the role's prefix"
            assert name in documented, f"{name} is not documented in group_vars/all.yml"
            assert documented[name] == value, name


def test_core_requirements_match_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    defaults = yaml.safe_load((ANSIBLE_DIR / "roles" / "appliance" / "defaults" / "main.yml").read_text())
    for requirement in defaults["appliance_core_requirements"]:
        assert f'"{requirement}"' in pyproject, requirement


# --- site.yml, for real, into a temporary prefix ------------------------------------------------------------


class Site:
    """A prefix that site.yml provisions as the current user, without root, GPU or Docker."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.opt, self.etc, self.data = root / "opt", root / "etc", root / "data"
        self.command = root / "bin" / "appliance"
        (root / "bin").mkdir(parents=True)
        user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
        self.inventory = root / "inventory.yml"
        self.inventory.write_text(
            yaml.safe_dump(
                {
                    "appliance": {
                        "hosts": {
                            "localhost": {
                                "ansible_connection": "local",
                                "ansible_python_interpreter": sys.executable,
                            }
                        }
                    }
                }
            )
        )
        self.vars: dict[str, Any] = {
            "ansible_become": False,
            "appliance_prefix": str(self.opt),
            "appliance_config_dir": str(self.etc),
            "appliance_data_dir": str(self.data),
            "appliance_command": str(self.command),
            "appliance_user": user,
            "appliance_group": group,
            "appliance_manage_user": False,
            "appliance_config_owner": user,
            "appliance_python": sys.executable,
            "appliance_system_packages": [],
            "appliance_wheel": str(self.build_wheel()),
            "appliance_full_install": False,
            "appliance_gpu_memory_gib": 24,
            "appliance_server_name": "appliance.school.test",
            "appliance_model_policies": {"nvidia/nemotron-3-nano-30b-a3b": "never"},
            "appliance_extra_settings": {"first_byte_timeout": 45},
            "gpu_health_snapshot": [gpu()],
        }

    def build_wheel(self) -> Path:
        """Built once here, as the playbook would on the controller (it is reproducible byte for byte)."""
        dist = self.root / "dist"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", dist, REPO],
            check=True,
            capture_output=True,
            timeout=300,
        )
        return next(dist.glob("appliance-*.whl"))

    def play(self, *tags: str, **overrides: Any) -> subprocess.CompletedProcess[str]:
        vars_file = self.root / "vars.json"
        vars_file.write_text(json.dumps({**self.vars, **overrides}))
        return subprocess.run(
            [
                BIN / "ansible-playbook",
                "-i",
                self.inventory,
                "site.yml",
                "--tags",
                ",".join(tags),
                "--skip-tags",
                "os_check",
                "-e",
                f"@{vars_file}",
            ],
            env=ansible_env(self.root, **SECRETS),
            capture_output=True,
            text=True,
            cwd=ANSIBLE_DIR,
            timeout=600,
        )


def recap(output: str) -> dict[str, int]:
    line = re.search(r"^localhost\s*:(.*)$", output, re.M)
    assert line, output
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line[1])}


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, lint: subprocess.Popen[str]
) -> tuple[Site, list[subprocess.CompletedProcess[str]]]:
    site = Site(tmp_path_factory.mktemp("site"))
    runs = [site.play("gpu", "appliance") for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr
    return site, runs


def test_second_run_changes_nothing(site):
    _, (first, second) = site
    assert recap(first.stdout)["changed"] > 0
    assert recap(second.stdout) | {"ok": 0, "skipped": 0} == {
        "ok": 0,
        "changed": 0,
        "unreachable": 0,
        "failed": 0,
        "skipped": 0,
        "rescued": 0,
        "ignored": 0,
    }


def test_secrets_reach_their_files_and_never_the_output(site):
    site, runs = site
    for secret in SECRETS.values():
        for run in runs:
            assert secret not in run.stdout + run.stderr
    ngc, gateway = site.etc / "secrets" / "ngc.env", site.etc / "secrets" / "gateway.env"
    assert f"NGC_API_KEY={SECRETS['NGC_API_KEY']}\n" in ngc.read_text()
    assert f"NVIDIA_NIM_API_KEY={SECRETS['NVIDIA_NIM_API_KEY']}\n" in gateway.read_text()
    for path in (ngc, gateway):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((site.etc / "secrets").stat().st_mode) == 0o700
    assert "NGC" not in (site.etc / "site.env").read_text()


def test_plan_env_is_the_planners(site, tmp_path):
    site, _ = site
    expected = tmp_path / "plan.env"
    subprocess.run(
        [sys.executable, "-m", "appliance", "plan", "--gpu-memory", "24", "--env-file", expected],
        env=clean_env(APPLIANCE_CONFIG=str(site.etc / "appliance.yaml")),
        capture_output=True,
        cwd=REPO,
        check=True,
        timeout=60,
    )
    assert (site.etc / "plan.env").read_text() == expected.read_text()
    assert "COMPOSE_PROFILES=tts,llm\n" in expected.read_text()


def test_settings_file_is_rendered_from_the_variables_and_loads(site):
    site, _ = site
    settings = load_settings(site.etc / "appliance.yaml")
    assert settings.log_level == "info"
    assert settings.cloud_fallback is None  # unset: chat falls back, audio stays on the box
    assert settings.models["nvidia/nemotron-3-nano-30b-a3b"].cloud_fallback == "never"
    assert settings.first_byte_timeout == 45


def test_site_env_gives_compose_the_paths_and_account(site):
    site, _ = site
    lines = (site.etc / "site.env").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if not line.startswith("#"))
    assert values["APPLIANCE_UID"] == str(os.getuid()) and values["APPLIANCE_GID"] == str(os.getgid())
    assert values["APPLIANCE_DATA_DIR"] == str(site.data)
    assert values["APPLIANCE_TLS_DIR"] == str(site.etc / "tls")
    assert values["APPLIANCE_HTTPS_PORT"] == "443"
    assert re.fullmatch(r"[0-9a-f]{40}", values["APPLIANCE_CONFIG_REVISION"])


def test_venv_holds_the_package_and_only_the_core_before_the_full_install(site):
    site, _ = site
    python = site.opt / "venv" / "bin" / "python"
    probe = "import appliance.gpu, appliance.planner, pynvml, pydantic_settings; print(appliance.__file__)"
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=site.root, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert str(site.opt / "venv") in proc.stdout  # the installed wheel, not this checkout
    heavy = subprocess.run([python, "-c", "import faster_whisper"], capture_output=True, cwd=site.root)
    assert heavy.returncode != 0
    wheels = list((site.opt / "stack" / "dist").glob("appliance-*.whl"))
    assert len(wheels) == 1


def test_gateway_serves_tls_from_the_rendered_files(site, tmp_path):
    """The gateway started as compose starts it: the settings file, data dir and certificate Ansible
    wrote, and a client key made with the admin command Ansible installed."""
    site, _ = site
    key = subprocess.run(
        [site.command, "keys", "add", "teacher-app"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()[-1]
    assert key.startswith("sk-appliance-") and (site.data / "appliance.db").is_file()
    cert, tls_key = site.etc / "tls" / "cert.pem", site.etc / "tls" / "key.pem"
    assert stat.S_IMODE(tls_key.stat().st_mode) == 0o640
    trust = ssl.create_default_context(cafile=cert)  # the self-signed certificate, and nothing else
    port = free_port()
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115 - the child writes to it
    env = clean_env(APPLIANCE_CONFIG=str(site.etc / "appliance.yaml"), APPLIANCE_DATA_DIR=str(site.data))
    cmd = [
        sys.executable,
        "-m",
        "appliance",
        "serve",
        "--port",
        str(port),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(tls_key),
    ]
    gateway = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                if httpx.get(url + "/healthz", verify=trust, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
                time.sleep(0.1)
        client = openai.OpenAI(
            base_url=url + "/v1", api_key=key, max_retries=0, http_client=httpx.Client(verify=trust)
        )
        assert client.models.list().object == "list"
        # The compose file's health check for the gateway, run against it (HTTPS, its own certificate).
        compose = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
        check = compose["services"]["gateway"]["healthcheck"]["test"]
        assert check[:3] == ["CMD", "python3", "-c"]
        script = check[3].replace("127.0.0.1:8443", f"127.0.0.1:{port}")
        assert subprocess.run([sys.executable, "-c", script], timeout=30).returncode == 0
        # The smoke test reaches it over TLS, trusting only the generated certificate. Nothing is
        # servable here (no engines), so it must stop at readiness, saying so, before making a key.
        smoke = site.play("smoke", smoke_test_url=url, smoke_test_ready_retries=1, smoke_test_ready_delay=0)
        assert smoke.returncode != 0
        failed_task = re.findall(r"^TASK \[(.+?)\]", smoke.stdout, re.M)[-1]
        assert failed_task == "smoke_test : Wait until the gateway is ready"
        assert "status: 503" in smoke.stdout and "CERTIFICATE_VERIFY_FAILED" not in smoke.stdout
        listed = subprocess.run([site.command, "keys", "list"], capture_output=True, text=True, timeout=60)
        assert "teacher-app" in listed.stdout and "smoke-test" not in listed.stdout
        with pytest.raises(httpx.HTTPError):  # TLS only
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        gateway.terminate()
        gateway.wait(15)
        log.close()


def test_serve_wants_both_tls_files(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not read")
    missing_key = tmp_path / "no-such-key.pem"
    for args in (
        ["--ssl-certfile", str(cert)],
        ["--ssl-certfile", str(cert), "--ssl-keyfile", str(missing_key)],
    ):
        proc = run_appliance("serve", *args, env=clean_env(APPLIANCE_API_KEYS="k"))
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_an_unhealthy_or_small_gpu_stops_the_play_before_anything_else(site):
    site, _ = site
    plan_before = (site.etc / "plan.env").read_text()
    sick_and_small = gpu(
        name="NVIDIA T4",
        memory={"total_mib": 15360, "used_mib": 0, "free_mib": 14913},
        ecc={"enabled": True, "volatile": {"corrected": 0, "uncorrected": 4}, "aggregate": {}},
    )
    run = site.play("gpu", "appliance", gpu_health_snapshot=[sick_and_small], appliance_gpu_memory_gib=80)
    assert run.returncode != 0
    assert "GPU unhealthy: GPU 0 (NVIDIA T4): 4 volatile uncorrectable (double-bit) ECC errors" in run.stdout
    assert "the plan needs 22528 MiB of GPU memory, the largest GPU has 15360 MiB" in run.stdout
    assert recap(run.stdout)["failed"] == 1
    # Nothing after the gate ran: no planner, no settings, no downloads.
    assert "Plan which models run on this GPU" not in run.stdout
    assert (site.etc / "plan.env").read_text() == plan_before


def test_ansible_lint_production_profile_passes(lint):
    output, _ = lint.communicate(timeout=300)
    assert lint.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output
