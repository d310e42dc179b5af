"""docker-compose.gpu.yml and the gateway's Dockerfile: valid against the Compose schema, and holding the
deployment's promises (pinned images, GPU reservations, health checks, start order, nothing but the
gateway published), with the planner's env file and Ansible's site.env filling in every variable."""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from appliance.catalog import load_catalog
from tests.harness import REFERENCE, REPO, run_appliance

COMPOSE_FILE = REPO / "docker-compose.gpu.yml"
SITE_ENV_TEMPLATE = REPO / "ansible" / "roles" / "appliance" / "templates" / "site.env.j2"
ENGINES = ("vllm", "tts")
# Which service runs each kind the planner starts (stt is Whisper, inside the gateway).
SERVICE_OF_KIND = {"tts": "tts", "stt": "gateway", "llm": "vllm"}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $$ is a literal $.
VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation, as the Compose specification defines it."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return value or ""

    return VARIABLE.sub(substitute, text)


def variables(text: str) -> set[str]:
    return {m.group("name") for m in VARIABLE.finditer(text) if m.group("name")}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as Compose reads them (a value may be in double quotes)."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value[1:-1] if value[:1] == value[-1:] == '"' and len(value) > 1 else value
    return env


def site_env_keys() -> set[str]:
    return {line.partition("=")[0] for line in SITE_ENV_TEMPLATE.read_text().splitlines() if "=" in line}


SITE_ENV = {
    "APPLIANCE_BIND_ADDRESS": "0.0.0.0",
    "APPLIANCE_HTTPS_PORT": "443",
    "APPLIANCE_GPU_DEVICE": "0",
    "APPLIANCE_UID": "998",
    "APPLIANCE_GID": "998",
    "APPLIANCE_DATA_DIR": "/var/lib/appliance",
    "APPLIANCE_HF_CACHE": "/var/lib/appliance/huggingface",
    "APPLIANCE_VLLM_PLUGINS": "/var/lib/appliance/vllm-plugins",
    "APPLIANCE_CONFIG_FILE": "/etc/appliance/appliance.yaml",
    "APPLIANCE_TLS_DIR": "/etc/appliance/tls",
    "APPLIANCE_SECRETS_DIR": "/etc/appliance/secrets",
    "APPLIANCE_CONFIG_REVISION": "0123abcd",
    "TTS_NIM_TAGS_SELECTOR": "name=magpie-tts-multilingual,batch_size=8",
}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads((REFERENCE / "compose-spec.json").read_text())
    # The schema names draft 7 (its $schema lacks the trailing '#' that jsonschema looks up).
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def planner(tmp_path: Path, gib: float) -> tuple[dict[str, str], dict]:
    """The real `appliance plan` for a card of `gib` GiB: its env file and its JSON plan."""
    env_path = tmp_path / f"plan-{gib}.env"
    proc = run_appliance("plan", "--gpu-memory", str(gib), "--json", "--env-file", str(env_path))
    assert proc.returncode == 0, proc.stderr
    return read_env_file(env_path), json.loads(proc.stdout)


def resolved(plan_env: dict[str, str]) -> dict:
    """The compose file as `docker compose --env-file plan.env --env-file site.env` sees it."""
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), {**plan_env, **SITE_ENV}))


def test_compose_file_is_valid_against_the_compose_schema(raw, validator):
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert set(raw["services"]) == {"vllm", "tts", "gateway"}


@pytest.mark.parametrize("gib", [16, 24, 48, 80])
def test_planner_and_site_env_fill_every_variable_and_the_result_is_valid(tmp_path, validator, gib):
    plan_env, _ = planner(tmp_path, gib)
    used = variables(COMPOSE_FILE.read_text())
    # Every variable comes from one of the two env files Ansible writes; nothing is left to hand edits.
    assert used <= set(plan_env) | site_env_keys(), used - set(plan_env) - site_env_keys()
    assert site_env_keys() == set(SITE_ENV)
    # Each planner value is read by compose (COMPOSE_PROFILES by compose itself), or by the smoke test.
    assert set(plan_env) - used <= {"COMPOSE_PROFILES", "TTS_ENABLED"}
    compose = resolved(plan_env)
    errors = list(validator.iter_errors(compose))
    assert not errors, [e.message for e in errors]


def test_vllm_command_carries_the_planners_arguments(tmp_path):
    plan_env, plan = planner(tmp_path, 24)
    assert "llm" in plan_env["COMPOSE_PROFILES"].split(",")
    argv = shlex.split(resolved(plan_env)["services"]["vllm"]["command"])
    assert argv[0] == plan["vllm"]["model"]  # the image's entrypoint is `vllm serve MODEL`
    option = dict(itertools.pairwise(argv))
    # The planner's full argument list, in its order, around the name and address compose adds.
    added = ["--served-model-name", option["--served-model-name"], "--host", "0.0.0.0", "--port", "8000"]
    rest = argv[1:]
    for flag in ("--served-model-name", "--host", "--port"):
        at = rest.index(flag)
        del rest[at : at + 2]
    assert rest == plan["vllm"]["args"]
    assert all(a in argv for a in added)
    assert option["--gpu-memory-utilization"] == plan_env["LLM_GPU_MEMORY_UTILIZATION"]
    assert option["--max-model-len"] == plan_env["LLM_MAX_MODEL_LEN"]
    assert option["--served-model-name"] == plan_env["LLM_SERVED_NAME"]
    assert option["--port"] == "8000"
    # The reasoning parser is the image's own; a plugin named later would be a file in the working directory.
    assert option["--reasoning-parser"] == "nemotron_v3" and "--reasoning-parser-plugin" not in option
    vllm = resolved(plan_env)["services"]["vllm"]
    assert any(v.endswith(f":{vllm['working_dir']}:ro") for v in vllm["volumes"])


def test_images_are_pinned_and_agree_with_the_catalog(raw):
    services = raw["services"]
    for name in ENGINES:
        image = services[name]["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "$" not in image, image
    assert services["vllm"]["image"].startswith("vllm/vllm-openai:v")
    assert services["tts"]["image"].startswith("nvcr.io/nim/nvidia/magpie-tts-multilingual:")
    # One vLLM image serves every LLM the catalog can plan; the NIM is the catalog's image and tag.
    catalog = load_catalog()
    vllm_images = {m.params["image"] for m in catalog.models.values() if m.engine == "vllm"}
    assert vllm_images == {services["vllm"]["image"]}
    nim = catalog.models["magpie-tts-multilingual"].params["image"]
    assert services["tts"]["image"] == nim
    # The gateway is built here, from the Dockerfile, under a local tag.
    assert services["gateway"]["build"] == {"context": ".", "dockerfile": "Dockerfile"}


def test_every_service_reserves_the_gpu_and_restarts(raw):
    for name, service in raw["services"].items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        assert service["restart"] in ("always", "unless-stopped"), name


def test_health_checks_probe_each_services_own_endpoint(raw):
    expected = {
        "vllm": "http://127.0.0.1:8000/health",
        "tts": "http://127.0.0.1:9000/v1/health/ready",
        "gateway": "https://127.0.0.1:8443/readyz",
    }
    for name, url in expected.items():
        check = raw["services"][name]["healthcheck"]
        assert url in " ".join(check["test"]), name
        assert check["test"][0] == "CMD"
        assert check["start_period"] and check["retries"] >= 1


def test_start_order_follows_the_planner(tmp_path):
    """Each service waits until every service the planner starts before it is healthy."""
    plan_env, plan = planner(tmp_path, 24)
    order = [SERVICE_OF_KIND[s["kind"]] for s in plan["start_order"]]
    assert order == ["tts", "gateway", "vllm"]
    services = resolved(plan_env)["services"]
    for position, name in enumerate(order):
        depends = services[name].get("depends_on", {})
        for earlier in order[:position]:
            assert depends[earlier]["condition"] == "service_healthy", (name, earlier)
    # A plan without local TTS still starts: the dependency on it is not required.
    assert services["gateway"]["depends_on"]["tts"]["required"] is False
    assert services["vllm"]["depends_on"]["tts"]["required"] is False


def test_profiles_match_the_planners(tmp_path, raw):
    assert raw["services"]["vllm"]["profiles"] == ["llm"]
    assert raw["services"]["tts"]["profiles"] == ["tts"]
    assert "profiles" not in raw["services"]["gateway"]  # always runs: Whisper lives in it
    plan_env, _ = planner(tmp_path, 80)
    assert set(plan_env["COMPOSE_PROFILES"].split(",")) == {"llm", "tts"}


def test_only_the_gateway_is_published(raw):
    for name in ENGINES:
        service = raw["services"][name]
        assert "ports" not in service, f"{name} must listen on the backend network only"
        assert "network_mode" not in service
        assert service["networks"] == ["backend"] and service["expose"]
    gateway = raw["services"]["gateway"]
    resolved_ports = interpolate(json.dumps(gateway["ports"]), SITE_ENV)
    assert json.loads(resolved_ports) == ["0.0.0.0:443:8443"]


def test_model_caches_survive_restarts(raw):
    services = raw["services"]
    assert "nim-cache:/opt/nim/.cache" in services["tts"]["volumes"]
    assert "nim-cache" in raw["volumes"]
    assert any(v.endswith(":/root/.cache/huggingface") for v in services["vllm"]["volumes"])
    data = [v for v in services["gateway"]["volumes"] if v.startswith("${APPLIANCE_DATA_DIR")]
    assert len(data) == 1 and data[0].endswith(":/var/lib/appliance")  # keys and Whisper models


def test_secrets_come_from_root_only_files_not_the_compose_file(raw):
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"(NGC_API_KEY|NVIDIA_NIM_API_KEY)\s*[:=]", text)
    tts_env_files = [f["path"] for f in raw["services"]["tts"]["env_file"]]
    gateway_env_files = [f["path"] for f in raw["services"]["gateway"]["env_file"]]
    assert [Path(p).name for p in tts_env_files] == ["ngc.env"]
    assert [Path(p).name for p in gateway_env_files] == ["gateway.env"]
    # vLLM reads VLLM_* variables as its own settings: the plan reaches it as arguments only.
    assert "env_file" not in raw["services"]["vllm"]
    assert set(raw["services"]["vllm"]["environment"]) == {"HF_HOME"}


def test_gateway_serves_tls_with_the_certificate_ansible_writes(raw):
    gateway = raw["services"]["gateway"]
    assert "--ssl-certfile=/etc/appliance/tls/cert.pem" in gateway["command"]
    assert "--ssl-keyfile=/etc/appliance/tls/key.pem" in gateway["command"]
    assert any(v.endswith(":/etc/appliance/tls:ro") for v in gateway["volumes"])
    # A new certificate or settings file changes this label, so compose recreates the gateway.
    assert gateway["labels"]["org.appliance.config-revision"] == "${APPLIANCE_CONFIG_REVISION:-}"


def test_dockerfile_builds_a_non_root_cuda_image_with_a_health_check():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", base), base
    # The planner's driver floor for the gateway is the catalog's: it must name this very image.
    assert load_catalog().gateway["image"] == base
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*readyz", text, re.M)
    assert "pip install /tmp/dist/appliance-*.whl" in text
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignore == ["*", "!dist/appliance-*.whl"]  # the wheel, and nothing else of the checkout
