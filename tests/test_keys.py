"""Keys that cannot lock a school out: key names are checked before anything is written, and an older
keys file with a bad line never takes the gateway (or `appliance keys`) down: its valid lines are
imported into the governance database, each bad line is named."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.harness import clean_env, run_appliance

GOOD_HASH = "sha256:" + "ab" * 32


@pytest.fixture
def keys(tmp_path):
    env = clean_env(APPLIANCE_DATA_DIR=str(tmp_path / "data"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = run_appliance("keys", *args, env=env)
        assert "Traceback" not in proc.stderr
        return proc

    return run


@pytest.mark.parametrize("name", ["maths app", "", "#teachers", "a" * 65, "klasse-5ä", "a/b"])
def test_a_bad_key_name_is_refused_before_anything_is_written(keys, tmp_path, name):
    proc = keys("add", name)
    assert proc.returncode == 1
    assert proc.stdout == ""  # no key printed: it would never work
    assert proc.stderr.strip() == (
        f"appliance: invalid key name {name!r}: use letters, digits, '-', '_' and '.', 1 to 64 characters"
    )
    assert not (tmp_path / "data" / "keys").exists()
    assert not (tmp_path / "data" / "appliance.db").exists()


def test_every_allowed_name_works(keys):
    names = ["maths-app", "Class_5.b", "x", "a" * 64]
    for name in names:
        assert keys("add", name).stdout.startswith("sk-appliance-")
    listed = keys("list").stdout.splitlines()[1:]  # under the header: name, tier, labels, use
    assert [line.split("\t")[0] for line in listed] == sorted(names)


def write(path, *lines: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def test_keys_commands_import_a_damaged_file_naming_each_bad_line(keys, tmp_path):
    path = tmp_path / "data" / "keys"
    write(path, "# comment", f"reading-app {GOOD_HASH}", f"maths app {GOOD_HASH}")
    listed = keys("list")  # the first command creates the database and imports the file once
    assert listed.returncode == 0
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()[1:]] == ["reading-app"]
    assert listed.stderr.strip() == (
        f"appliance: {path}:3: expected '<key name> sha256:<64 hex digits>' (not imported)"
    )
    assert keys("add", "new-app").stdout.startswith("sk-appliance-")
    assert keys("list").stderr == ""  # imported once: the file is not read again


def test_an_unreadable_keys_file_is_one_line(keys, tmp_path):
    (tmp_path / "data" / "keys").mkdir(parents=True)  # a folder where the file should be
    proc = keys("list")
    assert proc.returncode == 2  # nothing created: the database would have left its keys behind
    assert proc.stderr.strip() == f"appliance: {tmp_path / 'data' / 'keys'}: cannot read: Is a directory"


def problems_logged(gw) -> list[dict]:
    lines = [json.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]
    return [e for e in lines if e["event"] == "keys file problem"]


def test_the_gateway_imports_the_valid_keys_and_names_the_bad_line(start_gateway, tmp_path):
    from appliance.auth import hash_key

    key = "sk-appliance-written-by-an-older-version-0001"
    path = tmp_path / "data" / "keys"
    write(path, f"reading-app {hash_key(key)}", "#teachers sha256:" + "cd" * 32, f"maths app {GOOD_HASH}")
    gw = start_gateway(APPLIANCE_DATA_DIR=str(tmp_path / "data"), APPLIANCE_API_KEYS="")
    assert gw.client(api_key=key).models.list().object == "list"
    assert [(p["problem"], p["using"]) for p in problems_logged(gw)] == [
        (f"{path}:3: expected '<key name> sha256:<64 hex digits>'", "its valid keys")
    ]


def test_once_imported_the_keys_file_is_not_read_again(keys, start_gateway, tmp_path):
    key = keys("add", "reading-app").stdout.strip()
    path = tmp_path / "data" / "keys"
    gw = start_gateway(APPLIANCE_DATA_DIR=str(tmp_path / "data"), APPLIANCE_API_KEYS="")
    assert gw.client(api_key=key).models.list().object == "list"
    # Half an edit of a file the database has replaced: it changes nothing.
    write(path, f"maths app {GOOD_HASH}")
    time.sleep(2.5)  # longer than the gateway takes to see a change in its keys
    assert gw.client(api_key=key).models.list().object == "list"
    assert problems_logged(gw) == []


def test_a_file_with_no_valid_key_and_no_other_key_refuses_start_naming_the_line(tmp_path):
    path = tmp_path / "keys"
    write(path, f"maths app {GOOD_HASH}")
    proc = run_appliance("serve", env=clean_env(APPLIANCE_DATA_DIR=str(tmp_path)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(f"; {path}:1: expected '<key name> sha256:<64 hex digits>'")
    )
