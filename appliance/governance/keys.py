"""Client keys as records: who owns them (school, group, app), their tier, the models they may use,
how far their requests may travel, and when they expire. Validation lives here, once, for the CLI
and the store alike (key names: `appliance.auth.check_key_name`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

# Where a key's requests may be served, nearest first. `district` (a district's shared engines) serves
# like `box` until such upstreams exist: nothing leaves the box below `cloud`.
ZONES = ("box", "district", "cloud")
LABEL_MAX = 64


class KeyInputError(ValueError):
    """Bad key input; the message is one line naming what is wrong."""


def validate_label(kind: str, value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > LABEL_MAX or not value.isprintable():
        raise KeyInputError(f"invalid {kind} label: 1-{LABEL_MAX} printable characters")
    return value


def validate_zone(zone: str) -> str:
    if zone not in ZONES:
        raise KeyInputError(f"invalid zone {zone!r}: one of {', '.join(ZONES)}")
    return zone


def parse_expiry(text: str | None, today: date | None = None) -> str | None:
    """An ISO date (YYYY-MM-DD) not in the past, or None. The key works through that day."""
    if text is None or text == "":
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise KeyInputError(f"invalid expiry {text!r}: give a date as YYYY-MM-DD") from None
    if day < (today or date.today()):
        raise KeyInputError(f"expiry {text} is in the past")
    return day.isoformat()


@dataclass(frozen=True)
class KeyRecord:
    """One client key as stored. `models` None means every model; `digest` is the secret's hash."""

    id: int
    name: str
    digest: str
    tier: str | None = None
    school: str | None = None
    group: str | None = None
    app: str | None = None
    models: tuple[str, ...] | None = None
    max_zone: str = "cloud"
    created: float = 0.0
    last_used: float | None = None
    expires: str | None = None  # ISO date, inclusive
    revoked: float | None = None

    def public(self) -> dict[str, Any]:
        """What may be shown: everything but the digest."""
        return {
            "name": self.name,
            "tier": self.tier,
            "school": self.school,
            "group": self.group,
            "app": self.app,
            "models": list(self.models) if self.models is not None else None,
            "max_zone": self.max_zone,
            "created": self.created,
            "last_used": self.last_used,
            "expires": self.expires,
            "revoked": self.revoked,
        }
