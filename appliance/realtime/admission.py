"""Sharing the engine among live sessions: a fair queue for passes, and admission of new sessions.

Each session has at most one pass (partial or final) waiting or running, and passes take the engine's
slots in the order they asked, final passes first, so a busy session cannot starve a quiet one: a
classroom's sessions take turns, and a finished sentence is not kept waiting behind others' previews.
The time passes wait for a slot is the measure of load: while it is above the latency bound, a new
session is refused (an `error` event and a close) instead of slowing every child already dictating.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from appliance.realtime.metrics import FINAL_WAIT, PARTIAL_WAIT, SESSIONS
from appliance.realtime.protocol import ProtocolError

# Weight of the newest wait in the running average: about the last ten passes count.
_SMOOTHING = 0.1


class Admission:
    def __init__(self, max_sessions: int, max_lag: float, engine_slots: int) -> None:
        self.max_sessions = max_sessions
        self.max_lag = max_lag
        self.sessions = 0
        self.buffered: dict[int, int] = {}  # session id -> bytes of audio it holds
        self.lag = 0.0  # running average of the wait for an engine slot, seconds
        self.passes = 0
        self._free = engine_slots
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def admit(self) -> None:
        """Count a new session in, or raise the refusal it gets."""
        if self.sessions >= self.max_sessions:
            raise _busy(
                f"The appliance is serving its limit of {self.max_sessions} live transcription sessions."
            )
        if self._waiting and self.lag > self.max_lag:  # no queue now: the past waits no longer count
            raise _busy(
                f"The appliance is too busy to keep live transcription's latency "
                f"(passes wait {self.lag:.1f} s for the engine)."
            )
        self.sessions += 1
        SESSIONS.inc()

    def leave(self, session: int) -> None:
        self.sessions -= 1
        SESSIONS.dec()
        self.buffered.pop(session, None)
        if self.sessions == 0:
            self.lag = 0.0  # nobody waits any more

    @asynccontextmanager
    async def slot(self, final: bool) -> AsyncIterator[None]:
        """An engine slot for one pass: final passes (a child waits for the completed text) first,
        then partial passes, each kind in the order asked for."""
        asked = time.perf_counter()
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (0 if final else 1, next(self._order), ticket))
            try:
                await ticket
            except asyncio.CancelledError:
                if ticket.done() and not ticket.cancelled():
                    self._release()  # handed a slot just as the session ended: pass it on
                raise
        waited = time.perf_counter() - asked
        (FINAL_WAIT if final else PARTIAL_WAIT).observe(waited)
        self.lag += _SMOOTHING * (waited - self.lag)
        self.passes += 1
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, ticket = heapq.heappop(self._waiting)
            if not ticket.done():
                ticket.set_result(None)
                return
        self._free += 1

    def status(self) -> dict[str, object]:
        return {
            "ready": True,
            "sessions": self.sessions,
            "max_sessions": self.max_sessions,
            "buffered_bytes": sum(self.buffered.values()),
            "engine_wait_s": round(self.lag, 3),
        }


def _busy(message: str) -> ProtocolError:
    return ProtocolError(message + " Try again shortly.", code="busy", type="rate_limit_error", fatal=True)
