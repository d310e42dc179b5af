"""The day, hour and month the ledger and quotas count in (local time), recomputed once an hour."""

from __future__ import annotations

import time
from datetime import date, timedelta


class Clock:
    """Today's date, hour and month for the ledger and quotas, recomputed once an hour (local time)
    rather than per request."""

    __slots__ = ("_next", "day", "hour", "month")

    def __init__(self) -> None:
        self._next = 0.0
        self.tick()

    def tick(self) -> None:
        now = time.time()
        if now < self._next:
            return
        local = time.localtime(now)
        self.day = time.strftime("%Y-%m-%d", local)
        self.month = self.day[:7]
        self.hour = local.tm_hour
        self._next = now - local.tm_min * 60 - local.tm_sec - (now % 1) + 3600

    def next_day(self) -> str:
        return (date.fromisoformat(self.day) + timedelta(days=1)).isoformat()

    def next_month(self) -> str:
        first = date.fromisoformat(self.month + "-01")
        return (first + timedelta(days=32)).replace(day=1).isoformat()
