"""The admin console's server time per page with a year of ledger rows for 200 keys.

    python -m tests.bench.console [--keys 200] [--days 365] [--hours 8] [--rounds 5]

Fills a fresh database through the governance store (each key active `--hours` hours a day, half of
them on two models), starts `appliance serve` on it, signs in, fetches every page `--rounds` times, and
reports the gateway's own time per request from its access log (`latency_ms`): server time, without
the client or the network. A first round, not counted, runs while the gateway sums the earlier days
(at start-up, in the background).
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

from appliance.auth import hash_key
from appliance.governance.store import COUNTERS, Store, database_path
from tests.console import PAGES, console_settings, signed_in
from tests.harness import Gateway, clean_env

MODELS = ("nvidia/nemotron-mini-4b-instruct", "nvidia/nemotron-3-nano-30b-a3b")


def fill(data_dir: Path, keys: int, days: int, hours: int) -> int:
    """A year of ledger rows, written as the ledger writes them (one batch per day)."""
    store = Store(database_path(data_dir))
    ids = [
        store.add_key(
            f"app-{n:03d}",
            hash_key(f"secret-{n}"),
            school=f"School {n % 5}",
            group=f"class-{n % 20}",
            app=f"app{n % 10}",
        ).id
        for n in range(keys)
    ]
    today, rows = date.today(), 0
    for back in range(days):
        day = (today - timedelta(days=back)).isoformat()
        batch = {}
        for key_id in ids:
            for model in MODELS[: 1 + key_id % 2]:
                for hour in range(8, 8 + hours):
                    counts = [0.0] * len(COUNTERS)
                    counts[0], counts[4], counts[5], counts[8] = 12, 3000, 1500, 11  # requests, tokens, box
                    counts[9], counts[10] = 1, 1  # one by the cloud, after a local failure
                    batch[(key_id, model, day, hour)] = counts
        store.write_usage(batch, {})
        rows += len(batch)
    store.close()
    return rows


def server_times(log: str, count: int) -> list[float]:
    """The gateway's time for the last `count` console requests, in the order they were made."""
    pattern = re.compile(r'"path":"/admin/[^"]*","status":200,"latency_ms":([0-9.]+)')
    return [float(m) for m in pattern.findall(log)][-count:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--hours", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.monotonic()
        rows = fill(root / "data", args.keys, args.days, args.hours)
        print(f"{rows:,} rows for {args.keys} keys, {args.days} days ({time.monotonic() - started:.0f} s)")
        env = clean_env(
            APPLIANCE_DATA_DIR=str(root / "data"), APPLIANCE_GPU_REFRESH_INTERVAL="0", **console_settings()
        )
        gw = Gateway(env, root / "gateway.log").start()
        try:
            client, _ = signed_in(gw)
            for page in PAGES:  # a first round, not counted, while the gateway sums the earlier days
                assert client.get(page).status_code == 200, page
            time.sleep(15)  # the sums take a few seconds on a busy machine
            for _ in range(args.rounds):
                for page in PAGES:
                    assert client.get(page).status_code == 200, page
        finally:
            gw.stop()
        log = gw.logs()
    times = server_times(log, len(PAGES) * args.rounds)
    print(f"{'page':28} {'median ms':>10} {'max ms':>8}  every round (server time)")
    for n, page in enumerate(PAGES):
        mine = times[n :: len(PAGES)]
        each = " ".join(f"{t:.0f}" for t in mine)
        print(f"{page:28} {statistics.median(mine):10.1f} {max(mine):8.1f}  {each}")


if __name__ == "__main__":
    main()
