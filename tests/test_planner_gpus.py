"""`appliance plan` on boxes with several GPUs, as an admin runs it: one vLLM per card for models that
fit one, tensor parallel for one that does not, and the compose variables of each engine."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import REPO, clean_env, run_appliance
from tests.sims.nvml import FAKE_DIR, write_config

TIER1, TIER2 = "nvidia/nemotron-mini-4b-instruct", "nvidia/nemotron-3-nano-30b-a3b"
NANO_4B, NANO_30B = "nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8"
SPEECH = ["whisper-large-v3", "nvidia/magpietts"]


def plan(*args: str, env: dict[str, str] | None = None) -> dict:
    proc = run_appliance("plan", *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def engines(body: dict) -> list[tuple[str, list[int]]]:
    return [(e["model"], e["gpus"]) for e in body["engines"]]


def test_two_24_gb_cards_run_tier_1_on_each_and_pool_them():
    body = plan("--gpu-memory", "24,24")
    assert engines(body) == [(NANO_4B, [0]), (NANO_4B, [1])]
    assert body["local"] == [TIER1, *SPEECH] and body["cloud"] == [TIER2]
    assert body["speech"]["gpu"] == 0
    assert body["llm_urls"] == ["http://vllm:8000/v1", "http://vllm-1:8000/v1"]
    tier2 = next(r for r in body["routes"] if r["name"] == TIER2)
    # Why the 30B cannot be split over the two: speech holds most of GPU 0.
    assert "needs 32850 MiB on one card or 17449 MiB on each of two" in tier2["reason"]


def test_a_model_too_big_for_one_card_runs_tensor_parallel_across_two():
    body = plan("--gpu-memory", "24,24,24")
    assert engines(body) == [(NANO_30B, [1, 2]), (NANO_4B, [0])]
    assert set(body["local"]) == {TIER1, TIER2, *SPEECH}
    big = body["engines"][0]
    assert big["tensor_parallel_size"] == 2
    assert big["args"][-2:] == ["--tensor-parallel-size", "2"]
    assert "--tensor-parallel-size" not in body["engines"][1]["args"]
    tier2 = next(r for r in body["routes"] if r["name"] == TIER2)
    assert tier2["reason"] == f"served by {NANO_30B} on GPUs 1, 2 (tensor parallel)"


def test_cards_that_each_hold_the_30b_run_one_vllm_each():
    body = plan("--gpu-memory", "48,48")
    assert engines(body) == [(NANO_30B, [1]), (NANO_4B, [0])]
    assert all("--tensor-parallel-size" not in e["args"] for e in body["engines"])


def test_the_env_file_has_each_engines_compose_variables(tmp_path: Path):
    env_path = tmp_path / "plan.env"
    proc = run_appliance("plan", "--gpu-memory", "24,24,24", "--env-file", str(env_path))
    assert proc.returncode == 0, proc.stderr
    values = dict(
        line.split("=", 1) for line in env_path.read_text().splitlines() if line and not line.startswith("#")
    )
    assert values["LLM_MODEL"] == NANO_30B and values["LLM_GPUS"] == "1,2"
    assert values["LLM_1_MODEL"] == NANO_4B and values["LLM_1_GPUS"] == "0"
    assert "--tensor-parallel-size 2" in values["LLM_EXTRA_ARGS"]
    assert float(values["LLM_1_GPU_MEMORY_UTILIZATION"]) < 0.5  # it shares GPU 0 with speech
    assert values["APPLIANCE_LLM_URLS"] == "http://vllm:8000/v1,http://vllm-1:8000/v1"
    assert values["SPEECH_GPU"] == "0" and values["COMPOSE_PROFILES"] == "tts,llm"
    assert "vllm-1 on GPU 0" in proc.stdout and "the gateway pools:" in proc.stdout


def test_plan_places_engines_on_every_gpu_it_finds(tmp_path: Path):
    card = {"name": "NVIDIA L40S", "compute_capability": [8, 9], "memory_total_mib": 46068}
    env = clean_env(PYTHONPATH=f"{FAKE_DIR}:{REPO}")
    env["FAKE_NVML_CONFIG"] = str(write_config(tmp_path / "nvml.json", {"devices": [card, card]}))
    body = plan(env=env)
    assert body["gpu_memory_mib"] == [46068, 46068]
    assert body["memory_source"] == "GPU 0: NVIDIA L40S, GPU 1: NVIDIA L40S"
    assert engines(body) == [(NANO_30B, [1]), (NANO_4B, [0])]
