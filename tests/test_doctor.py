"""`appliance doctor` as an admin runs it, against the simulated engines and cloud: one line per check,
ok / warn / fail with the fix, exit 0 / 1 / 2, and --json."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CLOUD_KEY, CLOUD_MODELS
from tests.harness import clean_env, run_appliance
from tests.sims.nvml import FAKE_DIR, write_config
from tests.whisper_model import build_tiny_whisper


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture
def doctor(tmp_path, whisper_dir, local_llm, cloud_llm, magpie):
    """`appliance doctor ARGS` on a well set-up appliance, with `settings` changed."""
    data = tmp_path / "data"
    run_appliance("keys", "add", "reading-app", env=clean_env(APPLIANCE_DATA_DIR=str(data)))

    def run(*args: str, **settings: str) -> tuple[int, dict[str, dict], str]:
        env = clean_env(
            APPLIANCE_DATA_DIR=str(data),
            APPLIANCE_LLM_URL=local_llm.base_url,
            APPLIANCE_TTS_URL=magpie.url,
            APPLIANCE_STT_MODEL=str(whisper_dir),
            NVIDIA_NIM_BASE_URL=cloud_llm.base_url,
            NVIDIA_NIM_API_KEY=CLOUD_KEY,
            FAKE_NVML_CONFIG=str(write_config(tmp_path / "nvml.json", {"devices": [{}]})),  # a healthy H100
        )
        env["PYTHONPATH"] = f"{FAKE_DIR}:{env['PYTHONPATH']}"
        env.update(settings)
        proc = run_appliance("doctor", *args, env=env)
        assert "Traceback" not in proc.stderr and CLOUD_KEY not in proc.stdout + proc.stderr
        checks = {}
        for line in [] if "--json" in args else proc.stdout.splitlines():
            status, rest = line.split(None, 1)
            name, detail = rest.split(": ", 1)
            checks[name] = {"status": status, "detail": detail}
        return proc.returncode, checks, proc.stdout

    return run


def test_a_well_set_up_appliance_is_all_ok(doctor, cloud_llm, magpie, local_llm):
    code, checks, out = doctor()
    assert {c["status"] for c in checks.values()} == {"ok"}, out
    assert code == 0
    expected = [
        "config",
        "keys",
        "gpu",
        "llm engine",
        "whisper model",
        "tts engine",
        "cloud",
        "clock",
        "disk",
        "tls",
    ]
    assert all(name in checks for name in expected)
    assert checks["llm engine"]["detail"] == f"{local_llm.base_url} serves " + ", ".join(
        sorted(local_llm.models)
    )
    assert checks["tts engine"]["detail"].startswith(f"{magpie.url} ready, ")
    assert checks["cloud"]["detail"] == f"key accepted by {cloud_llm.base_url} ({CLOUD_MODELS[0]})"
    assert checks["clock"]["detail"].endswith("s against the cloud's clock")
    assert checks["keys"]["detail"].startswith("1 in ")
    assert f"cloud key set (...{CLOUD_KEY[-4:]})" in checks["config"]["detail"]  # masked
    # The cloud check is an authenticated call, and one fixed word is all it sends.
    (call,) = cloud_llm.seen
    assert call.path == "/v1/chat/completions" and call.headers["Authorization"] == f"Bearer {CLOUD_KEY}"
    assert call.body["messages"] == [{"role": "user", "content": "ping"}] and call.body["max_tokens"] == 1


def test_each_mistake_is_a_failing_line_with_its_fix(doctor, local_llm, tmp_path):
    code, checks, _ = doctor(
        "--host", "0.0.0.0", APPLIANCE_LLM_URL=local_llm.url, NVIDIA_NIM_API_KEY="nvapi-wrong-key-0000"
    )
    assert code == 2
    assert checks["llm engine"] == {
        "status": "fail",
        "detail": f"GET {local_llm.url}/models returned 404, not a model list; "
        "fix: end APPLIANCE_LLM_URL in /v1",
    }
    assert checks["cloud"] == {
        "status": "fail",
        "detail": "key rejected (HTTP 401); fix: update NVIDIA_NIM_API_KEY",
    }
    assert checks["tls"]["status"] == "fail"
    assert checks["tls"]["detail"].endswith("fix: give --ssl-certfile and --ssl-keyfile")


def test_warnings_only_exit_1(doctor):
    code, checks, _ = doctor(APPLIANCE_TTS_URL="http://127.0.0.1:9")
    assert code == 1
    assert checks["tts engine"]["status"] == "warn"
    assert checks["tts engine"]["detail"].endswith("fix: start the MagpieTTS NIM")


def test_a_missing_whisper_model_names_the_pull_command(doctor):
    code, checks, _ = doctor(APPLIANCE_STT_MODEL="large-v3")
    assert code == 2
    assert checks["whisper model"]["status"] == "fail"
    assert checks["whisper model"]["detail"].endswith("fix: appliance models pull large-v3")


def test_certificate_expiry(doctor, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [*("openssl", "req", "-x509", "-nodes", "-days", "10", "-subj", "/CN=appliance"),
         *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
         *("-keyout", str(key), "-out", str(cert))],
        check=True, capture_output=True,
    )  # fmt: skip
    _, checks, _ = doctor("--host", "0.0.0.0", "--ssl-certfile", str(cert))
    assert checks["tls"] == {
        "status": "warn",
        "detail": f"certificate {cert} expires in 10 days; fix: renew it",
    }


def test_json_and_a_configuration_error(doctor):
    code, _, out = doctor("--json")
    body = json.loads(out)
    assert code == 0 and body["status"] == "ok"
    assert {c["check"] for c in body["checks"]} >= {"config", "keys", "gpu", "cloud", "tls"}
    code, checks, _ = doctor(APPLIANCE_CLOUD_FALLBAK="never")
    assert code == 2
    assert checks == {
        "config": {
            "status": "fail",
            "detail": "unknown environment variable APPLIANCE_CLOUD_FALLBAK; did you mean "
            "APPLIANCE_CLOUD_FALLBACK?; fix: correct the setting it names",
        }
    }


def test_a_damaged_keys_file_not_yet_imported_warns_while_valid_keys_remain(doctor, tmp_path):
    from appliance.auth import hash_key

    (tmp_path / "data" / "appliance.db").unlink()  # before the first start: the file is what counts
    keys = tmp_path / "data" / "keys"
    keys.write_text(f"reading-app {hash_key('sk-appliance-old')}\nmaths app sha256:" + "ab" * 32 + "\n")
    code, checks, _ = doctor()
    assert code == 1
    assert checks["keys"] == {
        "status": "warn",
        "detail": f"{keys}:2: expected '<key name> sha256:<64 hex digits>' (1 valid keys in use); "
        f"fix: correct or delete that line in {keys}",
    }
