"""Who may use what, how much, and where it went: client keys with owners and tiers, rate limits and
quotas, the cloud budget, and the usage ledger, kept in one SQLite store. Never request content.

Modules: `tiers` (limits by name), `keys` (key records, validation), `store` (the database), `keyring`
(keys in memory), `limits` (buckets, quotas), `budget` (the NVIDIA key's), `ledger` (batched usage),
`service` (the gateway's three calls), `admin_api` and `commands` (the admin's HTTP and CLI sides).
The package itself imports nothing eagerly, so `appliance.config` can read `tiers` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.governance.keyring import Principal
    from appliance.governance.service import Governance
    from appliance.governance.store import StoreError

__all__ = ["Governance", "Principal", "StoreError"]
_WHERE = {"Governance": "service", "Principal": "keyring", "StoreError": "store"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    from importlib import import_module

    return getattr(import_module(f"appliance.governance.{_WHERE[name]}"), name)
