"""The client keys the gateway holds in memory, by their hashes.

Rebuilt from the database when `appliance keys` changes it (the gateway polls every second) and from
`APPLIANCE_API_KEYS`. A key keeps its live limits across a rebuild unless its tier changed. Lookup is
one SHA-256 and one dict probe.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import date, datetime, timedelta

from appliance.auth import hash_key
from appliance.governance.clock import Clock
from appliance.governance.keys import ZONES, KeyRecord
from appliance.governance.limits import Allowance, QuotaUsage
from appliance.governance.tiers import Tier


class Principal:
    """Who a request is for: a client key's identity, tier, model list, ceiling and live limits."""

    __slots__ = ("allowance", "expires", "expires_at", "id", "models", "name", "zones")

    def __init__(
        self,
        key_id: int,
        name: str,
        allowance: Allowance,
        models: frozenset[str] | None = None,
        max_zone: str = "cloud",
        expires: str | None = None,
    ) -> None:
        self.id = key_id
        self.name = name
        self.allowance = allowance
        self.models = models
        # The data zones its requests may be served in; None: every zone (a `cloud` ceiling).
        self.zones = None if max_zone == ZONES[-1] else frozenset(ZONES[: ZONES.index(max_zone) + 1])
        self.expires = expires
        self.expires_at = _end_of(expires) if expires else None

    @property
    def tier(self) -> Tier:
        return self.allowance.tier


def _end_of(day: str) -> float:
    """The first moment after an ISO date, local time: a key expiring on a day works through it."""
    return datetime.combine(date.fromisoformat(day) + timedelta(days=1), datetime.min.time()).timestamp()


class Keyring:
    def __init__(self, tiers: dict[str, Tier], default_tier: str, clock: Clock) -> None:
        self.tiers = tiers
        self.default_tier = default_tier
        self.clock = clock
        self.clients: dict[str, Principal] = {}
        self.usage: dict[int, QuotaUsage] = {}  # by key id, kept across rebuilds and tier changes

    def tier(self, name: str | None) -> Tier:
        # A tier removed from the configuration falls back to the default rather than locking a key out.
        return self.tiers.get(name or self.default_tier) or self.tiers[self.default_tier]

    def load(self, records: Iterable[KeyRecord], env_keys: list[str]) -> None:
        old = {p.id: p for p in self.clients.values()}
        clients: dict[str, Principal] = {}
        for i, key in enumerate(env_keys):
            clients[hash_key(key)] = self._principal(old, -(i + 1), f"env-{i + 1}", self.tier(None))
        for record in records:
            principal = self._principal(
                old,
                record.id,
                record.name,
                self.tier(record.tier),
                frozenset(record.models) if record.models is not None else None,
                record.max_zone,
                record.expires,
            )
            clients[record.digest] = principal
        self.clients = clients

    def _principal(
        self,
        old: dict[int, Principal],
        key_id: int,
        name: str,
        tier: Tier,
        models: frozenset[str] | None = None,
        max_zone: str = "cloud",
        expires: str | None = None,
    ) -> Principal:
        previous = old.get(key_id)
        if previous is not None and previous.tier == tier:
            allowance = previous.allowance
        else:
            usage = self.usage.get(key_id)
            if usage is None:
                usage = self.usage[key_id] = QuotaUsage(self.clock)
            allowance = Allowance(tier, usage)
        return Principal(key_id, name, allowance, models, max_zone, expires)

    def start_usage(
        self, today: dict[int, tuple[int, float, int]], month: dict[int, tuple[int, float, int]]
    ) -> None:
        """Quota counts so far today and this month, from the ledger, so a restart forgets nothing."""
        for key_id in set(today) | set(month):
            self.usage[key_id] = QuotaUsage(
                self.clock,
                [float(v) for v in today.get(key_id, (0, 0, 0))],
                [float(v) for v in month.get(key_id, (0, 0, 0))],
            )

    def client(self, token: str) -> Principal | None:
        return self.clients.get(hash_key(token))

    @staticmethod
    def expired(principal: Principal) -> bool:
        return principal.expires_at is not None and time.time() >= principal.expires_at
