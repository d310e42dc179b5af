"""The gateway's cost, measured in one run: the same fast upstream called directly, through the
gateway (one uvicorn worker, same machine), and through the plainest FastAPI + aiohttp relay
(`tests/bench/bare_relay.py`) as a reference, reported as ratios and added latency.

    python -m tests.bench.benchmark [--seconds 5] [--only llm,pool,stt,tts]

Non-streaming chat uses `wrk` (Debian package `wrk`) at 1, 32 and 256 connections; streaming uses
500 concurrent SSE streams from an aiohttp client, measuring time to first token and inter-chunk delay.
Speech-to-text and text-to-speech sections come from `tests/bench/stt.py` and `tests/bench/tts.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import httpx

from tests.harness import CLIENT_KEY, REPO, clean_env, free_port

MODEL = "nvidia/nemotron-mini-4b-instruct"
BODY = '{"model":"' + MODEL + '","messages":[{"role":"user","content":"Is this sentence right?"}]}'
STREAM_BODY = BODY[:-1] + ',"stream":true}'
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


@contextmanager
def process(cmd: list[str], env: dict[str, str], ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(ready_url)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def stack(
    chunks: int, interval: float, data_dir: str | None = None, pids: dict[str, int] | None = None
) -> Iterator[tuple[str, str, str]]:
    """A fast upstream, the gateway and the bare reference relay in front of it; yields their base URLs
    (direct, gateway, bare relay). `pids`, if given, gets the gateway's process id."""
    up, gw, bare = free_port(), free_port(), free_port()
    upstream = [
        sys.executable,
        "-m",
        "tests.bench.upstream",
        str(up),
        "--chunks",
        str(chunks),
        "--interval",
        str(interval),
    ]
    gw_env = clean_env(
        APPLIANCE_API_KEYS=CLIENT_KEY,
        APPLIANCE_LLM_URL=f"http://127.0.0.1:{up}/v1",
        APPLIANCE_DATA_DIR=data_dir or tempfile.mkdtemp(),
    )
    if data_dir is not None:
        gw_env["APPLIANCE_CONFIG"] = str(Path(data_dir) / "appliance.yaml")
    gateway = [sys.executable, "-m", "appliance", "serve", "--port", str(gw)]
    reference = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.bench.bare_relay:app",
        "--port",
        str(bare),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with (
        process(upstream, clean_env(), f"http://127.0.0.1:{up}/v1/models"),
        process(gateway, gw_env, f"http://127.0.0.1:{gw}/healthz") as gateway_proc,
        process(reference, clean_env(UPSTREAM=f"http://127.0.0.1:{up}"), f"http://127.0.0.1:{bare}/healthz"),
    ):
        if pids is not None:
            pids["gateway"] = gateway_proc.pid
        yield f"http://127.0.0.1:{up}/v1", f"http://127.0.0.1:{gw}/v1", f"http://127.0.0.1:{bare}/v1"


def wrk(url: str, connections: int, seconds: float, key: str = CLIENT_KEY) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) for POST /chat/completions."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{BODY}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "1",  # one wrk thread drives far more than the gateway serves; a second would take a core
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            f"{url}/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script.unlink()
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * UNITS[unit]

    return rps, pct("50"), pct("99")


async def streams(url: str, count: int) -> tuple[list[float], list[float]]:
    """Time to first token and inter-chunk gaps (ms) over `count` concurrent streams."""
    ttft: list[float] = []
    gaps: list[float] = []
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def one() -> None:
            started = time.perf_counter()
            async with http.post(f"{url}/chat/completions", data=STREAM_BODY, headers=headers) as resp:
                resp.raise_for_status()
                last = None
                async for chunk in resp.content.iter_any():
                    now = time.perf_counter()
                    if b"data: {" not in chunk:
                        continue
                    if last is None:
                        ttft.append((now - started) * 1000)
                    else:
                        gaps.append((now - last) * 1000)
                    last = now

        await asyncio.gather(*(one() for _ in range(count)))
    return ttft, gaps


def pctl(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100)[int(p) - 1] if len(values) > 1 else values[0]


def llm_benchmark(seconds: float, stream_count: int) -> str:
    rows = [
        "| load | direct req/s | bare relay req/s | gateway req/s | gateway / bare relay "
        "| direct p50 / p99 ms | bare relay adds p50 / p99 ms | gateway adds p50 / p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    interval = 0.05
    with stack(chunks=20, interval=interval) as (direct, gateway, bare):
        for url in (gateway, bare):
            wrk(url, 8, 1)  # warm up connections and code paths
        for connections in (1, 32, 256):
            d_rps, d50, d99 = wrk(direct, connections, seconds)
            b_rps, b50, b99 = wrk(bare, connections, seconds)
            g_rps, g50, g99 = wrk(gateway, connections, seconds)
            rows.append(
                f"| chat, {connections} conn | {d_rps:,.0f} | {b_rps:,.0f} | {g_rps:,.0f} "
                f"| {g_rps / b_rps:.2f} | {d50:.2f} / {d99:.2f} | {b50 - d50:+.2f} / {b99 - d99:+.2f} "
                f"| {g50 - d50:+.2f} / {g99 - d99:+.2f} |"
            )
        d_ttft, d_gaps = asyncio.run(streams(direct, stream_count))
        g_ttft, g_gaps = asyncio.run(streams(gateway, stream_count))
    rows += [
        "",
        f"| {stream_count} concurrent streams (20 chunks, {interval * 1000:.0f} ms apart) | direct | gateway "
        "| added |",
        "| --- | --- | --- | --- |",
    ]
    for name, d, g in (("time to first token", d_ttft, g_ttft), ("inter-chunk delay", d_gaps, g_gaps)):
        for p in (50, 99):
            dv, gv = pctl(d, p), pctl(g, p)
            rows.append(f"| {name} p{p} (ms) | {dv:.2f} | {gv:.2f} | {gv - dv:+.2f} |")
    return "\n".join(rows)


# Limits no benchmark reaches, so that every request pays for the checks and none is refused.
BENCH_TIER = (
    "tiers:\n  bench: {requests_per_minute: 1000000000, tokens_per_minute: 1000000000000, "
    "tokens_per_day: 1000000000000}\n"
)


def tiered_key(data_dir: str) -> str:
    """A key of the `bench` tier in a fresh governance database; its secret."""
    (Path(data_dir) / "appliance.yaml").write_text(BENCH_TIER)
    env = clean_env(APPLIANCE_DATA_DIR=data_dir, APPLIANCE_CONFIG=str(Path(data_dir) / "appliance.yaml"))
    cmd = [sys.executable, "-m", "appliance", "keys", "add", "bench-app", "--tier", "bench"]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.splitlines()[-1]


def hot_path_cpu_us(data_dir: str, key: str, count: int = 20_000) -> dict[str, float]:
    """CPU microseconds per request that governance spends on the hot path, in-process (authenticate,
    admit, the rate-limit headers, finish with the ledger count), for each key. CPU time, not wall
    time, so that other load on the machine does not count."""
    from appliance.catalog import load_catalog
    from appliance.config import load_settings
    from appliance.governance import Governance, Principal
    from appliance.middleware import RequestContext

    settings = load_settings(
        Path(data_dir) / "appliance.yaml", data_dir=data_dir, api_keys=CLIENT_KEY, usage_flush_interval=60
    )
    governance = Governance.open(settings)
    route = load_catalog().route(MODEL)
    assert route is not None
    costs = {}
    for name, secret in (("untiered", CLIENT_KEY), ("tiered", key)):

        def request(secret: str = secret) -> None:
            ctx = RequestContext("bench")
            principal = governance.authenticate(secret)
            assert isinstance(principal, Principal)
            ctx.principal, ctx.model = principal, route.name
            governance.admit(ctx, route, tokens=30)
            if principal.allowance.headers:
                principal.allowance.rate_headers()
            ctx.prompt_tokens, ctx.completion_tokens, ctx.target = 12, 7, "local"
            governance.finish(ctx, 200)

        request()
        started = time.process_time()
        for _ in range(count):
            request()
        costs[name] = (time.process_time() - started) / count * 1e6
    governance.store.close()
    return costs


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def choosing_cost(urls: list[str], calls: int = 200_000) -> float:
    """Microseconds one request spends choosing its targets (`LLMRouter.attempts`) in this process,
    with engines that have answered; no server runs."""
    import timeit

    from appliance.catalog import load_catalog
    from appliance.config import load_settings
    from appliance.routing import LLMRouter

    catalog = load_catalog()
    router = LLMRouter(load_settings(llm_url=",".join(urls)), catalog)
    route = catalog.routes_of_kind("llm")[0]
    for target in router.upstreams["box"].members:
        target.served = set(route.local)
    router._resolve()
    return timeit.timeit(lambda: router.attempts(route), number=calls) / calls * 1e6


def pool_benchmark(seconds: float, rounds: int = 6) -> str:
    """What choosing among a pool's URLs costs: the gateway with one engine URL against the gateway
    with two (a pool: in-flight counts, queue polling, turns), in alternating rounds. Besides req/s,
    the gateway's own CPU time per request: on a shared machine other work moves req/s a lot, and the
    CPU a request costs hardly (one worker's throughput is the inverse of it)."""
    ups = [free_port(), free_port()]
    one, two = free_port(), free_port()
    urls = [f"http://127.0.0.1:{p}/v1" for p in ups]

    def gateway(port: int) -> list[str]:
        return [sys.executable, "-m", "appliance", "serve", "--port", str(port)]

    def env(llm_url: str) -> dict[str, str]:
        return clean_env(
            APPLIANCE_API_KEYS=CLIENT_KEY, APPLIANCE_LLM_URL=llm_url, APPLIANCE_DATA_DIR=tempfile.mkdtemp()
        )

    def measure(url: str, pid: int) -> tuple[float, float]:
        """(req/s, gateway CPU microseconds per request) over one wrk run."""
        cpu = cpu_seconds(pid)
        rps = wrk(url, 32, seconds)[0]
        return rps, (cpu_seconds(pid) - cpu) * 1e6 / (rps * max(1, round(seconds)))

    upstream = [sys.executable, "-m", "tests.bench.upstream"]
    with (
        process([*upstream, str(ups[0])], clean_env(), f"{urls[0]}/models"),
        process([*upstream, str(ups[1])], clean_env(), f"{urls[1]}/models"),
        process(gateway(one), env(urls[0]), f"http://127.0.0.1:{one}/healthz") as single_proc,
        process(gateway(two), env(",".join(urls)), f"http://127.0.0.1:{two}/healthz") as pooled_proc,
    ):
        single = (f"http://127.0.0.1:{one}/v1", single_proc.pid)
        pooled = (f"http://127.0.0.1:{two}/v1", pooled_proc.pid)
        for url, _ in (single, pooled):
            wrk(url, 8, 1)
        rows, cpu_ratios = [], []
        for i in range(rounds):
            order = (single, pooled) if i % 2 == 0 else (pooled, single)
            result = {target: measure(*target) for target in order}
            (one_rps, one_us), (pool_rps, pool_us) = result[single], result[pooled]
            cpu_ratios.append(pool_us / one_us)
            rows.append(
                f"| {i + 1} | {one_rps:,.0f} | {pool_rps:,.0f} | {one_us:.0f} | {pool_us:.0f} "
                f"| {cpu_ratios[-1]:.3f} |"
            )
    one_us, two_us = choosing_cost(urls[:1]), choosing_cost(urls)
    all_cpu = sorted(float(r.split("|")[k]) for r in rows for k in (4, 5))
    per_request = statistics.median(all_cpu)
    return "\n".join(
        [
            f"Choosing the targets: {one_us:.2f} µs with one URL, {two_us:.2f} µs with a pool of two: "
            f"{two_us - one_us:+.2f} µs, {(two_us - one_us) / per_request:.1%} of the gateway's median "
            f"{per_request:.0f} µs of CPU per request below.",
            "",
            "| round (32 conn) | one URL req/s | pool of two req/s | one URL CPU µs/req | pool CPU µs/req "
            "| pool / one (CPU per request) |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            f"| median | | | | | {statistics.median(cpu_ratios):.3f} |",
        ]
    )


def governance_benchmark(seconds: float, rounds: int = 7) -> str:
    """The cost of keys, limits and the ledger: the same gateway, with an untiered key from
    APPLIANCE_API_KEYS (authentication and the ledger only) and with a key whose tier has rate limits
    and a daily quota (every check, and the rate-limit headers). Each round runs both back to back, in
    alternating order, and the figures are medians of the rounds' ratios and differences, so that a
    change in a shared machine's speed hits both sides alike. The gateway's CPU time per request is the
    steadiest figure on a busy machine: other processes' load does not add to it."""
    data_dir = tempfile.mkdtemp()
    key = tiered_key(data_dir)
    rows = [
        "| load | direct req/s | untiered key req/s | tiered key req/s | tiered / untiered (range) "
        "| untiered adds p50 ms | tiered - untiered p50 ms (range) "
        "| gateway CPU per request, untiered / tiered |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    pids: dict[str, int] = {}
    with stack(chunks=20, interval=0.05, data_dir=data_dir, pids=pids) as (direct, gateway, _):

        def measured(connections: int, secret: str) -> tuple[float, float, float]:
            """(requests/s, p50 ms, gateway CPU microseconds per request)."""
            before = cpu_seconds(pids["gateway"])
            rps, p50, _ = wrk(gateway, connections, seconds, secret)
            return rps, p50, (cpu_seconds(pids["gateway"]) - before) / (rps * round(seconds)) * 1e6

        wrk(gateway, 8, 1)
        wrk(gateway, 8, 1, key)
        for connections in (1, 32):
            d_rps, d50, _ = wrk(direct, connections, seconds)
            pairs = []
            for round_ in range(rounds):
                order = (CLIENT_KEY, key) if round_ % 2 == 0 else (key, CLIENT_KEY)
                runs = {k: measured(connections, k) for k in order}
                pairs.append((runs[CLIENT_KEY], runs[key]))
            ratios = [t[0] / u[0] for u, t in pairs]
            added = [t[1] - u[1] for u, t in pairs]
            u_rps, u50, u_cpu = (statistics.median(u[i] for u, _ in pairs) for i in range(3))
            t_rps, t_cpu = (statistics.median(t[i] for _, t in pairs) for i in (0, 2))
            rows.append(
                f"| chat, {connections} conn | {d_rps:,.0f} | {u_rps:,.0f} | {t_rps:,.0f} "
                f"| {statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}) | {u50 - d50:+.3f} "
                f"| {statistics.median(added):+.3f} ({min(added):+.2f} to {max(added):+.2f}) "
                f"| {u_cpu:.0f} / {t_cpu:.0f} us ({t_cpu / u_cpu:.3f}) |"
            )
    cpu = hot_path_cpu_us(data_dir, key)
    rows += [
        "",
        "| in-process, CPU time per request | untiered key | tiered key |",
        "| --- | --- | --- |",
        f"| authenticate, admit, headers, ledger count | {cpu['untiered']:.1f} us | {cpu['tiered']:.1f} us |",
    ]
    return "\n".join(rows)


def sections() -> dict[str, Callable[[argparse.Namespace], str]]:
    from tests.bench.stt import run_stt_benchmark
    from tests.bench.tts import run_tts_benchmark

    return {
        "llm": lambda a: llm_benchmark(a.seconds, a.streams),
        "pool": lambda a: pool_benchmark(a.seconds, a.rounds),
        "governance": lambda a: governance_benchmark(a.seconds),
        "stt": lambda a: run_stt_benchmark(),
        "tts": lambda a: run_tts_benchmark(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5, help="duration of each wrk run")
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (pool)")
    parser.add_argument("--only", default=",".join(sections()), help="comma list of: " + ",".join(sections()))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("benchmark: wrk is not installed (apt-get install wrk)")
    print(f"# Gateway benchmark ({os.cpu_count()} cores, one uvicorn worker)\n")
    for name in args.only.split(","):
        print(f"## {name}\n\n{sections()[name](args)}\n", flush=True)


if __name__ == "__main__":
    main()
