"""Configuration that cannot silently widen the privacy policy: a misspelled variable, a misspelled key
in the YAML file (also under `models:`) or a model name the catalog does not know stops start-up with
one line that names it, and `appliance serve` logs the policy it understood for every public name."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CLOUD_KEY
from tests.harness import clean_env, run_appliance

TIER1 = "nvidia/nemotron-mini-4b-instruct"
TIER2 = "nvidia/nemotron-3-nano-30b-a3b"


def serve_fails(tmp_path, config: str | None = None, **env: str) -> str:
    """`appliance serve` with these settings must refuse to start; returns its one line."""
    if config is not None:
        path = tmp_path / "appliance.yaml"
        path.write_text(config)
        env["APPLIANCE_CONFIG"] = str(path)
    env = clean_env(APPLIANCE_API_KEYS="k", NVIDIA_NIM_API_KEY=CLOUD_KEY, **env)
    proc = run_appliance("serve", "--port", "1", env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and CLOUD_KEY not in proc.stderr
    return lines[0]


def test_a_misspelled_variable_stops_start_up_and_names_the_right_one(tmp_path):
    line = serve_fails(tmp_path, APPLIANCE_CLOUD_FALLBAK="never")
    assert line == (
        "appliance: unknown environment variable APPLIANCE_CLOUD_FALLBAK; "
        "did you mean APPLIANCE_CLOUD_FALLBACK?"
    )


def test_a_misspelled_key_in_the_file_stops_start_up(tmp_path):
    line = serve_fails(tmp_path, "cloud_fallbak: never\n")
    assert line.startswith("appliance: unknown setting 'cloud_fallbak' in ")
    assert line.endswith("appliance.yaml; did you mean cloud_fallback?")


def test_a_misspelled_key_under_models_stops_start_up(tmp_path):
    line = serve_fails(tmp_path, f"models:\n  {TIER2}: {{cloud_fallbak: never}}\n")
    assert f"unknown setting 'cloud_fallbak' under models: {TIER2}" in line
    assert line.endswith("did you mean cloud_fallback?")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("nvidia/nemotron-3-nano-30b", "did you mean nvidia/nemotron-3-nano-30b-a3b?"),
        ("whisper-1", "'whisper-1' is an alias; write its public name 'whisper-large-v3'"),
    ],
)
def test_a_model_name_the_catalog_does_not_know_stops_start_up(tmp_path, name, expected):
    line = serve_fails(tmp_path, f"models:\n  {name}: {{cloud_fallback: never}}\n")
    assert line.startswith("appliance: models: ")
    assert expected in line


def test_the_admin_tools_refuse_the_same_mistakes():
    proc = run_appliance("plan", "--gpu-memory", "24", env=clean_env(APPLIANCE_STT_MODLE="large-v3"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "appliance: unknown environment variable APPLIANCE_STT_MODLE; did you mean APPLIANCE_STT_MODEL?"
    )


def policy_lines(logs: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    return {e["model"]: e for e in lines if e["event"] == "policy"}


def test_serve_logs_the_policy_in_force_per_public_name(start_gateway, cloud_llm, tmp_path):
    config = tmp_path / "appliance.yaml"
    config.write_text(f"cloud_fallback: on_failure\nmodels:\n  {TIER2}: {{cloud_fallback: never}}\n")
    gw = start_gateway(
        APPLIANCE_CONFIG=str(config), NVIDIA_NIM_API_KEY=CLOUD_KEY, NVIDIA_NIM_BASE_URL=cloud_llm.base_url
    )
    policies = policy_lines(gw.logs())
    assert set(policies) == {TIER1, TIER2, "whisper-large-v3", "nvidia/magpietts"}
    assert policies[TIER1]["cloud_fallback"] == "on_failure" and policies[TIER1]["leaves_box"] is True
    assert policies[TIER1]["cloud_model"] == TIER1
    assert policies[TIER1]["detail"] == (
        f"may go to {cloud_llm.base_url} ({TIER1}) when the local engine fails"
    )
    assert policies[TIER2] | {"ts": 0} == {
        "ts": 0,
        "level": "info",
        "event": "policy",
        "model": TIER2,
        "cloud_fallback": "never",
        "leaves_box": False,
        "cloud_model": None,
        "detail": "stays on the box: cloud_fallback is never",
    }
    for audio in ("whisper-large-v3", "nvidia/magpietts"):
        assert policies[audio]["leaves_box"] is False
    # Both tiers down locally: only tier 1 may go to the cloud.
    with gw.http() as http:
        for model in (TIER1, TIER2):
            http.post(
                "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
            )
    assert [s.body["model"] for s in cloud_llm.seen] == [TIER1]


def test_without_a_cloud_key_nothing_may_leave(start_gateway):
    policies = policy_lines(start_gateway().logs())
    assert all(p["leaves_box"] is False for p in policies.values())
    assert policies[TIER1]["detail"] == "stays on the box: no NVIDIA_NIM_API_KEY"
