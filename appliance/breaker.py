"""A circuit breaker per upstream target.

After `threshold` consecutive failures the target is skipped at once (no connect wait) and a
background probe checks it every `probe_interval` seconds. When the probe succeeds the breaker lets
traffic through again, but one more failure opens it straight away (half-open).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from enum import StrEnum

from appliance.log import event


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        threshold: int,
        probe_interval: float,
        probe: Callable[[], Awaitable[bool]],
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.probe_interval = probe_interval
        self._probe = probe
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def allows(self) -> bool:
        return self.state is not BreakerState.OPEN

    def success(self) -> None:
        if self.state is not BreakerState.CLOSED:
            event("breaker closed", target=self.name)
        self.state = BreakerState.CLOSED
        self.failures = 0

    def failure(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self._open()

    def _open(self) -> None:
        if self.state is not BreakerState.OPEN:
            event("breaker open", target=self.name, failures=self.failures, reason=self.last_error)
        self.state = BreakerState.OPEN
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._probe_until_healthy())

    async def _probe_until_healthy(self) -> None:
        while self.state is BreakerState.OPEN:
            await asyncio.sleep(self.probe_interval)
            try:
                healthy = await self._probe()
            except Exception:  # a probe that cannot even run counts as unhealthy
                healthy = False
            if healthy:
                self.state = BreakerState.HALF_OPEN
                event("breaker half-open", target=self.name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def status(self) -> dict[str, object]:
        return {
            "breaker": self.state.value,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
        }
