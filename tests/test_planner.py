"""The VRAM planner: each rule and its boundary on a catalog built here, then the real catalog on the card
sizes a school may have, and `appliance plan` as an admin runs it."""

from __future__ import annotations

import json
import subprocess

import pytest

from appliance.catalog import load_catalog, parse_catalog
from appliance.planner import PlanPolicy, env_file, plan, size_kv, smallest_card_for_all_local
from tests.harness import REPO, clean_env, run_appliance
from tests.sims.nvml import FAKE_DIR, write_config

TIER1, TIER2 = "nvidia/nemotron-mini-4b-instruct", "nvidia/nemotron-3-nano-30b-a3b"
NANO_4B, MINI_4B, NANO_30B = (
    "nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8",
    "nvidia/Nemotron-Mini-4B-Instruct",
    "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8",
)

# Round numbers, so each boundary is plain arithmetic: 1 KiB of KV per token is 1 MiB per 1024 tokens.
SMALL = {
    "id": "small",
    "kind": "llm",
    "engine": "vllm",
    "weights_mib": 1500,
    "runtime_overhead_mib": 498,
    "kv_bytes_per_token": 1024,
    "state_mib_per_seq": 0,
    "max_context": 8192,
    "target_model_len": 4096,
    "engine_args": ["--small-arg"],
}
BIG = {
    "id": "big",
    "kind": "llm",
    "engine": "vllm",
    "weights_mib": 5000,
    "runtime_overhead_mib": 978,
    "kv_bytes_per_token": 1024,
    "state_mib_per_seq": 10,
    "max_context": 8192,
    "target_model_len": 8192,
    "min_compute_capability": "8.9",
    "min_driver": "575.51.03",
    "engine_args": ["--big-arg", "x"],
}
STT = {
    "id": "stt-model",
    "kind": "stt",
    "engine": "faster-whisper",
    "min_driver": "525.60.13",
    "profile": [
        {"compute_type": "float16", "batch_size": 8, "vram_mib": 900},
        {"compute_type": "int8_float16", "batch_size": 1, "vram_mib": 400},
    ],
}
TTS = {"id": "tts-model", "kind": "tts", "engine": "nim", "profile": [{"batch_size": 8, "vram_mib": 1500}]}
ROUTES = [
    {"name": "small-chat", "kind": "llm", "local": ["small", "big"], "cloud": "cloud/small"},
    {"name": "big-chat", "kind": "llm", "local": ["big"], "cloud": "cloud/big"},
    {"name": "stt", "kind": "stt", "local": ["stt-model"]},
    {"name": "tts", "kind": "tts", "local": ["tts-model"]},
]
CATALOG = parse_catalog({"route": ROUTES, "model": [SMALL, BIG, STT, TTS]})
POLICY = PlanPolicy(headroom_fraction=0, headroom_min_mib=100, min_model_len=1024, min_num_seqs=2)
# headroom 100 + stt 400 + tts 1500 = 2000; small needs 1500 + 498 + 2 x 1 = 2000;
# big needs 5000 + 978 + 2 x 11 = 6000.
# vLLM's share of the card is rounded down to 1/10000, so these totals make it exact: 6000 / 8000 = 0.75.
SPEECH = 2000
ALL_LOCAL = SPEECH + 6000


def placements(p) -> dict[str, str]:
    return {r["name"]: r["placement"] for r in p.routes}


def reason(p, name: str) -> str:
    return next(r["reason"] for r in p.routes if r["name"] == name)


def test_one_vllm_model_serves_every_llm_route_it_is_listed_for():
    p = plan(CATALOG, ALL_LOCAL, POLICY)
    assert placements(p) == {"small-chat": "local", "big-chat": "local", "stt": "local", "tts": "local"}
    assert p.vllm.model == "big"
    assert p.to_dict()["local"] == ["small-chat", "big-chat", "stt", "tts"]


def test_a_mib_less_and_the_big_model_goes_to_the_cloud_saying_why():
    p = plan(CATALOG, ALL_LOCAL - 1, POLICY)
    assert placements(p) == {"small-chat": "local", "big-chat": "cloud", "stt": "local", "tts": "local"}
    assert p.vllm.model == "small"
    assert reason(p, "big-chat") == (
        # 5999 / 7999 rounds down to 0.7499 of the card: 5998 MiB.
        "big needs 6000 MiB, 5998 MiB left for vLLM after speech; served by NVIDIA's cloud (cloud/big)"
    )
    assert [r["target"] for r in p.routes[:2]] == ["small", "cloud/big"]


@pytest.mark.parametrize(("memory", "placement"), [(SPEECH + 2000, "local"), (SPEECH + 1999, "cloud")])
def test_the_small_model_needs_its_weights_overhead_and_the_fewest_useful_sequences(memory, placement):
    assert placements(plan(CATALOG, memory, POLICY))["small-chat"] == placement


@pytest.mark.parametrize(("memory", "tts"), [(SPEECH, "local"), (SPEECH - 1, "unavailable")])
def test_speech_comes_first_smallest_first_and_has_no_cloud(memory, tts):
    p = plan(CATALOG, memory, POLICY)
    assert placements(p) == {"small-chat": "cloud", "big-chat": "cloud", "stt": "local", "tts": tts}
    assert p.vllm is None
    if tts == "unavailable":
        assert "tts-model needs 1500 MiB, 1499 MiB left" in reason(p, "tts")
        assert "no cloud stand-in" in reason(p, "tts")


# 500 MiB more for Whisper's best profile; at 8500 vLLM's rounded share (0.7058) would be 5999 MiB.
@pytest.mark.parametrize(("memory", "compute_type"), [(8501, "float16"), (8500, "int8_float16")])
def test_whisper_moves_up_a_profile_only_when_vllm_keeps_its_room(memory, compute_type):
    p = plan(CATALOG, memory, POLICY)
    assert p.vllm.model == "big"
    assert p.service("stt").profile.compute_type == compute_type


def test_never_makes_what_does_not_fit_unavailable_with_the_reason():
    p = plan(CATALOG, SPEECH + 1999, PlanPolicy(**{**POLICY.__dict__, "cloud_fallback": "never"}))
    assert placements(p)["small-chat"] == "unavailable"
    assert placements(p)["big-chat"] == "unavailable"
    assert reason(p, "small-chat").endswith("cloud fallback is 'never' for it")
    assert p.to_dict()["unavailable"] == ["small-chat", "big-chat"]


def test_policy_is_per_public_name():
    policy = PlanPolicy(**{**POLICY.__dict__, "cloud_fallback": {"big-chat": "never"}})
    assert placements(plan(CATALOG, 3000, policy)) == {
        "small-chat": "cloud",
        "big-chat": "unavailable",
        "stt": "local",
        "tts": "local",
    }


def test_a_model_the_gpu_cannot_run_is_skipped_for_the_next_one():
    policy = PlanPolicy(**{**POLICY.__dict__, "compute_capability": "8.6"})
    p = plan(CATALOG, 100_000, policy)
    assert p.vllm.model == "small"
    assert reason(p, "big-chat").startswith("big needs compute capability 8.9, the GPU has 8.6")


def test_vllm_gets_the_rest_and_the_headroom_stays_free():
    p = plan(CATALOG, 10_000, POLICY)
    # (10000 - 100 - 900 - 1500) / 10000 = 0.75 of the card for vLLM.
    assert p.vllm.gpu_memory_utilization == 0.75
    assert p.vllm.kv_mib == 7500 - 5000 - 978
    assert p.vllm.max_model_len == 8192 and p.vllm.max_num_seqs == 64  # 1522 // 18 = 84, capped
    assert sum(mib for _, mib in p.budget) == 10_000
    assert p.budget[-1] == ("kept free (headroom)", 100)
    assert [s.kind for s in p.services] == ["tts", "stt", "llm"]  # vLLM last
    assert p.vllm.command_args() == [
        "--gpu-memory-utilization",
        "0.75",
        "--max-model-len",
        "8192",
        "--max-num-seqs",
        "64",
        "--big-arg",
        "x",
    ]
    assert p.min_driver == "575.51.03"


@pytest.mark.parametrize(
    ("kv_mib", "expected"),
    [(8, (4096, 2)), (7, (2048, 3)), (4, (2048, 2)), (3, (1024, 3)), (1000, (4096, 64))],
)
def test_kv_room_sets_the_longest_context_with_enough_sequences(kv_mib, expected):
    assert size_kv(CATALOG.models["small"], kv_mib, POLICY) == expected


def test_env_file_has_what_compose_reads():
    text = env_file(plan(CATALOG, ALL_LOCAL, POLICY), "on_failure")
    values = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))
    assert values == {
        "COMPOSE_PROFILES": "tts,llm",
        "LLM_MODEL": "big",
        "LLM_SERVED_NAME": "big",
        "LLM_GPU_MEMORY_UTILIZATION": "0.75",
        "LLM_MAX_MODEL_LEN": "1024",  # 22 MiB of KV: 2 sequences of 1024 tokens (1 + 10 MiB each)
        "LLM_MAX_NUM_SEQS": "2",
        "LLM_EXTRA_ARGS": '"--big-arg x"',
        "STT_MODEL": "stt-model",
        "STT_COMPUTE_TYPE": "int8_float16",
        "STT_BATCH_SIZE": "1",
        "TTS_ENABLED": "true",
        "APPLIANCE_CLOUD_FALLBACK": "on_failure",
    }
    empty = env_file(plan(CATALOG, SPEECH, POLICY), "never")
    assert "COMPOSE_PROFILES=tts\n" in empty and "LLM_MODEL=\n" in empty and "TTS_ENABLED=true\n" in empty


# --- the real catalog on real card sizes ---------------------------------------------------------------

REAL = load_catalog()


def real_plan(gib: int, **policy):
    return plan(REAL, gib * 1024, PlanPolicy(**policy))


def test_16_gb_keeps_tier_1_and_whisper_and_explains_what_cannot_stay():
    p = real_plan(16)
    assert placements(p) == {
        TIER1: "local",
        TIER2: "cloud",
        "whisper-large-v3": "local",
        "nvidia/magpietts": "unavailable",
    }
    assert p.vllm.model == NANO_4B
    assert "needs 32850 MiB" in reason(p, TIER2) and "NVIDIA's cloud" in reason(p, TIER2)
    assert "magpie-tts-multilingual needs 13923 MiB" in reason(p, "nvidia/magpietts")
    assert smallest_card_for_all_local(REAL) == 50


def test_24_gb_runs_tier_1_on_nano_4b_fp8_and_sends_tier_2_to_the_cloud():
    p = real_plan(24)
    assert placements(p) == {
        TIER1: "local",
        TIER2: "cloud",
        "whisper-large-v3": "local",
        "nvidia/magpietts": "local",
    }
    assert p.vllm.model == NANO_4B
    assert p.service("stt").profile.compute_type == "int8_float16"  # what it takes to keep chat local
    assert [s.kind for s in p.services] == ["tts", "stt", "llm"]
    args = p.vllm.command_args()
    assert args[0] == "--gpu-memory-utilization" and 0.25 < float(args[1]) < 0.3
    # Nemotron 3's reasoning parser is built into the catalog's vLLM image: no plugin file to mount.
    assert {"--trust-remote-code", "fp8", "nemotron_v3"} <= set(args)
    assert not any("plugin" in arg for arg in args)
    assert p.vllm.max_num_seqs >= 4 and p.vllm.max_model_len >= 8192


def test_24_gb_under_never_reports_tier_2_unavailable():
    p = real_plan(24, cloud_fallback="never")
    assert placements(p)[TIER2] == "unavailable"
    assert "cloud fallback is 'never'" in reason(p, TIER2)


@pytest.mark.parametrize("gib", [32, 48])
def test_32_and_48_gb_still_send_tier_2_to_the_cloud(gib):
    p = real_plan(gib)
    assert placements(p)[TIER1] == "local" and placements(p)[TIER2] == "cloud"
    assert p.service("stt").profile.compute_type == "float16"


@pytest.mark.parametrize(("gib", "seqs"), [(80, 64), (141, 64)])
def test_80_and_141_gb_run_everything_locally_on_the_30b(gib, seqs):
    p = real_plan(gib)
    assert set(placements(p).values()) == {"local"}
    assert p.vllm.model == NANO_30B
    assert p.vllm.max_model_len == 32768 and p.vllm.max_num_seqs == seqs
    assert p.budget[-1][1] >= p.headroom_mib


def test_an_ampere_card_falls_back_to_the_bf16_mini_model():
    p = real_plan(80, compute_capability="8.0")
    assert p.vllm.model == MINI_4B
    assert p.vllm.max_model_len == 4096
    assert "needs compute capability 8.9" in reason(p, TIER2)


def test_nano_4b_mamba_state_follows_its_config():
    # config.json: 21 Mamba-2 layers, mamba_num_heads 96, mamba_head_dim 80, ssm_state_size 128, with a
    # float32 SSM cache (--mamba-ssm-cache-dtype float32).
    ssm_mib = 21 * 96 * 80 * 128 * 4 / 2**20
    assert REAL.models[NANO_4B].params["state_mib_per_seq"] >= ssm_mib
    assert "float32" in REAL.models[NANO_4B].params["engine_args"]


def test_every_vllm_model_uses_one_cuda_12_image_with_the_nemotron_3_parser():
    vllm_models = [m for m in REAL.models.values() if m.engine == "vllm"]
    assert len({m.params["image"] for m in vllm_models}) == 1
    tag = vllm_models[0].params["image"].rpartition(":")[2]
    version = tuple(int(n) for n in tag.removeprefix("v").split("-")[0].split("."))
    assert version >= (0, 18, 0) and tag.endswith("-cu129")  # cu129: the 575.51.03 driver floor holds
    assert all(m.params["min_driver"] == "575.51.03" for m in vllm_models)


@pytest.mark.parametrize("gib", [16, 24, 32, 48, 80, 141])
def test_every_plan_adds_up_and_leaves_the_headroom(gib):
    p = real_plan(gib)
    assert sum(mib for _, mib in p.budget) == gib * 1024
    assert p.budget[-1][1] >= p.headroom_mib
    assert all(mib > 0 for _, mib in p.budget)
    json.dumps(p.to_dict())


# --- `appliance plan` ----------------------------------------------------------------------------------


def run_plan(*args: str, fake: dict | None = None, tmp_path=None, **env: str) -> subprocess.CompletedProcess:
    environ = clean_env(**env)
    if fake is not None:
        environ["PYTHONPATH"] = f"{FAKE_DIR}:{REPO}"
        environ["FAKE_NVML_CONFIG"] = str(write_config(tmp_path / "nvml.json", fake))
    return run_appliance("plan", *args, env=environ)


def test_plan_json_and_env_file(tmp_path):
    env_path = tmp_path / "plan.env"
    proc = run_plan("--gpu-memory", "24", "--json", "--env-file", str(env_path))
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["local"] == [TIER1, "whisper-large-v3", "nvidia/magpietts"]
    assert body["cloud"] == [TIER2] and body["unavailable"] == []
    assert [s["kind"] for s in body["start_order"]] == ["tts", "stt", "llm"]
    assert body["vllm"]["model"] == NANO_4B and "--max-num-seqs" in body["vllm"]["args"]
    assert sum(line["mib"] for line in body["budget"]) == 24 * 1024
    assert body["smallest_card_all_local_gib"] == 50
    env = env_path.read_text()
    assert f"LLM_MODEL={NANO_4B}\n" in env and "COMPOSE_PROFILES=tts,llm\n" in env
    assert "APPLIANCE_CLOUD_FALLBACK=on_failure\n" in env


def test_plan_follows_the_schools_policy_from_settings():
    body = json.loads(run_plan("--gpu-memory", "24", "--json", APPLIANCE_CLOUD_FALLBACK="never").stdout)
    assert body["unavailable"] == [TIER2]
    body = json.loads(run_plan("--gpu-memory", "24", "--json", "--cloud-fallback", "on_overload").stdout)
    assert body["cloud"] == [TIER2]


def test_plan_text_shows_the_budget_line_by_line():
    proc = run_plan("--gpu-memory", "16")
    assert proc.returncode == 0
    assert "unavailable nvidia/magpietts: magpie-tts-multilingual needs 13923 MiB" in proc.stdout
    assert "   4768 MiB  vLLM weights: nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8" in proc.stdout
    assert "everything runs locally from a 50 GiB card up" in proc.stdout


def test_without_a_gpu_the_plan_is_for_the_cpu_and_says_why(tmp_path):
    env_path = tmp_path / "plan.env"
    fake = {"init_error": "LibraryNotFound"}
    proc = run_plan("--env-file", str(env_path), fake=fake, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("no GPU: planning for the CPU (no usable NVIDIA GPU: ")
    no_key = "vLLM needs an NVIDIA GPU; set NVIDIA_NIM_API_KEY to serve it from NVIDIA's cloud"
    assert lines[1:6] == [
        f"  unavailable {TIER1}: {no_key}",
        f"  unavailable {TIER2}: {no_key}",
        "  local       whisper-large-v3: large-v3-turbo on the CPU (compute int8)",
        "  unavailable nvidia/magpietts: magpie-tts-multilingual needs an NVIDIA GPU; "
        "it has no cloud stand-in (its data stays on the premises)",
        "speech-to-text: fetch its model once with `appliance models pull large-v3-turbo`",
    ]
    env = env_path.read_text()
    assert "STT_MODEL=large-v3-turbo\n" in env and "STT_COMPUTE_TYPE=int8\n" in env
    assert "COMPOSE_PROFILES=\n" in env and "TTS_ENABLED=false\n" in env


@pytest.mark.parametrize(
    ("settings", "cloud"), [({"NVIDIA_NIM_API_KEY": "nvapi-x"}, [TIER1, TIER2]), ({}, [])]
)
def test_the_cpu_plan_sends_chat_to_the_cloud_only_with_a_key(settings, cloud):
    body = json.loads(run_plan("--cpu", "--json", **settings).stdout)
    assert body["device"] == "cpu" and body["memory_source"] == "--cpu"
    assert body["local"] == ["whisper-large-v3"] and body["cloud"] == cloud
    assert body["stt"] == {"model": "large-v3-turbo", "compute_type": "int8", "batch_size": None}
    never = json.loads(
        run_plan("--cpu", "--json", "--cloud-fallback", "never", NVIDIA_NIM_API_KEY="nvapi-x").stdout
    )
    assert never["cloud"] == [] and never["unavailable"] == [TIER1, TIER2, "nvidia/magpietts"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("--gpu-memory", "0"), "appliance: --gpu-memory 0: give the card's memory in GiB, more than 0"),
        (("--gpu-memory", "-8"), "appliance: --gpu-memory -8: give the card's memory in GiB, more than 0"),
        (("--gpu-memory", "nan"), "appliance: --gpu-memory nan: give the card's memory in GiB, more than 0"),
        (
            ("--gpu-memory", "24", "--env-file", "/no/such/folder/plan.env"),
            "appliance: --env-file /no/such/folder/plan.env: no such folder /no/such/folder",
        ),
    ],
)
def test_impossible_plan_arguments_are_one_line(args, line):
    proc = run_plan(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == line and proc.stdout == ""


@pytest.mark.parametrize("gib", [24, 40, 48, 50, 80])
def test_the_speech_lines_show_what_the_budget_gives(gib):
    body = plan(load_catalog(), gib * 1024).to_dict()
    for route in body["routes"]:
        if route["kind"] in ("stt", "tts") and route["placement"] == "local":
            line = next(b for b in body["budget"] if b["item"].startswith(f"{route['kind']}: "))
            profile = line["item"].removeprefix(f"{route['kind']}: {route['target']}")
            assert route["reason"] == f"{route['target']} needs {line['mib']} MiB{profile}"


def test_serving_both_chat_tiers_locally_wins_over_a_bigger_whisper_batch():
    # On 50 GiB the 30B fits only beside Whisper's smallest profile: both tiers stay local.
    p = plan(load_catalog(), 50 * 1024)
    assert p.names("local") == [TIER1, TIER2, "whisper-large-v3", "nvidia/magpietts"]
    assert reason(p, "whisper-large-v3") == "large-v3 needs 2926 MiB (compute int8_float16, batch 1)"
    # On 80 GiB there is room for both: Whisper gets its best profile.
    p = plan(load_catalog(), 80 * 1024)
    assert p.names("local") == [TIER1, TIER2, "whisper-large-v3", "nvidia/magpietts"]
    assert reason(p, "whisper-large-v3") == "large-v3 needs 6090 MiB (compute float16, batch 8)"


@pytest.mark.parametrize(
    ("name", "capability"), [("Tesla V100-SXM2-32GB", [7, 0]), ("Quadro RTX 8000", [7, 5])]
)
def test_volta_or_turing_gets_no_tts_nim_and_still_the_gateways_driver_floor(tmp_path, name, capability):
    card = {"name": name, "compute_capability": capability, "memory_total_mib": 32768}
    env_file = tmp_path / "plan.env"
    proc = run_plan("--json", "--env-file", str(env_file), fake={"devices": [card]}, tmp_path=tmp_path)
    body = json.loads(proc.stdout)
    tts = next(r for r in body["routes"] if r["name"] == "nvidia/magpietts")
    assert tts["placement"] == "unavailable"
    assert "needs compute capability 8.0" in tts["reason"]
    assert "COMPOSE_PROFILES=\n" in (tmp_path / "plan.env").read_text()  # neither the NIM nor vLLM
    # No LLM runs locally (FP8 needs 8.9, BF16 8.0), yet the gateway's CUDA 12.8 image needs its driver.
    assert body["vllm"] is None
    assert body["min_driver"] == "570.124.06"


def test_plan_reads_the_gpu_it_finds(tmp_path):
    a100 = {"name": "NVIDIA A100 80GB PCIe", "compute_capability": [8, 0], "memory_total_mib": 81920}
    body = json.loads(run_plan("--json", fake={"devices": [a100]}, tmp_path=tmp_path).stdout)
    assert body["memory_source"] == "GPU 0: NVIDIA A100 80GB PCIe"
    assert body["gpu_memory_mib"] == 81920
    assert body["vllm"]["model"] == MINI_4B  # no FP8 on Ampere
    assert body["cloud"] == [TIER2]
