"""The usage ledger: counts per key, public model, day and hour, kept in memory on the hot path and
written to the database in batches by a background task (never a write per request).

A crash loses at most the counts of one flush interval (`APPLIANCE_USAGE_FLUSH_INTERVAL`, 2 s by
default); shutdown flushes. When the database cannot be written (locked, disk full), the batch stays in
memory, merged with newer counts, up to `PENDING_CAP` rows, and is retried at the next flush.
Rows older than the retention period are deleted once a day.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from datetime import date, timedelta

from appliance.governance.clock import Clock
from appliance.governance.store import COUNTERS, Store, UsageKey
from appliance.log import event

PENDING_CAP = 100_000  # distinct (key, model, hour) rows held while the database cannot be written
INDEX = {name: i for i, name in enumerate(COUNTERS)}
REQUESTS, ERRORS_CLIENT, ERRORS_LIMITED, ERRORS_SERVER = (INDEX[n] for n in COUNTERS[:4])
PROMPT, COMPLETION, AUDIO, CHARACTERS = (INDEX[n] for n in COUNTERS[4:8])
BOX, CLOUD, ON_FAILURE, ON_OVERLOAD = (INDEX[n] for n in COUNTERS[8:])


class Ledger:
    def __init__(self, store: Store, clock: Clock, flush_interval: float, retention_days: int) -> None:
        self.store = store
        self.clock = clock
        self.flush_interval = flush_interval
        self.retention_days = retention_days
        self.rows: dict[UsageKey, list[float]] = {}
        self.last_used: dict[int, float] = {}
        self.problem: str | None = None  # the last write error, until a write succeeds
        self.dropped = 0
        self.pruned_on: str | None = None
        self._task: asyncio.Task[None] | None = None

    def record(
        self,
        key_id: int,
        model: str,
        status: int,
        zone: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        audio_seconds: float,
        characters: int,
        cloud_reason: str | None,
    ) -> None:
        clock = self.clock
        row_key = (key_id, model, clock.day, clock.hour)
        row = self.rows.get(row_key)
        if row is None:
            row = self.rows[row_key] = [0] * len(COUNTERS)
        row[REQUESTS] += 1
        if status >= 400:
            row[ERRORS_LIMITED if status == 429 else ERRORS_SERVER if status >= 500 else ERRORS_CLIENT] += 1
        row[PROMPT] += prompt_tokens
        row[COMPLETION] += completion_tokens
        row[AUDIO] += audio_seconds
        row[CHARACTERS] += characters
        if zone == "cloud":
            row[CLOUD] += 1
            row[ON_OVERLOAD if cloud_reason == "overload" else ON_FAILURE] += 1
        elif zone is not None:  # the box, or the district's engines (inside the district's boundary)
            row[BOX] += 1
        self.last_used[key_id] = time.time()

    # Background.

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self.clock.tick()
            await self.flush()
            if self.pruned_on != self.clock.day:
                await self.prune()

    async def flush(self) -> None:
        if not self.rows:
            return
        rows, last_used = self.rows, self.last_used
        self.rows, self.last_used = {}, {}
        try:
            await asyncio.to_thread(self.store.write_usage, rows, last_used)
        except (sqlite3.Error, OSError) as exc:
            self._keep(rows, last_used)
            self._report(f"cannot write the usage ledger: {exc}")
            return
        if self.problem is not None:
            event("usage ledger written again", pending_rows=len(rows))
            self.problem = None

    def _keep(self, rows: dict[UsageKey, list[float]], last_used: dict[int, float]) -> None:
        """Merge a batch that could not be written back under the newer counts, up to the cap."""
        for row_key, counts in rows.items():
            row = self.rows.get(row_key)
            if row is not None:
                for i, value in enumerate(counts):
                    row[i] += value
            elif len(self.rows) < PENDING_CAP:
                self.rows[row_key] = counts
            else:
                self.dropped += int(counts[REQUESTS])
        for key_id, at in last_used.items():
            self.last_used[key_id] = max(at, self.last_used.get(key_id, 0.0))

    def _report(self, problem: str) -> None:
        if self.problem is None:  # logged once per episode, not once per flush
            event(
                "usage ledger not written", level=40, error=problem, action="check the data directory's disk"
            )
        self.problem = problem

    async def prune(self) -> None:
        cutoff = (date.fromisoformat(self.clock.day) - timedelta(days=self.retention_days)).isoformat()
        try:
            deleted = await asyncio.to_thread(self.store.prune, cutoff)
        except (sqlite3.Error, OSError) as exc:
            self._report(f"cannot prune the usage ledger: {exc}")
            return
        self.pruned_on = self.clock.day
        if deleted:
            event("usage ledger pruned", rows=deleted, before=cutoff)

    def status(self) -> dict[str, object]:
        return {
            "pending_rows": len(self.rows),
            "dropped_requests": self.dropped,
            "retention_days": self.retention_days,
            "error": self.problem,
        }
