"""Governance as the gateway sees it: who a key is, whether a request may go ahead, and what it used.

Three calls on the hot path, all in memory: `authenticate` (middleware), `admit` (a feature, once it
knows the model and the request's size) and `finish` (middleware, when the response is done). The
database is touched only by background tasks: the key refresh and the ledger's batched writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from typing import TYPE_CHECKING

from appliance.auth import AdminKeys, hash_key
from appliance.errors import APIError
from appliance.governance.budget import CloudBudget
from appliance.governance.clock import Clock
from appliance.governance.keyring import Keyring, Principal
from appliance.governance.ledger import Ledger
from appliance.governance.store import Store, open_store
from appliance.governance.tiers import resolve_tiers
from appliance.log import event

if TYPE_CHECKING:
    from appliance.catalog import Route
    from appliance.config import Settings
    from appliance.middleware import RequestContext

REFRESH_SECONDS = 1.0  # how often the gateway looks for key changes (they apply within two seconds)
BYTES_PER_TOKEN = 4  # an up-front token estimate from the request's size; corrected from `usage`


def estimate_tokens(body_bytes: int, max_tokens: object) -> int:
    return body_bytes // BYTES_PER_TOKEN + (max_tokens if isinstance(max_tokens, int) else 0)


class Governance:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.clock = Clock()
        self.keyring = Keyring(resolve_tiers(settings.tiers), settings.default_tier, self.clock)
        self.ledger = Ledger(store, self.clock, settings.usage_flush_interval, settings.usage_retention_days)
        self.cloud_budget = CloudBudget.configured(
            settings.nvidia_nim_tier, settings.nvidia_nim_rpm, settings.nvidia_nim_tpm
        )
        self.problem: str | None = None  # the key refresh's last error
        self._version: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._env_keys = settings.client_keys
        # The admin identity: APPLIANCE_ADMIN_KEY's hash and the stored one from `appliance admin-key`.
        self._admin_setting = [hash_key(key) for key in settings.admin_keys]
        self.admin_keys = AdminKeys(self._admin_setting)
        first_of_month = self.clock.month + "-01"
        self.keyring.start_usage(store.usage_since(self.clock.day), store.usage_since(first_of_month))
        self._load()

    @classmethod
    def open(cls, settings: Settings) -> Governance:
        """Raises StoreError when the database cannot be used."""
        store = open_store(settings.data_dir, settings.resolved_keys_file)
        if store.imported:
            event("keys file imported", path=str(settings.resolved_keys_file), keys=store.imported)
        for problem in store.import_problems:
            event("keys file problem", logging.WARNING, problem=problem, using="its valid keys")
        return cls(settings, store)

    @property
    def configured(self) -> bool:
        return bool(self.keyring.clients)

    def _load(self) -> None:
        """Read keys from the database (on a worker thread once serving)."""
        version = self.store.data_version()
        records = self.store.keys()
        stored = self.store.admin_digest()
        self.keyring.load(records, self._env_keys)
        self.admin_keys.replace([*self._admin_setting, *([stored] if stored else [])])
        self._version = version

    def reload_keys(self) -> None:
        """Load the keys now, after a change through this gateway's own connection (the console):
        `PRAGMA data_version` only notices other connections' commits. Call it on a worker thread."""
        self._load()

    # The hot path.

    def authenticate(self, token: str) -> Principal | APIError:
        principal = self.keyring.client(token)
        if principal is None:
            return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        if self.keyring.expired(principal):
            return APIError(401, f"This API key expired on {principal.expires}.", code="expired_api_key")
        return principal

    def is_admin(self, token: str) -> bool:
        return self.admin_keys.verify(token)

    def admit(
        self,
        ctx: RequestContext,
        route: Route,
        tokens: int = 0,
        characters: int = 0,
        audio: bool = False,
        audio_seconds: float = 0.0,
        requests: int = 1,
    ) -> None:
        """May this key use this model, now, for a request of this size? Raises the 403 or 429 if not."""
        principal = ctx.principal
        if principal is None:
            return
        self.require_model(principal, route)
        principal.allowance.admit(self.clock, tokens, characters, audio, audio_seconds, requests)
        ctx.estimated_tokens = tokens

    @staticmethod
    def require_model(principal: Principal | None, route: Route) -> None:
        """Raises the 403 when the key may not use the route's model."""
        if principal is not None and principal.models is not None and route.name not in principal.models:
            raise APIError(
                403,
                f"This API key may not use the model '{route.name}'; ask the appliance's administrator.",
                param="model",
                code="model_not_allowed",
            )

    def admit_session(self, ctx: RequestContext) -> None:
        """A live session's start: one request, and some audio allowance left. Its model is checked
        when the session names it and at each turn (`admit` with the turn's seconds, `requests=0`)."""
        if ctx.principal is not None:
            ctx.principal.allowance.admit(self.clock, audio=True)

    def finish(self, ctx: RequestContext, status: int) -> None:
        """Correct the limits with what was used and count the request in the ledger."""
        principal = ctx.principal
        if principal is None or ctx.model is None:
            return
        prompt = ctx.prompt_tokens or 0
        completion = ctx.completion_tokens or 0
        ok = status < 400
        characters = ctx.characters if ok else 0
        principal.allowance.settle(ctx.estimated_tokens, prompt + completion, ctx.audio_seconds, characters)
        # Where it was served: the target's data zone (speech is served on the box, without one).
        zone = ctx.zone or ("box" if ctx.target is not None else None)
        if zone == "cloud":
            self.cloud_budget.correct(ctx.estimated_tokens, prompt + completion)
        self.ledger.record(
            principal.id,
            ctx.model,
            status,
            zone if ok else None,
            prompt,
            completion,
            ctx.audio_seconds,
            characters,
            ctx.cloud_reason,
        )

    # Background.

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refresh_keys())
        await self.ledger.start()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.ledger.stop()
        self.store.close()

    async def _refresh_keys(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                if await asyncio.to_thread(self.store.data_version) != self._version:
                    await asyncio.to_thread(self._load)
                    event("keys reloaded", keys=len(self.keyring.clients))
            except (sqlite3.Error, OSError) as exc:
                # Authentication goes on with the keys last loaded.
                if self.problem is None:
                    event("keys not reloaded", level=40, error=str(exc))
                self.problem = str(exc)
                continue
            self.problem = None

    def readiness(self) -> dict[str, object]:
        return {
            "ready": True,  # serving never depends on the database
            "keys": len(self.keyring.clients),
            "keys_error": self.problem,
            "ledger": self.ledger.status(),
            "cloud_budget": self.cloud_budget.status(),
        }
