"""Upstreams, zones and pools through the real gateway: the chain box -> district -> cloud under every
ceiling (simulators count what reaches them), pools of engine URLs, session affinity, the district's
headers, configuration errors, and the real vLLM Router as a district's engine."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import CLOUD_KEY, CLOUD_MODELS, LOCAL_MODELS
from tests.harness import (
    CLIENT_KEY,
    BackgroundLoop,
    clean_env,
    free_port,
    run_appliance,
    self_signed_certificate,
)
from tests.sims.openai_upstream import OpenAIUpstream

TIER1, TIER2 = CLOUD_MODELS
MESSAGES = [{"role": "user", "content": "Chek my sentense please."}]
DISTRICT_HEADERS = (
    "x-gateway-inference-fairness-id",
    "x-gateway-inference-objective",
    "x-llm-d-inference-fairness-id",
    "x-llm-d-inference-objective",
    "x-session-id",
)


@pytest.fixture
def engines(bg_loop: BackgroundLoop) -> Iterator[Callable[..., OpenAIUpstream]]:
    """Start simulated vLLM engines (each counts what it sees); all are stopped afterwards."""
    started: list[OpenAIUpstream] = []

    def start(flavor: str = "vllm", models: tuple[str, ...] = LOCAL_MODELS, **kw: str) -> OpenAIUpstream:
        sim = bg_loop.run(OpenAIUpstream(flavor, models, **kw).start())
        started.append(sim)
        return sim

    yield start
    for sim in started:
        bg_loop.run(sim.stop())


def write_config(tmp_path: Path, config: dict) -> str:
    path = tmp_path / f"appliance-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def chat(gw, model: str = TIER1, user: str | None = None, headers: dict | None = None) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES}
    if user is not None:
        body["user"] = user
    with gw.http() as http:
        return http.post("/v1/chat/completions", json=body, headers=headers or {})


def chats(gw, count: int, workers: int = 8, **kw) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda _: chat(gw, **kw), range(count)))


@pytest.fixture
def zones(start_gateway, engines, tmp_path):
    """box, district and cloud simulators; start(max_zone=..., **settings) starts a gateway over them."""
    box, district = engines(), engines()
    cloud = engines("cloud", CLOUD_MODELS, api_key=CLOUD_KEY)

    def start(max_zone: str | None = None, **settings: str):
        models = {TIER1: {"max_zone": max_zone}} if max_zone else {}
        config = {
            "upstreams": {"district": {"zone": "district", "urls": [district.base_url]}},
            "models": models,
        }
        return start_gateway(
            APPLIANCE_CONFIG=write_config(tmp_path, config),
            APPLIANCE_LLM_URL=box.base_url,
            NVIDIA_NIM_BASE_URL=cloud.base_url,
            NVIDIA_NIM_API_KEY=CLOUD_KEY,
            APPLIANCE_BREAKER_PROBE_INTERVAL="0.2",
            **settings,
        )

    return start, box, district, cloud


# The chain and its ceilings.


def test_failover_goes_box_then_district_then_cloud(zones):
    start, box, district, cloud = zones
    gw = start()
    assert chat(gw).headers["x-appliance-target"] == "box"
    box.fail("503")
    r = chat(gw)
    assert (r.status_code, r.headers["x-appliance-target"]) == (200, "district")
    assert r.headers["x-appliance-fallback"] == "true"
    district.fail("503")
    r = chat(gw)
    assert (r.status_code, r.headers["x-appliance-target"]) == (200, "cloud")
    assert "[cloud]" in r.json()["choices"][0]["message"]["content"]
    # In order; the district and the cloud once per request that reached them (the box may retry a
    # blip once before its text leaves the box).
    assert len(box.seen) >= 3 and (len(district.seen), len(cloud.seen)) == (2, 1)
    assert box.seen[-1].at < district.seen[-1].at < cloud.seen[-1].at
    # The request log (what a usage ledger reads) names the zone that served.
    logs = gw.logs()
    for zone in ("box", "district", "cloud"):
        assert f'"target":"{zone}","zone":"{zone}"' in logs


@pytest.mark.parametrize(
    ("max_zone", "served", "counts"),
    [("box", None, (0, 0)), ("district", "district", (1, 0)), ("cloud", "district", (1, 0))],
)
def test_each_ceiling_keeps_requests_within_its_zone(zones, max_zone, served, counts):
    start, box, district, cloud = zones
    gw = start(max_zone=max_zone)
    box.fail("503")
    r = chat(gw)
    if served is None:
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
    else:
        assert r.headers["x-appliance-target"] == served
    assert box.seen and (len(district.seen), len(cloud.seen)) == counts


def test_district_ceiling_never_reaches_the_cloud_even_when_the_district_fails(zones):
    start, box, district, cloud = zones
    gw = start(max_zone="district")
    box.fail("503")
    district.fail("503")
    r = chat(gw)
    assert r.status_code == 503
    assert r.headers["x-should-retry"] == "false"
    assert box.seen and (len(district.seen), len(cloud.seen)) == (1, 0)


def test_cloud_fallback_never_means_the_box_only(zones):
    start, box, district, cloud = zones
    gw = start(APPLIANCE_CLOUD_FALLBACK="never")
    box.fail("503")
    assert chat(gw).status_code == 503
    assert (len(district.seen), len(cloud.seen)) == (0, 0)


def test_readyz_shows_every_chain_and_every_url(zones):
    start, _, district, _ = zones
    gw = start(max_zone="district")
    llm = gw.readyz().json()["checks"]["llm"]
    assert llm["chains"][TIER1] == "box (box) -> district (district); up to district, on_failure"
    assert (
        llm["chains"][TIER2] == "box (box) -> district (district) -> cloud (cloud); up to cloud, on_failure"
    )
    assert llm["targets"]["district"]["zone"] == "district"
    assert [u["url"] for u in llm["targets"]["district"]["urls"]] == [district.base_url]
    assert '"event":"model chain"' in gw.logs()


def test_a_keys_ceiling_can_only_narrow_a_models_chain(tmp_path):
    """The function a client key's `--max-zone` is applied through (the gateway's key records pass it)."""
    from appliance.catalog import load_catalog
    from appliance.config import load_settings
    from appliance.upstreams.chain import resolve_chains

    config = {
        "upstreams": {"district": {"zone": "district", "urls": ["https://ai.district.example/v1"]}},
        "models": {TIER1: {"max_zone": "district"}},
    }
    settings = load_settings(write_config(tmp_path, config), nvidia_nim_api_key=CLOUD_KEY)
    chains = resolve_chains(settings, load_catalog())

    def zones(model: str, key_max_zone: str | None) -> list[str]:
        return [link.zone for link in chains[model].links_within(key_max_zone)]

    assert zones(TIER2, None) == zones(TIER2, "cloud") == ["box", "district", "cloud"]
    assert zones(TIER2, "district") == ["box", "district"]
    assert zones(TIER2, "box") == ["box"]
    assert zones(TIER1, "cloud") == ["box", "district"]  # a key cannot widen its model's ceiling
    assert zones(TIER1, "box") == ["box"]


def test_doctor_shows_each_chain_and_checks_every_engine_url(engines, tmp_path):
    box, box2, district = engines(), engines(), engines()
    config = {
        "upstreams": {"district": {"zone": "district", "urls": [district.base_url]}},
        "models": {TIER1: {"max_zone": "district"}},
    }
    env = clean_env(
        APPLIANCE_API_KEYS=CLIENT_KEY,
        APPLIANCE_DATA_DIR=str(tmp_path / "data"),
        APPLIANCE_LLM_URL=f"{box.base_url},{box2.base_url}",
        APPLIANCE_CONFIG=write_config(tmp_path, config),
    )
    out = run_appliance("doctor", env=env).stdout
    assert f"ok    chain {TIER1}: box (box) -> district (district); up to district, on_failure" in out
    assert f"ok    llm engine: {box.base_url} serves" in out
    assert f"ok    llm engine 2: {box2.base_url} serves" in out
    assert f"ok    upstream district: {district.base_url} serves" in out


# The district's headers.


def test_district_headers_go_to_the_district_only_and_carry_no_pupil_data(zones):
    start, box, district, cloud = zones
    gw = start()
    chat(gw, user="pupil-ada-lovelace")
    box.fail("503")
    chat(gw, user="pupil-ada-lovelace")
    chat(gw, TIER2, user="pupil-ada-lovelace")
    district.fail("503")
    chat(gw, user="pupil-ada-lovelace")
    assert [chat_count(s) for s in (district, cloud)] == [3, 1]
    headers = {name: [{k.lower(): v for k, v in s.headers.items()} for s in sim.seen] for name, sim in
               (("box", box), ("district", district), ("cloud", cloud))}  # fmt: skip
    for name in ("box", "cloud"):
        assert not any(h in seen for seen in headers[name] for h in DISTRICT_HEADERS)
    tier1, tier2, _ = headers["district"]
    assert tier1["x-gateway-inference-fairness-id"] == "env-1"  # the client key's id, never the key
    assert tier1["x-llm-d-inference-fairness-id"] == "env-1"  # llm-d's current name for it
    assert tier2["x-llm-d-inference-objective"] == "batch"
    assert [tier1["x-gateway-inference-objective"], tier2["x-gateway-inference-objective"]] == [
        "interactive",
        "batch",
    ]
    # One session, one stable token, and not the pupil's id.
    assert tier1["x-session-id"] == tier2["x-session-id"]
    assert "ada" not in tier1["x-session-id"]


def test_objective_is_configurable_per_model(start_gateway, engines, tmp_path):
    box, district = engines(), engines()
    config = {
        "upstreams": {"district": {"zone": "district", "urls": [district.base_url]}},
        "models": {TIER1: {"objective": "batch"}},
    }
    gw = start_gateway(APPLIANCE_CONFIG=write_config(tmp_path, config), APPLIANCE_LLM_URL=box.base_url)
    box.fail("503")
    assert chat(gw).headers["x-appliance-target"] == "district"
    assert district.seen[0].headers["x-gateway-inference-objective"] == "batch"


@pytest.fixture(scope="module")
def district_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A district's own certificate authority: a self-signed certificate for 127.0.0.1, and its key."""
    return self_signed_certificate(tmp_path_factory.mktemp("district-ca"))


def test_a_district_behind_its_own_ca_is_trusted_only_with_its_ca_file(
    start_gateway, engines, bg_loop, district_ca, tmp_path
):
    cert, key = district_ca
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    box = engines()
    district = bg_loop.run(OpenAIUpstream("vllm", LOCAL_MODELS).start(tls=tls))
    box.fail("503")
    try:
        for ca_file, served in ((None, None), (str(cert), "district")):
            upstream = {
                "zone": "district",
                "urls": [district.base_url],
                **({"ca_file": ca_file} if ca_file else {}),
            }
            config = {"upstreams": {"district": upstream}, "models": {TIER1: {"max_zone": "district"}}}
            gw = start_gateway(
                APPLIANCE_CONFIG=write_config(tmp_path, config), APPLIANCE_LLM_URL=box.base_url
            )
            r = chat(gw)
            if served is None:
                assert r.status_code == 503
                assert "TLS handshake failed (CERTIFICATE_VERIFY_FAILED)" in r.json()["error"]["message"]
            else:
                assert r.headers["x-appliance-target"] == served
        assert chat_count(district) == 1
    finally:
        bg_loop.run(district.stop())


# Routes from the file.


def test_a_route_from_the_file_adds_a_model_and_names_each_upstreams_id(start_gateway, engines, tmp_path):
    box, district = engines(models=("school/own-model",)), engines(models=("own-model-d",))
    config = {
        "upstreams": {"district": {"zone": "district", "urls": [district.base_url]}},
        "routes": [
            {
                "name": "school/own",
                "aliases": ["own"],
                "targets": [
                    {"upstream": "district", "model": "own-model-d"},
                    {"upstream": "box", "model": "school/own-model"},
                ],
            }
        ],
    }
    gw = start_gateway(APPLIANCE_CONFIG=write_config(tmp_path, config), APPLIANCE_LLM_URL=box.base_url)
    with gw.http() as http:
        assert "own" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert chat(gw, "own").headers["x-appliance-target"] == "box"  # the box first, whatever the order
    box.fail("503")
    assert chat(gw, "school/own").headers["x-appliance-target"] == "district"
    assert {s.body["model"] for s in box.seen} == {"school/own-model"}
    assert [s.body["model"] for s in district.seen] == ["own-model-d"]


# Configuration errors: one line each, before anything starts.


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"upstreams": {"d": {"zone": "campus", "urls": ["http://10.0.0.1/v1"]}}},
            "invalid setting upstreams.d.zone: Input should be 'box', 'district' or 'cloud'",
        ),
        ({"upstreams": {"d": {"zone": "district", "urls": []}}}, "invalid setting upstreams.d.urls: List"),
        ({"upstreams": {"d": {"zone": "district"}}}, "invalid setting upstreams.d.urls: Field required"),
        (
            {"routes": [{"name": "x", "targets": [{"upstream": "nowhere", "model": "m"}]}]},
            "routes[0] (x): unknown upstream 'nowhere' (declared: box, cloud)",
        ),
        (
            {"upstreams": {"d": {"zone": "district", "urls": ["http://h/v1"], "weight": 2}}},
            "unknown setting 'upstreams.d.weight'",
        ),
        (
            {"upstreams": {"d": {"zone": "district", "urls": ["http://h/v1"], "api_key_env": "NO_SUCH_KEY"}}},
            "environment variable NO_SUCH_KEY is not set",
        ),
        ({"models": {TIER1: {"max_zone": "moon"}}}, f"invalid setting models.{TIER1}.max_zone"),
        ({"upstreams": {"box": {"zone": "cloud", "urls": ["http://h/v1"]}}}, "must be in zone 'box'"),
    ],
)
def test_configuration_errors_are_one_line(tmp_path, config, message):
    result = run_appliance("--config", write_config(tmp_path, config), "serve")
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


# Pools.


def pool_gateway(start_gateway, *sims: OpenAIUpstream, **settings: str):
    return start_gateway(
        APPLIANCE_LLM_URL=",".join(s.base_url for s in sims),
        APPLIANCE_BREAKER_PROBE_INTERVAL="0.2",
        APPLIANCE_OVERLOAD_POLL_INTERVAL="0.2",
        **settings,
    )


def chat_count(sim: OpenAIUpstream) -> int:
    return sum(1 for s in sim.seen if s.path.endswith("/chat/completions"))


def test_a_pool_shares_load_evenly(start_gateway, engines):
    a, b = engines(), engines()
    for sim in (a, b):
        sim.fail("slow", delay=0.05)
    gw = pool_gateway(start_gateway, a, b)
    assert all(r.status_code == 200 for r in chats(gw, 80))
    counts = chat_count(a), chat_count(b)
    assert sum(counts) == 80
    assert min(counts) >= 0.8 * max(counts), counts


def test_a_pool_prefers_the_engine_with_the_shorter_queue(start_gateway, engines):
    a, b = engines(), engines()
    a.waiting = 12  # another gateway's requests queue on a
    gw = pool_gateway(start_gateway, a, b)
    time.sleep(1)  # a load poll or two
    for _ in range(6):
        assert chat(gw).status_code == 200
    assert (chat_count(a), chat_count(b)) == (0, 6)


def test_ties_are_taken_in_turn_not_by_the_first_url(start_gateway, engines):
    sims = [engines(), engines(), engines()]
    gw = pool_gateway(start_gateway, *sims)
    for _ in range(9):
        chat(gw)
    assert [chat_count(s) for s in sims] == [3, 3, 3]


def test_a_dead_pool_member_is_skipped_then_used_again_after_it_recovers(start_gateway, engines):
    a, b = engines(), engines()
    gw = pool_gateway(start_gateway, a, b)
    a.fail("503")
    a.healthy = False
    assert all(r.status_code == 200 for r in (chat(gw) for _ in range(10)))  # never fails a request
    urls = gw.readyz().json()["checks"]["llm"]["targets"]["box"]["urls"]
    assert [u["breaker"] for u in urls] == ["open", "closed"]
    tried = chat_count(a)
    assert tried in (3, 6)  # the breaker's threshold of three requests (each may retry a blip once)
    for _ in range(4):
        assert chat(gw).status_code == 200
    assert chat_count(a) == tried
    a.clear()
    a.healthy = True
    time.sleep(1)  # a probe or two
    for _ in range(6):
        chat(gw)
    assert chat_count(a) > tried


def test_a_session_stays_on_one_engine(start_gateway, engines):
    a, b = engines(), engines()
    gw = pool_gateway(start_gateway, a, b, APPLIANCE_SESSION_HEADER="x-conversation")
    for _ in range(6):
        chat(gw, user="essay-42")
    assert sorted((chat_count(a), chat_count(b))) == [0, 6]
    before = chat_count(a), chat_count(b)
    for _ in range(6):
        chat(gw, headers={"x-conversation": "essay-43"})
    after = chat_count(a) - before[0], chat_count(b) - before[1]
    assert sorted(after) == [0, 6]
    for _ in range(6):  # no session: shared
        chat(gw)
    assert min(chat_count(a), chat_count(b)) >= 3


def test_a_session_moves_when_its_engine_fails(start_gateway, engines):
    a, b = engines(), engines()
    gw = pool_gateway(start_gateway, a, b)
    chat(gw, user="essay-7")
    home, other = (a, b) if chat_count(a) else (b, a)
    home.fail("503")
    for _ in range(5):
        assert chat(gw, user="essay-7").status_code == 200
    assert chat_count(other) == 5


def test_a_pool_of_engines_serving_different_models_sends_each_name_to_its_engine(start_gateway, engines):
    """A multi-GPU box (`appliance plan --gpu-memory 24,24,24`): the 4B on one card, the 30B on two."""
    small, big = engines(models=(LOCAL_MODELS[0],)), engines(models=(LOCAL_MODELS[1],))
    gw = pool_gateway(start_gateway, big, small)
    for _ in range(3):
        assert chat(gw, TIER1).headers["x-appliance-target"] == "box"
        assert chat(gw, TIER2).headers["x-appliance-target"] == "box"
    assert [s.body["model"] for s in small.seen] == [LOCAL_MODELS[0]] * 3
    assert [s.body["model"] for s in big.seen] == [LOCAL_MODELS[1]] * 3


# The real vLLM Router as a district's engine.


@pytest.fixture
def vllm_router(engines, tmp_path) -> Iterator[tuple[str, list[OpenAIUpstream]]]:
    """`vllm-router` (PyPI) in front of two simulated vLLM engines; yields its /v1 URL and the engines."""
    exe = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
    workers = [engines(), engines()]
    port = free_port()
    cmd = [
        exe,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--worker-urls", *(w.url for w in workers),
        "--policy", "consistent_hash",  # sessions by X-Session-ID, as a district would run it
        "--log-level", "warning",
    ]  # fmt: skip
    log = open(tmp_path / "vllm-router.log", "wb")  # noqa: SIM115 - the router writes to it until stopped
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "vllm-router.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vllm-router did not become healthy"
            time.sleep(0.1)
        yield url + "/v1", workers
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def router_gateway(start_gateway, tmp_path, box, district_url, cloud, max_zone=None):
    config = {
        "upstreams": {"district": {"zone": "district", "urls": [district_url], "health_path": "/health"}},
        "models": {TIER1: {"max_zone": max_zone}} if max_zone else {},
    }
    return start_gateway(
        APPLIANCE_CONFIG=write_config(tmp_path, config),
        APPLIANCE_LLM_URL=box.base_url,
        NVIDIA_NIM_BASE_URL=cloud.base_url,
        NVIDIA_NIM_API_KEY=CLOUD_KEY,
    )


def test_the_vllm_router_serves_as_the_district_tier(start_gateway, engines, vllm_router, tmp_path):
    district_url, workers = vllm_router
    box, cloud = engines(), engines("cloud", CLOUD_MODELS, api_key=CLOUD_KEY)
    gw = router_gateway(start_gateway, tmp_path, box, district_url, cloud)
    box.fail("reset")  # the box's engine fails: every request fails over to the district
    replies = [chat(gw, user=f"pupil-{i}") for i in range(16)]
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert {r.headers["x-appliance-target"] for r in replies} == {"district"}
    counts = [chat_count(w) for w in workers]
    assert sum(counts) == 16 and min(counts) > 0, counts  # the router spread them over both engines
    assert cloud.seen == []
    # The router passed the district headers through to the engines; its session hash kept one
    # conversation on one engine.
    seen = [s for w in workers for s in w.seen if s.path.endswith("/chat/completions")]
    assert all(s.headers.get("x-gateway-inference-objective") == "interactive" for s in seen)
    for _ in range(4):
        chat(gw, user="pupil-0")
    holders = [w for w in workers if any(s.body.get("user") == "pupil-0" for s in w.seen)]
    assert len(holders) == 1


def test_a_box_ceiling_keeps_requests_from_the_router_and_the_cloud(
    start_gateway, engines, vllm_router, tmp_path
):
    district_url, workers = vllm_router
    box, cloud = engines(), engines("cloud", CLOUD_MODELS, api_key=CLOUD_KEY)
    gw = router_gateway(start_gateway, tmp_path, box, district_url, cloud, max_zone="box")
    box.fail("reset")
    assert chat(gw).status_code == 503
    assert [chat_count(w) for w in workers] == [0, 0]
    assert cloud.seen == []
