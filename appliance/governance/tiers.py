"""Tiers: named sets of rate limits and quotas a key is given. Any limit left out is unlimited.

The defaults are NVIDIA's cloud tiers (free, standard, enterprise), so one table describes both the
school's client keys and the NVIDIA key's own budget (`NVIDIA_NIM_TIER`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pydantic import BaseModel, ConfigDict, Field

RATE_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "audio_seconds_per_minute",
    "characters_per_minute",
)
QUOTA_FIELDS = (
    "tokens_per_day",
    "audio_seconds_per_day",
    "characters_per_day",
    "tokens_per_month",
    "audio_seconds_per_month",
    "characters_per_month",
)


class TierConfig(BaseModel):
    """One tier as written in the YAML file (`tiers: {NAME: {...}}`)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    audio_seconds_per_minute: float | None = Field(None, ge=0)
    characters_per_minute: int | None = Field(None, ge=0)
    tokens_per_day: int | None = Field(None, ge=0)
    audio_seconds_per_day: float | None = Field(None, ge=0)
    characters_per_day: int | None = Field(None, ge=0)
    tokens_per_month: int | None = Field(None, ge=0)
    audio_seconds_per_month: float | None = Field(None, ge=0)
    characters_per_month: int | None = Field(None, ge=0)


@dataclass(frozen=True)
class Tier:
    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    audio_seconds_per_minute: float | None = None
    characters_per_minute: int | None = None
    tokens_per_day: int | None = None
    audio_seconds_per_day: float | None = None
    characters_per_day: int | None = None
    tokens_per_month: int | None = None
    audio_seconds_per_month: float | None = None
    characters_per_month: int | None = None

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, f) is None for f in (*RATE_FIELDS, *QUOTA_FIELDS))

    def to_dict(self) -> dict[str, float | int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


# NVIDIA's published API tiers: Free 10 requests and 10,000 tokens a minute, Standard 100 and 100,000,
# Enterprise unlimited.
DEFAULT_TIERS: dict[str, Tier] = {
    "free": Tier("free", requests_per_minute=10, tokens_per_minute=10_000),
    "standard": Tier("standard", requests_per_minute=100, tokens_per_minute=100_000),
    "enterprise": Tier("enterprise"),
}


def resolve_tiers(configured: dict[str, TierConfig]) -> dict[str, Tier]:
    """The defaults, with the configuration's tiers added or replacing them by name."""
    tiers = dict(DEFAULT_TIERS)
    for name, config in configured.items():
        tiers[name] = Tier(name, **config.model_dump())
    return tiers
