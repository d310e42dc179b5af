"""Admin commands that answer sensibly: `appliance serve` port errors, --version, group help."""

from __future__ import annotations

import socket

import pytest

from appliance import __version__
from tests.harness import clean_env, run_appliance


def serve(*args: str, tmp_path) -> tuple[int, list[str]]:
    env = clean_env(APPLIANCE_API_KEYS="k", APPLIANCE_DATA_DIR=str(tmp_path))
    proc = run_appliance("serve", *args, env=env)
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stderr.strip().splitlines()


def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = serve("--port", str(port), tmp_path=tmp_path)
    assert code == 1
    assert lines[-1] == f"appliance: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not any("startup complete" in line.lower() for line in lines)
    assert all(line.startswith('{"ts"') for line in lines[:-1])  # at most the policy lines before it


@pytest.mark.parametrize("port", ["0", "65536", "-1"])
def test_an_invalid_port_is_refused_not_replaced_by_a_random_one(tmp_path, port):
    assert serve("--port", port, tmp_path=tmp_path) == (
        2,
        [f"appliance: --port {port} is not a TCP port (1-65535)"],
    )


def test_an_address_that_does_not_resolve_is_one_line(tmp_path):
    code, lines = serve("--host", "no-such-host.invalid", "--port", "8080", tmp_path=tmp_path)
    assert code == 1 and lines[-1].startswith("appliance: cannot listen on no-such-host.invalid:8080: ")


def test_serve_help_shows_the_defaults():
    out = run_appliance("serve", "--help").stdout
    assert "address to listen on (default: 127.0.0.1)" in out
    assert "(default: 8080)" in out


def test_version():
    proc = run_appliance("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"appliance {__version__}"


GROUPS = [("gpu", ["check"]), ("keys", ["list", "add", "remove"]), ("models", ["list", "pull", "verify"])]


@pytest.mark.parametrize(("group", "verbs"), [*GROUPS, ("", ["serve", "keys", "gpu", "plan", "models"])])
def test_a_command_without_its_verb_prints_that_groups_help(group, verbs):
    proc = run_appliance(*filter(None, [group]))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: appliance {group}".rstrip() + " [-h]")
    assert all(f"    {verb} " in proc.stderr for verb in verbs)
    assert "error:" not in proc.stderr
