"""The model store: `appliance models list|pull|verify`, and serving a pulled model from disk only.

Downloads come from a loopback stand-in for the Hugging Face Hub (tests/sims/hf_hub.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import BackgroundLoop, clean_env, run_appliance
from tests.sims.hf_hub import HubSimulator
from tests.stt_audio import make_audio
from tests.stt_gateway import start_stt_gateway
from tests.whisper_model import build_tiny_whisper

REPO_ID = "Systran/faster-whisper-large-v3"  # large-v3's source in models/catalog.toml
TURBO_REPO_ID = "mobiuslabsgmbh/faster-whisper-large-v3-turbo"  # large-v3-turbo's (the CPU plan's model)


@pytest.fixture(scope="module")
def hub(bg_loop: BackgroundLoop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubSimulator]:
    model = build_tiny_whisper(tmp_path_factory.mktemp("hub-model"))
    files = {f.name: f.read_bytes() for f in model.iterdir()}
    files |= {"README.md": b"# tiny\n", ".gitattributes": b"*.bin filter=lfs\n", "extra/big.onnx": b"x" * 64}
    simulator = HubSimulator({REPO_ID: files, TURBO_REPO_ID: files})
    bg_loop.run(simulator.start())
    yield simulator
    bg_loop.run(simulator.stop())


def appliance(*args: str, data_dir: Path, hub_url: str = "http://127.0.0.1:9") -> subprocess.CompletedProcess:
    env = clean_env(
        APPLIANCE_DATA_DIR=str(data_dir),
        HF_ENDPOINT=hub_url,
        HF_HOME=str(data_dir / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return run_appliance(*args, env=env, timeout=120)


def test_pull_verify_list_then_serve_from_disk(hub, tmp_path):
    data = tmp_path / "data"
    missing = appliance("models", "verify", "large-v3", data_dir=data)
    assert missing.returncode == 1
    assert "appliance models pull large-v3" in missing.stderr and "Traceback" not in missing.stderr

    pulled = appliance("models", "pull", "large-v3", data_dir=data, hub_url=hub.url)
    assert pulled.returncode == 0, pulled.stderr
    target = data / "models" / "large-v3"
    assert f"large-v3: complete in {target}" in pulled.stdout
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.json", "preprocessor_config.json"):
        assert (target / name).read_bytes() == hub.repos[REPO_ID][name]
    assert not (target / "extra").exists() and not (target / ".gitattributes").exists()

    verified = appliance("models", "verify", "large-v3", data_dir=data)
    assert verified.returncode == 0 and f"ok large-v3 ({target})" in verified.stdout
    listed = appliance("models", "list", data_dir=data).stdout.splitlines()
    assert any(line.startswith(f"large-v3\tstt\t{REPO_ID}\tinstalled") for line in listed)
    assert any(line.startswith("large-v3-turbo\tstt\t") and "not installed" in line for line in listed)

    # A second pull finds the files current and fetches nothing again.
    before = sum(hub.downloads.values())
    assert appliance("models", "pull", "large-v3", data_dir=data, hub_url=hub.url).returncode == 0
    assert sum(hub.downloads.values()) == before

    # The gateway loads it by catalog name from the data directory, with the Hub out of reach.
    gw = start_stt_gateway(
        tmp_path,
        "pulled",
        APPLIANCE_DATA_DIR=str(data),
        APPLIANCE_STT_MODEL="large-v3",
        HF_ENDPOINT="http://127.0.0.1:9",
    )
    try:
        text = gw.client().audio.transcriptions.create(model="whisper-1", file=make_audio("wav", 3.0)).text
        assert text
        assert gw.readyz().json()["checks"]["stt"]["model"] == "large-v3"
    finally:
        gw.stop()


def test_verify_names_each_missing_file(tmp_path):
    model = build_tiny_whisper(tmp_path / "model")
    (model / "tokenizer.json").unlink()
    (model / "vocabulary.json").unlink()
    result = appliance("models", "verify", str(model), data_dir=tmp_path / "data")
    assert result.returncode == 1
    assert "tokenizer.json" in result.stderr and "vocabulary.json or vocabulary.txt" in result.stderr
    (model / "vocabulary.txt").write_text("a\nb\n")
    (model / "tokenizer.json").write_text("{}")
    assert appliance("models", "verify", str(model), data_dir=tmp_path / "data").returncode == 0


def test_failed_download_is_one_line_and_pull_resumes(hub, tmp_path):
    data = tmp_path / "data"
    hub.fail_file = "model.bin"
    try:
        failed = appliance("models", "pull", "large-v3", data_dir=data, hub_url=hub.url)
    finally:
        hub.fail_file = None
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith(f"appliance: download of {REPO_ID} failed") and "pull again" in lines[-1]
    assert "Traceback" not in failed.stderr
    assert appliance("models", "verify", "large-v3", data_dir=data).returncode == 1

    fetched = hub.downloads.copy()
    assert appliance("models", "pull", "large-v3", data_dir=data, hub_url=hub.url).returncode == 0
    assert hub.downloads["config.json"] == fetched["config.json"]  # kept from the first try
    assert appliance("models", "verify", "large-v3", data_dir=data).returncode == 0


def test_unknown_models_and_unreachable_hub(tmp_path):
    unknown = appliance("models", "pull", "large-v9", data_dir=tmp_path)
    assert unknown.returncode == 1 and "unknown model 'large-v9'" in unknown.stderr
    offline = appliance("models", "pull", "large-v3-turbo", data_dir=tmp_path)
    assert offline.returncode == 1
    assert "download of mobiuslabsgmbh/faster-whisper-large-v3-turbo failed" in offline.stderr
    assert "Traceback" not in offline.stderr


def test_quick_start_without_a_gpu_serves_speech_to_text_once_the_planned_model_is_pulled(hub, tmp_path):
    # README's quick start on a machine without a GPU (APPLIANCE_STT_DEVICE=cpu says so on any machine):
    # `appliance serve` picks the CPU plan's model, names the exact command that fetches it, and serves
    # speech-to-text once `appliance models pull` has run.
    data = tmp_path / "data"
    cpu = {
        "APPLIANCE_DATA_DIR": str(data),
        "APPLIANCE_STT_DEVICE": "cpu",
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    gw = start_stt_gateway(tmp_path, "before-pull", **cpu)
    try:
        with gw.http() as http:
            r = http.post("/v1/audio/transcriptions", files={"file": make_audio("wav", 1.0)},
                          data={"model": "whisper-1"})  # fmt: skip
        assert r.status_code == 503
        assert r.json()["error"]["message"] == (
            "Speech-to-text is unavailable: model 'large-v3-turbo' is not installed; "
            "run `appliance models pull large-v3-turbo`"
        )
        assert str(tmp_path) not in r.text  # no server paths to the apps
    finally:
        gw.stop()

    env = clean_env(APPLIANCE_DATA_DIR=str(data), APPLIANCE_STT_DEVICE="cpu", HF_ENDPOINT=hub.url)
    env["HF_HOME"] = str(data / "hf-home")
    pulled = run_appliance("models", "pull", env=env, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert (
        pulled.stdout.splitlines()[-1] == f"large-v3-turbo: complete in {data / 'models' / 'large-v3-turbo'}"
    )

    gw = start_stt_gateway(tmp_path, "after-pull", **cpu)
    try:
        assert gw.client().audio.transcriptions.create(model="whisper-1", file=make_audio("wav", 2.0)).text
        stt = gw.readyz().json()["checks"]["stt"]
        assert (stt["model"], stt["device"], stt["compute_type"]) == ("large-v3-turbo", "cpu", "int8")
    finally:
        gw.stop()
