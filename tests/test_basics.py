"""What every route shares: liveness, auth, OpenAI-shaped errors, request ids, configuration errors."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.harness import clean_env, run_appliance
from tests.openapi import validate


def test_healthz_needs_no_key_and_carries_request_id(start_gateway):
    gw = start_gateway()
    r = httpx.get(gw.url + "/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    assert len(r.headers["x-request-id"]) >= 16


def test_missing_and_wrong_key_are_openai_shaped_401(start_gateway):
    gw = start_gateway()
    r = httpx.get(gw.base_url + "/models")
    assert r.status_code == 401
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["code"] == "missing_api_key"
    assert "x-request-id" in r.headers
    with pytest.raises(openai.AuthenticationError) as exc:
        gw.client(api_key="sk-wrong").models.list()
    assert exc.value.status_code == 401
    assert "sk-wrong" not in gw.logs()


def test_unknown_path_and_method_are_openai_shaped(start_gateway):
    gw = start_gateway()
    with gw.http() as http:
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404
        validate("ErrorResponse", r.json())
        r = http.delete("/v1/models")
        assert r.status_code == 405
        validate("ErrorResponse", r.json())
        assert r.headers["allow"] == "GET"
        r = http.get("/v1/chat/completions")  # a relay route, served ahead of the framework for POST
        assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_unknown_model_is_404(start_gateway):
    gw = start_gateway()
    with pytest.raises(openai.NotFoundError) as exc:
        gw.client().models.retrieve("no-such-model")
    assert exc.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"APPLIANCE_CLOUD_FALLBACK": "sometimes"}, "APPLIANCE_CLOUD_FALLBACK"),
        ({"NVIDIA_NIM_BASE_URL": "http://cloud.example.com/v1"}, "NVIDIA_NIM_BASE_URL"),
        ({"APPLIANCE_CONNECT_TIMEOUT": "soon"}, "APPLIANCE_CONNECT_TIMEOUT"),
        ({"APPLIANCE_CONFIG": "/nonexistent/appliance.yaml"}, "APPLIANCE_CONFIG"),
    ],
)
def test_invalid_configuration_is_one_clear_line(env, names):
    proc = run_appliance("serve", "--port", "1", env=clean_env(APPLIANCE_API_KEYS="k", **env))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert names in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_cloud_key_that_could_break_its_header_is_refused_without_being_shown():
    key = "nvapi-secret-0123\r\nX-Injected: 1"
    env = clean_env(APPLIANCE_API_KEYS="k", NVIDIA_NIM_API_KEY=key)
    proc = run_appliance("serve", "--port", "1", env=env)
    assert proc.returncode == 2
    assert "NVIDIA_NIM_API_KEY" in proc.stderr and "one token" in proc.stderr
    assert "nvapi-secret" not in proc.stderr + proc.stdout


def test_yaml_file_with_unknown_setting_names_it(tmp_path):
    config = tmp_path / "appliance.yaml"
    config.write_text("cloud_fallback: never\nllm_ulr: http://127.0.0.1:8000/v1\n")
    proc = run_appliance("serve", "--config", str(config), env=clean_env(APPLIANCE_API_KEYS="k"))
    assert proc.returncode == 2
    assert "llm_ulr" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_without_any_client_key_refuses_to_start(tmp_path):
    proc = run_appliance("serve", env=clean_env(APPLIANCE_DATA_DIR=str(tmp_path)))
    assert proc.returncode == 1
    assert "appliance keys add" in proc.stderr
